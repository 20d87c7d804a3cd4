"""--config FILE (kdcache.options.config, kdcache.cli.ConfigCommand): any option of any command in one YAML or JSON
file, the flags given winning; one line for a bad file; and the kdcache_config.yaml that every output folder
writes, which reruns it."""

import json
from dataclasses import fields, replace
from pathlib import Path

import pytest
import typer
import yaml
from helpers import weights
from typer.testing import CliRunner

import kdcache.format.reader
import kdcache.student.train
import kdcache.sweeps.run
import kdcache.teacher.run
from kdcache.cli import Kdcache, app
from kdcache.options import CacheOptions, SweepOptions, TrainingOptions
from kdcache.options.config import CONFIG_FILE, as_given, portable, write_config
from kdcache.outputs import TRAINING_RECORD

FAST = dict(batch_size=8, progress=False, logging_steps=1)


def received_by(monkeypatch, module, function: str) -> dict:
    """What the command hands the library function `module.function`, which is not run."""
    received = {}
    monkeypatch.setattr(module, function, lambda *args, **given: received.update(given, args=args))
    return received


def invoke(*arguments):
    return CliRunner().invoke(app, [str(argument) for argument in arguments])


def test_the_file_gives_the_options_and_the_flags_given_win(tmp_path, monkeypatch):
    received = received_by(monkeypatch, kdcache.student.train, "train_student")
    config = tmp_path / "runs" / "run.yaml"
    config.parent.mkdir()
    config.write_text(
        "cache: [../a, /data/b]\nlearning-rate: 0.002\nepochs: 3\nteacher_weights: [0.6, 0.4]\n"
        "eval_split: none\nonline: true\nstudent: mobilenet_v2\n"
    )
    assert invoke("train-student", "--config", config).exit_code == 0
    options = received["options"]
    # relative paths are the file's folder's; a list where a flag takes a comma-separated one; 'none' as on the line
    assert received["args"] == ([tmp_path / "runs" / "../a", Path("/data/b")],)
    assert (options.learning_rate, options.epochs, options.teacher_weights) == (0.002, 3, [0.6, 0.4])
    assert options.eval_split is None and options.online and options.student == "mobilenet_v2"
    assert options.seed == 42, "what neither gives: the command's default"

    # a flag given wins, even one given at its default value; an argument given replaces the file's list
    result = invoke("train-student", "--config", config, "--epochs", "20", "--learning-rate", "0.1", tmp_path / "c")
    assert result.exit_code == 0, result.output
    assert received["args"] == (tmp_path / "c",)
    assert (received["options"].epochs, received["options"].learning_rate) == (20, 0.1)


def test_a_json_file_is_read_too_and_gives_required_options(tmp_path, monkeypatch):
    received = received_by(monkeypatch, kdcache.sweeps.run, "sweep")
    monkeypatch.setattr(kdcache.sweeps.run, "optuna_module", lambda: None)
    config = tmp_path / "sweep.json"
    config.write_text(json.dumps({"cache": "c", "trials": 4, "output": "out", "space": ["seed=int(0,3)"]}))
    result = invoke("sweep", "--config", config)
    assert result.exit_code == 0, result.output
    assert (
        received["trials"] == 4 and received["output"] == tmp_path / "out" and received["space"] == ["seed=int(0,3)"]
    )


@pytest.mark.parametrize(
    "content, message",
    [
        ("epoch: 3\n", "key epoch: kdcache train-student has no such option; did you mean epochs?"),
        ("zzz: 3\n", "key zzz: kdcache train-student has no such option; its keys are alpha, "),
        ("epochs: many\n", "key epochs: "),
        ("epochs: [1, 2\n", "is not valid YAML"),
        ("- 3\n", "must map option names to values"),
        ("command: sweep\n", "is the config of kdcache sweep, not of kdcache train-student; give it to kdcache sweep"),
    ],
)
def test_a_bad_file_is_one_line_naming_the_key_and_the_file(tmp_path, content, message):
    config = tmp_path / "run.yaml"
    config.write_text(content)
    result = invoke("train-student", "--config", config, tmp_path)
    assert result.exit_code == 1
    assert len(result.output.strip().splitlines()) == 1, result.output
    assert result.output.startswith(f"kdcache: error: --config '{config}'") and message in result.output


