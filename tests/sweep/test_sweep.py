"""kdcache.sweep (kdcache.sweeps.run) and kdcache.sweeps.space: the space and its one-line refusals, then sweeps on
the tiny cache (verified once, pruned trials, refused trials, best/, resuming after a kill, two processes on one
storage). The sweeps need Optuna (the 'sweep' extra) and skip without it; the message a user gets without it is
tested by hiding it."""

import inspect
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import fields
from pathlib import Path

import pytest

from kdcache import KdcacheError
from kdcache.options import DEFAULT_STUDY
from kdcache.outputs import TRAINING_RECORD
from kdcache.sweeps.space import Param, build_space, parse_param, read_space_file

try:
    import optuna
except ImportError:  # the sweeps below skip; the space, and the message without Optuna, are tested all the same
    optuna = None

needs_optuna = pytest.mark.skipif(optuna is None, reason="Optuna is not installed: pip install -e '.[sweep]'")
REPO = Path(__file__).resolve().parents[2]
FAST = dict(epochs=2, batch_size=8, logging_steps=1)
SPACE = ["learning_rate=loguniform(1e-3,3e-2)"]


def cli(*arguments):
    from typer.testing import CliRunner

    from kdcache.cli import app

    return CliRunner().invoke(app, ["sweep", *map(str, arguments)])


def test_a_param_is_parsed_into_its_field_type():
    assert parse_param("learning_rate=loguniform(1e-4, 1e-2)") == Param("learning_rate", "loguniform", 1e-4, 1e-2)
    assert parse_param("student-size=int(96,160)") == Param("student_size", "int", 96, 160)
    assert parse_param("temperature=choice(2,5,none)").choices == (2.0, 5.0, None)
    assert parse_param("ema_decay=choice(none,0.99)").choices == (None, 0.99)
    assert parse_param("standardize_logits=choice(true,false)").choices == (True, False)
    assert parse_param("loss=choice(kd,dkd)").choices == ("kd", "dkd")
    assert parse_param("batch_size=choice(16,32)").choices == (16, 32)
    assert parse_param("epochs=int(4,8)").spec == "epochs=int(4,8)"


@pytest.mark.parametrize(
    "text, message",
    [
        (
            "learning_rate",
            "--param 'learning_rate' is not NAME=SPEC; SPEC is one of loguniform(a,b), uniform(a,b), "
            "int(a,b) or choice(x,y,...)",
        ),
        ("lr=uniform(0,1)", "--param 'lr=uniform(0,1)': 'lr' is not an option of train-student; sweepable: student, "),
        ("device=choice(cpu)", "--param 'device=choice(cpu)': device says how or where a trial runs"),
        ("alpha=normal(0,1)", "--param 'alpha=normal(0,1)': 'normal' is not a distribution; use one of"),
        ("alpha=uniform(1,0)", "--param 'alpha=uniform(1,0)': the bounds must be a < b"),
        ("alpha=uniform(0,x)", "--param 'alpha=uniform(0,x)': 'x' is not a number"),
        ("alpha=uniform(0)", "--param 'alpha=uniform(0)': uniform() takes two bounds, uniform(a,b) with a < b"),
        ("learning_rate=loguniform(0,1)", "loguniform(a,b) needs 0 < a"),
        ("batch_size=uniform(8,64)", "batch_size takes whole numbers, and uniform() draws real ones"),
        ("batch_size=choice(8,12.5)", "batch_size takes whole numbers, not '12.5'"),
        ("loss=uniform(0,1)", "loss takes a name, not a number drawn from a range; use choice(...)"),
        ("standardize_logits=choice(maybe)", "standardize_logits takes true or false, not 'maybe'"),
        ("alpha=choice(none,0.5)", "alpha cannot be none"),
        ("alpha=choice(0.5,0.5)", "choice() lists a value twice"),
        ("epochs=int(1.5,4)", "int(a,b) takes whole-number bounds"),
    ],
)
def test_a_bad_param_is_one_line_naming_it(text, message):
    with pytest.raises(KdcacheError) as refused:
        parse_param(text)
    assert len(str(refused.value).splitlines()) == 1
    assert str(refused.value).startswith(message) or message in str(refused.value)


