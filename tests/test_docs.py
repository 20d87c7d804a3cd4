"""What README.md, BENCHMARKS.md and docs/ state, held to the code and to the files behind it: the Python version,
the figures quoted from benchmarks/results/, and the kdcache command lines (each must parse as written)."""

import json
import re
import shlex
import statistics
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

    import kdcache.teacher.run
    from kdcache.teacher.run import teacher_logits

    workers = []

    class RecordingLoader(torch.utils.data.DataLoader):
        def __init__(self, *arguments, **options):
            workers.append(options["num_workers"])
            super().__init__(*arguments, **options)

    monkeypatch.setattr(torch.utils.data, "DataLoader", RecordingLoader)
    for cpus in (1, 2, 4):
        monkeypatch.setattr(kdcache.teacher.run, "cpus_per_process", lambda processes, cpus=cpus: cpus)
        teacher_logits(
            str(tiny_dataset),
            str(tiny_teacher),
            output=tmp_path / f"cpus{cpus}",
            splits=["validation"],
            progress=False,
            device="cpu",  # the rule is the CPU's (a GPU's stage one takes more: seen on an H200)
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

    from kdcache.format.columns import PIXELS
    from kdcache.student.train import train_student
    from kdcache.teacher.run import teacher_logits

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
    every = {"teacher-logits", "train-student", "evaluate", "verify", "info", "demo", "push-cache", "pull-cache"}
    assert every <= subcommands


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


# Figures quoted from benchmarks/results/: each quote's numbers, in order, are the file's values as rounded in the quote


RESULTS = REPO / "benchmarks" / "results"


def results(name: str):
    path = RESULTS / name
    if name.endswith(".jsonl"):
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return json.loads(path.read_text())


def quality(recipe: str) -> dict:
    (row,) = [row for row in results("quality.json") if row["recipe"] == recipe]
    return row


def export_row(name: str, kind: str) -> list[float]:
    """A row of an export benchmark's table as BENCHMARKS.md shows it: accuracy mean, sd, agreements, MB, then per
    thread count the batch-1 median and p90 and the batch-32 throughput."""
    (row,) = [row for row in results(name)["table"] if row["kind"] == kind]
    figures = [row["test_accuracy"]["mean"], row["test_accuracy"]["sd"], row["agreement_with_fp32_student"]["mean"]]
    figures += [row["agreement_with_teacher"]["mean"], row["bytes"]["mean"] / 1e6]
    for threads in (1, 2):
        figures += [row[f"{key}_{threads}_threads"]["mean"] for key in EXPORT_SPEEDS]
    return figures


EXPORT_SPEEDS = ("batch_1_latency_ms_median", "batch_1_latency_ms_p90", "throughput_images_per_second")
EXPORT_ROWS = {  # BENCHMARKS.md's rows, as written there
    "export.json": [
        "| fp32 PyTorch | 0.896 ± 0.018 | 1.000 | 0.888 | 9.09 | 24.14 (29.55) | 14.3 | 18.84 (20.96) | 22.7 |",
        "| fp32 ONNX | 0.896 ± 0.018 | 1.000 | 0.888 | 9.20 | 8.30 (9.11) | 109.6 | 5.70 (6.14) | 190.6 |",
        "| int8 dynamic | 0.891 ± 0.014 | 0.995 | 0.883 | 2.51 | 63.96 (90.33) | 15.0 | 52.64 (65.41) | 18.3 |",
        "| int8 static | 0.898 ± 0.014 | 0.997 | 0.891 | 2.83 | 6.34 (7.49) | 136.4 | 4.76 (5.07) | 202.1 |",
        "| int8 QAT | 0.896 ± 0.012 | 0.961 | 0.891 | 2.83 | 6.70 (7.12) | 138.6 | 5.26 (5.80) | 231.0 |",
    ],
    "export-many-classes.json": [
        "| fp32 PyTorch | 0.977 ± 0.001 | 1.000 | 0.975 | 3.38 | 5.77 (7.25) | 1704.7 | 6.79 (9.49) | 1696.1 |",
        "| fp32 ONNX | 0.977 ± 0.001 | 1.000 | 0.975 | 3.58 | 0.21 (0.24) | 9511.9 | 0.28 (0.34) | 14739.0 |",
        "| int8 dynamic | 0.978 ± 0.001 | 0.997 | 0.976 | 1.08 | 1.48 (1.91) | 785.3 | 2.27 (2.62) | 658.3 |",
        "| int8 static | 0.976 ± 0.002 | 0.996 | 0.975 | 1.30 | 0.26 (0.36) | 9429.5 | 0.38 (0.49) | 7298.1 |",
        "| int8 QAT | 0.975 ± 0.006 | 0.984 | 0.974 | 1.30 | 0.27 (0.37) | 9354.9 | 0.42 (0.53) | 7139.9 |",
    ],
}


def gpu(*keys):
    value = results("gpu.json")
    for key in keys:
        value = value[key]
    return value


def budget_row(budget: float, recipe: str) -> list:
    """budget.json's row: test mean, sd, validation mean, sd, seeds, the budget's CPU-minutes, epochs."""
    (row,) = [row for row in results("budget.json") if (row["budget"], row["recipe"]) == (budget, recipe)]
    return [
        row["test_accuracy_mean"],
        row["test_accuracy_sd"],
        row["validation_accuracy_mean"],
        row["validation_accuracy_sd"],
        row["seeds"],
        row["budget_cpu_minutes"],
        row["epochs"],
    ]


def cpu_budget_seeds(budget: float, recipe: str, key: str) -> list[float]:
    """budget-runs.jsonl: one figure of each seed of a recipe at a budget, by seed."""
    runs = [run for run in results("budget-runs.jsonl") if (run["budget"], run["recipe"]) == (budget, recipe)]
    return [run[key] for run in sorted(runs, key=lambda run: run["seed"])]


def quality_row(recipe: str) -> list[float]:
    """A BENCHMARKS table row's figures: test mean ± sd, validation mean, agreement with the teacher."""
    row = quality(recipe)
    return [row[name] for name in ("test_accuracy_mean", "test_accuracy_sd", "validation_accuracy_mean")] + [
        row["teacher_agreement_mean"]
    ]


def accuracy_per_seed(recipe: str, momentum: float) -> list[float]:
    runs = [run for run in results("quality-runs.jsonl") if run["recipe"] == recipe]
    return [
        run["test_accuracy"]
        for run in sorted(runs, key=lambda run: run["seed"])
        if run["batchnorm_momentum"] == momentum
    ]


def last_epoch_gain(recipe: str) -> float:
    """Points of validation accuracy that the mean curve of a pre-fix recipe's seeds gained in its last epoch."""
    curves = [
        run["curve"] for run in results("quality-runs.jsonl") if run["recipe"] == recipe and "ema_warmup" not in run
    ]
    mean = [sum(values) / len(values) for values in zip(*curves)]
    return 100 * (mean[-1] - mean[-2])


def compact_student(storage: str, dropout: str, alpha=None) -> list[float]:
    """A compact-logits table row: seeds, validation mean ± sd, test mean ± sd."""
    (row,) = [
        row
        for row in results("compact-logits.json")["students"]
        if row["storage"] == storage
        and row["training"]["student"].endswith("-dropout02") == (dropout == "0.2")
        and row["training"].get("alpha") == alpha
    ]
    validation, test = row["validation_accuracy"], row["test_accuracy"]
    return [len(row["seeds"]), validation["mean"], validation["sd"], test["mean"], test["sd"]]


def compact_seeds(storage: str, dropout: str) -> list[float]:
    """A compact-logits table row's validation accuracy per seed, from one line per student."""
    runs = [
        run
        for run in results("compact-logits-runs.jsonl")
        if run["storage"] == storage
        and run["training"]["student"].endswith("-dropout02") == (dropout == "0.2")
        and "alpha" not in run["training"]
    ]
    return [run["validation_accuracy"] for run in sorted(runs, key=lambda run: run["seed"])]


def kl(storage: str) -> dict:
    (row,) = [row for row in results("compact-logits.json")["kl"] if row["storage"] == storage]
    return row


def scale(rows: int) -> dict:
    (row,) = [row for row in results("scale.json")["results"] if row["rows"] == rows]
    return row


def scale_row(rows: int) -> list[float]:
    """A row of the at-scale table, in MB (10^6 bytes)."""
    row = scale(rows)
    cache, load, train = row["cache"], row["load"], row["train"]
    return [
        rows, cache["images_per_second"], cache["peak_rss"] / 1e6, cache["wchar"] / 1e6, cache["cache_bytes"] / 1e6,
        cache["wchar"] / cache["cache_bytes"], load["seconds"], load["peak_rss"] / 1e6, train["steps_per_second"],
        train["peak_rss"] / 1e6, train["peak_anon"] / 1e6, train["peak_file"] / 1e6,
    ]  # fmt: skip


def peak(stage: str, rows: int) -> float:
    return scale(rows)[stage]["peak_rss"]


def release_runs(release: int) -> list[dict]:
    runs = [run for run in results("scale-release-mapped.json")["runs"] if run["KDCACHE_RELEASE_MAPPED"] == release]
    return [run["result"]["results"][0]["train"] for run in sorted(runs, key=lambda run: run["round"])]


def mapped(release: bool, name: str) -> list[float]:
    values = [row[name] for row in results("mapped-release.json")["results"] if row["release"] == release]
    return [min(values), max(values)]


QUOTES = [
    # issue 33: the rebuilt teacher
    (("BENCHMARKS.md",), "validation 1.0 at epoch 8 of 16, **test 0.9844** (the shared teacher: 0.969), in 57.8 wall minutes",
     "make-teacher.json", lambda: [results("make-teacher.json")["validation_accuracy"], results("make-teacher.json")["best_epoch"],
                                   results("make-teacher.json")["epochs"], results("make-teacher.json")["test_accuracy"], 0.969,
                                   results("make-teacher.json")["wall_minutes"]]),
    # (documents, quoted text, results file, its values in the quote's order)
    # issue 36: recipes at equal CPU budgets
    (("README.md",), "reaches 0.888 ± 0.024 on test over 3 seeds in 16.7 CPU-minutes", "budget.json",
     lambda: [*budget_row(0.5, "progressive")[:2], len(budget_row(0.5, "progressive")[4]), budget_row(0.5, "progressive")[5]]),
    (("README.md",), "defaults at twice the CPU (0.896 ± 0.018, 3 seeds;", "budget.json",
     lambda: [*budget_row(1.0, "defaults")[:2], len(budget_row(1.0, "defaults")[4])]),
    (("README.md",), "| 0.896 ± 0.018 (3 seeds; `budget.json`) |", "budget.json",
     lambda: [*budget_row(1.0, "defaults")[:2], len(budget_row(1.0, "defaults")[4])]),
    (("docs/recipes.md",), "**0.896 ± 0.018** on test (3 seeds, `budget.json`)", "budget.json",
     lambda: [*budget_row(1.0, "defaults")[:2], len(budget_row(1.0, "defaults")[4])]),
    (("BENCHMARKS.md",), "| 0.5 (16.7 CPU-minutes) | `--student-size 128:0.7,224` | 19 (13 at 128 px, 6 at 224 px) | 0, 1, 2 | 0.888 ± 0.024 | 0.935 ± 0.036 |",
     "budget.json", lambda: [0.5, budget_row(0.5, "progressive")[5], 128, 0.7, 224, budget_row(0.5, "progressive")[6],
                             13, 128, 6, 224, *budget_row(0.5, "progressive")[4], *budget_row(0.5, "progressive")[:4]]),
    (("BENCHMARKS.md",), "| 1 (33.3 CPU-minutes) | the defaults (224 px) | 20 | 0, 1, 2 | 0.896 ± 0.018 | 0.940 ± 0.020 |",
     "budget.json", lambda: [1, budget_row(1.0, "defaults")[5], 224, budget_row(1.0, "defaults")[6],
                             *budget_row(1.0, "defaults")[4], *budget_row(1.0, "defaults")[:4]]),
    (("BENCHMARKS.md",), "| 0.5 (16.7 CPU-minutes) | `--student-size 128` | 33 | 0, 1, 2 | 0.880 ± 0.018 | 0.935 ± 0.016 |",
     "budget.json", lambda: [0.5, budget_row(0.5, "fixed-128")[5], 128, budget_row(0.5, "fixed-128")[6],
                             *budget_row(0.5, "fixed-128")[4], *budget_row(0.5, "fixed-128")[:4]]),
    (("BENCHMARKS.md",), "| 0.5 (16.7 CPU-minutes) | the defaults (224 px) | 9 | 0, 1, 2 | 0.833 ± 0.039 | 0.875 ± 0.039 |",
     "budget.json", lambda: [0.5, budget_row(0.5, "defaults")[5], 224, budget_row(0.5, "defaults")[6],
                             *budget_row(0.5, "defaults")[4], *budget_row(0.5, "defaults")[:4]]),
    (("BENCHMARKS.md",), "| 1 (33.3 CPU-minutes) | `--student-size 128:0.7,224` | 39 (70% of the steps at 128 px) | 0, 1, 2 | 0.888 ± 0.016 | 0.935 ± 0.004 |",
     "budget.json", lambda: [1, budget_row(1.0, "progressive")[5], 128, 0.7, 224, budget_row(1.0, "progressive")[6], 70, 128,
                             *sorted(budget_row(1.0, "progressive")[4]), *budget_row(1.0, "progressive")[:4]]),
    (("BENCHMARKS.md",), "| 1 (33.3 CPU-minutes) | `--student-size 128` | 67 | 0, 1, 2 | 0.862 ± 0.009 | 0.932 ± 0.008 |",
     "budget.json", lambda: [1, budget_row(1.0, "fixed-128")[5], 128, budget_row(1.0, "fixed-128")[6],
                             *budget_row(1.0, "fixed-128")[4], *budget_row(1.0, "fixed-128")[:4]]),
    (("BENCHMARKS.md",), "fixed 128 px given the full budget (67 epochs) reaches 0.862 on test and 0.932 on validation, no "
     "better than with half of it (33 epochs: 0.880 and 0.935) and 3.4 points under the defaults on test. Its best "
     "validation epochs were 39 to 42 of 67", "budget.json",
     lambda: [128, budget_row(1.0, "fixed-128")[6], budget_row(1.0, "fixed-128")[0], budget_row(1.0, "fixed-128")[2],
              budget_row(0.5, "fixed-128")[6], budget_row(0.5, "fixed-128")[0], budget_row(0.5, "fixed-128")[2],
              100 * (budget_row(1.0, "defaults")[0] - budget_row(1.0, "fixed-128")[0]),
              min(cpu_budget_seeds(1.0, "fixed-128", "best_epoch")), max(cpu_budget_seeds(1.0, "fixed-128", "best_epoch")),
              budget_row(1.0, "fixed-128")[6]]),
    (("BENCHMARKS.md",), "5.5 points above the defaults given the same 16.7 CPU-minutes on test (0.888 against 0.833) and 6.0 on validation",
     "budget.json", lambda: [100 * (budget_row(0.5, "progressive")[0] - budget_row(0.5, "defaults")[0]), budget_row(0.5, "defaults")[5],
                             budget_row(0.5, "progressive")[0], budget_row(0.5, "defaults")[0],
                             100 * (budget_row(0.5, "progressive")[2] - budget_row(0.5, "defaults")[2])]),
    (("BENCHMARKS.md",), "the defaults (0.896) and the schedule (0.888) are level", "budget.json",
     lambda: [budget_row(1.0, "defaults")[0], budget_row(1.0, "progressive")[0]]),
    (("README.md",), "0.888 ± 0.024 at half the defaults' CPU, where the defaults reach 0.833 ± 0.039 (3 seeds each;", "budget.json",
     lambda: [*budget_row(0.5, "progressive")[:2], *budget_row(0.5, "defaults")[:2], 3]),
    (("docs/recipes.md",), "given half the defaults' CPU, 5.5 points on test over the defaults given the same CPU", "budget.json",
     lambda: [100 * (budget_row(0.5, "progressive")[0] - budget_row(0.5, "defaults")[0])]),
    (("BENCHMARKS.md",), "These 3 seeds (0.896 ± 0.018)", "budget.json",
     lambda: [len(budget_row(1.0, "defaults")[4]), *budget_row(1.0, "defaults")[:2]]),
    (("BENCHMARKS.md",), "0.8\n  points under on test and 0.5 on validation", "budget.json",
     lambda: [100 * (budget_row(1.0, "defaults")[0] - budget_row(0.5, "progressive")[0]),
              100 * (budget_row(1.0, "defaults")[2] - budget_row(0.5, "progressive")[2])]),
    (("BENCHMARKS.md",), "load average 1.9 to 7.6 at their\nends", "budget-runs.jsonl",
     lambda: [min(run["load_average"][0] for run in results("budget-runs.jsonl")),
              max(run["load_average"][0] for run in results("budget-runs.jsonl"))]),
    (("BENCHMARKS.md",), "between 35% under and 72% over the prediction", "budget-runs.jsonl",
     lambda: [100 * (1 - min(r["cpu_seconds"] / r["predicted_cpu_seconds"] for r in results("budget-runs.jsonl"))),
              100 * (max(r["cpu_seconds"] / r["predicted_cpu_seconds"] for r in results("budget-runs.jsonl")) - 1)]),
    # issue 32: caches that travel
    (("BENCHMARKS.md",), "(198.5 MB, 13 files", "travel.json",
     lambda: [results("travel.json")["cache_megabytes"], results("travel.json")["files_pushed"]]),
    (("BENCHMARKS.md",), "push 76.5 MB/s, pull 122.3 MB/s", "travel.json",
     lambda: [results("travel.json")["push_megabytes_per_second"], results("travel.json")["pull_megabytes_per_second"]]),
    (("BENCHMARKS.md",), "took 0.086 of the pull's time. The killed pull left 156.9 MB on disk; the rerun fetched 120.0 MB, 0.605 of",
     "travel.json", lambda: [results("travel.json")["pull_verify_share"], results("travel.json")["killed_pull_megabytes_on_disk"],
                             results("travel.json")["resumed_pull_megabytes_fetched"],
                             results("travel.json")["resumed_pull_share_of_whole"]]),
    (("BENCHMARKS.md",), "costs 99.6 CPU-seconds at 224 px and 29.4 at 128 px, 3.38 times less", "budget-calibration.json",
     lambda: [results("budget-calibration.json")["epoch_cpu_seconds"]["224"], 224,
              results("budget-calibration.json")["epoch_cpu_seconds"]["128"], 128,
              results("budget-calibration.json")["epoch_cost_ratio"]]),
    (("BENCHMARKS.md",), "a run costs 7.5 CPU-seconds", "budget-calibration.json",
     lambda: [results("budget-calibration.json")["start_cpu_seconds"]]),
    (("BENCHMARKS.md",), "20 epochs at 224 px, is 33.3 CPU-minutes", "budget-calibration.json",
     lambda: [20, 224, results("budget-calibration.json")["defaults_predicted_cpu_minutes"]]),
    (("BENCHMARKS.md",), "0.870 ± 0.020", "quality.json",
     lambda: [quality("k1-defaults")["test_accuracy_mean"], quality("k1-defaults")["test_accuracy_sd"]]),
    (("README.md",), "(test accuracy 0.969)", "quality.json", lambda: [quality("k1-defaults")["teacher_test_accuracy"]]),
    (("README.md",), "0.823 ± 0.043 and 0.810 ± 0.045", "quality.json", lambda: quality_row("views")[:2] + quality_row("patient")[:2]),
    (("BENCHMARKS.md",), "0.833 ± 0.009", "quality.json", lambda: quality_row("scratch")[:2]),
    (("docs/recipes.md",), "DIST 0.776 ± 0.027, KD on standardised logits 0.734 ± 0.036, DKD 0.719 ± 0.028", "quality.json",
     lambda: quality_row("views-dist")[:2] + quality_row("views-kd-standardized")[:2] + quality_row("views-dkd")[:2]),
    (("README.md",), "fp16, top-50 and top-10 0.971-0.972 against float32's 0.913 ± 0.110; top-1 0.792 ± 0.269",
     "compact-logits.json", lambda: [
         min(compact_student(storage, "0.2")[1] for storage in ("fp16", "fp16-top50", "fp16-top10")),
         max(compact_student(storage, "0.2")[1] for storage in ("fp16", "fp16-top50", "fp16-top10")),
         *compact_student("fp32", "0.2")[1:3], *compact_student("fp16-top1", "0.2")[1:3]]),
    # BENCHMARKS: the quality sections
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.745 ± 0.048 | 0.804 | 0.753 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("patient (BatchNorm momentum 0.997) (EMA without warm-up)")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.818 ± 0.048 | **0.872** | 0.823 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("views (BatchNorm momentum 0.997) (EMA without warm-up)")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | **0.831 ± 0.020** | 0.862 | 0.846 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("scratch (BatchNorm momentum 0.997) (EMA without warm-up)")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.836 ± 0.016 | 0.920 | 0.839 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("k1-defaults (BatchNorm momentum 0.997)")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | **0.870 ± 0.020** | **0.932** | 0.859 | 16.9 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("k1-defaults") + [quality("k1-defaults")["stage_two_minutes"]]),
    (("BENCHMARKS.md",), "seeds 0, 1, 2: 0.891, 0.867, 0.852 against 0.852, 0.820, 0.836", "quality-runs.jsonl",
     lambda: [0, 1, 2] + accuracy_per_seed("k1-defaults", 0.1) + accuracy_per_seed("k1-defaults", 0.997)),
    (("BENCHMARKS.md",), "(patient 1.3, scratch 1.2, views 2.3)", "quality-runs.jsonl",
     lambda: [last_epoch_gain(recipe) for recipe in ("patient", "scratch", "views")]),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.810 ± 0.045 | 0.862 | 0.807 |", "quality.json", lambda: [0, 1, 2] + quality_row("patient")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.823 ± 0.043 | **0.897** | 0.836 |", "quality.json", lambda: [0, 1, 2] + quality_row("views")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | **0.833 ± 0.009** | 0.887 | 0.828 |", "quality.json", lambda: [0, 1, 2] + quality_row("scratch")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.719 ± 0.028 | 0.719 | 0.719 |", "quality.json", lambda: [0, 1, 2] + quality_row("views-dkd")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.776 ± 0.027 | 0.820 | 0.784 |", "quality.json", lambda: [0, 1, 2] + quality_row("views-dist")),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.734 ± 0.036 | 0.737 | 0.737 |", "quality.json",
     lambda: [0, 1, 2] + quality_row("views-kd-standardized")),
    # compact logits
    (("BENCHMARKS.md",), "| fp32 | 3 | 0.913 ± 0.110 | 0.906 ± 0.102 |", "compact-logits.json", lambda: compact_student("fp32", "0.2")),
    (("BENCHMARKS.md",), "| fp16 | 3 | 0.971 ± 0.005 | 0.975 ± 0.006 |", "compact-logits.json", lambda: compact_student("fp16", "0.2")),
    (("BENCHMARKS.md",), "| fp16-top50 | 3 | 0.972 ± 0.001 | 0.977 ± 0.015 |", "compact-logits.json",
     lambda: compact_student("fp16-top50", "0.2")),
    (("BENCHMARKS.md",), "| fp16-top10 | 3 | 0.972 ± 0.005 | 0.973 ± 0.005 |", "compact-logits.json",
     lambda: compact_student("fp16-top10", "0.2")),
    (("BENCHMARKS.md",), "| fp16-top1 | 3 | 0.792 ± 0.269 | 0.799 ± 0.261 |", "compact-logits.json",
     lambda: compact_student("fp16-top1", "0.2")),
    (("BENCHMARKS.md",), "| scratch (alpha 0) | 3 | 0.899 ± 0.083 | 0.885 ± 0.088 |", "compact-logits.json",
     lambda: [0] + compact_student("fp32", "0.2", alpha=0)),
    (("BENCHMARKS.md",), "| fp32 | 5 | 0.775 ± 0.365 | 0.774 ± 0.365 |", "compact-logits.json", lambda: compact_student("fp32", "0.8")),
    (("BENCHMARKS.md",), "| fp16-top10 | 5 | 0.440 ± 0.305 | 0.445 ± 0.315 |", "compact-logits.json",
     lambda: compact_student("fp16-top10", "0.8")),
    (("BENCHMARKS.md",), "| 0.913 ± 0.110 | 0.906 ± 0.102 | 0.963, 0.990, 0.787 |", "compact-logits-runs.jsonl",
     lambda: compact_student("fp32", "0.2")[1:] + compact_seeds("fp32", "0.2")),
    (("BENCHMARKS.md",), "| 0.775 ± 0.365 | 0.774 ± 0.365 | 0.938, 0.960, 0.883, 0.967, 0.125 |", "compact-logits-runs.jsonl",
     lambda: compact_student("fp32", "0.8")[1:] + compact_seeds("fp32", "0.8")),
    (("BENCHMARKS.md",), "| fp16, top 10 | 0.00029 | 0.047 | 0.67 |", "compact-logits.json",
     lambda: [10, kl("fp16-top10")["kl_mean_T1"], kl("fp16-top10")["kl_mean_T5"], kl("fp16-top10")["mass_outside_top_k_T5"]]),
    (("BENCHMARKS.md",), "| fp16, top 1 | 0.0122 | 0.116 | 0.85 |", "compact-logits.json",
     lambda: [1, kl("fp16-top1")["kl_mean_T1"], kl("fp16-top1")["kl_mean_T5"], kl("fp16-top1")["mass_outside_top_k_T5"]]),
    (("BENCHMARKS.md",), "is 0.378):", "compact-logits.json", lambda: [kl("fp16")["kl_to_uniform_mean_T5"]]),
    # at scale
    (("BENCHMARKS.md",), "| 10,000 | 875 | 617 | 176 / 176 MB (1.002) | 0.17 s | 343 | 8.82 | 778 (534 + 245) |", "scale.json",
     lambda: scale_row(10_000)),
    (("BENCHMARKS.md",), "| 100,000 | 1,098 | 637 | 1,720 / 1,717 MB (1.002) | 1.65 s | 375 | 8.80 | 792 (536 + 254) |",
     "scale.json", lambda: scale_row(100_000)),
    (("BENCHMARKS.md",), "| **1.033** | | | **1.093** | | **1.018** |", "scale.json",
     lambda: [peak(stage, 100_000) / peak(stage, 10_000) for stage in ("cache", "load", "train")]),
    (("docs/at-scale.md",), "| peak RSS | 637 MB vs 617 MB (1.03x) | 375 MB vs 343 MB (1.09x) | 792 MB vs 778 MB (1.02x) |",
     "scale.json", lambda: [
         value for stage in ("cache", "load", "train")
         for value in (peak(stage, 100_000) / 1e6, peak(stage, 10_000) / 1e6, peak(stage, 100_000) / peak(stage, 10_000))]),
    (("docs/at-scale.md",), "| time | 1,098 img/s vs 875 img/s | 1.65 s for 1.72 GB vs 0.17 s | 8.8 steps/s vs 8.8 |", "scale.json",
     lambda: [scale(100_000)["cache"]["images_per_second"], scale(10_000)["cache"]["images_per_second"],
              scale(100_000)["load"]["seconds"], scale(100_000)["cache"]["cache_bytes"] / 1e9, scale(10_000)["load"]["seconds"],
              scale(100_000)["train"]["steps_per_second"], scale(10_000)["train"]["steps_per_second"]]),
    (("BENCHMARKS.md",), "(2.3 MB of `wchar`,\n  32,768 bytes to storage, at 100k)", "scale.json",
     lambda: [scale(100_000)["cache"]["workers_wchar"] / 1e6, scale(100_000)["cache"]["workers_write_bytes"], 100]),
    (("BENCHMARKS.md",), "peak RSS 2,342-2,350 MB without, 793-796 MB", "scale-release-mapped.json",
     lambda: [min(run["peak_rss"] for run in release_runs(0)) / 1e6, max(run["peak_rss"] for run in release_runs(0)) / 1e6,
              min(run["peak_rss"] for run in release_runs(1)) / 1e6, max(run["peak_rss"] for run in release_runs(1)) / 1e6]),
    (("BENCHMARKS.md",), "steps/s 9.61, 8.90, 9.61 without and 8.68, 8.78, 8.40 with, per-round ratio 0.90, 0.99, 0.87",
     "scale-release-mapped.json", lambda: [run["steps_per_second"] for run in release_runs(0)]
     + [run["steps_per_second"] for run in release_runs(1)]
     + [on["steps_per_second"] / off["steps_per_second"] for off, on in zip(release_runs(0), release_runs(1))]),
    (("BENCHMARKS.md",), "takes 4.8 to 5.0 ms of CPU", "mapped-release.json", lambda: mapped(True, "release_cpu_ms_per_batch")),
    (("BENCHMARKS.md",), "12.6 to 13.0 ms instead of 9.6 to 11.0", "mapped-release.json",
     lambda: mapped(True, "read_ms_per_batch") + mapped(False, "read_ms_per_batch")),
    (("BENCHMARKS.md",), "is 204 to 206 MB\n  with unmapping, 1,592 to 1,596 MB without", "mapped-release.json",
     lambda: mapped(True, "peak_rss_file_mb") + mapped(False, "peak_rss_file_mb")),
    (("BENCHMARKS.md", "docs/at-scale.md"), "64 to 72 MB", "mapped-release.json",
     lambda: [min(mapped(True, "one_batch_maps_mb") + mapped(False, "one_batch_maps_mb")),
              max(mapped(True, "one_batch_maps_mb") + mapped(False, "one_batch_maps_mb"))]),
    # issue 21: stage one's checks of its own work
    (("BENCHMARKS.md",), "| 183.5 s, 241.1 s | 1 |", "resume-check.json",
     lambda: results("resume-check.json")["teacher_chunk_loop_seconds"] + [1]),
    (("BENCHMARKS.md",), "median of 5) | 0.32 s (611 MB/s) | 0.0015 |", "resume-check.json",
     lambda: [5, statistics.median(results("resume-check.json")["resume_check_seconds"]["warm"]),
              results("resume-check.json")["resume_check_megabytes_per_second"]["warm"],
              results("resume-check.json")["resume_check_to_teacher"]["warm"]]),
    (("BENCHMARKS.md",), "| 0.38 s / 0.38 s | 0.0018 |", "resume-check.json",
     lambda: [*results("resume-check.json")["final_check_seconds"].values(),
              results("resume-check.json")["final_check_to_teacher"]]),
    (("docs/cache-format.md",), "took 0.32 s, 0.0015 of the", "resume-check.json",
     lambda: [statistics.median(results("resume-check.json")["resume_check_seconds"]["warm"]),
              results("resume-check.json")["resume_check_to_teacher"]["warm"]]),
    # issue 25: label budgets and the demo
    (("BENCHMARKS.md",), "| 5% (51 rows) | scratch | 0.503 ± 0.004 |", "label-budget.json", lambda: [5, 51, *budget(0.05, "scratch")]),
    (("BENCHMARKS.md",), "| 100% | distilled | 0.763 ± 0.025 |", "label-budget.json", lambda: [100, *budget(1.0, "distilled")]),
    # issue 36: the label budgets at 128 px
    (("README.md",), "MobileNetV2 at 128 px, 495 steps for every student", "label-budget.json",
     lambda: [128, label_budget_row(0.1, "distilled", 128)["steps"]]),
    (("README.md",), "| student from scratch on the labelled rows | | 0.549 ± 0.025 | 0.609 ± 0.059 | 0.638 ± 0.087 | **0.870 ± 0.012** |",
     "label-budget.json", lambda: [v for f in (0.05, 0.1, 0.25, 1.0) for v in budget(f, "scratch", 128)]),
    (("README.md",), "| student distilled on every image | 0.865 ± 0.024 (`--alpha 1`) | **0.815 ± 0.037** | **0.799 ± 0.033** | **0.852 ± 0.028** | 0.846 ± 0.016 |",
     "label-budget.json", lambda: [*budget(0.0, "teacher-alone", 128), 1,
                                   *[v for f in (0.05, 0.1, 0.25, 1.0) for v in budget(f, "distilled", 128)]]),
    (("README.md",), "With a tenth of the labels the teacher adds 19 points", "label-budget.json",
     lambda: [100 * (budget(0.1, "distilled", 128)[0] - budget(0.1, "scratch", 128)[0])]),
    (("BENCHMARKS.md",), "| none | the teacher alone (`--alpha 1`) | 0.865 ± 0.024 | 0.882 | 0.870 |", "label-budget.json",
     lambda: [1, *label_budget_figures(0.0, "teacher-alone")]),
    (("BENCHMARKS.md",), "| 5% (51 rows) | scratch | 0.549 ± 0.025 | 0.519 | 0.552 |", "label-budget.json",
     lambda: [5, 51, *label_budget_figures(0.05, "scratch")]),
    (("BENCHMARKS.md",), "| 5% (51 rows) | distilled | 0.815 ± 0.037 | 0.837 | 0.820 |", "label-budget.json",
     lambda: [5, 51, *label_budget_figures(0.05, "distilled")]),
    (("BENCHMARKS.md",), "| 10% (104 rows) | scratch | 0.609 ± 0.059 | 0.579 | 0.620 |", "label-budget.json",
     lambda: [10, 104, *label_budget_figures(0.1, "scratch")]),
    (("BENCHMARKS.md",), "| 10% (104 rows) | distilled | 0.799 ± 0.033 | 0.809 | 0.807 |", "label-budget.json",
     lambda: [10, 104, *label_budget_figures(0.1, "distilled")]),
    (("BENCHMARKS.md",), "| 25% (258 rows) | scratch | 0.638 ± 0.087 | 0.664 | 0.635 |", "label-budget.json",
     lambda: [25, 258, *label_budget_figures(0.25, "scratch")]),
    (("BENCHMARKS.md",), "| 25% (258 rows) | distilled | 0.852 ± 0.028 | 0.875 | 0.846 |", "label-budget.json",
     lambda: [25, 258, *label_budget_figures(0.25, "distilled")]),
    (("BENCHMARKS.md",), "| 100% | scratch | 0.870 ± 0.012 | 0.915 | 0.862 |", "label-budget.json",
     lambda: [100, *label_budget_figures(1.0, "scratch")]),
    (("BENCHMARKS.md",), "| 100% | distilled | 0.846 ± 0.016 | 0.890 | 0.854 |", "label-budget.json",
     lambda: [100, *label_budget_figures(1.0, "distilled")]),
    (("BENCHMARKS.md",), "+26.6 at 5% of the labels, +19.0 at 10%, +21.4 at 25%", "label-budget.json",
     lambda: [v for f in (0.05, 0.1, 0.25) for v in (label_budget_gain(f), 100 * f)]),
    (("BENCHMARKS.md",), "stay between 0.55 and 0.64", "label-budget.json",
     lambda: [min(budget(f, "scratch", 128)[0] for f in (0.05, 0.1, 0.25)),
              max(budget(f, "scratch", 128)[0] for f in (0.05, 0.1, 0.25))]),
    (("BENCHMARKS.md",), "the teacher alone reaches 0.865 ± 0.024, 6.5 points above the distilled students with 10% of "
     "the labels (0.799 ± 0.033) and level with every label (scratch 0.870, distilled 0.846)", "label-budget.json",
     lambda: [*budget(0.0, "teacher-alone", 128),
              100 * (budget(0.0, "teacher-alone", 128)[0] - budget(0.1, "distilled", 128)[0]), 10,
              *budget(0.1, "distilled", 128), budget(1.0, "scratch", 128)[0], budget(1.0, "distilled", 128)[0]]),
    (("BENCHMARKS.md",), "distilled 0.846 ± 0.016 against scratch 0.870 ± 0.012", "label-budget.json",
     lambda: [*budget(1.0, "distilled", 128), *budget(1.0, "scratch", 128)]),
    (("BENCHMARKS.md",), "best validation epochs were 11 to 15 of 15", "label-budget-runs.jsonl",
     lambda: [min(label_budget_best_epochs()), max(label_budget_best_epochs()), 15]),
    (("BENCHMARKS.md",), "(every distilled row 5 to 10 points higher)", "label-budget.json",
     lambda: [min(label_budget_growth()), max(label_budget_growth())]),
    (("BENCHMARKS.md",), "**not met** (+19.0; met at 5%, +26.6); within 3 points of distilled with every label: "
     "**not met** (4.7 points under)", "label-budget.json",
     lambda: [label_budget_gain(0.1), 5, label_budget_gain(0.05), 3,
              100 * (budget(1.0, "distilled", 128)[0] - budget(0.1, "distilled", 128)[0])]),
    (("BENCHMARKS.md",), "distilled 0.789, 0.836, 0.773; scratch 0.555, 0.602, 0.672; the teacher alone 0.859, 0.891, 0.844",
     "label-budget-runs.jsonl", lambda: budget_seeds(0.1, "distilled", 128) + budget_seeds(0.1, "scratch", 128)
     + budget_seeds(0.0, "teacher-alone", 128)),
    (("BENCHMARKS.md",), "(4.7 to 14.9 wall minutes a student)", "label-budget-runs.jsonl",
     lambda: [min(run["stage_two_minutes"] for run in label_budget_runs()),
              max(run["stage_two_minutes"] for run in label_budget_runs())]),

    (("BENCHMARKS.md",), "distilled 0.797, 0.688, 0.758; scratch 0.609, 0.594, 0.531", "label-budget-runs.jsonl",
     lambda: budget_seeds(0.1, "distilled") + budget_seeds(0.1, "scratch")),
    (("README.md",), "teacher (ResNet, run once) 0.9973 310,746", "demo.json",
     lambda: [demo(0)["accuracy"]["teacher"], demo(0)["parameters"]["teacher"]]),
    (("README.md",), "student distilled, every image 0.9780 700,490", "demo.json",
     lambda: [demo(0)["accuracy"]["distilled_few_labels"], demo(0)["parameters"]["distilled_few_labels"]]),
    (("README.md",), "student from scratch on them 0.9258", "demo.json", lambda: [demo(0)["accuracy"]["scratch_few_labels"]]),
    (("README.md",), "2.38 from the cache, 2.55 with the teacher online (1.07x); demo took 183 s", "demo.json",
     lambda: [*demo(0)["seconds_per_epoch"].values(), 1.07, demo(0)["seconds"]]),
    # issue 23: the beans sweep, its finals and the controls beside them
    (("README.md", "docs/sweeps.md", "BENCHMARKS.md"), "0.893 ± 0.023", "quality.json", lambda: quality_row("swept")[:2]),
    (("README.md", "docs/sweeps.md", "BENCHMARKS.md"), "0.896 ± 0.012", "quality.json",
     lambda: quality_row("k1-defaults-beside-swept")[:2]),
    (("README.md", "docs/sweeps.md"), "3.4 points above the same options from labels alone (0.859 ± 0.008)", "quality.json",
     lambda: [100 * (quality("swept")["test_accuracy_mean"] - quality("swept-labels-only")["test_accuracy_mean"]),
              *quality_row("swept-labels-only")[:2]]),
    (("README.md", "docs/sweeps.md"), "18 trials of five options at 96 px and 8 epochs, in 45.6 CPU-minutes on 2 cores",
     "sweep/sweep.json", lambda: [sum(sweep_report()["counts"].values()), sweep_report()["fixed"]["student_size"],
                                  sweep_report()["fixed"]["epochs"], sweep_report()["sweep_cpu_minutes"], 2]),
    (("BENCHMARKS.md",), "18 trials, 5 complete and 13 pruned, in 45.6 CPU-minutes and 52.3 wall minutes", "sweep/sweep.json",
     lambda: [sum(sweep_report()["counts"].values()), sweep_report()["counts"]["complete"], sweep_report()["counts"]["pruned"],
              sweep_report()["sweep_cpu_minutes"], sweep_report()["sweep_wall_minutes"]]),
    (("BENCHMARKS.md",), "The best, trial 2: validation 0.872 at epoch 7", "sweep/sweep.json",
     lambda: [sweep_report()["best"]["trial"], sweep_report()["best"]["validation_accuracy"], sweep_report()["best"]["best_epoch"]]),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.893 ± 0.023 | **0.947** | 0.883 | 0.906, 0.867, 0.906 | 22.9", "quality.json",
     lambda: [0, 1, 2, *quality_row("swept"), *accuracy_per_seed("swept", 0.1), quality("swept")["stage_two_minutes"]]),
    (("BENCHMARKS.md",), "| 0, 1, 2 | **0.896 ± 0.012** | 0.937 | 0.898 | 0.906, 0.898, 0.883 | 14.4 |", "quality.json",
     lambda: [0, 1, 2, *quality_row("k1-defaults-beside-swept"), *accuracy_per_seed("k1-defaults-beside-swept", 0.1),
              quality("k1-defaults-beside-swept")["stage_two_minutes"]]),
    (("BENCHMARKS.md",), "| 0, 1, 2 | 0.859 ± 0.008 | 0.922 | 0.875 | 0.867, 0.852, 0.859 | 13.5 |", "quality.json",
     lambda: [0, 1, 2, *quality_row("swept-labels-only"), *accuracy_per_seed("swept-labels-only", 0.1),
              quality("swept-labels-only")["stage_two_minutes"]]),
    (("BENCHMARKS.md",), "(by 3.9, 1.6 and 4.7 points) and on validation (0.947 against 0.922)", "quality-runs.jsonl",
     lambda: [100 * (a - b) for a, b in zip(accuracy_per_seed("swept", 0.1), accuracy_per_seed("swept-labels-only", 0.1))]
     + [quality("swept")["validation_accuracy_mean"], quality("swept-labels-only")["validation_accuracy_mean"]]),
    (("BENCHMARKS.md",), "(0.947 against 0.937)", "quality.json",
     lambda: [quality("swept")["validation_accuracy_mean"], quality("k1-defaults-beside-swept")["validation_accuracy_mean"]]),
    (("BENCHMARKS.md",), "under each of three evaluator seeds (0.289 to 0.319)", "sweep/sweep.json",
     lambda: [min(seed["learning_rate"] for seed in importances()),
              max(seed["learning_rate"] for seed in importances())]),
    (("BENCHMARKS.md",), "(weight decay 0.21 to 0.26, α 0.21 to 0.25, temperature 0.12 to 0.20, EMA 0.03 to 0.13)",
     "sweep/sweep.json", lambda: [f(seed[name] for seed in importances())
                                  for name in ("weight_decay", "alpha", "temperature", "ema_decay") for f in (min, max)]),
]  # fmt: skip