def test_an_unreadable_file_and_a_value_its_option_refuses_are_one_line(tmp_path):
    result = invoke("train-student", "--config", tmp_path / "missing.yaml", tmp_path)
    assert (result.exit_code, result.output.strip()) == (
        1,
        f"kdcache: error: --config '{tmp_path / 'missing.yaml'}' cannot be read (No such file or directory); "
        "give a YAML or JSON file",
    )
    config = tmp_path / "run.yaml"
    config.write_text("warmup_ratio: 1\n")  # a value of the right type that the options' checks refuse
    result = invoke("train-student", "--config", config, tmp_path, "--output", tmp_path / "s")
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "kdcache: error: --warmup-ratio 1.0 is the fraction of the steps spent warming up: it must be >= 0 and < 1 "
        f"(set by --config '{config}', key warmup_ratio)"
    ]


def test_every_command_takes_a_config_and_a_new_one_with_no_line_of_its_own(tmp_path):
    group = typer.main.get_command(app)
    assert all("config" in [param.name for param in command.params] for command in group.commands.values())
    # a command added later (export, say) gets --config by being registered on the app
    other = Kdcache()
    seen = {}

    @other.command("export")
    def export(model: str = typer.Argument(...), opset: int = typer.Option(17)):
        seen.update(model=model, opset=opset)

    @other.command("other")
    def another():
        pass

    config = tmp_path / "export.yaml"
    config.write_text("model: m\nopset: 18\n")
    assert CliRunner().invoke(other, ["export", "--config", str(config)]).exit_code == 0
    assert seen == {"model": "m", "opset": 18}


# Options with values that their command-line spellings must read back exactly: lists, 'none', a schedule.
STUDENT = replace(
    TrainingOptions(),
    student="mobilenet_v2",
    loss="dkd",
    temperature=2.0,
    teacher_weights=[0.7, 0.3],
    eval_split=None,
    unlabeled_splits=[],
    labeled_fraction=0.5,
    student_size="128:0.7,224",
    ema_decay=0.99,
    num_workers=0,
    device="cpu",
    precision="fp32",
)
CACHE = replace(CacheOptions(), splits=["train", "test"], view_splits=["train"], view_scale=(0.5, 1.0), views=3)


@pytest.mark.parametrize(
    "command, module, function, options",
    [
        ("train-student", kdcache.student.train, "train_student", STUDENT),
        ("train-student", kdcache.student.train, "train_student", TrainingOptions()),
        ("teacher-logits", kdcache.teacher.run, "teacher_logits", CACHE),
        ("teacher-logits", kdcache.teacher.run, "teacher_logits", CacheOptions()),
    ],
)
def test_a_written_config_reads_back_as_the_same_options(tmp_path, monkeypatch, command, module, function, options):
    received = received_by(monkeypatch, module, function)
    monkeypatch.setattr(kdcache.format.reader, "describe", lambda cache: "")  # of the cache not made
    inputs = {"cache": tmp_path / "cache"} if command == "train-student" else {"dataset": "beans", "teacher": "a/b"}
    write_config(tmp_path, command, {**inputs, "output": tmp_path / "out", **as_given(options)})
    result = invoke(command, "--config", tmp_path / CONFIG_FILE)
    assert result.exit_code == 0, result.output
    written = {field.name for field in fields(options) if field.metadata.get("in_config", True)}
    assert {name: getattr(received["options"], name) for name in written} == {
        name: getattr(options, name) for name in written
    }
    assert received["output"] == tmp_path / "out"


def test_a_sweep_config_reads_back_as_the_same_study_and_options(tmp_path, monkeypatch):
    received = received_by(monkeypatch, kdcache.sweeps.run, "sweep")
    monkeypatch.setattr(kdcache.sweeps.run, "optuna_module", lambda: None)
    study = SweepOptions(space=["seed=int(0,3)"], trials=5, output=tmp_path / "sweep", storage="x.log", final_seeds=2)
    fixed = replace(TrainingOptions(), epochs=3, student_size=128, eval_split="test")
    write_config(tmp_path, "sweep", {"cache": tmp_path / "cache", **as_given(study), **as_given(fixed, sweep=True)})
    assert invoke("sweep", "--config", tmp_path / CONFIG_FILE).exit_code == 0
    assert {key: received[key] for key in ("space", "trials", "output", "storage", "final_seeds")} == {
        "space": ["seed=int(0,3)"],
        "trials": 5,
        "output": tmp_path / "sweep",
        "storage": "x.log",
        "final_seeds": 2,
    }
    assert (received["options"].epochs, received["options"].student_size, received["options"].eval_split) == (
        3,
        128,
        "test",
    )