def test_a_space_file_in_yaml_or_json_and_a_field_given_twice(tmp_path):
    pytest.importorskip("yaml")
    (tmp_path / "space.yaml").write_text("learning_rate: loguniform(1e-4,1e-2)\ntemperature: [2, 5]\n")
    assert read_space_file(tmp_path / "space.yaml") == [
        Param("learning_rate", "loguniform", 1e-4, 1e-2),
        Param("temperature", "choice", choices=(2.0, 5.0)),
    ]
    (tmp_path / "space.json").write_text(json.dumps({"alpha": "uniform(0.2,1)"}))
    assert build_space(["temperature=choice(2,5)"], tmp_path / "space.json") == [
        Param("alpha", "uniform", 0.2, 1.0),
        Param("temperature", "choice", choices=(2.0, 5.0)),
    ]
    with pytest.raises(KdcacheError, match=r"^--param alpha is given twice \(in --param or --space\); give it once$"):
        build_space(["alpha=uniform(0,1)"], tmp_path / "space.json")
    (tmp_path / "bad.yaml").write_text("alpha: 0.5\n")
    with pytest.raises(KdcacheError, match=r"^--space '.*bad.yaml', alpha: '0.5' is not a distribution"):
        read_space_file(tmp_path / "bad.yaml")
    (tmp_path / "list.yaml").write_text("- alpha\n")
    with pytest.raises(KdcacheError, match=r"must map option names to distributions"):
        read_space_file(tmp_path / "list.yaml")
    with pytest.raises(KdcacheError, match=r"^a sweep needs at least one --param NAME=SPEC"):
        build_space([], None)


def test_kdcache_sweep_is_the_function_and_takes_the_commands_options_by_their_names():
    import kdcache
    from kdcache.options import SweepOptions
    from kdcache.sweeps.run import sweep

    assert kdcache.sweep is sweep and inspect.isfunction(sweep)  # after kdcache.sweeps.space was imported, too
    assert {field.name for field in fields(SweepOptions)} <= set(inspect.signature(sweep).parameters)


def test_without_optuna_the_command_says_in_one_line_how_to_install_it(tmp_path, monkeypatch, tiny_cache):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError, as when it is absent
    result = cli(tiny_cache, "--trials", 2, "--output", tmp_path / "sweep", "--param", SPACE[0])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "kdcache: error: kdcache sweep needs Optuna, an optional extra; install it with pip install -e '.[sweep]'"
    ]
    assert not (tmp_path / "sweep").exists()


@pytest.fixture(scope="module")
def mixed_cache(make_cache):
    return make_cache(views=2, mix_alpha=1.0)


@needs_optuna
def test_bad_spaces_are_refused_in_one_line_before_any_trial(tmp_path, tiny_cache, mixed_cache):
    output = tmp_path / "sweep"
    (tmp_path / "space.json").write_text(json.dumps({"alpha": "uniform(0.2,1)"}))
    cases = [
        ([tiny_cache, "--param", "alpha=uniform(0,2)"], "--param alpha=uniform(0,2): alpha=2.0 is refused: "),
        ([tiny_cache, "--param", "temperature=choice(2,x)"], "--param 'temperature=choice(2,x)': 'x' is not a number"),
        ([tiny_cache, "--param", "size=int(96,128)"], "--param 'size=int(96,128)': 'size' is not an option"),
        (
            [tiny_cache, "--param", "loss=choice(kd,dist)", "--standardize-logits"],
            "--param loss=choice(kd,dist): "
            "loss=dist is refused: --standardize-logits is an option of the KL-based losses",
        ),
        # the example: DKD needs one label per image, and a mixed cache has two
        (
            [mixed_cache, "--param", "loss=choice(kd,dkd)"],
            "--param loss=choice(kd,dkd): loss=dkd is refused: --loss dkd needs one label per image, and cache",
        ),
        (
            [tiny_cache, "--param", SPACE[0], "--pruner", "asha"],
            "--pruner 'asha' is not one of median, hyperband, none",
        ),
        ([tiny_cache, "--param", SPACE[0], "--eval-split", "none"], "a sweep scores each trial on --eval-split"),
        # --param and --space both reach the space (SweepOptions.space and .space_file, as kdcache.sweep names them)
        (
            [tiny_cache, "--param", "alpha=uniform(0,1)", "--space", tmp_path / "space.json"],
            "--param alpha is given twice (in --param or --space); give it once",
        ),
    ]
    for arguments, message in cases:
        result = cli(*arguments, "--trials", 2, "--output", output)
        lines = result.output.strip().splitlines()
        assert result.exit_code == 1 and len(lines) == 1, result.output
        assert lines[0].startswith("kdcache: error: " + message), lines[0]
        assert "Traceback" not in result.output and not output.exists()


