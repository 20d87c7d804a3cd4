"""Many students from one teacher pass: an Optuna study whose trials are ordinary `train_student` runs.

The cache is verified once per process, then every trial trains from it without hashing it again; each trial is
scored by its best epoch's validation accuracy (as train-student keeps that epoch), reported to Optuna after every
epoch so that a pruner stops hopeless trials. The study lives in a storage (SQLite in the output folder by default,
any SQLAlchemy URL, or an Optuna journal file), which is what makes a sweep resumable and shareable: a rerun of the
same command continues it, and several processes (on one machine or several) pointed at one storage run distinct
trials of it. What a sweep leaves (sweep.json, the leaderboard, best/, the plots) is in kdcache.sweeps.report.
"""

import contextlib
import logging
import os
import shutil
import socket
import statistics
import time
from dataclasses import asdict, replace
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options import DEFAULT_STUDY, SweepOptions, TrainingOptions, check_loss_for_cache
from kdcache.options.config import as_given, write_config
from kdcache.outputs import TRAINING_RECORD, OutputLocked, lock_file, output_lock
from kdcache.sweeps.space import Param, build_space
from kdcache.sweeps.study import (
    REFUSED,
    SURPLUS,
    counted,
    fail_dead_local_trials,
    open_storage,
    open_study,
    quiet_optuna,
    surplus,
)

log = logging.getLogger("kdcache")

INSTALL = "kdcache sweep needs Optuna, an optional extra; install it with pip install -e '.[sweep]'"
PRUNERS = ("median", "hyperband", "none")


def optuna_module():
    """Optuna, or one line saying how to install it."""
    try:
        import optuna
    except ImportError:
        raise KdcacheError(INSTALL) from None
    return optuna


class TrialRefused(Exception):
    """A trial whose drawn options train-student refused: recorded as failed, with the reason, and the sweep goes on."""


class TrialSurplus(Exception):
    """A trial begun by a process that found the study one short while another did too: failed untrained, marked
    SURPLUS, and not counted (kdcache.sweeps.study.surplus)."""


class ReportEpochs:
    """A TrainerCallback (built by `report_epochs`) that reports each evaluation's accuracy to the trial, as step
    1, 2, ... (one per epoch), and stops training cleanly once the pruner says the trial is hopeless."""

    def __init__(self, trial):
        self.trial, self.pruned_at, self.steps = trial, None, 0

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        if not metrics or "eval_accuracy" not in metrics:
            return
        self.steps += 1
        self.trial.report(float(metrics["eval_accuracy"]), self.steps)
        if self.trial.should_prune():
            self.pruned_at = self.steps
            control.should_training_stop = True


def report_epochs(trial):
    from transformers import TrainerCallback

    return type("ReportEpochs", (ReportEpochs, TrainerCallback), {})(trial)


def make_pruner(pruner, epochs: float):
    """`median` (no pruning during the first 4 trials, nor in the first half of a trial's epochs: on beans a trial
    still at chance after a quarter of its 8 epochs finished among the best, so a quarter pruned slow starters),
    `hyperband` over the epochs, `none`, or an Optuna pruner as it is."""
    optuna = optuna_module()
    if not isinstance(pruner, str):
        return pruner
    if pruner == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=max(1, int(epochs) // 2))
    if pruner == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=1, max_resource=max(2, int(epochs)), reduction_factor=3)
    if pruner == "none":
        return optuna.pruners.NopPruner()
    raise KdcacheError(f"--pruner '{pruner}' is not one of {', '.join(PRUNERS)}")


def check_space(space: list[Param], fixed: TrainingOptions, caches: int, cache_facts) -> None:
    """Refuse, before any trial, a value that the options' checks (or the cache) would refuse whatever else is
    drawn: each parameter's bounds and choices, with every other option as fixed. Combinations refused only together
    are refused trial by trial (recorded as refused)."""
    check_trial_options(fixed, caches, cache_facts)
    for param in space:
        for value in param.corners():
            try:
                check_trial_options(replace(fixed, **{param.name: value}), caches, cache_facts)
            except KdcacheError as error:
                raise KdcacheError(f"--param {param.spec}: {param.name}={value} is refused: {error}") from None


