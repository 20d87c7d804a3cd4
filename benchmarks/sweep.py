"""`kdcache sweep` on beans under a CPU-minute budget: the study, its plots and a "swept" row of the quality table.

    nice -n 15 python benchmarks/sweep.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \\
        --budget-cpu-minutes 45 --final-seeds 3 --test

Makes the K=1 cache once (ROOT/caches/k1, reused when up to date), then runs the study of SPACE over FIXED one trial
at a time (each a `kdcache.sweep` call that continues the study in ROOT/sweep) until this process and its children
have used the budget's CPU time: a trial started under the budget runs to its end (or its pruning). Then the best
options are retrained with seeds 0..K-1 (--final-seeds, validation only) and, with --test, each final student is
evaluated once on the test split. Writes benchmarks/results/sweep/ (sweep.json, the plots), and with --test appends
the final students to quality-runs.jsonl as recipe "swept" and rebuilds quality.json (benchmarks/quality.py table).
"""

import argparse
import json
import resource
import shutil
import time
from pathlib import Path

from kdcache.outputs import TRAINING_RECORD

RESULTS = Path(__file__).resolve().parent / "results"

# What the sweep draws: the options BENCHMARKS.md found moving beans results by several points, one seed each.
SPACE = [
    "learning_rate=loguniform(3e-4,5e-3)",
    "temperature=uniform(1,8)",
    "alpha=uniform(0.3,1.0)",
    "weight_decay=loguniform(1e-3,1e-1)",
    "ema_decay=choice(none,0.99)",
]
# Every trial: the K=1 cache at 96 px (under a fifth of a 224 px step's cost), 8 epochs: what a 2-core CPU shared by
# four sessions affords for a few trials in an hour, not what the recipe is best at.
FIXED = {"student_size": 96, "epochs": 8, "seed": 0, "logging_steps": 50}


def cpu_minutes() -> float:
    used = [resource.getrusage(who) for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)]
    return sum(usage.ru_utime + usage.ru_stime for usage in used) / 60


