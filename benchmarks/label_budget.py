"""What the teacher is worth when labels are few: `benchmarks/results/label-budget.json` and its plot.

    OMP_NUM_THREADS=1 python benchmarks/label_budget.py run --dataset ../shared/data/beans \\
        --teacher ../shared/teachers/effl0-beans --student-size 128 --epochs 15 --fractions 0.1 1.0 0 0.05 0.25
    python benchmarks/label_budget.py table      # run ends with it too

One K=1 cache (stage one, ROOT/cache, reused when up to date). For each labelled fraction F of the train split
(`--labeled-fraction`: a seeded, class-stratified share, the same rows for both recipes of a seed) and each seed, two
students at the same number of optimizer steps (one at fraction 0, where no label is kept):
- scratch: `alpha=0` on the labelled rows alone (the other rows are left out), `max_steps` set to the distilled
  student's steps, so at small F it makes many short epochs; it is validated every k epochs (k epochs of its rows
  being about one epoch of the whole split), so both recipes are validated about as often in steps and pick their best
  checkpoint from about as many candidates;
- distilled: the default loss (alpha 0.5) on every train row, the cross-entropy on the labelled ones;
- teacher-alone (fraction 0, the only recipe there): alpha 1 on every train row, so no label enters the loss.
Every choice (the best checkpoint) is made on the validation split, with its labels; each final student is evaluated
once on the test split (kdcache.evaluation.evaluate.evaluate_models). One line per student goes to
benchmarks/results/label-budget-runs.jsonl as it finishes; a killed run started again skips the students whose line
is there (same fraction, recipe, seed and settings). Several processes started side by side (one thread each:
OMP_NUM_THREADS=1) share the grid, each claiming the next student that none has claimed. `table` averages the seeds
into label-budget.json and plots, for each student size, test accuracy against the fraction (mean, error bars one sd)
to label-budget-{size}px.png.
"""

import argparse
import json
import math
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS, TABLE = RESULTS / "label-budget-runs.jsonl", RESULTS / "label-budget.json"
RECIPES = ("scratch", "distilled", "teacher-alone")


def recipes_at(fraction: float) -> tuple[str, ...]:
    """No label to learn from at fraction 0: the teacher alone teaches there."""
    return ("teacher-alone",) if fraction == 0 else ("scratch", "distilled")


def run(args):
    from kdcache.demo import epochs_per_validation, evaluate_every
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.format.manifest import Manifest
    from kdcache.options import TrainingOptions
    from kdcache.student.train import train_student
    from kdcache.teacher.run import teacher_logits

    root = Path(args.root)
    settings = {
        "student_size": args.student_size,
        "epochs": args.epochs,
        "learning_rate": args.learning_rate,
        "batch_size": TrainingOptions.batch_size,
    }
    started = time.time()
    cache = teacher_logits(args.dataset, args.teacher, output=root / "cache", progress=False)
    manifest = Manifest.read(cache)
    train_rows = manifest.split("train")["num_rows"]
    # the distilled student's steps: every train row, each epoch (the Trainer's last partial batch counts as a step)
    steps = args.epochs * math.ceil(train_rows / settings["batch_size"])
    # fraction by fraction, in the order given: a run stopped early has every seed of its first fractions
    grid = [
        (fraction, seed, recipe)
        for fraction in args.fractions
        for seed in args.seeds
        for recipe in recipes_at(fraction)
    ]
    for fraction, seed, recipe in grid:
        student = root / "students" / f"{recipe}-f{fraction:g}-s{seed}"
        claim = claimed(student)
        if claim is None or (fraction, recipe, seed) in finished(settings):
            if claim:
                claim.release()
            continue
        training = dict(
            labeled_fraction=fraction or None,
            student_size=args.student_size,
            epochs=args.epochs,
            learning_rate=args.learning_rate,
            seed=seed,
        )
        callbacks, every = [], 1
        if recipe == "scratch":
            labeled = labeled_rows(manifest, cache, fraction, seed)
            every = epochs_per_validation({"steps": steps, "epochs": args.epochs}, labeled, settings["batch_size"])
            training.update(alpha=0.0, max_steps=steps)
            callbacks = [evaluate_every(every)] if every > 1 else []
        elif recipe == "teacher-alone":
            training.update(alpha=1.0)  # the cross-entropy's weight is 0: the labels never reach the loss
        summary = train_student(
            cache,
            output=student,
            overwrite=True,
            progress=False,
            logging_steps=50,
            callbacks=callbacks,
            **training,
        )
        report = evaluate_models(  # once per final student: every choice was made on validation
            [str(student)],
            dataset=args.dataset,
            split="test",
            cache=str(cache),
            output=student / "eval-test",
            progress=False,
        )
        result = report["models"][0]
        line = {
            "fraction": fraction,
            "recipe": recipe,
            "seed": seed,
            "settings": settings,
            "training": training,
            "labeled_rows": 0 if recipe == "teacher-alone" else summary["recipe"]["labeled_rows"],
            "training_rows": summary["recipe"]["training_rows"],
            "steps": summary["steps"],
            "epochs": summary["epochs"],
            "validated_every_epochs": every,
            "validation_accuracy": summary["best_eval_accuracy"],
            "best_epoch": summary["best_epoch"],
            "curve": [round(entry["eval_accuracy"], 4) for entry in summary["history"]],
            "test_accuracy": result["accuracy"],
            "teacher_agreement": result["teacher_agreement"]["top1_agreement"],
            "teacher_test_accuracy": result["teacher_agreement"]["teacher_accuracy"],
            "stage_two_minutes": round(summary["seconds"] / 60, 2),
            "output": str(student),
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            "wall_minutes_so_far": round((time.time() - started) / 60, 2),
        }
        RESULTS.mkdir(parents=True, exist_ok=True)
        with open(RUNS, "a") as runs:
            runs.write(json.dumps(line) + "\n")
        print(json.dumps({key: line[key] for key in line if key not in ("training", "curve")}), flush=True)
        claim.release()
    table(args)


