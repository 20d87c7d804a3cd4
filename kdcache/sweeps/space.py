"""A sweep's search space: TrainingOptions fields, each with a distribution, parsed from `--param NAME=SPEC` or a
small YAML or JSON file, and refused in one line when a field does not exist or cannot take what SPEC draws.
Free of Optuna and of heavy imports: the space is checked before anything is loaded."""

import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options import TrainingOptions
from kdcache.options.config import read_yaml_or_json

KINDS = ("loguniform", "uniform", "int", "choice")
SPEC_FORMS = "loguniform(a,b), uniform(a,b), int(a,b) or choice(x,y,...)"
# Fields that say how or where a trial runs, or what it starts from, not what it trains: the sweep sets them once.
NOT_SWEPT = (
    "resume",
    "overwrite",
    "online",
    "teacher",
    "teacher_weights",
    "train_split",
    "eval_split",
    "num_workers",
    "device",
    "precision",
    "logging_steps",
    "save_checkpoints",
    "license",
    "push_to_hub",
)
_SPEC = re.compile(r"^\s*([A-Za-z_][\w-]*)\s*=\s*([A-Za-z]+)\s*\((.*)\)\s*$", re.DOTALL)


@dataclass(frozen=True)
class Param:
    """One swept field: `kind` is one of KINDS; `low`, `high` bound a range, `choices` list a choice's values."""

    name: str
    kind: str
    low: float | None = None
    high: float | None = None
    choices: tuple = ()

    @property
    def spec(self) -> str:
        """The parameter as `--param` takes it (what the study records)."""
        if self.kind == "choice":
            return f"{self.name}=choice({','.join(_text(value) for value in self.choices)})"
        return f"{self.name}={self.kind}({_text(self.low)},{_text(self.high)})"

    def corners(self) -> list:
        """The values that bound what this parameter draws: a range's ends, every choice."""
        return list(self.choices) if self.kind == "choice" else [self.low, self.high]

    def suggest(self, trial):
        """Draw this parameter's value for an Optuna trial."""
        if self.kind == "choice":
            return trial.suggest_categorical(self.name, list(self.choices))
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high))
        return trial.suggest_float(self.name, self.low, self.high, log=self.kind == "loguniform")


def _text(value) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str) and "," in value:  # a schedule's text, quoted as --param takes it back
        return f"'{value}'"
    return f"{value:g}" if isinstance(value, float) else str(value)


def sweepable() -> dict:
    """{field name: (its type: bool, int, float or str; whether it takes None)} of every field a sweep can draw."""
    found = {}
    for field in fields(TrainingOptions):
        if field.name in NOT_SWEPT:
            continue
        annotation = field.type
        members = typing.get_args(annotation) if isinstance(annotation, types.UnionType) else (annotation,)
        optional = type(None) in members
        kinds = [member for member in members if member is not type(None)]
        if len(kinds) == 1 and kinds[0] in (bool, int, float, str):
            found[field.name] = (kinds[0], optional)
        elif set(kinds) == {int, str} and "parse" in field.metadata:  # a size (int(a,b)) or a schedule (choice)
            found[field.name] = (int, optional)
    return found


def parse_param(text: str) -> Param:
    """`NAME=SPEC` (e.g. `learning_rate=loguniform(1e-4,1e-2)`) as a Param, or one line saying what is wrong."""
    match = _SPEC.match(text)
    if not match:
        raise KdcacheError(f"--param '{text}' is not NAME=SPEC; SPEC is one of {SPEC_FORMS}")
    name, kind, arguments = match.group(1).replace("-", "_"), match.group(2).lower(), match.group(3)
    values = _values(arguments)
    return make_param(name, kind, values, f"--param '{text}'")


def _values(arguments: str) -> list[str]:
    """A SPEC's comma-separated values; a quoted one may hold commas (choice('128:0.7,224',224))."""
    if not arguments.strip():
        return []
    values, current, quote = [], "", None
    for char in arguments:
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == ",":
            values, current = [*values, current.strip()], ""
            continue
        current += char
    return [*values, current.strip()]