def check_trial_options(options: TrainingOptions, caches: int, cache_facts) -> None:
    options.check(caches=caches)
    classes, mixed, path = cache_facts
    check_loss_for_cache(options.loss, classes, mixed, path)


def sweep(
    cache,
    output: str | Path,
    space=None,
    *,
    trials: int,
    options: TrainingOptions | None = None,
    space_file: str | Path | None = None,
    timeout: float | None = None,
    storage: str | None = None,
    study_name: str = DEFAULT_STUDY,
    pruner="median",
    sampler_seed: int | None = None,
    final_seeds: int = 0,
    progress: bool = True,
    **overrides,
) -> dict:
    """Run (or continue) a study of `trials` trials in all, each a `train_student(cache, ...)` run with options drawn
    from `space` (Param objects, `NAME=SPEC` strings such as "learning_rate=loguniform(1e-4,1e-2)", or a
    {name: SPEC} mapping; and/or `space_file`, YAML or JSON) over the fixed `options` (a TrainingOptions, and/or
    keywords as train_student takes them). Trial N trains into OUTPUT/trials/NNNN; the study is stored in
    OUTPUT/study.db unless `storage` names another (an SQLAlchemy URL, or an Optuna journal file path).

    `pruner`: median, hyperband, none, or an Optuna pruner. `timeout`: seconds after which this process starts no
    new trial. `final_seeds` K: once the study is complete, retrain the best options with seeds 0..K-1 into
    OUTPUT/final/ and report their validation accuracy (mean and sd). Returns what OUTPUT/sweep.json holds.
    """
    from kdcache.sweeps.report import leaderboard, update_best, write_plots, write_report

    optuna = optuna_module()
    fixed, params, caches, manifests = _checked(
        cache, space, space_file, options, overrides, trials, final_seeds, pruner
    )
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    settings = SweepOptions(
        space=[param.spec for param in params],  # the --space file's too: the config holds the whole space
        trials=trials,
        output=output,
        timeout=timeout,
        storage=without_password(storage),
        study_name=study_name,
        pruner=pruner if isinstance(pruner, str) else SweepOptions.pruner,  # an Optuna pruner object has no text
        final_seeds=final_seeds,
        sampler_seed=sampler_seed,
    )
    cache = [Path(each) for each in caches]
    given = {"cache": cache[0] if len(cache) == 1 else cache, **as_given(settings), **as_given(fixed, sweep=True)}
    with quiet_optuna(optuna):
        storage_name, opened = open_storage(storage, output)
        fingerprints = [manifest.fingerprint for manifest in manifests]
        pruner = make_pruner(pruner, fixed.epochs)
        study = open_study(optuna, opened, storage_name, study_name, params, fixed, fingerprints, pruner, sampler_seed)
        write_config(output, "sweep", given)  # once the study took them: a refused rerun leaves the config be
        fail_dead_local_trials(optuna, study)
        runner = _TrialRunner(caches, output, params, fixed, study, trials, progress)
        finals = _run_trials(optuna, runner, storage_name, timeout, final_seeds)
    update_best(study, output)
    plots = write_plots(study, output)
    report = write_report(study, output, trials, storage_name, params, finals=finals, plots=plots)
    if progress:
        log.info(leaderboard(report))
    return report


