"""A sweep's Optuna study: its storage (SQLite, an SQLAlchemy URL or a journal file), opened or continued only with
the settings it was started with, the trials that count towards --trials, and those a killed process left running."""

import contextlib
import os
import re
import shutil
import socket
import time
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options import run_options
from kdcache.outputs import lock_file

STUDY_FILE = "study.db"
HEARTBEAT_SECONDS = 60  # a trial whose process stops beating for 3 of these is failed and retried (counted())
HEARTBEAT_VARIABLE = "KDCACHE_SWEEP_HEARTBEAT"  # whole seconds, in place of HEARTBEAT_SECONDS (the tests use 1)
REFUSED = "refused"  # a failed trial's user attribute: the one-line reason its options were refused
SURPLUS = "surplus"  # a failed trial's user attribute: begun one over the total by racing processes, never trained


def open_storage(storage: str | None, output: Path):
    """(the storage as kdcache writes and prints it, the storage): SQLite in `output` by default; a URL with '://' is
    an SQLAlchemy database (with a heartbeat, so that trials of a dead process are failed and retried); anything else
    is an Optuna journal file. A URL's password is never shown: the name has *** in its place."""
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
    name = shown(storage)
    storages = optuna.storages
    # Optuna 4.9 renamed the stale-trial callback and its argument; 4.0 to 4.8 know the old names only.
    if hasattr(storages, "RetryHeartbeatStaleTrialCallback"):
        retry = {"heartbeat_stale_trial_callback": storages.RetryHeartbeatStaleTrialCallback(max_retry=3)}
    else:
        retry = {"failed_trial_callback": storages.RetryFailedTrialCallback(max_retry=3)}
    server = not storage.startswith("sqlite")
    if server:
        from sqlalchemy.pool import NullPool

        # A connection only while a storage call runs, none kept between calls: a worker holds at most 2 at once
        # (its own and its heartbeat thread's) and none while it trains, so N workers cannot use up the server's
        # connections (max_connections, 100 by default), and no idle connection is left for a firewall to cut
        # during a long trial. The cost, a new connection per storage call, is milliseconds against a trial.
        engine = {"poolclass": NullPool}
    else:  # several processes write one SQLite file: wait for its lock instead of failing at once
        engine = {"connect_args": {"timeout": 120}}
    heartbeat = heartbeat_seconds()
    from sqlalchemy.exc import IntegrityError, OperationalError, ProgrammingError

    for attempt in range(6):
        try:
            return name, storages.RDBStorage(
                storage,
                engine_kwargs=engine,
                heartbeat_interval=heartbeat,
                grace_period=3 * heartbeat,
                **retry,
            )
        except ImportError as error:  # Optuna's "Failed to import DB access module", from the driver's own error
            module = getattr(error.__cause__, "name", None)
            if module is None:
                failure = error
                break
            raise KdcacheError(
                f"--storage '{name}' needs the database driver {module}, which is not installed; install it, or name "
                "the driver you have in the URL (pip install -e '.[sweep]' brings psycopg: postgresql+psycopg://...)"
            ) from None
        except (OperationalError, IntegrityError, ProgrammingError) as error:
            if server and error.statement is None:  # no connection at all, before any statement: a retry won't help
                raise KdcacheError(no_connection(storage, error)) from None
            # Processes started together on a new database race to create its tables ("table ... already exists"):
            # the loser finds them made when it tries again
            failure = error
            time.sleep(0.5 * (attempt + 1))
        except Exception as error:
            failure = error
            break
    first = str(failure).strip().splitlines()[0][:200] if str(failure).strip() else type(failure).__name__
    raise KdcacheError(
        f"--storage '{name}' cannot be opened ({type(failure).__name__}: {_hidden(first, storage)})"
    ) from None


def heartbeat_seconds() -> int:
    """Seconds between a running trial's heartbeats: HEARTBEAT_SECONDS, or the environment's KDCACHE_SWEEP_HEARTBEAT.
    A trial is failed after 3 of them without one (3 minutes unless set)."""
    text = os.environ.get(HEARTBEAT_VARIABLE, "").strip()
    if not text:
        return HEARTBEAT_SECONDS
    if not text.isdigit() or int(text) < 1:
        raise KdcacheError(
            f"{HEARTBEAT_VARIABLE}={text!r} is not a whole number of seconds >= 1; set it to one, or unset it for "
            f"{HEARTBEAT_SECONDS}"
        )
    return int(text)


def shown(storage: str) -> str:
    """A storage URL as kdcache writes and prints it: its password replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        return make_url(storage).render_as_string(hide_password=True)
    except ArgumentError:  # not a URL SQLAlchemy reads (refused when opened): hide what would be the password
        return re.sub(r"(://[^/@:]*:)[^/@]*@", r"\1***@", storage)


def no_connection(storage: str, error) -> str:
    """One line for a database server that cannot be reached, refuses the login, or has no such database: it names
    the server and the fix, never the password."""
    from sqlalchemy.engine import make_url

    url = make_url(storage)
    text = str(getattr(error, "orig", None) or error).strip()
    first = text.splitlines()[0] if text else type(error).__name__
    # psycopg: 'connection failed: connection to server at "HOST", port N failed: FATAL:  password authentication ...'
    reason = _hidden(first.rsplit("failed: ", 1)[-1].removeprefix("FATAL:").strip(), storage)
    server = (url.host or "localhost") + (f":{url.port}" if url.port else "")
    said, name = text.lower(), shown(storage)
    if "database" in said and ("does not exist" in said or "unknown database" in said):
        return (
            f"--storage '{name}': the server at {server} has no database '{url.database}'; create it there "
            f"(createdb -h {url.host or 'localhost'} -U {url.username} {url.database}, or CREATE DATABASE "
            f"{url.database}), or name one that exists"
        )
    if any(word in said for word in ("authentication", "password", "access denied", "pg_hba.conf", "role ")):
        return (
            f"--storage '{name}': the server at {server} refused user '{url.username}' ({reason}); fix the user or "
            "password in the URL, or let that user log in on the server (CREATE ROLE ... LOGIN PASSWORD, pg_hba.conf)"
        )
    return (
        f"--storage '{name}': no database server answers at {server} ({reason}); check the host and port in the "
        "URL, and that the server is running and accepts connections from this machine (listen_addresses, "
        "pg_hba.conf, the firewall)"
    )


def _hidden(text: str, storage: str) -> str:
    """`text` with the storage URL's password, should a driver's message quote it, replaced by ***."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    with contextlib.suppress(ArgumentError):
        password = make_url(storage).password
        if password:
            text = text.replace(str(password), "***")
    return text


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
    so that several processes stop at the study's total together. Trials failed by a crash or a kill do not count;
    nor does a trial whose heartbeat stopped (its machine died): it is failed here first, and queued again."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)  # Optuna does it before each trial; here before the count too
    return sum(_counts(optuna, trial) for trial in study.get_trials(deepcopy=False))


def surplus(optuna, study, trial, total: int) -> bool:
    """Whether `trial` is one too many: the trials numbered before it that count already make the study's total.
    Several processes can find the study one trial short at the same moment and each begin one; the storage numbers
    them in order, so the later ones stand down before training (the first 8-worker PostgreSQL run made 25 of 24)."""
    before = study.get_trials(deepcopy=False)
    return sum(_counts(optuna, other) for other in before if other.number < trial.number) >= total


def _counts(optuna, trial) -> bool:
    state = optuna.trial.TrialState
    return trial.state in (state.COMPLETE, state.PRUNED, state.RUNNING) or (
        trial.state == state.FAIL and REFUSED in trial.user_attrs
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
