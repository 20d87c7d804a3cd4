"""What README.md, BENCHMARKS.md and docs/ state, held to the code and to the files behind it: the Python version,
the figures quoted from benchmarks/results/, and the kdcache command lines (each must parse as written)."""

import re
import shlex
import tomllib
from importlib.metadata import metadata
from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def oldest_python(requires_python: str) -> tuple[int, int]:
    """The oldest 3.x release that a Requires-Python specifier accepts."""
    specifier = SpecifierSet(requires_python)
    return next((3, minor) for minor in range(6, 30) if f"3.{minor}" in specifier)


def test_the_python_version_agrees_in_pyproject_ruff_makefile_and_readme_and_is_what_transformers_needs():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    major, minor = oldest_python(pyproject["project"]["requires-python"])
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert f"sys.version_info >= ({major}, {minor})" in (REPO / "Makefile").read_text()
    assert f"Python {major}.{minor}+" in (REPO / "README.md").read_text()
    # kdcache supports what its two central dependencies support: the newest of their own minimums, no older
    # (a user could not install the transformers kdcache is tested with) and no newer (it would shut users out)
    needed = max(oldest_python(metadata(package)["Requires-Python"]) for package in ("transformers", "datasets"))
    assert (major, minor) == needed
    # a dependency that only applies to older Pythons would be dead weight
    assert not [line for line in pyproject["project"]["dependencies"] if "python_version" in line]


# Claims of the docs about behaviour, each held to what the code does


def test_stage_one_takes_one_dataloader_worker_per_process_on_cpu_with_two_cores_or_more_else_none(
    tmp_path, tiny_dataset, tiny_teacher, monkeypatch
):
    """docs/processes.md: "in stage one, 1 [worker] per process on CPU when that share is 2 cores or more, else 0"."""
    import torch

    import kdcache.cache
    from kdcache.cache import teacher_logits

    workers = []

    class RecordingLoader(torch.utils.data.DataLoader):
        def __init__(self, *arguments, **options):
            workers.append(options["num_workers"])
            super().__init__(*arguments, **options)

    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingLoader)
    for cpus in (1, 2, 4):
        monkeypatch.setattr(kdcache.cache, "cpus_per_process", lambda processes, cpus=cpus: cpus)
        teacher_logits(
            str(tiny_dataset),
            str(tiny_teacher),
            output=tmp_path / f"cpus{cpus}",
            splits=["validation"],
            progress=False,
        )
    assert workers == [0, 1, 1]


def test_the_pixels_do_not_depend_on_whether_torchvision_is_installed(
    tmp_path, tiny_dataset, tiny_teacher, tiny_cache
):
    """docs/cache-format.md: images go through the image processor's PIL backend whether or not torchvision is
    installed. With transformers told that torchvision is there (it picks torchvision's processors by default then),
    a cache's pixels are those of the suite's cache, made without it, and a student trains from it."""
    import datasets
    import numpy as np
    import transformers.models.auto.image_processing_auto as auto

    from kdcache.cache import PIXELS, teacher_logits
    from kdcache.train import train_student

    original = auto.is_torchvision_available
    auto.is_torchvision_available = lambda: True
    try:
        assert auto._resolve_backend(None, None, "ViTImageProcessor") == "torchvision", "the patch takes effect"
        cache = teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "cache", progress=False)
        train_student(cache, output=tmp_path / "student", max_steps=1, batch_size=8, progress=False)
    finally:
        auto.is_torchvision_available = original
    for split in ("train", "validation", "test"):
        mine, reference = (
            np.stack(list(datasets.load_from_disk(str(path))[split].with_format("numpy")[PIXELS]))
            for path in (cache, tiny_cache)
        )
        assert mine.shape == (len(mine), 3, 32, 32) and np.array_equal(mine, reference), split


def documented_commands() -> list[tuple[str, str]]:
    """Every `kdcache ...` command line in the code blocks of README.md, BENCHMARKS.md and docs/ (joined across `\\`
    continuations; after `-m kdcache` in a launcher's line), as (document, line). Lines with `...` are elisions
    ("the same command as above"), not commands, and are left out."""
    found = []
    for document in DOCUMENTS:
        block, shell, lines = False, False, []
        for line in document.read_text().splitlines():
            if line.startswith("```") and block:  # a fence closes the block it opened
                found += [(document.name, command) for command in commands_in(lines)]
                block, shell, lines = False, False, []
            elif line.startswith("```"):
                block, shell = True, line[3:].strip() in ("", "bash", "sh", "console")
            elif shell:
                lines.append(line)
    return found


def commands_in(lines: list[str]) -> list[str]:
    commands = []
    for line in "\n".join(lines).replace("\\\n", " ").splitlines():
        line = line.split(" #", 1)[0].strip()
        command = re.search(r"(?:^|\s-m\s|^\.venv/bin/)(kdcache\s.*)$", line)
        if command and "..." not in command.group(1):
            commands.append(command.group(1))
    return commands


def test_the_docs_hold_kdcache_commands_of_every_subcommand():
    subcommands = {shlex.split(line)[1] for _, line in documented_commands()}
    assert {"teacher-logits", "train-student", "evaluate", "verify", "info", "demo"} <= subcommands


def parse(line: str) -> None:
    """Parse a `kdcache ...` line with the CLI's own parser, as `kdcache` would (options known, values of the right
    type and choice, required arguments given), short of running it."""
    import typer

    from kdcache.cli import app

    name, *arguments = shlex.split(line)[1:]
    command = typer.main.get_command(app).get_command(None, name)
    if command is None:
        raise ValueError(f"kdcache has no command '{name}'")
    command.make_context(name, arguments)


def test_a_command_that_would_not_run_does_not_parse():
    parse("kdcache train-student CACHE --epochs 3")
    for wrong in (
        "kdcache train-student CACHE --epoch 3",
        "kdcache teacher-logits --views K",
        "kdcache evaluate",
        "kdcache trian",
    ):
        with pytest.raises(Exception):  # noqa: B017 (typer bundles its own click: its exceptions are not click's)
            parse(wrong)


@pytest.mark.parametrize(("document", "line"), documented_commands())
def test_each_documented_command_parses_as_written(document, line):
    try:
        parse(line)
    except Exception as error:
        pytest.fail(f"{document}: `{line}` does not parse: {getattr(error, 'format_message', error.__str__)()}")