# issue 34: shipping the student (every row of both tables, and what BENCHMARKS.md says of them)
EXPORT_KINDS = ("fp32 PyTorch", "fp32 ONNX", "int8 dynamic", "int8 static", "int8 QAT")
QUOTES += [
    (("BENCHMARKS.md",), line, name, lambda name=name, kind=kind: export_row(name, kind))
    for name, lines in EXPORT_ROWS.items()
    for line, kind in zip(lines, EXPORT_KINDS, strict=True)
]


def static_against(name: str, kind: str, column: int) -> float:
    """How many times the int8 static model's `column` (export_row's order) is `kind`'s."""
    return export_row(name, kind)[column] / export_row(name, "int8 static")[column]


QUOTES += [
    (("BENCHMARKS.md",), "on beans 0.3 points above its fp32 students on test (0.898 against 0.896) and agrees with them on 0.997",
     "export.json", lambda: [100 * (export_row("export.json", "int8 static")[0] - export_row("export.json", "fp32 PyTorch")[0]),
                             export_row("export.json", "int8 static")[0], export_row("export.json", "fp32 PyTorch")[0],
                             export_row("export.json", "int8 static")[2]]),
    (("BENCHMARKS.md",), "on 100 classes 0.03 points under (one image in 3,000 over the three students), agreeing on 0.996",
     "export-many-classes.json",
     lambda: [100, 100 * (export_row("export-many-classes.json", "fp32 PyTorch")[0]
                          - export_row("export-many-classes.json", "int8 static")[0]),
              3 * results("export-many-classes.json")["rows"], export_row("export-many-classes.json", "int8 static")[2]]),
    (("BENCHMARKS.md",), "static int8 is 3.8x faster than PyTorch eager fp32 (6.34 against 24.14 ms; 4.0x at 2 threads) and "
     "1.3x faster than the fp32 ONNX model (8.30 ms), and 3.2x smaller (2.83 against 9.09 MB)",
     "export.json", lambda: [static_against("export.json", "fp32 PyTorch", 5), export_row("export.json", "int8 static")[5],
                             export_row("export.json", "fp32 PyTorch")[5], static_against("export.json", "fp32 PyTorch", 8), 2,
                             static_against("export.json", "fp32 ONNX", 5), export_row("export.json", "fp32 ONNX")[5],
                             static_against("export.json", "fp32 PyTorch", 4), export_row("export.json", "int8 static")[4],
                             export_row("export.json", "fp32 PyTorch")[4]]),
    *[(("README.md",), line, "export.json", lambda kind=kind: [export_row("export.json", kind)[i] for i in (0, 1, 2, 4, 5)])
      for line, kind in (("| PyTorch fp32 | 0.896 ± 0.018 | 1.000 | 9.09 | 24.14 |", "fp32 PyTorch"),
                         ("| ONNX fp32 | 0.896 ± 0.018 | 1.000 | 9.20 | 8.30 |", "fp32 ONNX"),
                         ("| ONNX int8 static | 0.898 ± 0.014 | 0.997 | 2.83 | 6.34 |", "int8 static"))],
    (("docs/export.md",), "static int8 scores 0.898 ± 0.014 against the students' 0.896 ± 0.018 and agrees with them on 0.997 of the "
     "images, at 6.34 ms per image against 24.14 ms in PyTorch and 8.30 ms in fp32 ONNX (one thread), 2.83 MB against 9.09 MB",
     "export.json", lambda: [*[export_row("export.json", "int8 static")[i] for i in (0, 1)],
                             *[export_row("export.json", "fp32 PyTorch")[i] for i in (0, 1)],
                             export_row("export.json", "int8 static")[2], export_row("export.json", "int8 static")[5],
                             export_row("export.json", "fp32 PyTorch")[5], export_row("export.json", "fp32 ONNX")[5],
                             export_row("export.json", "int8 static")[4], export_row("export.json", "fp32 PyTorch")[4]]),
    (("docs/export.md",), "static int8 0.03 points under fp32 (0.976 against 0.977), agreeing on 0.996", "export-many-classes.json",
     lambda: [100 * (export_row("export-many-classes.json", "fp32 PyTorch")[0] - export_row("export-many-classes.json", "int8 static")[0]),
              export_row("export-many-classes.json", "int8 static")[0], export_row("export-many-classes.json", "fp32 PyTorch")[0],
              export_row("export-many-classes.json", "int8 static")[2]]),
    # one H200: benchmarks/gpu.py
    (("BENCHMARKS.md",), "fp32 239.9 images/s, bf16 218.7, fp16 221.8; bf16's logits within 0.0146 of fp32's and fp16's within 0.0018",
     "gpu.json", lambda: [gpu("stage_one", "fp32", "images_per_second"), gpu("stage_one", "bf16", "images_per_second"),
                          gpu("stage_one", "fp16", "images_per_second"),
                          gpu("stage_one", "bf16", "max_abs_logit_difference_vs_fp32"),
                          gpu("stage_one", "fp16", "max_abs_logit_difference_vs_fp32")]),
    (("BENCHMARKS.md",), "300 steps of batch 64 in bf16 autocast: 594.4 images/s from the cache against 222.5 with the "
     "teacher run online, **2.67x**",
     "gpu.json", lambda: [gpu("stage_two", "from_cache", "steps"), gpu("stage_two", "from_cache", "batch_size"),
                          gpu("stage_two", "from_cache", "images_per_second"),
                          gpu("stage_two", "online_teacher", "images_per_second"),
                          gpu("stage_two", "from_cache", "images_per_second")
                          / gpu("stage_two", "online_teacher", "images_per_second")]),
    (("BENCHMARKS.md",), "the student 8899.7 images/s, the teacher 1102.3", "gpu.json",
     lambda: [gpu("evaluate", "student-from_cache", "forward_images_per_second"),
              gpu("evaluate", "teacher", "forward_images_per_second")]),
]  # fmt: skip