@needs_optuna
def test_a_four_trial_sweep_verifies_the_cache_once_and_keeps_the_best_student(tmp_path, tiny_cache, monkeypatch):
    import kdcache
    from kdcache.format.manifest import Manifest

    verified = []
    verify_files = Manifest.verify_files
    monkeypatch.setattr(
        Manifest, "verify_files", lambda self, *a, **k: verified.append(1) or verify_files(self, *a, **k)
    )
    output = tmp_path / "sweep"
    report = kdcache.sweep(
        tiny_cache,
        output,
        SPACE + ["temperature=choice(2,5)"],
        trials=4,
        pruner="none",
        sampler_seed=0,
        progress=False,
        **FAST,
    )
    assert len(verified) == 1  # once for the process, not once per trial
    study = optuna.load_study(study_name=DEFAULT_STUDY, storage=f"sqlite:///{output / 'study.db'}")
    complete = study.get_trials(states=(optuna.trial.TrialState.COMPLETE,))
    assert len(complete) == 4 and len(study.trials) == 4
    # sweep.json: every trial with its options, state, best epoch, validation accuracy and minutes, best first
    saved = json.loads((output / "sweep.json").read_text())
    assert saved == json.loads(json.dumps(report, default=str))
    assert [record["state"] for record in saved["trials"]] == ["complete"] * 4
    accuracies = [record["validation_accuracy"] for record in saved["trials"]]
    assert accuracies == sorted(accuracies, reverse=True)
    for record in saved["trials"]:
        trial = study.trials[record["trial"]]
        assert record["validation_accuracy"] == trial.value == max(trial.intermediate_values.values())
        assert record["options"]["learning_rate"] == trial.params["learning_rate"]
        assert record["options"]["temperature"] == trial.params["temperature"] and record["options"]["epochs"] == 2
        assert record["best_epoch"] in (1, 2) and record["minutes"] >= 0
        student = json.loads((output / "trials" / f"{record['trial']:04d}" / TRAINING_RECORD).read_text())
        assert student["best_eval_accuracy"] == record["validation_accuracy"]
        assert student["recipe"]["learning_rate"] == trial.params["learning_rate"]
    # best/: the best trial's student, a normal student folder that pipeline() loads
    best = json.loads((output / "best" / TRAINING_RECORD).read_text())
    assert best["best_eval_accuracy"] == study.best_value == saved["best"]["validation_accuracy"]
    assert json.loads((output / "best" / "kdcache_sweep_trial.json").read_text())["trial"] == study.best_trial.number
    from helpers import make_images
    from transformers import pipeline

    classifier = pipeline("image-classification", model=str(output / "best"))
    assert len(classifier(make_images(1, seed=5)[0][0])) == 3
    assert set(saved["plots"]["written"]) >= {"optimization_history", "param_importances", "slice"}
    assert all(Path(path).stat().st_size > 0 for path in saved["plots"]["written"].values())
    assert not list((output / "trials").glob("*.partial"))
    assert not list(tmp_path.rglob("*.lock")), "no lock file left anywhere: the trials', best/'s"
    # rerun with the same arguments: the study is complete, nothing is trained again
    again = kdcache.sweep(
        tiny_cache,
        output,
        SPACE + ["temperature=choice(2,5)"],
        trials=4,
        pruner="none",
        sampler_seed=0,
        progress=False,
        **FAST,
    )
    assert len(again["trials"]) == 4 and len(verified) == 2
    # its kdcache_config.yaml reruns it from anywhere: the space, the study, the trials' fixed options
    import yaml
    from typer.testing import CliRunner

    from kdcache.cli import app
    from kdcache.options.config import CONFIG_FILE

    config = yaml.safe_load((output / CONFIG_FILE).read_text())
    assert config["space"] == ["learning_rate=loguniform(0.001,0.03)", "temperature=choice(2,5)"]
    assert (config["trials"], config["epochs"], config["batch_size"], config["output"]) == (4, 2, 8, ".")
    monkeypatch.chdir(tmp_path.parent)
    result = CliRunner().invoke(app, ["sweep", "--config", str(output / CONFIG_FILE)])
    assert result.exit_code == 0, result.output
    assert len(verified) == 3 and len(study.get_trials()) == 4, "complete: nothing more"
    # another space on the same study is refused, not mixed into it
    with pytest.raises(
        KdcacheError,
        match=r"^study 'kdcache-sweep' in '.*' was started with other settings \(the "
        r"space and epochs differ\); rerun the same command",
    ):
        kdcache.sweep(tiny_cache, output, SPACE, trials=5, progress=False, **{**FAST, "epochs": 3})
    assert yaml.safe_load((output / CONFIG_FILE).read_text()) == config, "a refused rerun leaves the config be"