def make_param(name: str, kind: str, values: list, where: str) -> Param:
    """The Param of field `name` drawn by `kind` from `values` (strings, or a file's numbers), checked against the
    field's type; `where` names the input in the error."""
    known = sweepable()
    if name not in known:
        if name in NOT_SWEPT:
            raise KdcacheError(
                f"{where}: {name} says how or where a trial runs, not what it trains, so it cannot be swept; pass it "
                "once as an option of kdcache sweep"
            )
        raise KdcacheError(f"{where}: '{name}' is not an option of train-student; sweepable: {', '.join(known)}")
    field_type, optional = known[name]
    if kind not in KINDS:
        raise KdcacheError(f"{where}: '{kind}' is not a distribution; use one of {SPEC_FORMS}")
    if kind == "choice":
        if not values:
            raise KdcacheError(f"{where}: choice() needs at least one value, e.g. choice(2,5)")
        choices = tuple(_value(value, field_type, optional, name, where) for value in values)
        if len(set(map(repr, choices))) < len(choices):
            raise KdcacheError(f"{where}: choice() lists a value twice; list each once")
        return Param(name, kind, choices=choices)
    if field_type in (bool, str):
        raise KdcacheError(
            f"{where}: {name} takes {'true or false' if field_type is bool else 'a name'}, not a number drawn from "
            f"a range; use choice(...)"
        )
    if field_type is int and kind != "int":
        raise KdcacheError(
            f"{where}: {name} takes whole numbers, and {kind}() draws real ones; use int(a,b) or choice"
        )
    if len(values) != 2:
        raise KdcacheError(f"{where}: {kind}() takes two bounds, {kind}(a,b) with a < b")
    low, high = (_number(value, where) for value in values)
    if kind == "int" and not (float(low).is_integer() and float(high).is_integer()):
        raise KdcacheError(f"{where}: int(a,b) takes whole-number bounds")
    if not low < high:
        raise KdcacheError(f"{where}: the bounds must be a < b")
    if kind == "loguniform" and low <= 0:
        raise KdcacheError(f"{where}: loguniform(a,b) needs 0 < a (it draws log(x) uniformly); use uniform(a,b)")
    return Param(name, kind, low=int(low) if kind == "int" else low, high=int(high) if kind == "int" else high)


def _number(value, where: str) -> float:
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise KdcacheError(f"{where}: '{value}' is not a number") from None
    if number != number or number in (float("inf"), float("-inf")):
        raise KdcacheError(f"{where}: '{value}' is not a finite number")
    return number


def _value(value, field_type, optional: bool, name: str, where: str):
    """A choice's value as field `name` takes it (strings from --param; numbers, booleans or null from a file)."""
    text = str(value).strip().strip("'\"") if isinstance(value, str) else value
    if text is None or (isinstance(text, str) and text.lower() in ("none", "null")):
        if optional:
            return None
        raise KdcacheError(f"{where}: {name} cannot be none; give values of its type")
    if field_type is bool:
        if isinstance(text, bool):
            return text
        if str(text).lower() in ("true", "false", "yes", "no", "1", "0"):
            return str(text).lower() in ("true", "yes", "1")
        raise KdcacheError(f"{where}: {name} takes true or false, not '{text}'")
    if field_type is str:
        return str(text)
    parse = fields_by_name()[name].metadata.get("parse") if field_type is int else None
    if parse and isinstance(text, str) and ":" in text:  # --student-size's schedule of sizes, as its text
        return parse(text)
    number = _number(text, where)
    if field_type is int:
        if not number.is_integer():
            raise KdcacheError(f"{where}: {name} takes whole numbers, not '{text}'")
        return int(number)
    return number


def fields_by_name() -> dict:
    return {field.name: field for field in fields(TrainingOptions)}


def read_space_file(path: str | Path) -> list[Param]:
    """A space file: a YAML or JSON mapping of field names to SPEC strings (a list is a choice), e.g.
    `learning_rate: loguniform(1e-4,1e-2)` and `temperature: [2, 5]`."""
    path = Path(path)
    content = read_yaml_or_json(path, "--space")
    if not isinstance(content, dict) or not content:
        raise KdcacheError(
            f"--space '{path}' must map option names to distributions, e.g. 'learning_rate: loguniform(1e-4,1e-2)'"
        )
    params = []
    for name, spec in content.items():
        where = f"--space '{path}', {name}"
        if isinstance(spec, list):
            params.append(make_param(str(name).replace("-", "_"), "choice", spec, where))
        elif isinstance(spec, str):
            params.append(parse_param(f"{name}={spec}") if "(" in spec else _bad_spec(where, spec))
        else:
            _bad_spec(where, spec)
    return params


def _bad_spec(where: str, spec):
    raise KdcacheError(f"{where}: '{spec}' is not a distribution; use one of {SPEC_FORMS}, or a list of values")


def build_space(params=None, space_file=None) -> list[Param]:
    """The space of `params` (Param objects, `NAME=SPEC` strings, or a {name: SPEC} mapping) and of `space_file`,
    each field once."""
    found = list(read_space_file(space_file)) if space_file else []
    if isinstance(params, dict):
        params = [f"{name}={spec}" for name, spec in params.items()]
    for param in params or []:
        found.append(param if isinstance(param, Param) else parse_param(str(param)))
    seen = set()
    for param in found:
        if param.name in seen:
            raise KdcacheError(f"--param {param.name} is given twice (in --param or --space); give it once")
        seen.add(param.name)
    if not found:
        raise KdcacheError(
            "a sweep needs at least one --param NAME=SPEC (or --space FILE), e.g. "
            "--param 'learning_rate=loguniform(1e-4,1e-2)'"
        )
    return found
