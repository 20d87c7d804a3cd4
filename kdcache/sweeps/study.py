"""A sweep's Optuna study: its storage (SQLite, an SQLAlchemy URL or a journal file), opened or continued only with
the settings it was started with, the trials that count towards --trials, and those a killed process left running."""

import contextlib
import os
import shutil
import socket
import time
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options import run_options
from kdcache.outputs import lock_file

STUDY_FILE = "study.db"
HEARTBEAT_SECONDS = 60  # a trial whose process stops beating for 3 of these is failed and retried by the next sweep
REFUSED = "refused"  # a failed trial's user attribute: the one-line reason its options were refused


def open_storage(storage: str | None, output: Path):
    """The study's storage: SQLite in `output` by default; a URL with '://' is an SQLAlchemy database (with a
    heartbeat, so that trials of a dead process are failed and retried); anything else is an Optuna journal file."""
    import optuna

    if storage is None:
        storage = f"sqlite:///{(output / STUDY_FILE).resolve()}"
    if "://" not in storage:
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            Path(storage).parent.mkdir(parents=True, exist_ok=True)
            return storage, JournalStorage(JournalFileBackend(str(storage)))
        except OSError as error:
            raise KdcacheError(f"--storage '{storage}' cannot be opened as a journal file ({error})") from None
    storages = optuna.storages
    # Optuna 4.9 renamed the stale-trial callback and its argument; 4.0 to 4.8 know the old names only.
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
    else:
        retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=3)}
    # several processes write one SQLite file: wait for its lock instead of failing at once
    engine = {"connect_args": {"timeout": 120}} if storage.startswith("sqlite") else {}
    from sqlalchemy.exc import IntegrityError, OperationalError

    for attempt in range(6):
        try:
            return storage, storages.RDBStorage(
                storage,
                engine_kwargs=engine,
                heartbeat_interval=HEARTBEAT_SECONDS,
                grace_period=3 * HEARTBEAT_SECONDS,
                **retry,
            )
        except (OperationalError, IntegrityError) as error:
            # Processes started together on a new database race to create its tables ("table ... already exists"):
            # the loser finds them made when it tries again
            failure = error
            time.sleep(0.5 * (attempt + 1))
        except Exception as error:
            failure = error
            break
    first = str(failure).strip().splitlines()[0][:200] if str(failure).strip() else type(failure).__name__
    raise KdcacheError(f"--storage '{storage}' cannot be opened ({type(failure).__name__}: {first})") from None


@contextlib.contextmanager
def quiet_optuna(optuna):
    """Optuna's and transformers' own lines off while the sweep runs: each trial has its progress line."""
    import warnings

    from transformers.utils import logging as transformers_logging

    verbosity, bars = optuna.logging.get_verbosity(), transformers_logging.is_progress_bar_enabled()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    transformers_logging.disable_progress_bar()  # a bar per checkpoint written
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)  # the heartbeat's
            yield
    finally:
        optuna.logging.set_verbosity(verbosity)
        if bars:
            transformers_logging.enable_progress_bar()


def open_study(optuna, storage, storage_name, study_name, params, fixed, fingerprints, pruner, sampler_seed):
    """The study named `study_name` in `storage`, created if new; refused when it was started with another space,
    other fixed options or other caches (a rerun must be the same command to continue it)."""
    recorded = {
        "space": [param.spec for param in params],
        "options": run_options(fixed, cache_fingerprint=fingerprints),
    }
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="maximize",
        load_if_exists=True,
        pruner=pruner,
    )
    if sampler_seed is not None:  # reproducible, yet not the same draws again in a rerun or a second process
        study.sampler = optuna.samplers.TPESampler(seed=sampler_seed + len(study.get_trials(deepcopy=False)))
    before = study.user_attrs.get("kdcache")
    if before is None:
        study.set_user_attr("kdcache", recorded)
    elif before != recorded:
        changed = [key for key in ("space", "options") if before.get(key) != recorded[key]]
        names = sorted(
            name
            for name in set(before.get("options", {})) | set(recorded["options"])
            if before.get("options", {}).get(name) != recorded["options"].get(name)
        )
        detail = "the space" if "space" in changed else ""
        if names:
            detail += (" and " if detail else "") + ", ".join(names)
        raise KdcacheError(
            f"study '{study_name}' in '{storage_name}' was started with other settings ({detail} differ); rerun the "
            "same command to continue it, or start another with --study-name or another --output"
        )
    return study


def counted(optuna, study) -> int:
    """Trials that count towards --trials: completed, pruned, refused, and those running now (in any process),
    so that several processes stop at the study's total together. Trials failed by a crash or a kill do not count."""
    state = optuna.trial.TrialState
    return sum(
        trial.state in (state.COMPLETE, state.PRUNED, state.RUNNING)
        or (trial.state == state.FAIL and REFUSED in trial.user_attrs)
        for trial in study.get_trials(deepcopy=False)
    )


def fail_dead_local_trials(optuna, study) -> None:
    """Trials left RUNNING by a process of this machine that no longer exists (killed): failed now, their unfinished
    folder removed, and queued again with the same options. (A dead process of another machine is found by the
    storage's heartbeat instead; a journal file has none, so there this is the only recovery.)"""
    state, host = optuna.trial.TrialState, socket.gethostname()
    for trial in study.get_trials(deepcopy=False, states=(state.RUNNING,)):
        attrs = trial.user_attrs
        if attrs.get("host") != host or _alive(attrs.get("pid")):
            continue
        try:
            study._storage.set_trial_state_values(trial._trial_id, state=state.FAIL)
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another process failed it first
        if attrs.get("work"):  # OUTPUT/trials/NNNN.partial, and the lock file of OUTPUT/trials/NNNN
            work = Path(attrs["work"])
            shutil.rmtree(work, ignore_errors=True)
            with contextlib.suppress(OSError):
                lock_file(work.with_name(work.name.removesuffix(".partial"))).unlink()
        study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number}, skip_if_exists=False)


def _alive(pid) -> bool:
    if not isinstance(pid, int):
        return True  # not known: leave it to the heartbeat
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
