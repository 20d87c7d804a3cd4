"""--student-size as a schedule (kdcache.options.resolution, kdcache.student.trainer.ResolutionSchedule): parsed or
refused in one line, each epoch trained at its size and evaluated at the last, the BatchNorm statistics restarted at
a change, resumable across the change, recorded, sweepable."""

import json

import pytest
import torch
from helpers import FAST, crash_after_first_save, weights

from kdcache import KdcacheError
from kdcache.options.resolution import epoch_sizes, parse_student_size, size_schedule
from kdcache.student import trainer as trainer_module
from kdcache.student.train import train_student
from kdcache.sweeps.space import parse_param

SCHEDULE = "16:0.5,32"  # the tiny teacher's input is 32 px: half the epochs at 16 px, then 32 px


@pytest.mark.parametrize(
    "given, expected",
    [
        (None, None),
        (128, 128),
        ("224", 224),
        ("128:0.7,224", "128:0.7,224"),
        (" 96:0.40, 160:0.8 ,224", "96:0.4,160:0.8,224"),
    ],
)
def test_sizes_and_schedules_are_read_into_one_spelling(given, expected):
    assert parse_student_size(given) == expected


def test_each_epoch_trains_at_the_size_holding_its_middle():
    assert epoch_sizes("128:0.7,224", 20) == [128] * 14 + [224] * 6
    assert epoch_sizes("128:0.7,224", 10) == [128] * 7 + [224] * 3
    assert epoch_sizes("96:0.4,160:0.8,224", 5) == [96, 96, 160, 160, 224]
    assert size_schedule("128:0.7,224") == [(128, 0.7), (224, 1.0)]


@pytest.mark.parametrize(
    "given, message",
    [
        ("128:0.7", "is not SIZE, or SIZE:UNTIL,...,SIZE"),
        ("128,224", "is not SIZE, or SIZE:UNTIL"),
        ("128:x,224", "is not SIZE, or SIZE:UNTIL"),
        ("big", "is not SIZE, or SIZE:UNTIL"),
        ("128:0.7,96:0.5,224", "each UNTIL must be a share of the epochs above the one before it"),
        ("128:1.5,224", "each UNTIL must be a share"),
        ("224:0.7,128", "ends at 128 px, below the 224 px it trains at before"),
        ("8:0.5,32", "8 px is too small"),
    ],
)
def test_a_malformed_schedule_is_one_line(given, message):
    with pytest.raises(KdcacheError, match=message) as refused:
        parse_student_size(given)
    assert "\n" not in str(refused.value)


def test_a_schedule_is_refused_before_any_work(tmp_path, tiny_cache):
    for options, message in (
        (dict(student_size="224:0.5,16", epochs=2), "ends at 16 px, below the 224 px"),
        (dict(student_size="16:0.02,32", epochs=2), "gives 16 px no epoch of the 2"),
        (dict(student_size="16:0.5,32", epochs=2, online=True), "--online runs the teacher on the student's input"),
    ):
        with pytest.raises(KdcacheError, match=message):
            train_student(tiny_cache, output=tmp_path / "student", **options, **FAST)
        assert list(tmp_path.iterdir()) == []


def test_the_command_line_takes_a_schedule_and_refuses_a_bad_one(tmp_path, tiny_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    result = CliRunner().invoke(app, ["train-student", str(tiny_cache), "--student-size", "32:0.5,16"])
    assert result.exit_code != 0
    assert "ends at 16 px, below the 32 px" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "student").exists()


@pytest.fixture
def batch_shapes(monkeypatch):
    """(training?, height) of every batch the Trainer computes a loss on, in order."""
    seen = []
    original = trainer_module.DistillationTrainer.compute_loss

    def recording(self, model, inputs, *args, **kwargs):
        seen.append((model.training, inputs["pixel_values"].shape[-1]))
        return original(self, model, inputs, *args, **kwargs)

    monkeypatch.setattr(trainer_module.DistillationTrainer, "compute_loss", recording)
    return seen


@pytest.mark.parametrize("cache", ["tiny_cache", "four_view_cache"])
def test_a_schedule_trains_each_epoch_at_its_size_and_evaluates_at_the_last(tmp_path, cache, request, batch_shapes):
    cache = request.getfixturevalue(cache)
    summary = train_student(cache, output=tmp_path / "student", epochs=2, student_size=SCHEDULE, **FAST)
    steps = summary["steps"] // 2
    training = [size for is_training, size in batch_shapes if is_training]
    assert training == [16] * steps + [32] * steps
    assert {size for is_training, size in batch_shapes if not is_training} == {32}  # validation: the final size
    assert summary["recipe"]["student_size"] == [32, 32]
    assert summary["recipe"]["student_size_schedule"] == [[16, 0.5], [32, 1.0]]
    card = (tmp_path / "student" / "README.md").read_text()
    assert "trained at 16 px for the first 50% of the epochs, then 32 px" in card
    processor = json.loads((tmp_path / "student" / "preprocessor_config.json").read_text())
    assert processor["size"] == {"height": 32, "width": 32}


def test_batchnorm_statistics_restart_at_a_size_change(tmp_path, tiny_cache):
    """The saved student (the last epoch's, without checkpoints) has BatchNorm statistics of the last size alone."""
    plain = train_student(tiny_cache, output=tmp_path / "plain", epochs=2, save_checkpoints=False, **FAST)
    scheduled = train_student(
        tiny_cache, output=tmp_path / "scheduled", epochs=2, student_size=SCHEDULE, save_checkpoints=False, **FAST
    )
    tracked = {
        name: {
            key: int(value) for key, value in weights(tmp_path / name).items() if key.endswith("num_batches_tracked")
        }
        for name in ("plain", "scheduled")
    }
    assert set(tracked["plain"].values()) == {plain["steps"]}
    assert set(tracked["scheduled"].values()) == {scheduled["steps"] // 2}


def test_resume_across_the_size_change_equals_an_uninterrupted_run(tmp_path, four_view_cache, monkeypatch):
    options = dict(epochs=2, student_size=SCHEDULE, **FAST)
    whole = train_student(four_view_cache, output=tmp_path / "whole", **options)
    with crash_after_first_save(monkeypatch), pytest.raises(KeyboardInterrupt):  # killed at the change: epoch 1 saved
        train_student(four_view_cache, output=tmp_path / "resumed", **options)
    with pytest.raises(KdcacheError, match=r"--student-size \"16:0.5,32\" \(now \"16:0.6,32\"\)"):
        train_student(
            four_view_cache, output=tmp_path / "resumed", resume=True, **{**options, "student_size": "16:0.6,32"}
        )
    resumed = train_student(four_view_cache, output=tmp_path / "resumed", resume=True, **options)
    steps = whole["steps"] // 2
    assert resumed["train_losses"][-steps:] == whole["train_losses"][-steps:]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_a_schedule_is_sweepable():
    param = parse_param("student_size=choice('128:0.7,224', 224)")
    assert param.choices == ("128:0.7,224", 224)
    assert parse_param(param.spec) == param  # the study records the spec and reads it back
    with pytest.raises(KdcacheError, match="ends at 128 px"):
        parse_param("student_size=choice('224:0.7,128', 224)")