def test_a_written_config_keeps_the_storage_without_its_password():
    from kdcache.sweeps.run import without_password

    assert without_password("postgresql+psycopg://me:s3cret@db.example:5432/sweeps") == (
        "postgresql+psycopg://me@db.example:5432/sweeps"
    )
    assert without_password("sqlite:///sweeps/study.db") == "sqlite:///sweeps/study.db"
    assert without_password("journal.log") == "journal.log" and without_password(None) is None


@needs_optuna
def test_the_median_pruner_spares_a_slow_starter_for_half_its_epochs():
    from kdcache.sweeps.run import make_pruner

    # four finished trials at 0.7 from epoch 1 on, then a trial at chance (as on beans, where one such trial of 8
    # epochs was still at 0.34 after epoch 2 and finished at 0.865): not pruned before epoch 4 of 8, pruned from there
    study = optuna.create_study(direction="maximize", pruner=make_pruner("median", epochs=8))
    for _ in range(4):
        trial = study.ask()
        for epoch in range(1, 9):
            trial.report(0.7, epoch)
        study.tell(trial, 0.7)
    slow = study.ask()
    decisions = []
    for epoch in range(1, 9):
        slow.report(0.34, epoch)
        decisions.append(slow.should_prune())
    assert decisions == [False, False, False, True, True, True, True, True]


@needs_optuna
def test_a_pruned_trial_leaves_its_record_and_no_student(tmp_path, tiny_cache):
    from kdcache.sweeps.run import sweep

    output = tmp_path / "sweep"
    # a pruner that prunes any trial below 110% accuracy: the first epoch's report stops every trial
    report = sweep(
        tiny_cache,
        output,
        SPACE,
        trials=1,
        pruner=optuna.pruners.ThresholdPruner(lower=1.1),
        progress=False,
        **{**FAST, "epochs": 4},
    )
    (record,) = report["trials"]
    assert record["state"] == "pruned" and record["pruned_after_epoch"] == 1
    assert record["validation_accuracy"] is not None and record["options"]["epochs"] == 4
    assert not (output / "trials" / "0000").exists() and not (output / "trials" / "0000.partial").exists()
    assert list((output / "pruned-runs" / "0000").rglob("events.out.tfevents.*"))  # its TensorBoard run stays
    assert not (output / "best").exists() and report["best"] is None