def without_password(storage: str | None) -> str | None:
    """The storage URL as a written config keeps it: without its password (SQLAlchemy's drivers read it from
    ~/.pgpass or the environment then, or --storage gives it again)."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(storage) if storage and "://" in storage else None
    if parts is None or parts.password is None:
        return storage
    host = parts.netloc.rpartition("@")[2]
    return urlunsplit(parts._replace(netloc=f"{parts.username}@{host}"))


def _checked(cache, space, space_file, options, overrides: dict, trials: int, final_seeds: int, pruner):
    """Everything a sweep is refused for before the storage is touched, in one line each: (the fixed options as
    every trial starts from them, the space's parameters, the caches, their manifests)."""
    from kdcache.format.reader import load_cache
    from kdcache.format.remote import local_cache
    from kdcache.runtime import launched_processes

    if launched_processes() > 1:
        raise KdcacheError(
            "kdcache sweep runs its trials one after another in this process; start it as one process per "
            "machine (or per GPU, with --device cuda:N), all pointed at one --storage, not with accelerate launch"
        )
    if trials < 1:
        raise KdcacheError(f"--trials {trials} must be at least 1 (the study's total, counted over reruns)")
    if final_seeds < 0:
        raise KdcacheError(f"--final-seeds {final_seeds} must be >= 0")
    fixed = replace(options or TrainingOptions(), **overrides)
    # the recipe's epochs and learning rate where not given, as numbers: the pruner reads them, the study records them
    fixed = replace(fixed, resume=False, overwrite=False, push_to_hub=None).with_recipe_defaults()
    if fixed.eval_split is None:
        raise KdcacheError("a sweep scores each trial on --eval-split, so it cannot be none; name a validation split")
    params = build_space(space, space_file)
    caches = [cache] if isinstance(cache, (str, Path)) else list(cache)
    if not caches:
        raise KdcacheError("name at least one cache to train from (a folder written by kdcache teacher-logits)")
    caches = [local_cache(path) for path in caches]  # an address: pulled once, and every trial reads the copy
    # Verified once for the whole process: each trial then opens the caches without hashing their files again.
    manifests = [load_cache(path)[1] for path in caches]
    views = manifests[0].views_of(fixed.train_split) if fixed.train_split in manifests[0].splits else 1
    facts = (len(manifests[0].label_names), views > 1 and manifests[0].mixed_views, caches[0])
    check_space(params, fixed, len(caches), facts)
    make_pruner(pruner, fixed.epochs)  # a bad --pruner is refused before the storage is touched
    return fixed, params, caches, manifests


def _run_trials(optuna, runner: "_TrialRunner", storage_name: str, timeout, final_seeds: int):
    """Trials one at a time until the study counts `trials` (or `timeout` has passed), then the final seeds."""
    from kdcache.sweeps.report import update_best, write_report

    study, output, trials = runner.study, runner.output, runner.trials
    started = time.monotonic()
    while counted(optuna, study) < trials:
        if timeout is not None and time.monotonic() - started >= timeout:
            log.info(f"sweep: --timeout {timeout:g} s reached; run the same command again to continue")
            break
        study.optimize(runner, n_trials=1, catch=(TrialRefused, TrialSurplus))
        update_best(study, output)
        write_report(study, output, trials, storage_name, runner.params)
    if final_seeds and counted(optuna, study) >= trials:
        return _final_seeds(optuna, study, runner.caches, output, runner.fixed, final_seeds, runner.progress)
    return None


class _TrialRunner:
    """The objective: one trial's options drawn, checked, trained, and its outcome recorded on the trial."""

    def __init__(self, caches, output: Path, params, fixed: TrainingOptions, study, trials: int, progress: bool):
        self.caches, self.output, self.params, self.fixed = caches, output, params, fixed
        self.study, self.trials, self.progress = study, trials, progress

    def __call__(self, trial) -> float:
        import optuna

        from kdcache.student.train import train_student

        name = (
            f"{trial.number:04d}"
            if self.study.study_name == DEFAULT_STUDY
            else f"{self.study.study_name}-{trial.number:04d}"
        )
        folder = self.output / "trials" / name  # another study in the same output never writes over this one's
        work = folder.with_name(folder.name + ".partial")
        if surplus(optuna, self.study, trial, self.trials):
            trial.set_user_attr(SURPLUS, True)
            raise TrialSurplus(f"trial {trial.number}: the study has its {self.trials} trials already")
        trial.set_user_attr("host", socket.gethostname())
        trial.set_user_attr("pid", os.getpid())
        trial.set_user_attr("work", str(work.resolve()))
        drawn = {param.name: param.suggest(trial) for param in self.params}
        options = replace(self.fixed, **drawn)
        trial.set_user_attr("options", asdict(options))
        begun = time.time()
        reporter = report_epochs(trial)
        try:
            summary = train_student(
                self.caches[0] if len(self.caches) == 1 else self.caches,
                output=folder,
                options=replace(options, overwrite=True),
                callbacks=[reporter],
                progress=False,
                verify=False,
            )
        except KdcacheError as error:
            shutil.rmtree(work, ignore_errors=True)
            trial.set_user_attr(REFUSED, str(error))
            self._say(trial, drawn, f"refused: {error}")
            raise TrialRefused(str(error)) from None
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)  # a crash or Ctrl-C: the trial fails, its folder goes
            raise
        finally:
            with contextlib.suppress(OSError):  # the trial's output lock, released: one file per trial is clutter
                lock_file(folder).unlink()
        minutes = round((time.time() - begun) / 60, 2)
        trial.set_user_attr("minutes", minutes)
        trial.set_user_attr("best_epoch", summary["best_epoch"])
        trial.set_user_attr("history", [entry["eval_accuracy"] for entry in summary["history"]])
        if reporter.pruned_at is not None:
            runs = folder / "runs"
            if runs.is_dir():  # the TensorBoard run stays, beside the trials, for the study's whole story
                shutil.move(str(runs), str(self.output / "pruned-runs" / folder.name))
            shutil.rmtree(folder, ignore_errors=True)
            self._say(trial, drawn, f"pruned after epoch {reporter.pruned_at} ({summary['best_eval_accuracy']:.4f})")
            raise optuna.TrialPruned()
        trial.set_user_attr("student", str(folder.resolve()))
        value = float(summary["best_eval_accuracy"])
        self._say(trial, drawn, f"validation {value:.4f} at epoch {summary['best_epoch']:g}", value)
        return value

    def _say(self, trial, drawn: dict, outcome: str, value: float | None = None) -> None:
        if not self.progress:
            return
        best = _best_complete(self.study)
        if value is not None and (best is None or value > best.value):
            best_text = f"best so far {value:.4f} (this trial)"
        else:
            best_text = f"best so far {best.value:.4f} (trial {best.number})" if best else "no trial completed yet"
        settings = " ".join(f"{name}={_short(value)}" for name, value in drawn.items())
        log.info(f"sweep: trial {trial.number} of {self.trials}: {settings}: {outcome}; {best_text}")