def sweep_report() -> dict:
    return results("sweep/sweep.json")


def importances() -> list[dict]:
    return list(sweep_report()["importances"]["fanova_by_seed"].values())


def label_budget_row(fraction: float, recipe: str, size: int = 64) -> dict:
    """A label-budget row: 64 px is the first table (issue 25), 128 px the second (issue 36)."""
    (row,) = [
        row
        for row in results("label-budget.json")
        if row["fraction"] == fraction and row["recipe"] == recipe and row["settings"]["student_size"] == size
    ]
    return row


def budget(fraction: float, recipe: str, size: int = 64) -> list[float]:
    row = label_budget_row(fraction, recipe, size)
    return [row["test_accuracy_mean"], row["test_accuracy_sd"]]


def label_budget_figures(fraction: float, recipe: str) -> list[float]:
    """A row of BENCHMARKS' 128-px label-budget table: test mean, sd, validation mean, agreement."""
    row = label_budget_row(fraction, recipe, 128)
    return [
        row["test_accuracy_mean"],
        row["test_accuracy_sd"],
        row["validation_accuracy_mean"],
        row["teacher_agreement_mean"],
    ]


def label_budget_gain(fraction: float) -> float:
    """Points the teacher adds at 128 px: distilled over scratch, test means."""
    return 100 * (budget(fraction, "distilled", 128)[0] - budget(fraction, "scratch", 128)[0])


