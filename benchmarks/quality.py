"""Student quality by recipe, over seeds: what `benchmarks/results/quality.json` and BENCHMARKS.md's quality table are.

    python benchmarks/quality.py run --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \\
        --recipes patient,scratch,views --seeds 0 1 2 --test     # add k1-defaults for the K=1 defaults row
    python benchmarks/quality.py table

`run` makes each recipe's cache once (ROOT/caches/NAME, reused when up to date), trains one student per seed
(ROOT/students/RECIPE-sSEED) and appends a line per student to benchmarks/results/quality-runs.jsonl: the validation
curve, the best validation accuracy, the stage-one and stage-two minutes and, with --test, the test accuracy and the
agreement with the teacher on the test split. Choices are made on validation runs without --test; the test split is
evaluated once per final student. `table` averages the lines of each recipe into benchmarks/results/quality.json and
plots the validation curves (mean over seeds) to benchmarks/results/quality-curves.png.

A recipe is a cache (stage one's options) and a training (stage two's); `--set KEY=VALUE` overrides a training option
of every recipe run (for the validation sweeps) and is recorded in the line.
"""

import argparse
import json
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
RUNS, TABLE, CURVES = RESULTS / "quality-runs.jsonl", RESULTS / "quality.json", RESULTS / "quality-curves.png"

# Stage one: the clean view (K=1), and 16 inception-style views (5-100% of the area, as Beyer et al.) per training
# image, each alone or mixed with a view of another image (function matching).
CACHES = {
    "k1": {},
    "views16": {"views": 16, "view_scale": (0.05, 1.0)},
    "mixed16": {"views": 16, "view_scale": (0.05, 1.0), "mix_alpha": 1.0},
}
# Stage two of the patient recipe: the teacher alone (alpha=1), at 128 px, with an EMA of the weights; 16 epochs is
# what this session could afford on a 2-core CPU (BENCHMARKS.md), not what the recipe is for.
PATIENT = {"alpha": 1.0, "student_size": 128, "epochs": 16, "learning_rate": 1e-3, "ema_decay": 0.99}
# The options benchmarks/sweep.py chose on validation (results/sweep/sweep.json, trial 2), at the finals' 224 px and
# 20 epochs: its "swept" rows are written by sweep.py, this copy is for the controls beside them.
SWEPT = {
    "learning_rate": 0.0010229186121747333,
    "temperature": 1.1814836227952394,
    "alpha": 0.6847637345150963,
    "weight_decay": 0.007424116619296478,
    "ema_decay": None,
    "student_size": 224,
    "epochs": 20,
}
RECIPES = {
    "k1-defaults": ("k1", {}),
    # The K=1 defaults again on the machine the swept finals ran on (2026-12-01): figures from two machines do not
    # compare, and the first k1-defaults rows are from 2026-11-23.
    "k1-defaults-beside-swept": ("k1", {}),
    "swept-labels-only": ("k1", {**SWEPT, "alpha": 0.0}),  # what the teacher adds to the swept options
    "scratch": ("views16", {**PATIENT, "alpha": 0.0}),  # the same schedule and views, from labels alone
    "views": ("views16", PATIENT),  # consistent views, not mixed
    "patient": ("mixed16", PATIENT),  # consistent mixed views: function matching
    # Issue 15's losses on the recipe chosen on validation (views), each at its paper's temperature (DKD T=4, TCKD + 8
    # NCKD; DIST T=1, inter + intra) and with its paper's cross-entropy: DKD and DIST add their terms to CE with weight
    # 1, which alpha=0.5 gives up to a factor 2 that AdamW does not see (the teacher alone, alpha=1, left DKD at 0.586
    # on validation with seed 0: its terms split the probabilities around the label and say little on 3 classes
    # without CE). Logit standardisation with KD at the paper's base temperature 2 (standardised logits have unit
    # spread, so T=5 would flatten the targets), the teacher alone as the views recipe.
    "views-dkd": ("views16", {**PATIENT, "loss": "dkd", "alpha": 0.5}),
    "views-dist": ("views16", {**PATIENT, "loss": "dist", "alpha": 0.5}),
    "views-kd-standardized": ("views16", {**PATIENT, "standardize_logits": True, "temperature": 2.0}),
}