def claimed(student: Path):
    """The student's claim (a held file lock beside its folder), or None when another process of the benchmark holds
    it: processes started side by side share the grid, each training the next student nobody has claimed."""
    import filelock

    from kdcache.outputs import lock_file

    student.parent.mkdir(parents=True, exist_ok=True)
    claim = filelock.FileLock(str(student.with_name(student.name + ".claim")))
    try:
        claim.acquire(timeout=0)
        # a student being trained by a process that did not claim it (train_student's own lock) is taken too
        with filelock.FileLock(str(lock_file(student))).acquire(timeout=0):
            pass
    except filelock.Timeout:
        if claim.is_locked:
            claim.release()
        return None
    return claim


def finished(settings: dict) -> set:
    """The students another process has finished since this one started."""
    return {(line["fraction"], line["recipe"], line["seed"]) for line in read_runs() if line["settings"] == settings}


def labeled_rows(manifest, cache, fraction: float, seed: int) -> int:
    """How many train rows keep their label at `fraction` with `seed` (kdcache.labels, as train_student draws them)."""
    import datasets
    import numpy as np

    from kdcache.labels import labeled_subset

    labels = np.asarray(
        datasets.load_from_disk(str(cache))["train"].with_format("numpy", columns=["labels"])["labels"]
    )
    return int(labeled_subset(labels, fraction, seed, manifest.label_names).sum())


def read_runs() -> list[dict]:
    return [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()] if RUNS.exists() else []