def label_budget_runs(size: int = 128) -> list[dict]:
    return [run for run in results("label-budget-runs.jsonl") if run["settings"]["student_size"] == size]


def label_budget_best_epochs() -> list[float]:
    """The best validation epochs of the 128-px students taught by the teacher (distilled and teacher alone)."""
    return [run["best_epoch"] for run in label_budget_runs() if run["recipe"] != "scratch"]


def label_budget_growth() -> list[float]:
    """Points each distilled row gained from 64 px (264 steps) to 128 px (495 steps)."""
    return [100 * (budget(f, "distilled", 128)[0] - budget(f, "distilled")[0]) for f in (0.05, 0.1, 0.25, 1.0)]


def budget_seeds(fraction: float, recipe: str, size: int = 64) -> list[float]:
    runs = [run for run in label_budget_runs(size) if run["fraction"] == fraction and run["recipe"] == recipe]
    return [run["test_accuracy"] for run in sorted(runs, key=lambda run: run["seed"])]


def demo(seed: int) -> dict:
    (run,) = [run for run in results("demo.json") if run["seed"] == seed]
    return run


# a number as a quote shows it: not part of a word (float32, top-1, fp16), with its thousands separators
FIGURE = re.compile(r"(?<![\w.])(?<![A-Za-z]-)\d[\d,]*(?:\.\d+)?")