def run(args):
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.format.manifest import Manifest
    from kdcache.student.model import BATCHNORM_MOMENTUM
    from kdcache.student.train import train_student
    from kdcache.teacher.run import teacher_logits

    root = Path(args.root)
    overrides = dict(parse_setting(item) for item in args.set)
    for name in args.recipes.split(","):
        cache_name, training = RECIPES[name]
        training = {**training, **overrides}
        started = time.time()
        cache = teacher_logits(args.dataset, args.teacher, output=root / "caches" / cache_name, **CACHES[cache_name])
        manifest = Manifest.read(cache)
        for seed in args.seeds:
            tag = "-".join(f"{key}{value}" for key, value in sorted(overrides.items()))
            student = root / "students" / f"{name}{'-' + tag if tag else ''}-s{seed}"
            summary = train_student(cache, output=student, seed=seed, overwrite=True, logging_steps=50, **training)
            line = {
                "recipe": name,
                "cache": cache_name,
                "seed": seed,
                "overrides": overrides,
                "training": training,
                "cache_options": {
                    key: list(value) if isinstance(value, tuple) else value
                    for key, value in CACHES[cache_name].items()
                },
                "validation_accuracy": summary["best_eval_accuracy"],
                "best_epoch": summary["best_epoch"],
                "epochs": summary["epochs"],
                "curve": [round(entry["eval_accuracy"], 4) for entry in summary["history"]],
                "stage_one_minutes": round(manifest["seconds"] / 60, 2),
                "stage_two_minutes": round(summary["seconds"] / 60, 2),
                "student_size": summary["recipe"]["student_size"][0],
                "output": str(student),
                "batchnorm_momentum": BATCHNORM_MOMENTUM,
                "ema_warmup": True,  # kdcache.student.ema.ema_decay_at; runs before it had an EMA that stayed at chance
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                "wall_minutes": round((time.time() - started) / 60, 2),
            }
            if args.test:  # once per final student, after every choice was made on validation
                report = evaluate_models(
                    [str(student)],
                    dataset=args.dataset,
                    split="test",
                    cache=str(cache),
                    output=student / "eval-test",
                    progress=False,
                )
                result = report["models"][0]
                line.update(
                    test_accuracy=result["accuracy"],
                    teacher_agreement=result["teacher_agreement"]["top1_agreement"],
                    teacher_test_accuracy=result["teacher_agreement"]["teacher_accuracy"],
                )
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(RUNS, "a") as runs:
                runs.write(json.dumps(line) + "\n")
            print(json.dumps({key: line[key] for key in line if key not in ("training", "cache_options")}), flush=True)


def parse_setting(item: str):
    key, _, value = item.partition("=")
    return key, json.loads(value)