def table(args=None):
    lines = read_runs()
    rows = []
    for key in dict.fromkeys((line["fraction"], line["recipe"], json.dumps(line["settings"])) for line in lines):
        runs = [line for line in lines if (line["fraction"], line["recipe"], json.dumps(line["settings"])) == key]

        def mean(name, runs=runs):
            return round(statistics.mean(line[name] for line in runs), 4)

        rows.append(
            {
                "fraction": key[0],
                "recipe": key[1],
                "seeds": [line["seed"] for line in runs],
                "test_accuracy_mean": mean("test_accuracy"),
                "test_accuracy_sd": round(statistics.stdev(line["test_accuracy"] for line in runs), 4)
                if len(runs) > 1
                else None,
                "validation_accuracy_mean": mean("validation_accuracy"),
                "teacher_agreement_mean": mean("teacher_agreement"),
                "steps": runs[0]["steps"],
                "stage_two_minutes": mean("stage_two_minutes"),
                "labeled_rows": [line["labeled_rows"] for line in runs],
                "training_rows": runs[0]["training_rows"],
                "teacher_test_accuracy": runs[0]["teacher_test_accuracy"],
                "settings": runs[0]["settings"],
            }
        )
    rows.sort(key=lambda row: (json.dumps(row["settings"]), row["fraction"], RECIPES.index(row["recipe"])))
    RESULTS.mkdir(parents=True, exist_ok=True)
    TABLE.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"{'fraction':>9}{'recipe':>11}{'seeds':>7}{'test mean':>11}{'sd':>8}{'val mean':>10}{'agree':>8}{'steps':>7}{'min':>7}"
    )
    for row in rows:
        print(
            f"{row['fraction']:>9g}{row['recipe']:>11}{len(row['seeds']):>7}{row['test_accuracy_mean']:>11.4f}"
            f"{row['test_accuracy_sd'] or 0:>8.4f}{row['validation_accuracy_mean']:>10.4f}"
            f"{row['teacher_agreement_mean']:>8.4f}{row['steps']:>7}{row['stage_two_minutes']:>7.1f}"
        )
    for settings in dict.fromkeys(json.dumps(row["settings"]) for row in rows):
        plot([row for row in rows if json.dumps(row["settings"]) == settings])


def plot(rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for recipe, colour, label in (
        ("scratch", "tab:gray", "from scratch, labelled rows alone (alpha 0)"),
        ("distilled", "tab:blue", "distilled, every train image (alpha 0.5)"),
    ):
        points = points_of(rows, recipe)
        axes.errorbar(
            [row["fraction"] for row in points],
            [row["test_accuracy_mean"] for row in points],
            yerr=[row["test_accuracy_sd"] or 0 for row in points],
            color=colour,
            marker="o",
            capsize=4,
            label=label,
        )
        for row in points:  # a point with fewer seeds than the others says so
            if len(row["seeds"]) < 3:
                axes.annotate(
                    f"{len(row['seeds'])} seed{'s' if len(row['seeds']) > 1 else ''}",
                    (row["fraction"], row["test_accuracy_mean"]),
                    textcoords="offset points",
                    xytext=(6, -12),
                    fontsize=7,
                    color=colour,
                )
    for row in points_of(rows, "teacher-alone"):
        axes.axhline(
            row["test_accuracy_mean"],
            color="tab:purple",
            linestyle=":",
            label=f"no label at all, the teacher alone (alpha 1): {row['test_accuracy_mean']:.3f}",
        )
    axes.axhline(rows[0]["teacher_test_accuracy"], color="tab:green", linestyle="--", label="teacher effl0-beans")
    axes.set_xscale("log")
    fractions = sorted({row["fraction"] for row in rows if row["fraction"] > 0})
    axes.set_xticks(fractions, [f"{fraction:.0%}" for fraction in fractions])
    axes.minorticks_off()
    axes.set_xlabel("labelled share of the train split (1,034 images)")
    axes.set_ylabel("test accuracy (mean ± sd over 3 seeds)")
    settings = rows[0]["settings"]
    axes.set_title(
        f"beans: MobileNetV2 at {settings['student_size']} px, {settings['epochs']} epochs' steps, same steps per pair",
        fontsize=10,
    )
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(RESULTS / f"label-budget-{settings['student_size']}px.png", dpi=110)


def points_of(rows, recipe):
    return [row for row in rows if row["recipe"] == recipe]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--dataset", required=True)
    runner.add_argument("--teacher", required=True)
    runner.add_argument("--root", default="data/label-budget", help="folder for the cache and the students")
    runner.add_argument(
        "--fractions", type=float, nargs="+", default=[0.05, 0.1, 0.25, 1.0], help="0: no label, the teacher alone"
    )
    runner.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runner.add_argument("--student-size", type=int, default=128, help="the student's input, pixels")
    runner.add_argument("--epochs", type=int, default=15, help="epochs of the whole train split (the distilled run)")
    runner.add_argument("--learning-rate", type=float, default=1e-3)
    commands.add_parser("table")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