@pytest.mark.parametrize(
    ("documents", "quote", "source", "values"), QUOTES, ids=[quote[:50] for _, quote, _, _ in QUOTES]
)
def test_each_quoted_figure_is_its_results_file_rounded(documents, quote, source, values):
    expected = values()
    shown = FIGURE.findall(quote)
    assert len(shown) == len(expected), f"{quote!r} shows {shown}, the check has {len(expected)} values"
    for text, value in zip(shown, expected):
        decimals = len(text.split(".")[1]) if "." in text else 0
        assert abs(float(text.replace(",", "")) - value) <= 0.5 * 10**-decimals + 1e-9, (
            f"{quote!r}: {text} is not {value} ({source}) rounded"
        )
    for document in documents:  # whatever the line breaks
        text = " ".join((REPO / document).read_text().split())
        assert " ".join(quote.split()) in text, f"{document} no longer quotes {quote!r} ({source})"


# Results files that BENCHMARKS.md does not quote yet (their sections are being written): once it names one, the
# figures it quotes from it go into QUOTES
NOT_YET_QUOTED = set()


def test_every_results_file_is_checked_and_every_benchmarks_results_file_exists():
    checked = {source for _, _, source, _ in QUOTES}
    kept = {str(path.relative_to(RESULTS)) for path in RESULTS.rglob("*") if path.suffix in (".json", ".jsonl")}
    assert kept - NOT_YET_QUOTED == checked, (
        "a results file whose quoted figures no test checks, or a check of a file not kept"
    )
    benchmarks = (REPO / "BENCHMARKS.md").read_text()
    assert not [name for name in NOT_YET_QUOTED if name in benchmarks], (
        "BENCHMARKS quotes it now: add its figures to QUOTES"
    )
    named = set(re.findall(r"benchmarks/results/([\w./-]+\.jsonl?)", (REPO / "BENCHMARKS.md").read_text()))
    assert named <= kept, f"BENCHMARKS.md names results files that do not exist: {sorted(named - kept)}"


