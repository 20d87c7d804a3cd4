"""Recipes at the same CPU budget per student: what `benchmarks/results/budget.json` and BENCHMARKS.md's "Quality per
CPU-minute" are.

    python benchmarks/budget.py run --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \\
        --budgets 1 0.5 --seeds 0 1 2 --test
    python benchmarks/budget.py table

A budget is CPU-seconds of the training process (user + system, its DataLoader workers included), not wall time,
so a busy machine moves it little. `run` first measures what an epoch costs at each size the recipes train at (a
student of 1 and of 2 epochs per size: the slope is an epoch, with its evaluation at the final size; the intercept is
the process's start, the cache's checks and the saving), then gives each recipe the most epochs whose predicted cost
fits the budget. Budget 1 is what the K=1 defaults cost (20 epochs at the teacher's 224 px), 0.5 half of it. The
recipes: the defaults; a fixed low size (128 px) for as many epochs as the budget buys; and the progressive schedule
(`--student-size 128:0.7,224`, kdcache.options.resolution). Every student is trained in a process of its own, its
CPU-seconds measured and written beside the prediction; each is chosen on validation (its best epoch) and, with
--test, evaluated once on the test split. Lines go to budget-runs.jsonl; `table` averages the seeds of each recipe and
budget into budget.json and plots accuracy against CPU-minutes (budget.png).
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_EPOCHS = 20  # the K=1 defaults' (kdcache.options.training.EPOCHS)
SHARE_AT_LOW_SIZE = 0.7  # the progressive schedule's: as the hand-made runs of issue 36 (15 epochs of 19 at 128 px)


def recipes(low: int, final: int) -> dict:
    """Each recipe's --student-size (None: the teacher's size, the defaults')."""
    return {"defaults": None, f"fixed-{low}": low, "progressive": f"{low}:{SHARE_AT_LOW_SIZE:g},{final}"}


def train(cache, output: Path, epochs: int, student_size, seed: int) -> tuple[dict, float]:
    """One student trained by `kdcache train-student` in a process of its own: (its summary, its CPU-seconds)."""
    command = [sys.executable, "-m", "kdcache", "train-student", str(cache), "--output", str(output)]
    command += ["--epochs", str(epochs), "--seed", str(seed), "--overwrite"]
    command += ["--student-size", str(student_size)] if student_size is not None else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)
    after = resource.getrusage(resource.RUSAGE_CHILDREN)  # the process and its reaped workers
    seconds = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return json.loads((output / "kdcache_training.json").read_text()), seconds


def epoch_costs(cache, root: Path, sizes: list[int]) -> dict:
    """{"start": CPU-seconds a run spends besides its epochs, size: CPU-seconds of an epoch at that size}."""
    costs, starts = {}, []
    for size in sizes:
        one = train(cache, root / f"calibration-{size}-1", 1, size, 0)[1]
        two = train(cache, root / f"calibration-{size}-2", 2, size, 0)[1]
        # a run of 2 epochs costing barely more than one of 1 (tiny data, a noisy machine) would buy endless epochs
        costs[size] = max(two - one, 0.05 * one)
        starts.append(one - costs[size])
        print(f"calibration: an epoch at {size} px costs {costs[size]:.1f} CPU-s (runs of 1 and 2 epochs)", flush=True)
    costs["start"] = max(0.0, statistics.mean(starts))
    return costs


def predicted_seconds(student_size, epochs: int, costs: dict, final: int) -> float:
    from kdcache.options.resolution import epoch_sizes

    sizes = epoch_sizes(student_size if student_size is not None else final, epochs)
    return costs["start"] + sum(costs[size] for size in sizes)


def epochs_within(budget: float, student_size, costs: dict, final: int) -> int:
    """The most epochs whose predicted cost fits `budget` CPU-seconds; at least the fewest that give each size of a
    schedule an epoch."""
    from kdcache.errors import KdcacheError
    from kdcache.options.resolution import check_every_size_trains

    epochs = 1
    while True:
        try:
            check_every_size_trains(student_size, epochs)
            break
        except KdcacheError:
            epochs += 1
    while predicted_seconds(student_size, epochs + 1, costs, final) <= budget * (1 + 1e-9):
        epochs += 1
    return epochs


