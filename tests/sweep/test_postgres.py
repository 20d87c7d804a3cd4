"""kdcache sweep on a PostgreSQL server, as several machines would share a study: 8 worker processes sharing 24
trials, a worker killed mid-trial whose trial the heartbeat fails and another worker retries, a rerun that does the
same for another machine's dead trial, the URL's password kept out of every file and line kdcache writes, and one
line for a server that cannot be reached, a refused login, a missing database or a missing driver. The server is
started here (Debian's `postgresql` package: .ci/run installs it), on a free localhost port with its data in a new
temporary folder, and stopped after. Where it is not installed these tests skip, saying so; in CI (CI=true, which
.ci/run sets) they fail instead, so that they cannot pass there by not running."""

import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import warnings
from datetime import datetime
from pathlib import Path

import pytest

from .test_sweep import SPACE, cli, needs_optuna, start_sweep, trials_of

HEARTBEAT = 1  # seconds (KDCACHE_SWEEP_HEARTBEAT): a dead worker's trial is failed after 3 s, not 3 minutes


def unavailable(reason: str):
    """Skip, saying why, or in CI fail: there the PostgreSQL tests must run."""
    if os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no"):
        pytest.fail(f"{reason} (CI is set: the PostgreSQL tests must run there, not skip)")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def driver():
    """Optuna and the PostgreSQL driver that the 'sweep' extra brings (psycopg)."""
    for module in ("optuna", "psycopg"):
        try:
            __import__(module)
        except ImportError:
            unavailable(f"{module} is not installed: pip install -e '.[sweep]'")


def server_programs() -> Path | None:
    """The folder of PostgreSQL's initdb, pg_ctl and createdb: Debian's /usr/lib/postgresql/NN/bin (the newest), or
    where pg_ctl on PATH really is (Debian's /usr/bin/createdb is a wrapper that picks a cluster; these tests have
    their own)."""
    versions = [path.parent for path in Path("/usr/lib/postgresql").glob("*/bin") if path.parent.name.isdigit()]
    for folder in sorted(versions, key=lambda version: int(version.name), reverse=True):
        if all((folder / "bin" / program).exists() for program in ("initdb", "pg_ctl", "createdb")):
            return folder / "bin"
    on_path = shutil.which("pg_ctl")
    folder = Path(on_path).resolve().parent if on_path else None
    return folder if folder and (folder / "initdb").exists() and (folder / "createdb").exists() else None


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Server:
    """A PostgreSQL server of this test module: user `kdcache` with a random password, TCP on 127.0.0.1 only."""

    def __init__(self, programs: Path, folder: Path, port: int, password: str, as_server_user: list[str]):
        self.programs, self.folder, self.port, self.password = programs, folder, port, password
        self.as_server_user = as_server_user

    def run(self, program: str, *arguments: str) -> None:
        done = subprocess.run(
            [*self.as_server_user, str(self.programs / program), *arguments], capture_output=True, text=True
        )
        log = self.folder / "server.log"
        assert done.returncode == 0, f"{program} failed: {done.stdout}{done.stderr}" + (
            log.read_text() if log.exists() else ""
        )

    def database(self, name: str) -> str:
        """A new, empty database: its URL, password included, as a user gives it to --storage."""
        self.run("createdb", "-h", str(self.folder), "-p", str(self.port), "-U", "kdcache", name)
        return self.url(name)

    def url(self, database: str, password: str | None = None) -> str:
        password = self.password if password is None else password
        return f"postgresql+psycopg://kdcache:{password}@127.0.0.1:{self.port}/{database}"

    def connections(self, database: str) -> int:
        """How many connections to `database` the server has now, this question's own left out."""
        import psycopg

        with psycopg.connect(self.url(database).replace("+psycopg", ""), autocommit=True) as connection:
            query = "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()"
            return connection.execute(query, (database,)).fetchone()[0]


@pytest.fixture(scope="module")
def postgres(driver):
    """A server started on a free port with its data in a new temporary folder, stopped and removed after. PostgreSQL
    refuses to run as root, so as root it runs as the `postgres` system user, in a folder of its own under /tmp
    (pytest's temporary folders are root's alone)."""
    programs = server_programs()
    if programs is None:
        unavailable(
            "PostgreSQL's server is not installed (no initdb and pg_ctl on PATH or in /usr/lib/postgresql/*/bin): "
            "apt-get install postgresql"
        )
    as_server_user = []
    if os.geteuid() == 0:
        try:
            owner = pwd.getpwnam("postgres")
        except KeyError:
            unavailable("running as root, and there is no `postgres` system user to run the server as")
        as_server_user = ["runuser", "-u", "postgres", "--"]
    folder = Path(tempfile.mkdtemp(prefix="kdcache-postgres-", dir="/tmp" if as_server_user else None))
    password_file = folder / "password"
    password = "pw-" + secrets.token_hex(12)
    password_file.write_text(password + "\n")
    if as_server_user:
        for path in (folder, password_file):
            os.chown(path, owner.pw_uid, owner.pw_gid)
    server = Server(programs, folder, free_port(), password, as_server_user)
    data = str(folder / "data")
    try:
        # scram-sha-256 over TCP, as on a real server, so that a wrong password is refused; the local socket, only
        # for createdb here, trusts the server's own user
        login = ["-U", "kdcache", f"--pwfile={password_file}", "--auth-host=scram-sha-256", "--auth-local=trust"]
        server.run("initdb", "-D", data, *login, "--no-sync")
        password_file.unlink()
        settings = (
            f"-p {server.port} -k {folder} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off"
        )
        server.run("pg_ctl", "-D", data, "-l", str(folder / "server.log"), "-o", settings, "-w", "-t", "60", "start")
        yield server
    finally:
        subprocess.run(
            [*as_server_user, str(programs / "pg_ctl"), "-D", data, "-m", "immediate", "-w", "stop"],
            capture_output=True,
        )
        shutil.rmtree(folder, ignore_errors=True)