def test_the_readme_stays_short_enough_to_read_at_one_sitting():
    """Issue 33: the README is the stranger's first page, at most 1,800 words; the rest belongs in docs/."""
    words = len((REPO / "README.md").read_text().split())
    assert words <= 1800, f"README.md has {words} words; move detail into docs/"


# docs/your-data.md, run: each of its kdcache commands in a folder holding tiny stand-ins of the files it names

YOUR_DATA = REPO / "docs" / "your-data.md"
ONNX_COMMANDS = ("export", "evaluate data/students/leaves data/exports")


def your_data_folder(root: Path) -> None:
    """The files docs/your-data.md names, tiny: class folders, a metadata.csv folder, a 'hub' dataset with other
    column names (a folder under the hub id's name, which kdcache reads before trying the hub), and teachers whose
    label names are the dataset's, the same in other spelling and order, generic, and as the tutorial saves them."""
    import csv

    import datasets
    from helpers import LABELS, make_images, save_vit_teacher

    for offset, (split, count) in enumerate({"train": 24, "validation": 12, "test": 12}.items()):
        images, labels = make_images(count, seed=offset)
        for index, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / "leaves" / split / LABELS[label]
            folder.mkdir(parents=True, exist_ok=True)
            image.save(folder / f"{index:04d}.png")
        if split != "test":
            folder = root / "photos" / split
            folder.mkdir(parents=True)
            with open(folder / "metadata.csv", "w", newline="") as file:
                writer = csv.writer(file)
                writer.writerow(["file_name", "disease"])
                for index, (image, label) in enumerate(zip(images, labels, strict=True)):
                    image.save(folder / f"img-{index + 1:04d}.png")
                    writer.writerow([f"img-{index + 1:04d}.png", LABELS[label]])
    features = datasets.Features(
        {"photo": datasets.Image(), "disease": datasets.ClassLabel(names=LABELS), "note": datasets.Value("string")}
    )
    splits = {}
    for offset, (split, count) in enumerate({"train": 24, "validation": 12, "test": 12}.items()):
        images, labels = make_images(count, seed=10 + offset)
        splits[split] = datasets.Dataset.from_dict(
            {"photo": images, "disease": labels, "note": ["field"] * count}, features=features
        )
    datasets.DatasetDict(splits).save_to_disk(str(root / "someone" / "leaf-photos"))
    save_vit_teacher(root / "teachers" / "leaves-vit")
    save_vit_teacher(root / "teachers" / "leaves-vit-renamed", {0: "Healthy", 1: "Bean Rust", 2: "Angular Leaf Spot"})
    save_vit_teacher(root / "teachers" / "leaves-generic", {index: f"LABEL_{index}" for index in range(3)})
    save_vit_teacher(root / "my_awesome_leaf_model")