def run(args):
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.format.manifest import Manifest
    from kdcache.teacher.run import teacher_logits

    root, results = Path(args.root), Path(args.results)
    cache = teacher_logits(args.dataset, args.teacher, output=root / "caches" / "k1", progress=False)
    final = Manifest.read(cache).pixel_shape[-1]
    chosen = recipes(args.low_size, final)
    if args.calibration:  # an earlier `calibrate`, taken alone: the students then run on a machine that may be busier
        figures = json.loads(Path(args.calibration).read_text())
        costs = {int(size): seconds for size, seconds in figures["epoch_cpu_seconds"].items()}
        costs["start"] = figures["start_cpu_seconds"]
    else:
        costs = epoch_costs(cache, root / "students", sorted({final, args.low_size}))
    full = predicted_seconds(None, args.default_epochs, costs, final)  # the K=1 defaults' budget
    results.mkdir(parents=True, exist_ok=True)
    for budget in args.budgets:
        for name in args.recipes or chosen:
            student_size = chosen[name]
            epochs = epochs_within(budget * full, student_size, costs, final)
            for seed in args.seeds:
                started = time.time()
                student = root / "students" / f"{name}-b{budget:g}-s{seed}"
                summary, seconds = train(cache, student, epochs, student_size, seed)
                line = {
                    "budget": budget,
                    "budget_cpu_seconds": round(budget * full, 1),
                    "recipe": name,
                    "student_size": student_size if student_size is not None else final,
                    "epochs": epochs,
                    "seed": seed,
                    "predicted_cpu_seconds": round(predicted_seconds(student_size, epochs, costs, final), 1),
                    "cpu_seconds": round(seconds, 1),
                    "wall_seconds": round(time.time() - started, 1),
                    "load_average": [round(load, 2) for load in os.getloadavg()],  # at the end: what ran beside it
                    "epoch_costs": {str(key): round(value, 2) for key, value in costs.items()},
                    "validation_accuracy": summary["best_eval_accuracy"],
                    "best_epoch": summary["best_epoch"],
                    "curve": [round(entry["eval_accuracy"], 4) for entry in summary["history"]],
                    "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                }
                if args.test:  # once per final student: each recipe's options were fixed before any test run
                    report = evaluate_models(
                        [str(student)], dataset=args.dataset, split="test", cache=str(cache), progress=False
                    )
                    result = report["models"][0]
                    line.update(
                        test_accuracy=result["accuracy"],
                        teacher_agreement=result["teacher_agreement"]["top1_agreement"],
                    )
                with open(results / "budget-runs.jsonl", "a") as runs:
                    runs.write(json.dumps(line) + "\n")
                print(json.dumps({key: line[key] for key in line if key not in ("curve", "epoch_costs")}), flush=True)


def calibrate(args):
    """What an epoch costs at each size, alone (budget-calibration.json): the run's first step, kept on its own."""
    from kdcache.format.manifest import Manifest
    from kdcache.teacher.run import teacher_logits

    root, results = Path(args.root), Path(args.results)
    cache = teacher_logits(args.dataset, args.teacher, output=root / "caches" / "k1", progress=False)
    final = Manifest.read(cache).pixel_shape[-1]
    costs = epoch_costs(cache, root / "students", sorted({final, args.low_size}))
    figures = {
        "epoch_cpu_seconds": {str(size): round(costs[size], 1) for size in sorted({final, args.low_size})},
        "start_cpu_seconds": round(costs["start"], 1),
        "epoch_cost_ratio": round(costs[final] / costs[args.low_size], 2),
        "defaults_predicted_cpu_minutes": round(predicted_seconds(None, args.default_epochs, costs, final) / 60, 1),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    results.mkdir(parents=True, exist_ok=True)
    (results / "budget-calibration.json").write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


def table(args):
    results = Path(args.results)
    lines = [json.loads(line) for line in (results / "budget-runs.jsonl").read_text().splitlines() if line.strip()]
    rows = []
    for budget, recipe in dict.fromkeys((line["budget"], line["recipe"]) for line in lines):
        runs = [line for line in lines if (line["budget"], line["recipe"]) == (budget, recipe)]

        def mean_sd(key, runs=runs):
            values = [line[key] for line in runs if key in line]
            if not values:
                return None, None
            return round(statistics.mean(values), 4), round(statistics.stdev(values), 4) if len(values) > 1 else None

        (test, test_sd), (validation, validation_sd) = mean_sd("test_accuracy"), mean_sd("validation_accuracy")
        rows.append(
            {
                "budget": budget,
                "recipe": recipe,
                "student_size": runs[0]["student_size"],
                "epochs": runs[0]["epochs"],
                "seeds": [line["seed"] for line in runs],
                "budget_cpu_minutes": round(runs[0]["budget_cpu_seconds"] / 60, 2),
                "cpu_minutes_mean": round(statistics.mean(line["cpu_seconds"] for line in runs) / 60, 2),
                "predicted_cpu_minutes": round(runs[0]["predicted_cpu_seconds"] / 60, 2),
                "test_accuracy_mean": test,
                "test_accuracy_sd": test_sd,
                "validation_accuracy_mean": validation,
                "validation_accuracy_sd": validation_sd,
            }
        )
    (results / "budget.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(
        f"{'budget':>7} {'recipe':<14}{'px':>12}{'epochs':>7}{'CPU min':>9}{'test':>8}{'sd':>7}{'val':>8}{'sd':>7}  seeds"
    )
    for row in rows:
        print(
            f"{row['budget']:>7g} {row['recipe']:<14}{str(row['student_size']):>12}{row['epochs']:>7}"
            f"{row['cpu_minutes_mean']:>9.1f}{row['test_accuracy_mean'] or 0:>8.4f}{row['test_accuracy_sd'] or 0:>7.4f}"
            f"{row['validation_accuracy_mean']:>8.4f}{row['validation_accuracy_sd'] or 0:>7.4f}  {len(row['seeds'])}"
        )
    plot(rows, results / "budget.png")


def plot(rows, path: Path):
    """Accuracy (mean and sd over seeds) against the CPU-minutes each recipe spent: test filled, validation hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 5))
    colours = dict(zip(dict.fromkeys(row["recipe"] for row in rows), plt.get_cmap("tab10").colors))
    for row in rows:
        for key, marker, fill in (("test", "o", colours[row["recipe"]]), ("validation", "s", "none")):
            if row[f"{key}_accuracy_mean"] is None:
                continue
            axes.errorbar(
                row["cpu_minutes_mean"],
                row[f"{key}_accuracy_mean"],
                yerr=row[f"{key}_accuracy_sd"] or 0,
                marker=marker,
                markerfacecolor=fill,
                color=colours[row["recipe"]],
                capsize=3,
                label=f"{row['recipe']} ({key})",
            )
    handles, labels = axes.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    axes.legend(unique.values(), unique.keys(), fontsize=8, loc="lower right")
    axes.set_xlabel("CPU-minutes of the training process per student")
    axes.set_ylabel("accuracy (mean ± sd over seeds)")
    axes.grid(alpha=0.3)
    axes.set_title("beans, MobileNetV2 student from the K=1 cache: recipes at equal CPU budgets")
    figure.tight_layout()
    figure.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--results", default=str(RESULTS), help="folder of budget-runs.jsonl, budget.json, budget.png")
    commands = parser.add_subparsers(dest="command", required=True)
    runner = commands.add_parser("run")
    runner.add_argument("--dataset", required=True)
    runner.add_argument("--teacher", required=True)
    runner.add_argument("--root", default="data/budget", help="folder for the cache and the students")
    runner.add_argument("--budgets", type=float, nargs="+", default=[1.0, 0.5], help="shares of the defaults' cost")
    runner.add_argument("--recipes", nargs="+", help="recipe names (default: all)")
    runner.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    runner.add_argument("--low-size", type=int, default=128, help="the low size of fixed and progressive recipes")
    runner.add_argument("--default-epochs", type=int, default=DEFAULT_EPOCHS, help="the defaults' epochs: budget 1")
    runner.add_argument("--calibration", help="budget-calibration.json of an earlier `calibrate` (default: measure)")
    runner.add_argument("--test", action="store_true", help="evaluate each final student once on the test split")
    calibration = commands.add_parser("calibrate", help="only measure what an epoch costs at each size")
    for name in ("--dataset", "--teacher"):
        calibration.add_argument(name, required=True)
    calibration.add_argument("--root", default="data/budget")
    calibration.add_argument("--low-size", type=int, default=128)
    calibration.add_argument("--default-epochs", type=int, default=DEFAULT_EPOCHS)
    commands.add_parser("table")
    args = parser.parse_args()
    {"run": run, "calibrate": calibrate, "table": table}[args.command](args)


if __name__ == "__main__":
    main()