@needs_optuna
def test_trials_refused_together_are_recorded_as_refused(tmp_path, tiny_cache):
    from kdcache.sweeps.run import sweep

    output = tmp_path / "sweep"
    # each value passes with the other option as fixed (kd; no standardising), but dist with standardising does not
    report = sweep(
        tiny_cache, output, ["loss=choice(dist)", "standardize_logits=choice(true)"], trials=2, progress=False, **FAST
    )
    assert [record["state"] for record in report["trials"]] == ["refused", "refused"]
    assert report["trials"][0]["refused"].startswith("--standardize-logits is an option of the KL-based losses")
    assert not (output / "trials").exists() or not list((output / "trials").iterdir())


@needs_optuna
def test_a_journal_file_storage_continues_up_to_the_total(tmp_path, tiny_cache):
    from kdcache.sweeps.run import sweep

    journal = tmp_path / "study.journal"
    first = sweep(tiny_cache, tmp_path / "a", SPACE, trials=1, storage=str(journal), progress=False, **FAST)
    second = sweep(
        tiny_cache, tmp_path / "a", SPACE, trials=2, storage=str(journal), pruner="hyperband", progress=False, **FAST
    )
    assert len(first["trials"]) == 1 and [record["trial"] for record in second["trials"]] != []
    assert sorted(record["trial"] for record in second["trials"]) == [0, 1]
    assert all(record["state"] == "complete" for record in second["trials"]) and journal.exists()