def run_kdcache(line: str):
    from typer.testing import CliRunner

    from kdcache.cli import app

    return CliRunner().invoke(app, shlex.split(line)[1:])


def test_every_command_of_the_your_data_tutorial_runs_on_tiny_stand_ins(tmp_path, monkeypatch):
    """Each command as written, in order; train-student gets `--epochs 1` added (the last flag wins), to keep the
    suite short. The export commands need the [export] extra and are left out without it."""
    import datasets
    import numpy as np
    from helpers import cached_logits

    from kdcache.format.manifest import Manifest

    try:
        import onnxruntime  # noqa: F401

        exports = True
    except ImportError:
        exports = False
    lines = [line for document, line in documented_commands() if document == YOUR_DATA.name]
    assert {shlex.split(line)[1] for line in lines} >= {"teacher-logits", "train-student", "evaluate", "export"}
    your_data_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    for line in lines:
        if not exports and any(part in line for part in ONNX_COMMANDS):
            continue
        result = run_kdcache(line + (" --epochs 1" if shlex.split(line)[1] == "train-student" else ""))
        assert result.exit_code == 0, f"`{line}` failed:\n{result.output}"

    # the metadata.csv's names, numbered in sorted order over the splits, as the cache records them
    photos = Manifest.read(tmp_path / "data" / "photos-cache")
    assert photos.label_names == sorted(["angular_leaf_spot", "bean_rust", "healthy"])
    assert photos.dataset["label_column"] == "disease"
    cached = datasets.load_from_disk(str(tmp_path / "data" / "photos-cache"))["validation"]
    names = [row.split(",")[1] for row in (tmp_path / "photos/validation/metadata.csv").read_text().split()[1:]]
    assert list(cached["labels"]) == [photos.label_names.index(name) for name in names]
    # the renamed teacher (the same weights, its outputs named Healthy, Bean Rust, Angular Leaf Spot) stored in the
    # dataset's order: the plain teacher's logits with the classes reversed
    plain = cached_logits(tmp_path / "data" / "leaves-cache", "test")
    renamed = cached_logits(tmp_path / "data" / "leaves-renamed-cache", "test")
    assert np.array_equal(renamed, plain[..., ::-1]) and not np.array_equal(renamed, plain)
    hub = Manifest.read(tmp_path / "data" / "leaf-photos-cache").dataset
    assert (hub["image_column"], hub["label_column"]) == ("photo", "disease")


def test_the_refusals_the_your_data_tutorial_shows_are_what_kdcache_says(tmp_path, monkeypatch):
    import shutil

    your_data_folder(tmp_path)
    monkeypatch.chdir(tmp_path)
    text = YOUR_DATA.read_text()
    generic = run_kdcache("kdcache teacher-logits --dataset leaves --teacher teachers/leaves-generic --output x")
    # what the user reads last (datasets' own bars come before it)
    assert generic.exit_code == 1 and generic.output.strip().splitlines()[-1] in text.splitlines(), generic.output
    shutil.copytree("my_awesome_leaf_model", "saved_without_processor")
    Path("saved_without_processor/preprocessor_config.json").unlink()
    missing = run_kdcache("kdcache teacher-logits --dataset leaves --teacher saved_without_processor --output x")
    refusal = missing.output.strip().splitlines()[-1]
    assert missing.exit_code == 1 and refusal.startswith(
        "kdcache: error: --teacher 'saved_without_processor' holds"
    ), refusal
    assert "preprocessor_config.json" in refusal and "save_pretrained('saved_without_processor')" in refusal
    assert not Path("x").exists() and not any(Path().glob("x.*"))
