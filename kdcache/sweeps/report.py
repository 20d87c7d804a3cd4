"""What a sweep leaves in its output folder: sweep.json (every trial's options, state, best epoch, validation
accuracy and minutes), the printed leaderboard, best/ (the best trial's student, a normal student folder) and the
study's plots (optuna.visualization.matplotlib, as PNG). Every file is written under a temporary name and renamed."""

import contextlib
import json
import logging
import os
import shutil
from pathlib import Path

from kdcache.outputs import TRAINING_RECORD

log = logging.getLogger("kdcache")

REPORT_FILE = "sweep.json"
BEST = "best"
BEST_MARK = "kdcache_sweep_trial.json"  # in best/: which trial it is a copy of
PLOTS = {
    "optimization_history": "plot_optimization_history",
    "param_importances": "plot_param_importances",
    "parallel_coordinate": "plot_parallel_coordinate",
    "slice": "plot_slice",
    "intermediate_values": "plot_intermediate_values",
}


def trial_record(trial) -> dict:
    attrs = trial.user_attrs
    record = {
        "trial": trial.number,
        "state": trial.state.name.lower(),
        "params": trial.params,
        "validation_accuracy": trial.value,
        "best_epoch": attrs.get("best_epoch"),
        "minutes": attrs.get("minutes"),
        "host": attrs.get("host"),
        "options": attrs.get("options"),
    }
    if trial.state.name == "PRUNED":
        record["pruned_after_epoch"] = max(trial.intermediate_values, default=None)
        record["validation_accuracy"] = max(trial.intermediate_values.values(), default=None)
    if "refused" in attrs:
        record["state"] = "refused"
        record["refused"] = attrs["refused"]
    if "student" in attrs:
        record["student"] = attrs["student"]
    if "retry_of" in attrs or "failed_trial" in trial.system_attrs:
        record["retry_of"] = attrs.get("retry_of", trial.system_attrs.get("failed_trial"))
    return record


def write_report(study, output: Path, trials: int, storage: str, params, finals=None, plots=None) -> dict:
    """sweep.json: the study's trials, best first, and its totals (what `leaderboard` prints)."""
    records = [trial_record(trial) for trial in study.get_trials(deepcopy=False)]
    ranked = sorted(records, key=_rank)
    complete = [record for record in records if record["state"] == "complete"]
    best = max(complete, key=lambda record: record["validation_accuracy"]) if complete else None
    report = {
        "study": study.study_name,
        "storage": storage,
        "trials_wanted": trials,
        "space": [param.spec for param in params],
        "counts": {
            state: sum(r["state"] == state for r in records) for state in sorted({r["state"] for r in records})
        },
        "minutes": round(sum(record["minutes"] or 0 for record in records), 2),
        "best": best,
        "best_student": str(output / BEST) if best and (output / BEST / BEST_MARK).exists() else None,
        "trials": ranked,
    }
    if finals is not None:
        report["final_seeds"] = finals
    previous = _read(output / REPORT_FILE)
    if plots is not None:
        report["plots"] = plots
    elif previous and "plots" in previous:
        report["plots"] = previous["plots"]
    if finals is None and previous and previous.get("final_seeds"):
        report["final_seeds"] = previous["final_seeds"]
    _write_text(output / REPORT_FILE, json.dumps(report, indent=2, default=str) + "\n")
    return report


def _rank(record):
    order = {"complete": 0, "pruned": 1}.get(record["state"], 2)
    return (order, -(record["validation_accuracy"] or 0), record["trial"])