def test_a_config_names_hub_ids_as_ids_and_local_paths_relative_to_itself(tmp_path):
    (tmp_path / "data" / "beans").mkdir(parents=True)
    home = tmp_path / "data" / "students" / "s"
    assert portable("merve/beans-vit-224", home) == "merve/beans-vit-224"
    assert portable(str(tmp_path / "data" / "beans"), home) == "../../beans"
    assert portable(home, home, always=True) == "."
    assert portable("/", home, always=True) == "/", "nothing shared below the root: the path itself"


def test_a_student_config_reruns_the_same_student(tmp_path, tiny_cache, monkeypatch):
    """The written config makes the same student: the same options, the same first steps' losses, the same weights."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "caches").mkdir()
    (tmp_path / "caches" / "tiny").symlink_to(tiny_cache, target_is_directory=True)
    first = ["train-student", "caches/tiny", "--output", "students/first", "--epochs", "2", "--batch-size", "8"]
    result = invoke(*first, "--learning-rate", "0.003", "--seed", "3", "--student-size", "24", "--device", "cpu")
    assert result.exit_code == 0, result.output
    config = tmp_path / "students" / "first" / CONFIG_FILE
    written = yaml.safe_load(config.read_text())
    assert written["command"] == "train-student" and written["output"] == "."
    assert written["cache"] == "../../caches/tiny" and written["learning_rate"] == 0.003
    assert not any(str(tmp_path) in str(value) for value in written.values()), "no absolute path"

    result = invoke("train-student", "--config", config, "--output", tmp_path / "second")
    assert result.exit_code == 0, result.output
    runs = [json.loads((tmp_path / folder / TRAINING_RECORD).read_text()) for folder in ("students/first", "second")]
    assert runs[0]["recipe"] == runs[1]["recipe"]
    assert runs[0]["train_losses"][:3] == runs[1]["train_losses"][:3]
    for name, tensor in weights(tmp_path / "students" / "first").items():
        assert tensor.equal(weights(tmp_path / "second")[name]), name
    again = yaml.safe_load((tmp_path / "second" / CONFIG_FILE).read_text())
    assert again["cache"] == "../caches/tiny", "relative to its own folder, one level up this time"
    assert {**again, "cache": written["cache"]} == written, "the rerun writes the same config"


def test_a_cache_config_reruns_the_same_cache(tmp_path, tiny_dataset, tiny_teacher, make_cache, monkeypatch):
    """A cache's kdcache_config.yaml names its inputs relative to itself and reruns it: the same inputs and options,
    so the cache is found up to date (a changed option would make another fingerprint, and a refusal)."""
    cache = make_cache(tmp_path / "caches" / "tiny", views=2, view_seed=3, splits=["train", "validation"])
    config = cache / CONFIG_FILE
    written = yaml.safe_load(config.read_text())
    assert written["command"] == "teacher-logits" and written["output"] == "."
    assert written["views"] == 2 and written["splits"] == ["train", "validation"] and written["view_scale"] == 0.25
    assert Path(written["dataset"]).is_absolute() is False and (cache / written["dataset"]).resolve() == tiny_dataset
    manifest = (cache / "kdcache.json").read_text()
    monkeypatch.chdir(tmp_path.parent)  # anywhere: its paths are its own folder's
    result = invoke("teacher-logits", "--config", config)
    assert result.exit_code == 0, result.output
    assert (cache / "kdcache.json").read_text() == manifest, "up to date: nothing rewritten"
    result = invoke("teacher-logits", "--config", config, "--views", "3")
    assert result.exit_code == 1 and "--overwrite" in result.output, "the flag wins: another cache, refused there"