def table(args):
    lines = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    final = [line for line in lines if "test_accuracy" in line]
    for line in final:  # runs before the BatchNorm fix (kdcache.student.model.BATCHNORM_MOMENTUM) are their own rows
        if line.get("batchnorm_momentum", 0.997) != 0.1:
            line["recipe"] += f" (BatchNorm momentum {line.get('batchnorm_momentum', 0.997)})"
        if line["training"].get("ema_decay") and not line.get("ema_warmup"):
            line["recipe"] += " (EMA without warm-up)"
    rows = []
    for recipe in dict.fromkeys(line["recipe"] for line in final):
        runs = [line for line in final if line["recipe"] == recipe]
        if len(runs) < 3:  # a quality figure is a mean and sd over 3 seeds at least; the lines stay in RUNS
            print(f"{recipe}: {len(runs)} seed(s), not a row of the table")
            continue

        def mean(key, runs=runs):
            return round(statistics.mean(line[key] for line in runs), 4)

        def sd(key, runs=runs):
            return round(statistics.stdev(line[key] for line in runs), 4) if len(runs) > 1 else None

        rows.append(
            {
                "recipe": recipe,
                "seeds": [line["seed"] for line in runs],
                "test_accuracy_mean": mean("test_accuracy"),
                "test_accuracy_sd": sd("test_accuracy"),
                "validation_accuracy_mean": mean("validation_accuracy"),
                "validation_accuracy_sd": sd("validation_accuracy"),
                "teacher_agreement_mean": mean("teacher_agreement"),
                "stage_one_minutes": runs[0]["stage_one_minutes"],
                "stage_two_minutes": mean("stage_two_minutes"),
                "epochs": runs[0]["epochs"],
                "student_size": runs[0]["student_size"],
                "teacher_test_accuracy": runs[0]["teacher_test_accuracy"],
                "cache": runs[0]["cache"],
                "training": runs[0]["training"],
                "batchnorm_momentum": runs[0].get("batchnorm_momentum", 0.997),
                # a recipe found by benchmarks/sweep.py: its study's trials and minutes
                **({"sweep": runs[0]["sweep"]} if "sweep" in runs[0] else {}),
            }
        )
    TABLE.write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"{'recipe':<40}{'test mean':>10}{'sd':>8}{'val mean':>10}{'agree':>8}{'stage 1 min':>13}{'stage 2 min':>13}{'epochs':>8}{'px':>5}"
    )
    for row in rows:
        print(
            f"{row['recipe']:<40}{row['test_accuracy_mean']:>10.4f}{row['test_accuracy_sd'] or 0:>8.4f}"
            f"{row['validation_accuracy_mean']:>10.4f}{row['teacher_agreement_mean']:>8.4f}{row['stage_one_minutes']:>13.1f}"
            f"{row['stage_two_minutes']:>13.1f}{row['epochs']:>8g}{row['student_size']:>5}"
        )
    plot(final)


def plot(final):
    """Left: the recipes (runs from before a fix dashed); right: issue 15's losses on the views recipe."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    figure, (recipes, losses) = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colours = iter(plt.get_cmap("tab10").colors * 2)
    for recipe in dict.fromkeys(line["recipe"] for line in final):
        curves = [line["curve"] for line in final if line["recipe"] == recipe]
        if len(curves) < 3:  # as in the table
            continue
        length = min(len(curve) for curve in curves)
        mean = np.mean([curve[:length] for curve in curves], axis=0)
        before_a_fix = "(" in recipe
        colour = next(colours)
        for axes in [recipes] if not recipe.startswith("views-") else []:
            axes.plot(
                range(1, length + 1),
                mean,
                color=colour,
                linestyle="--" if before_a_fix else "-",
                alpha=0.5 if before_a_fix else 1.0,
                label=f"{recipe} ({len(curves)} seeds)",
            )
        if recipe.startswith("views") and not before_a_fix:
            label = "views (kd)" if recipe == "views" else recipe
            losses.plot(range(1, length + 1), mean, color=colour, label=f"{label} ({len(curves)} seeds)")
    recipes.set_title("recipes (dashed: before the BatchNorm / EMA fixes)")
    losses.set_title("losses on the views recipe (16 epochs, 128 px)")
    for axes in (recipes, losses):
        axes.set_xlabel("epoch")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=7, loc="lower right")
    recipes.set_ylabel("validation accuracy (mean over seeds)")
    figure.suptitle("beans, MobileNetV2 student, teacher effl0-beans")
    figure.tight_layout()
    figure.savefig(CURVES, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--dataset", required=True)
    runner.add_argument("--teacher", required=True)
    runner.add_argument("--root", default="data/quality", help="folder for the caches and the students")
    runner.add_argument("--recipes", default="patient,views,scratch,k1-defaults")
    runner.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runner.add_argument("--set", action="append", default=[], metavar="KEY=JSON", help="override a training option")
    runner.add_argument("--test", action="store_true", help="evaluate each final student on the test split")
    commands.add_parser("table")
    args = parser.parse_args()
    run(args) if args.command == "run" else table(args)


if __name__ == "__main__":
    main()