def _short(value) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def _best_complete(study):
    import optuna

    done = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    return max(done, key=lambda trial: trial.value) if done else None


def _final_seeds(optuna, study, caches, output: Path, fixed, seeds: int, progress: bool) -> dict | None:
    """The best trial's options retrained with seeds 0..K-1 into OUTPUT/final/trial-NNNN/seed-S (a finished one is
    reused), their validation accuracy as mean and sd. One process does it (holding the lock of OUTPUT/final, which
    goes with it); another finding it under way skips it."""
    from kdcache.student.train import train_student

    best = _best_complete(study)
    if best is None:
        return None
    lock = contextlib.ExitStack()
    try:
        lock.enter_context(output_lock(output / "final", "--output"))
    except OutputLocked:
        log.info("sweep: another process is training the final seeds; leaving them to it")
        return None
    with lock:
        options = replace(fixed, **best.params)  # the best trial's options, run where this process runs
        runs = []
        for seed in range(seeds):
            folder = output / "final" / f"trial-{best.number:04d}" / f"seed-{seed}"
            record = folder / TRAINING_RECORD
            if record.exists():
                import json

                summary = json.loads(record.read_text())
            else:
                summary = train_student(
                    caches[0] if len(caches) == 1 else caches,
                    output=folder,
                    options=replace(options, seed=seed, overwrite=True, resume=False),
                    progress=False,
                    verify=False,
                )
            runs.append({"seed": seed, "validation_accuracy": summary["best_eval_accuracy"], "student": str(folder)})
            if progress:
                log.info(
                    f"sweep: final seed {seed} of trial {best.number}: validation {summary['best_eval_accuracy']:.4f}"
                )
    values = [run["validation_accuracy"] for run in runs]
    return {
        "trial": best.number,
        "runs": runs,
        "validation_accuracy_mean": round(statistics.mean(values), 4),
        "validation_accuracy_sd": round(statistics.stdev(values), 4) if len(values) > 1 else None,
    }