def assert_password_nowhere(password: str, outputs: list[Path], logs: list[str]) -> None:
    """Neither the password nor the URL holding it is in any file under `outputs` or in any log line."""
    for output in outputs:
        for path in output.rglob("*"):
            if path.is_file():
                assert password.encode() not in path.read_bytes(), f"the storage's password is in {path}"
    for log in logs:
        assert password not in log, log


@pytest.mark.slow
def test_eight_workers_share_24_trials_without_repeating_one(postgres, tmp_path, tiny_cache):
    import optuna

    storage = postgres.database("eight")
    workers = [
        start_sweep(tiny_cache, tmp_path / f"w{index}", trials=24, storage=storage, epochs=1) for index in range(8)
    ]
    most = 0  # connections to the database at once: NullPool keeps at most 2 per worker (its own, its heartbeat's)
    deadline = time.monotonic() + 600
    while any(worker.poll() is None for worker in workers) and time.monotonic() < deadline:
        most = max(most, postgres.connections("eight"))
        time.sleep(0.2)
    logs = [worker.communicate(timeout=60)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [0] * 8, logs
    everything = trials_of(storage)
    trials = [trial for trial in everything if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(trials) == 24 and len({trial.params["learning_rate"] for trial in trials}) == 24
    # workers that found the study one short at the same moment each began one: the later ones stood down untrained
    others = [trial for trial in everything if trial.state != optuna.trial.TrialState.COMPLETE]
    assert all(trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs.get("surplus") for trial in others)
    # each trial trained once, by one worker, into that worker's own output
    folders = sorted(int(path.name) for index in range(8) for path in (tmp_path / f"w{index}" / "trials").glob("*"))
    assert folders == sorted(trial.number for trial in trials)
    pids = {worker.pid for worker in workers}
    assert {trial.user_attrs["pid"] for trial in trials} <= pids
    assert len({trial.user_attrs["pid"] for trial in trials}) >= 2
    assert 0 < most <= 2 * len(workers)
    report = (tmp_path / "w0" / "sweep.json").read_text()
    assert postgres.url("eight", password="***") in report  # the storage as sweep.json names it
    assert_password_nowhere(postgres.password, [tmp_path], logs)


@pytest.mark.slow
def test_a_killed_workers_trial_is_failed_by_the_heartbeat_and_retried_by_another(
    postgres, tmp_path, tiny_cache, monkeypatch
):
    import optuna

    monkeypatch.setenv("KDCACHE_SWEEP_HEARTBEAT", str(HEARTBEAT))  # both workers beat every second: grace 3 s
    storage = postgres.database("killed")
    # 2 epochs: a trial lasts seconds, long enough to be killed in; 6 trials: the survivor still has trials to run
    # after the grace period, and it fails the dead trial before it counts what is left
    doomed, survivor = (start_sweep(tiny_cache, tmp_path / name, trials=6, storage=storage) for name in "ab")
    RUNNING = optuna.trial.TrialState.RUNNING
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:  # the doomed worker's trial under way
        under_way = [
            trial
            for trial in trials_of(storage)
            if trial.state == RUNNING and trial.user_attrs.get("pid") == doomed.pid and trial.params  # training
        ]
        if under_way:
            break
        assert doomed.poll() is None and survivor.poll() is None, "a worker stopped before the kill"
        time.sleep(0.1)
    else:
        pytest.fail("the worker to kill did not start a trial")
    doomed.send_signal(signal.SIGKILL)
    killed_at = datetime.now()
    doomed.wait()
    (killed,) = under_way
    logs = [doomed.stdout.read(), survivor.communicate(timeout=600)[0]]
    assert survivor.returncode == 0, logs[1]
    trials = {trial.number: trial for trial in trials_of(storage)}
    assert trials[killed.number].state == optuna.trial.TrialState.FAIL
    complete = [trial for trial in trials.values() if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 6 and len(trials) == 7
    (retry,) = [trial for trial in complete if trial.system_attrs.get("failed_trial") == killed.number]
    assert retry.params == killed.params == trials[killed.number].params and retry.user_attrs["pid"] == survivor.pid
    # failed by the survivor's heartbeat check, not by the check of a process started later on this machine (that
    # one marks its retries retry_of), and only once the grace period had passed
    assert "retry_of" not in retry.user_attrs
    assert (retry.datetime_start - killed_at).total_seconds() >= 2 * HEARTBEAT
    report = json.loads((tmp_path / "b" / "sweep.json").read_text())
    assert report["counts"] == {"complete": 6, "fail": 1}
    assert [record["retry_of"] for record in report["trials"] if "retry_of" in record] == [killed.number]
    assert_password_nowhere(postgres.password, [tmp_path], logs)


def test_a_rerun_fails_a_dead_machines_trial_and_runs_it_again(postgres, tmp_path, tiny_cache, monkeypatch):
    import optuna

    from kdcache.sweeps.run import sweep
    from kdcache.sweeps.study import open_storage

    monkeypatch.setenv("KDCACHE_SWEEP_HEARTBEAT", str(HEARTBEAT))
    storage = postgres.database("rerun")
    sweep(tiny_cache, tmp_path / "here", SPACE, trials=1, storage=storage, progress=False, epochs=1, batch_size=8)
    # a trial of another machine, which died in it: running, its last heartbeat older than the grace period
    with warnings.catch_warnings():  # Optuna's: the heartbeat is experimental, and meant for Study.optimize
        warnings.simplefilter("ignore")
        study = optuna.load_study(study_name="kdcache-sweep", storage=open_storage(storage, tmp_path)[1])
        dead = study.ask({"learning_rate": optuna.distributions.FloatDistribution(1e-3, 3e-2, log=True)})
    dead.set_user_attr("host", "another-machine")
    study._storage.record_heartbeat(dead._trial_id)
    time.sleep(3 * HEARTBEAT + 0.5)
    # it counted as running, so the study looked complete at 2: the rerun fails it before counting, and runs it again
    report = sweep(
        tiny_cache, tmp_path / "here", SPACE, trials=2, storage=storage, progress=False, epochs=1, batch_size=8
    )
    assert report["counts"] == {"complete": 2, "fail": 1}
    (retry,) = [record for record in report["trials"] if record.get("retry_of") == dead.number]
    assert retry["state"] == "complete" and retry["params"] == dead.params


def refused(storage: str, password: str, output: Path, cache) -> str:
    """kdcache sweep's one line for `storage`, which it cannot open: it names the URL with *** for its password."""
    result = cli(cache, "--trials", 1, "--output", output, "--param", SPACE[0], "--storage", storage)
    lines = result.output.strip().splitlines()
    assert result.exit_code == 1 and len(lines) == 1, result.output
    shown = storage.replace(f":{password}@", ":***@")
    assert shown != storage and lines[0].startswith(f"kdcache: error: --storage '{shown}'"), lines[0]
    assert password not in lines[0] and "Traceback" not in result.output and not list(output.glob("*"))
    return lines[0]


def test_a_server_that_does_not_answer_is_one_line_naming_host_and_port(driver, tmp_path, tiny_cache):
    port = free_port()  # nothing listens there
    password = secrets.token_hex(8)
    url = f"postgresql+psycopg://kdcache:{password}@127.0.0.1:{port}/sweeps"
    line = refused(url, password, tmp_path / "out", tiny_cache)
    assert f"no database server answers at 127.0.0.1:{port} (Connection refused); check the host and port" in line


def test_a_wrong_password_is_one_line_naming_the_user_not_the_password(postgres, tmp_path, tiny_cache):
    wrong = "wrong-" + secrets.token_hex(8)
    line = refused(postgres.url("postgres", password=wrong), wrong, tmp_path / "out", tiny_cache)
    assert f"the server at 127.0.0.1:{postgres.port} refused user 'kdcache' (password authentication failed" in line
    assert "fix the user or password in the URL" in line
    assert postgres.password not in line


def test_a_database_that_does_not_exist_is_one_line_saying_how_to_create_it(postgres, tmp_path, tiny_cache):
    line = refused(postgres.url("absent"), postgres.password, tmp_path / "out", tiny_cache)
    assert f"the server at 127.0.0.1:{postgres.port} has no database 'absent'; create it there (createdb -h " in line


@needs_optuna
def test_a_driver_that_is_not_installed_is_one_line_naming_it(tmp_path, tiny_cache, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "psycopg2", None)  # `import psycopg2` fails, as where it is not installed
    url = "postgresql+psycopg2://kdcache:secret@127.0.0.1:5432/sweeps"
    assert "needs the database driver psycopg2, which is not installed" in refused(
        url, "secret", tmp_path / "out", tiny_cache
    )


@needs_optuna
def test_a_heartbeat_that_is_not_a_whole_number_of_seconds_is_refused(tmp_path, tiny_cache, monkeypatch):
    monkeypatch.setenv("KDCACHE_SWEEP_HEARTBEAT", "0.5")
    result = cli(tiny_cache, "--trials", 1, "--output", tmp_path / "out", "--param", SPACE[0])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "kdcache: error: KDCACHE_SWEEP_HEARTBEAT='0.5' is not a whole number of seconds >= 1; set it to one, or "
        "unset it for 60"
    ]
