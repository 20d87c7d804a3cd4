"""A run in one file: `--config FILE` (YAML or JSON) gives any of a command's options, and every output folder (a
cache, a student, a sweep) writes kdcache_config.yaml, which reruns it. Written in the spirit of transformers'
HfArgumentParser (a JSON or YAML file of the same fields as the flags) and timm's args.yaml (the file beside every
run). A config's keys are the options' field names (learning_rate, or learning-rate), its values as the command
line takes them, a list where a flag takes a comma-separated list or is repeated. Its relative paths are relative
to the file's own folder, so a config written into an output folder reruns it from anywhere and names no folder
above the tree it shares with its inputs (nothing private is published with it).

The command line's side (reading the file before the flags, the flags winning) is kdcache.cli's `ConfigCommand`;
this module reads and writes the files and says what a dataclass of options holds as the command line took it."""

import json
import os
from dataclasses import fields
from pathlib import Path

from kdcache.errors import KdcacheError, first_line

CONFIG_FILE = "kdcache_config.yaml"
# The parameters of type str that take a hub id or a local folder: a relative path among them is read relative to
# the config's folder, like every parameter of type Path (a cache may also be an address: s3://..., hf://...).
PATH_OR_ID = ("dataset", "teacher", "student", "extra_images", "models", "cache")


def read_config(path: str | Path) -> dict:
    """The mapping in the YAML or JSON file at `path`, its keys as field names ('-' read as '_'); an unreadable or
    malformed file is one line naming it."""
    content = read_yaml_or_json(path, "--config")
    if content is None:
        return {}
    if not isinstance(content, dict):
        raise KdcacheError(f"--config '{path}' must map option names to values, e.g. 'learning_rate: 0.001'")
    return {str(key).replace("-", "_"): value for key, value in content.items()}


def read_yaml_or_json(path: str | Path, flag: str):
    """What the file given as `flag` holds, read as JSON if its name ends in .json, else as YAML; a file that cannot be
    read or parsed is one line naming the flag and the file (--config, the sweep's --space)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as error:
        raise KdcacheError(
            f"{flag} '{path}' cannot be read ({error.strerror or error}); give a YAML or JSON file"
        ) from None
    try:
        if path.suffix.lower() == ".json":
            return json.loads(text)
        import yaml

        return yaml.safe_load(text)
    except Exception as error:  # yaml and json raise several kinds, each with the line and column
        kind = "JSON" if path.suffix.lower() == ".json" else "YAML"
        raise KdcacheError(f"{flag} '{path}' is not valid {kind} ({first_line(error)})") from None


def write_config(folder: Path, command: str, values: dict, home: Path | None = None) -> None:
    """Write `folder`/kdcache_config.yaml: `kdcache COMMAND --config` with it reruns what made `folder`. `values`:
    {parameter: value as the command line takes it}; local paths (Path values, and those of PATH_OR_ID that are
    local) are written relative to `home`, the folder where the file will be read (`folder`, unless it is written
    before being moved into place; kdcache.options.config.portable)."""
    import yaml

    home = home or folder
    written = {"command": command}
    for name, value in values.items():
        always = isinstance(value, Path) or _paths(value)
        written[name] = portable(value, home, always) if name in PATH_OR_ID or always else value
    header = f"# kdcache {command} --config {CONFIG_FILE} reruns this; relative paths are relative to this file\n"
    partial = Path(folder) / f"{CONFIG_FILE}.{os.getpid()}.tmp"  # several processes of a sweep may write it at once
    partial.write_text(header + yaml.safe_dump(written, sort_keys=False, allow_unicode=True))
    partial.replace(Path(folder) / CONFIG_FILE)


def _paths(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(item, Path) for item in value)


def portable(value, folder: Path, always: bool = False):
    """How a written config names an input: a hub id as it is; a local path (always one with `always`, else when it
    exists, is absolute or starts with '.' or '~', as the loaders decide) relative to `folder` when the two share a
    folder below the filesystem's root, else absolute (kdcache.hub leaves such a config out of a push). Lists:
    each item."""
    if isinstance(value, (list, tuple)):
        return [portable(item, folder, always) for item in value]
    if value is None or not (always or is_local(str(value))):
        return value
    path = Path(os.path.abspath(Path(value).expanduser()))  # a link kept as given, not resolved
    home = Path(os.path.abspath(folder))
    common = Path(os.path.commonpath([path, home]))
    if common == Path(common.anchor):
        return str(path)
    return Path(os.path.relpath(path, home)).as_posix()


def is_local(name_or_path: str) -> bool:
    """Whether the loaders take `name_or_path` as a local path rather than a hub id: a path that exists, or one
    written as a path (absolute, or starting with '.' or '~')."""
    path = Path(name_or_path).expanduser()
    return path.exists() or path.is_absolute() or name_or_path.startswith((".", "~"))


def names_local_path(folder: Path) -> bool:
    """Whether `folder`'s kdcache_config.yaml names an input outside the tree of `folder`: an absolute path, or a
    relative one that climbs out of it (`../data/beans` says where this machine keeps its data)."""
    file = Path(folder) / CONFIG_FILE
    if not file.exists():
        return False
    values = read_config(file).values()
    return any(
        isinstance(item, str) and (Path(item).is_absolute() or ".." in Path(item).parts)
        for value in values
        for item in _items(value)
    )


def _items(value) -> list:
    return value if isinstance(value, list) else [value]


def as_given(options, *, sweep: bool = False, leave_out=()) -> dict:
    """{field: value} of the options object `options` as its command takes them (`sweep`: those of `kdcache
    sweep`), each the value that the field's `parse` makes the one held: a schedule's text, 'none' for an empty
    list or no split, a list for a comma-separated flag. Fields marked `in_config=False` (what to do with an
    existing output, whether to push) and `leave_out` are not written."""
    given = {}
    for field in fields(options):
        spec = {**field.metadata, **field.metadata.get("sweep", {})} if sweep else field.metadata
        if (sweep and "sweep" not in field.metadata) or not spec.get("help"):
            continue
        if not spec.get("in_config", True) or field.name in leave_out:
            continue
        given[field.name] = _as_given(field, spec, getattr(options, field.name))
    return given


def _as_given(field, spec: dict, value):
    """The command-line value that reads back as `value`: the value itself (as `cli_default` spells a default, a
    list for a comma-separated flag), else 'none'."""
    parse = spec.get("parse", lambda same: same)
    cli = spec.get("cli_default", lambda same: same)
    for candidate in (cli(value), "none"):
        if isinstance(candidate, tuple):
            candidate = list(candidate)
        if _read_back(candidate, parse, spec, cli(field.default)) == value:
            return candidate
    raise ValueError(f"{field.name}={value!r} has no spelling on the command line")  # a new field's parse: add one


def _read_back(candidate, parse, spec: dict, default):
    """What the command line makes of `candidate` given in a config (kdcache.cli.ConfigCommand): None is the
    default, a list is joined with commas for a flag of type str."""
    if candidate is None:
        candidate = default
    elif isinstance(candidate, list) and spec.get("type") is str:
        candidate = ",".join(str(item) for item in candidate)
    elif spec.get("type") is str and not isinstance(candidate, str):
        candidate = str(candidate)
    try:
        return parse(candidate)
    except KdcacheError:
        return _UNREADABLE


_UNREADABLE = object()