def start_sweep(cache, output: Path, trials: int, storage: str | None = None, epochs: int = 2) -> subprocess.Popen:
    environment = dict(os.environ, OMP_NUM_THREADS="1")
    environment["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "kdcache", "sweep", str(cache), "--trials", str(trials), "--output", str(output)]
    command += ["--param", SPACE[0], "--epochs", str(epochs), "--batch-size", "8", "--pruner", "none"]
    command += ["--storage", storage] if storage else []
    return subprocess.Popen(command, env=environment, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def trials_of(storage: str):
    from sqlalchemy.exc import IntegrityError, OperationalError

    try:
        return optuna.load_study(study_name=DEFAULT_STUDY, storage=storage).get_trials()
    except KeyError:  # not created yet
        return []
    except (OperationalError, IntegrityError):  # the sweep is creating the database's tables right now: look again
        return []


@needs_optuna
@pytest.mark.slow
def test_a_sweep_killed_after_its_second_trial_continues_without_repeating_one(tmp_path, tiny_cache):
    output = tmp_path / "sweep"
    storage = f"sqlite:///{output / 'study.db'}"
    running = start_sweep(tiny_cache, output, trials=4, epochs=3)
    deadline = time.monotonic() + 900  # minutes on a loaded machine
    while time.monotonic() < deadline:  # two trials done, the third training (its options drawn and recorded)
        trials = trials_of(storage) if (output / "study.db").exists() else []
        done = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
        under_way = [trial for trial in trials if trial.state == optuna.trial.TrialState.RUNNING]
        if len(done) >= 2 and under_way and "options" in under_way[0].user_attrs:
            break
        assert running.poll() is None, running.stdout.read()
        time.sleep(0.2)
    else:
        pytest.fail("the sweep did not reach its third trial")
    running.send_signal(signal.SIGKILL)
    running.wait()
    killed = under_way[0]
    finished_before = {trial.number: trial.params for trial in done}
    rerun = start_sweep(tiny_cache, output, trials=4, epochs=3)
    log, _ = rerun.communicate(timeout=1200)
    assert rerun.returncode == 0, log
    trials = trials_of(storage)
    complete = [trial for trial in trials if trial.state == optuna.trial.TrialState.COMPLETE]
    assert len(complete) == 4 and len({trial.number for trial in complete}) == 4
    assert {trial.number: trial.params for trial in complete if trial.number in finished_before} == finished_before
    (failed,) = [trial for trial in trials if trial.state == optuna.trial.TrialState.FAIL]
    assert failed.number == killed.number  # the killed trial, failed, and run again with its options
    (retry,) = [trial for trial in complete if trial.user_attrs.get("retry_of") == killed.number]
    assert retry.params == killed.params
    folders = sorted(path.name for path in (output / "trials").iterdir())
    assert folders == [f"{trial.number:04d}" for trial in sorted(complete, key=lambda trial: trial.number)]
    report = json.loads((output / "sweep.json").read_text())
    assert report["counts"] == {"complete": 4, "fail": 1}


@needs_optuna
@pytest.mark.slow
def test_two_processes_on_one_storage_run_distinct_trials_of_one_study(tmp_path, tiny_cache):
    storage = f"sqlite:///{tmp_path / 'shared.db'}"
    processes = [start_sweep(tiny_cache, tmp_path / name, trials=6, storage=storage) for name in ("a", "b")]
    logs = [process.communicate(timeout=1200)[0] for process in processes]
    assert [process.returncode for process in processes] == [0, 0], logs
    trials = trials_of(storage)
    assert len(trials) == 6 and all(trial.state == optuna.trial.TrialState.COMPLETE for trial in trials)
    pids = {trial.user_attrs["pid"] for trial in trials}
    assert pids == {process.pid for process in processes}  # both processes ran trials of the one study
    for name, process in zip(("a", "b"), processes):
        own = sorted(trial.number for trial in trials if trial.user_attrs["pid"] == process.pid)
        assert sorted(int(path.name) for path in (tmp_path / name / "trials").iterdir()) == own


@needs_optuna
def test_final_seeds_retrain_the_best_options_and_report_validation_mean_and_sd(tmp_path, tiny_cache):
    import statistics

    from kdcache.sweeps.run import sweep

    output = tmp_path / "sweep"  # a folder the user already had, with a file of theirs
    output.mkdir()
    (output / "notes.txt").write_text("mine\n")
    report = sweep(tiny_cache, output, SPACE, trials=1, final_seeds=2, progress=False, **{**FAST, "epochs": 1})
    finals, (best,) = report["final_seeds"], report["trials"]
    assert finals["trial"] == best["trial"] == 0 and [run["seed"] for run in finals["runs"]] == [0, 1]
    accuracies = []
    for run in finals["runs"]:
        summary = json.loads((Path(run["student"]) / TRAINING_RECORD).read_text())
        assert summary["recipe"]["seed"] == run["seed"]
        assert summary["recipe"]["learning_rate"] == best["params"]["learning_rate"]
        assert summary["best_eval_accuracy"] == run["validation_accuracy"]
        accuracies.append(run["validation_accuracy"])
    assert finals["validation_accuracy_mean"] == round(statistics.mean(accuracies), 4)
    assert finals["validation_accuracy_sd"] == round(statistics.stdev(accuracies), 4)
    assert json.loads((output / "sweep.json").read_text())["final_seeds"] == finals
    # beside the user's file, what a sweep leaves and no lock (best/'s, final/'s, the students'), anywhere below
    assert (output / "notes.txt").read_text() == "mine\n"
    assert not list(tmp_path.rglob("*.lock"))


@needs_optuna
def test_a_trial_begun_over_the_total_by_racing_processes_is_surplus():
    """Two processes that find the study one trial short at once each begin one: the storage numbers them in order,
    and the later one is surplus (it stands down untrained and does not count); a failed trial before it does not
    count either, so a trial that replaces it is not surplus."""
    from kdcache.sweeps.study import counted, surplus

    study = optuna.create_study(direction="maximize")
    first, second, third = study.ask(), study.ask(), study.ask()  # all three running, as racing processes leave them
    assert [surplus(optuna, study, trial, 2) for trial in (first, second, third)] == [False, False, True]
    study.tell(first, state=optuna.trial.TrialState.FAIL)  # a crash: it does not count, and is replaced
    assert not surplus(optuna, study, third, 2) and counted(optuna, study) == 2
