"""Stage two refuses what it cannot do as asked, up front and in one line: bad options, a --resume that would not
continue the same run, an --online teacher that did not make the cache."""

import json
import shutil

import pytest
from helpers import save_vit_teacher
from transformers import TrainerCallback

from kdcache import KdcacheError
from kdcache.options import OPTIONS_FILE
from kdcache.student.train import train_student

FAST = dict(batch_size=8, progress=False, logging_steps=1)


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(precision="bf17"), r"--precision 'bf17' is not one of auto, fp32, bf16, fp16"),
        (dict(precision="bf16"), r"--precision bf16 needs a CUDA device"),
        (dict(warmup_ratio=1), r"--warmup-ratio 1 is the fraction .* must be >= 0 and < 1"),
        (dict(warmup_ratio=-0.1), r"--warmup-ratio -0.1 .* must be >= 0 and < 1"),
        (dict(scheduler="cosine_with_min_lr"), r"--scheduler 'cosine_with_min_lr' is not one of linear, cosine,"),
        (dict(scheduler="cosin"), r"--scheduler 'cosin' is not one of"),
        (dict(weight_decay=-0.01), r"--weight-decay -0.01 must be >= 0"),
        (dict(num_workers=-1), r"--num-workers -1 must be >= 0"),
        (dict(batch_size=0), r"--batch-size 0 must be at least 1"),
        (dict(epochs=0, max_steps=-1), r"--epochs 0 must be > 0"),
        (dict(epochs=float("nan"), max_steps=-1), r"--epochs nan must be > 0"),
        (dict(max_steps=0), r"max_steps=0 must be at least 1"),
        (dict(logging_steps=0), r"logging_steps=0 must be at least 1"),
        (dict(learning_rate=-1), r"--learning-rate -1 must be > 0"),
        (dict(seed=-1), r"--seed -1 must be >= 0"),
        (dict(online=True, student_only_augment=True), r"--online and --student-only-augment are two different runs"),
        (dict(teacher="some/teacher"), r"--teacher is used with --online only"),
        (dict(resume=True, save_checkpoints=False), r"--resume .* cannot go with save_checkpoints=False"),
        (dict(push_to_hub="not a repo!"), r"--push-to-hub 'not a repo!' is not a hub repository id"),
        (dict(device="cuda:0"), r"--device 'cuda:0' asked for CUDA but no CUDA GPU"),
        (dict(loss="ce"), r"--loss 'ce' is not one of kd, dkd, dist"),
        (
            dict(loss="dist", standardize_logits=True),
            r"--standardize-logits is an option of the KL-based losses .* not of --loss dist",
        ),
        (dict(loss="dkd", temperature=0), r"temperature must be > 0"),
        (dict(temperature=-1.0), r"temperature must be > 0, got -1.0"),
        (dict(temperature=float("nan")), r"temperature must be > 0, got nan"),
        (dict(alpha=-0.1), r"alpha \(lambda\) must be in \[0, 1\], got -0.1"),
        (dict(alpha=1.5), r"alpha \(lambda\) must be in \[0, 1\], got 1.5"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, tiny_cache, options, message, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # the same answers on a machine with a GPU
    with pytest.raises(KdcacheError, match=message) as refused:
        train_student(tiny_cache, output=tmp_path / "s", **{**FAST, "max_steps": 1, **options})
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == [], "a refused run writes nothing"


@pytest.mark.parametrize(
    "caches,options,message",
    [
        (2, dict(teacher_weights=[1.0]), r"--teacher-weights 1 gives 1 weights for 2 caches; give one per cache"),
        (2, dict(teacher_weights=[1.0, 0.0]), r"--teacher-weights 1,0: every weight must be a number > 0"),
        (2, dict(teacher_weights=[1.0, float("nan")]), r"--teacher-weights 1,nan: every weight must be a number > 0"),
        (1, dict(teacher_weights=[1.0]), r"--teacher-weights 1 weighs the teachers of several caches .* 1 cache was"),
        (2, dict(alpha=0.0), r"--alpha 0 trains from the labels alone, so several caches would make no difference"),
        (2, dict(standardize_logits=True), r"--standardize-logits z-scores each teacher's logits, and an ensemble's"),
        (2, dict(online=True), r"--online runs the one teacher of a cache on every batch; an ensemble is trained"),
    ],
)
def test_what_an_ensemble_cannot_go_with_is_refused_in_one_line(tmp_path, tiny_cache, caches, options, message):
    with pytest.raises(KdcacheError, match=message) as refused:
        train_student([tiny_cache] * caches, output=tmp_path / "s", **{**FAST, "max_steps": 1, **options})
    assert "\n" not in str(refused.value)
    assert list(tmp_path.iterdir()) == [], "a refused run writes nothing"


def test_the_command_line_prints_a_bad_option_as_one_line(tmp_path, tiny_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    result = CliRunner().invoke(
        app, ["train-student", str(tiny_cache), "--output", str(tmp_path / "s"), "--warmup-ratio", "1"]
    )
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "kdcache: error: --warmup-ratio 1.0 is the fraction of the steps spent warming up: it must be >= 0 and < 1"
    ]


class StopAt(TrainerCallback):
    """Interrupts training as Ctrl-C would: at the first save, or as soon as it begins."""

    def __init__(self, event):
        self.event = event

    def on_save(self, args, state, control, **kwargs):
        if self.event == "save":
            raise KeyboardInterrupt

    def on_train_begin(self, args, state, control, **kwargs):
        if self.event == "begin":
            raise KeyboardInterrupt


def interrupted(tiny_cache, output, event="save", **options):
    with pytest.raises(KeyboardInterrupt):
        train_student(tiny_cache, output=output, epochs=2, callbacks=[StopAt(event)], **{**FAST, **options})
    work = output.with_name(output.name + ".partial")
    assert work.is_dir() and not output.exists()
    return work


def test_resume_refuses_other_options_and_continues_with_the_same(tmp_path, tiny_cache):
    output = tmp_path / "s"
    # fp32 throughout: auto is bf16 on a GPU, and a run begun in bf16 is (rightly) not resumed in fp32 on the CPU below
    fast = {**FAST, "precision": "fp32"}
    with pytest.raises(
        KdcacheError, match=r"--resume: there is no interrupted run to continue .*s.partial' does not exist"
    ):
        train_student(tiny_cache, output=output, epochs=2, resume=True, **fast)
    work = interrupted(tiny_cache, output, precision="fp32")
    recorded = json.loads((work / OPTIONS_FILE).read_text())
    assert recorded["alpha"] == 0.5 and recorded["precision"] == "fp32" and "num_workers" not in recorded
    with pytest.raises(KdcacheError) as refused:
        train_student(tiny_cache, output=output, epochs=2, alpha=0.9, learning_rate=2e-3, resume=True, **fast)
    assert str(refused.value) == (
        f"--resume: the interrupted run in '{work}' was started with other options: --alpha 0.5 (now 0.9); "
        "--learning-rate 0.001 (now 0.002); resume with the same options, or pass --overwrite to start over"
    )
    assert any(work.glob("checkpoint-*")), "a refused resume keeps the interrupted run"
    with pytest.raises(
        KdcacheError, match=r'other options: --loss "kd" \(now "dist"\); --temperature 5.0 \(now 1.0\); resume'
    ):
        train_student(tiny_cache, output=output, epochs=2, loss="dist", resume=True, **fast)
    # how fast, how loud and where may change: workers, logging, the device (the run began on the default one)
    summary = train_student(
        tiny_cache, output=output, epochs=2, resume=True, num_workers=0, device="cpu", **{**fast, "logging_steps": 2}
    )
    assert summary["epochs"] == 2 and output.is_dir() and not work.exists()


def test_resume_with_nothing_to_resume_is_refused(tmp_path, tiny_cache):
    output = tmp_path / "s"
    with pytest.raises(KeyboardInterrupt):  # interrupted before its first checkpoint: nothing to resume, nothing left
        train_student(tiny_cache, output=output, epochs=2, callbacks=[StopAt("begin")], **FAST)
    assert not output.with_name("s.partial").exists()
    work = interrupted(tiny_cache, output)  # as a run killed (no cleanup) before its first checkpoint leaves it
    for checkpoint in work.glob("checkpoint-*"):
        shutil.rmtree(checkpoint)
    with pytest.raises(
        KdcacheError,
        match=r"stopped before its first checkpoint, so there is nothing to continue; "
        r"pass --overwrite instead",
    ):
        train_student(tiny_cache, output=output, epochs=2, resume=True, **FAST)
    shutil.rmtree(work)
    work = interrupted(tiny_cache, output)
    (work / OPTIONS_FILE).unlink()
    with pytest.raises(KdcacheError, match=r"has no readable record of its options"):
        train_student(tiny_cache, output=output, epochs=2, resume=True, **FAST)


def test_online_runs_only_the_teacher_that_made_the_cache(tmp_path, tiny_cache, tiny_teacher, tiny_dataset):
    other = save_vit_teacher(tmp_path / "other-teacher", seed=1)
    with pytest.raises(KdcacheError, match=r"--teacher '.*other-teacher' is not the teacher that made cache"):
        train_student(tiny_cache, output=tmp_path / "s", online=True, teacher=str(other), max_steps=1, **FAST)
    assert not (tmp_path / "s.partial").exists()

    copy = tmp_path / "copy-of-the-teacher"  # the same weights elsewhere: it is run, and named as run
    shutil.copytree(tiny_teacher, copy)
    summary = train_student(tiny_cache, output=tmp_path / "s", online=True, teacher=str(copy), max_steps=1, **FAST)
    assert summary["recipe"]["teacher"] == str(copy)
    assert f"from the teacher `{copy.name}`" in (tmp_path / "s" / "README.md").read_text()  # its folder, not its path

    from kdcache.teacher.run import teacher_logits

    moved = tmp_path / "teacher"  # the cache's own teacher, replaced since by other weights
    shutil.copytree(tiny_teacher, moved)
    cache = teacher_logits(str(tiny_dataset), str(moved), output=tmp_path / "cache", splits=["train"], progress=False)
    shutil.rmtree(moved)
    save_vit_teacher(moved, seed=1)
    with pytest.raises(
        KdcacheError, match=r"the cache's teacher '.*teacher' no longer has the weights that made cache"
    ):
        train_student(cache, output=tmp_path / "t", online=True, eval_split=None, max_steps=1, **FAST)


def test_the_fields_say_once_what_resume_may_change_and_what_the_recipe_leaves_out():
    from dataclasses import fields

    from kdcache.options import TrainingOptions

    names = {field.name for field in fields(TrainingOptions)}
    how_it_runs = {"resume", "overwrite", "num_workers", "device", "logging_steps", "license", "push_to_hub"}
    resolved_in_the_recipe = {"save_checkpoints", "train_split", "eval_split", "teacher"}
    assert set(TrainingOptions().compared()) == names - how_it_runs
    assert set(TrainingOptions().recipe()) == names - how_it_runs - resolved_in_the_recipe


def test_the_command_line_parses_its_options_into_the_dataclass(monkeypatch, tmp_path):
    # the generated options reach train_student parsed as their fields take them (lists, 'none', weights)
    from typer.testing import CliRunner

    import kdcache.student.train
    from kdcache.cli import app

    received = {}
    monkeypatch.setattr(kdcache.student.train, "train_student", lambda cache, **given: received.update(given))
    arguments = ["train-student", str(tmp_path / "a"), str(tmp_path / "b"), "--teacher-weights", "0.7,0.3", "-T", "2"]
    arguments += ["--eval-split", "none", "--unlabeled-splits", "none", "--lambda", "0.9", "--online"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 0, result.output
    options = received["options"]
    assert options.teacher_weights == [0.7, 0.3] and options.temperature == 2 and options.alpha == 0.9
    assert options.eval_split is None and options.unlabeled_splits == [] and options.online
    assert options.train_split == "train" and options.logging_steps == 10  # not on the command line: their defaults