def _read(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_text(path: Path, text: str) -> None:
    partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    partial.write_text(text)
    partial.replace(path)


def leaderboard(report: dict, rows: int = 10) -> str:
    """The study as a table, best first: rank, trial, state, validation accuracy, best epoch, minutes, options."""
    counts = ", ".join(f"{count} {state}" for state, count in report["counts"].items())
    lines = [
        f"sweep {report['study']}: {counts} of {report['trials_wanted']} wanted; {report['minutes']:.1f} trial-minutes"
    ]
    lines.append(f"  {'rank':>4}  {'trial':>5}  {'state':<8}  {'val acc':>7}  {'epoch':>5}  {'min':>6}  options")
    for rank, record in enumerate(report["trials"][:rows], start=1):
        accuracy, minutes = record["validation_accuracy"], record["minutes"]
        epoch = record.get("best_epoch") if record["state"] == "complete" else record.get("pruned_after_epoch")
        settings = " ".join(
            f"{name}={value:.3g}" if isinstance(value, float) else f"{name}={value}"
            for name, value in record["params"].items()
        )
        lines.append(
            f"  {rank:>4}  {record['trial']:>5}  {record['state']:<8}  "
            f"{'' if accuracy is None else f'{accuracy:.4f}':>7}  {'' if epoch is None else f'{epoch:g}':>5}  "
            f"{'' if minutes is None else f'{minutes:.1f}':>6}  {settings}"
        )
    if len(report["trials"]) > rows:
        lines.append(f"  ... {len(report['trials']) - rows} more in {REPORT_FILE}")
    if report.get("best_student"):
        lines.append(f"best student (trial {report['best']['trial']}): {report['best_student']}")
    finals = report.get("final_seeds")
    if finals:
        sd = finals["validation_accuracy_sd"]
        lines.append(
            f"best options retrained with seeds 0-{len(finals['runs']) - 1}: validation "
            f"{finals['validation_accuracy_mean']:.4f}" + (f" ± {sd:.4f}" if sd is not None else "")
        )
    return "\n".join(lines)


def update_best(study, output: Path) -> None:
    """best/: a copy of the best completed trial's student, replaced when a better one completes (if its folder is
    on this machine: a trial run elsewhere left its student there). Copied, renamed into place under the lock of
    best/ (OUTPUT/best.lock, which goes with the run that held it)."""
    import optuna

    from kdcache.outputs import output_lock
    from kdcache.runtime import move_into_place

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if not done:
        return
    best = max(done, key=lambda trial: trial.value)
    source = Path(best.user_attrs.get("student", ""))
    target = output / BEST
    with output_lock(target, wait=300):
        current = _read(target / BEST_MARK)
        if current and current.get("trial") == best.number and current.get("study") == study.study_name:
            return
        if not (source / TRAINING_RECORD).exists():
            return
        partial = output / f"{BEST}.{os.getpid()}.partial"
        shutil.rmtree(partial, ignore_errors=True)
        shutil.copytree(source, partial, ignore=shutil.ignore_patterns("runs"))
        mark = {
            "study": study.study_name,
            "trial": best.number,
            "validation_accuracy": best.value,
            "source": str(source),
        }
        (partial / BEST_MARK).write_text(json.dumps(mark, indent=2) + "\n")
        move_into_place(partial, target)


def write_plots(study, output: Path) -> dict:
    """The study's plots as PNG in OUTPUT/plots: {name: path}, and {name: why not} for those it cannot draw yet
    (importances need two completed trials that differ, for instance)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as plots

    folder = output / "plots"
    folder.mkdir(parents=True, exist_ok=True)
    written, skipped = {}, {}
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    for name, function in PLOTS.items():
        if len(complete) < (2 if name == "param_importances" else 1):
            skipped[name] = f"needs {2 if name == 'param_importances' else 1} completed trials"
            continue
        try:
            with _quiet():
                axes = getattr(plots, function)(study)
            figure = _figure(axes)
            if name != "slice":  # the slice plot sizes itself to its panels
                figure.set_size_inches(10, 6)
            path = folder / f"{name}.png"
            partial = path.with_name(f"{name}.{os.getpid()}.tmp.png")
            figure.savefig(partial, dpi=100, bbox_inches="tight")
            partial.replace(path)
            written[name] = str(path)
        except Exception as error:  # a plot Optuna cannot draw for this study (too few distinct values, ...)
            skipped[name] = (
                f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"
            )
        finally:
            plt.close("all")
    return {"written": written, "skipped": skipped}


def _figure(axes):
    import numpy as np

    first = axes.flat[0] if isinstance(axes, np.ndarray) else axes
    return first.get_figure()


@contextlib.contextmanager
def _quiet():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # optuna.visualization.matplotlib is experimental and says so each call
        yield