def past(deadline: str | None) -> bool:
    return deadline is not None and time.strftime("%H:%M", time.gmtime()) >= deadline


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="../shared/data/beans")
    parser.add_argument("--teacher", default="../shared/teachers/effl0-beans")
    parser.add_argument("--root", default="data/bench-sweep")
    parser.add_argument("--budget-cpu-minutes", type=float, required=True)
    parser.add_argument("--max-trials", type=int, default=40)
    parser.add_argument(
        "--deadline", default=None, help="HH:MM (UTC): start no trial after it, whatever is left of the budget"
    )
    parser.add_argument("--final-seeds", type=int, default=3)
    parser.add_argument(
        "--final-student-size",
        type=int,
        default=None,
        help=f"retrain the best options at this size (default: the trials' own, {FIXED['student_size']})",
    )
    parser.add_argument(
        "--final-epochs", type=float, default=None, help="and for this many epochs (default: the trials' own)"
    )
    parser.add_argument("--test", action="store_true", help="evaluate each final student once on the test split")
    parser.add_argument("--results", default=str(RESULTS), help="where the study, plots and quality table go")
    args = parser.parse_args()

    from kdcache.format.manifest import Manifest
    from kdcache.sweeps.run import sweep
    from kdcache.teacher.run import teacher_logits

    root, started = Path(args.root), time.time()
    cache = teacher_logits(args.dataset, args.teacher, output=root / "caches" / "k1")
    stage_one_minutes = round(Manifest.read(cache)["seconds"] / 60, 2)
    output = root / "sweep"
    report = None
    for trials in range(1, args.max_trials + 1):
        done = (
            len(json.loads((output / "sweep.json").read_text())["trials"]) if (output / "sweep.json").exists() else 0
        )
        if trials <= done:
            continue
        if cpu_minutes() >= args.budget_cpu_minutes or past(args.deadline):
            break
        report = sweep(cache, output, SPACE, trials=trials, sampler_seed=0, **FIXED)
    if report is None and not done:
        raise SystemExit(f"sweep.py: the budget of {args.budget_cpu_minutes:g} CPU-minutes was spent before any trial")
    sweep_cpu, sweep_wall = round(cpu_minutes(), 1), round((time.time() - started) / 60, 1)
    print(f"sweep: {sweep_cpu} CPU-minutes, {sweep_wall} wall minutes (this process)", flush=True)
    final_fixed = {
        **FIXED,
        **{
            key: value
            for key, value in (("student_size", args.final_student_size), ("epochs", args.final_epochs))
            if value
        },
    }
    same_fidelity = final_fixed == FIXED
    report = sweep(  # the study's report (and, at the trials' own fidelity, its final seeds)
        cache,
        output,
        SPACE,
        trials=report["trials_wanted"] if report else done,
        sampler_seed=0,
        final_seeds=args.final_seeds if same_fidelity else 0,
        **FIXED,
    )
    if not same_fidelity and args.final_seeds:
        report["final_seeds"] = final_seeds_at(cache, root / "final", report, final_fixed, args.final_seeds)
    out = Path(args.results) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    report["budget_cpu_minutes"] = args.budget_cpu_minutes
    report["sweep_cpu_minutes"], report["sweep_wall_minutes"] = sweep_cpu, sweep_wall  # the study alone, no finals
    report["cpu_minutes_this_run"] = round(cpu_minutes(), 1)
    report["wall_minutes_this_run"] = round((time.time() - started) / 60, 1)
    report["space"], report["fixed"] = SPACE, FIXED
    report["importances"] = importances(report)
    (out / "sweep.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    for name, path in report.get("plots", {}).get("written", {}).items():
        shutil.copy(path, out / f"{name}.png")
    if args.test and report.get("final_seeds"):
        test_finals(args, cache, report, stage_one_minutes)


def importances(report: dict, seeds=(0, 1, 2)) -> dict:
    """fANOVA importances of the swept options over the completed trials, once per evaluator seed: with a handful of
    trials they move with the seed, and the spread says how far to trust the plot (drawn with one random seed)."""
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.load_study(study_name=report["study"], storage=report["storage"])
    by_seed = {}
    for seed in seeds:
        evaluator = optuna.importance.FanovaImportanceEvaluator(seed=seed)
        values = optuna.importance.get_param_importances(study, evaluator=evaluator)
        by_seed[str(seed)] = {name: round(float(value), 3) for name, value in values.items()}
    return {"completed_trials": report["counts"]["complete"], "fanova_by_seed": by_seed}


def final_seeds_at(cache, root: Path, report: dict, fixed: dict, seeds: int) -> dict:
    """The best trial's options retrained at another fidelity (a larger student, more epochs) with seeds 0..K-1: the
    trials are cheap low-fidelity runs, the finals what a user would train (a finished seed is reused)."""
    import statistics

    from kdcache.student.train import train_student

    best = report["best"]
    runs = []
    for seed in range(seeds):
        folder = root / f"trial-{best['trial']:04d}" / f"seed-{seed}"
        record = folder / TRAINING_RECORD
        if record.exists():
            summary = json.loads(record.read_text())
        else:
            options = {**best["options"], **fixed, "seed": seed, "overwrite": True, "resume": False}
            summary = train_student(cache, output=folder, progress=False, verify=False, **options)
        runs.append({"seed": seed, "validation_accuracy": summary["best_eval_accuracy"], "student": str(folder)})
        print(
            f"final seed {seed} of trial {best['trial']}: validation {summary['best_eval_accuracy']:.4f}", flush=True
        )
    values = [run["validation_accuracy"] for run in runs]
    return {
        "trial": best["trial"],
        "fixed": fixed,
        "runs": runs,
        "validation_accuracy_mean": round(statistics.mean(values), 4),
        "validation_accuracy_sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
    }


def test_finals(args, cache, report, stage_one_minutes):
    """Each final student evaluated once on test, as lines of quality-runs.jsonl (recipe "swept"); then the table."""
    import sys

    from kdcache.evaluation.evaluate import evaluate_models

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import quality

    quality.RUNS, quality.TABLE = Path(args.results) / quality.RUNS.name, Path(args.results) / quality.TABLE.name
    quality.CURVES = Path(args.results) / quality.CURVES.name
    finals = report["final_seeds"]
    best = next(record for record in report["trials"] if record["trial"] == finals["trial"])
    training = {**report["final_seeds"].get("fixed", FIXED), **best["params"]}
    training.pop("logging_steps")
    for run in finals["runs"]:
        student = Path(run["student"])
        summary = json.loads((student / TRAINING_RECORD).read_text())
        result = evaluate_models(
            [str(student)],
            dataset=args.dataset,
            split="test",
            cache=str(cache),
            output=student / "eval-test",
            progress=False,
        )["models"][0]
        line = {
            "recipe": "swept",
            "cache": "k1",
            "seed": run["seed"],
            "overrides": {},
            "training": training,
            "cache_options": {},
            "validation_accuracy": summary["best_eval_accuracy"],
            "best_epoch": summary["best_epoch"],
            "epochs": summary["epochs"],
            "curve": [round(entry["eval_accuracy"], 4) for entry in summary["history"]],
            "stage_one_minutes": stage_one_minutes,
            "stage_two_minutes": round(summary["seconds"] / 60, 2),
            "student_size": summary["recipe"]["student_size"][0],
            "output": str(student),
            "batchnorm_momentum": 0.1,
            "ema_warmup": True,
            "test_accuracy": result["accuracy"],
            "teacher_agreement": result["teacher_agreement"]["top1_agreement"],
            "teacher_test_accuracy": result["teacher_agreement"]["teacher_accuracy"],
            "sweep": {
                "trials": report["counts"],
                "trial_minutes": report["minutes"],
                "cpu_minutes": report["sweep_cpu_minutes"],
                "wall_minutes": report["sweep_wall_minutes"],
                "cpu_minutes_with_finals": report["cpu_minutes_this_run"],
                "budget_cpu_minutes": args.budget_cpu_minutes,
                "best_trial": finals["trial"],
            },
            "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(quality.RUNS, "a") as runs:
            runs.write(json.dumps(line) + "\n")
        print(json.dumps({key: line[key] for key in ("seed", "validation_accuracy", "test_accuracy")}), flush=True)
    quality.table(None)


if __name__ == "__main__":
    main()
