"""Stage two (kdcache.student.train): training from the cache equals online distillation; checkpoints, resume, locks
and full disks; refusals before training; views, mixed views and compact caches."""

import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import FAST, LABELS, crash_after_first_save, save_mobilenet_student, save_vit_teacher, weights
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kdcache import KdcacheError
from kdcache.data import ImagePipeline, load_image_dataset
from kdcache.format.manifest import LOGITS, MANIFEST
from kdcache.format.reader import load_cache
from kdcache.format.replay import Collator
from kdcache.losses import LOSS_SPECS
from kdcache.models import align_labels, load_classifier
from kdcache.outputs import TRAINING_RECORD
from kdcache.student.loss import LOSSES
from kdcache.student.model import OnlineTeacher
from kdcache.student.rows import _online_rows
from kdcache.student.train import train_student
from kdcache.teacher.work import write_chunk_file


def test_cached_loss_equals_online_loss_batch_by_batch(tiny_cache, tiny_dataset, tiny_teacher):
    cache, manifest = load_cache(tiny_cache)
    pipeline_ = ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil"))
    collate = Collator(pipeline_)
    teacher_model = load_classifier(str(tiny_teacher))
    teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, LABELS))
    online_rows = _online_rows(load_image_dataset(str(tiny_dataset))["train"], "image", "labels", pipeline_)
    cached_rows = cache["train"].with_format("torch", columns=["pixel_values", "labels", LOGITS])
    torch.manual_seed(0)
    student = AutoModelForImageClassification.from_pretrained(
        str(save_mobilenet_student(tiny_cache.parent / "s0"))
    ).eval()
    for start in range(0, 24, 8):
        rows = list(range(start, start + 8))
        cached = collate(cached_rows.__getitems__(rows))
        online = collate(online_rows.__getitems__(rows))
        assert torch.equal(cached["pixel_values"], online["pixel_values"])  # the same student input, bit for bit
        assert torch.equal(cached["labels"], online["labels"])
        online_logits = teacher(online["pixel_values"])
        assert (cached["teacher_logits"] - online_logits).abs().max() <= 1e-5
        with torch.no_grad():
            student_logits = student(pixel_values=cached["pixel_values"]).logits
        for name, loss in LOSSES.items():
            temperature = LOSS_SPECS[name].temperature
            cached_loss = loss(student_logits, cached["labels"], cached["teacher_logits"], temperature, 0.5)
            online_loss = loss(student_logits, online["labels"], online_logits, temperature, 0.5)
            assert abs(cached_loss.item() - online_loss.item()) <= 1e-6, name


def test_training_from_the_cache_equals_online_distillation(tmp_path, row_cache, teacher_row_by_row):
    """The same run, step by step and weight by weight, with every teacher output computed one row at a time in both
    (helpers.teacher_one_row_at_a_time says why)."""
    cached = train_student(row_cache, output=tmp_path / "cached", max_steps=6, **FAST)
    online = train_student(row_cache, output=tmp_path / "online", max_steps=6, online=True, **FAST)
    assert len(cached["train_losses"]) == 6
    assert cached["train_losses"] == online["train_losses"]
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "online")
    for name in a:
        assert torch.equal(a[name], b[name]), name
    # and the teacher mattered: a different alpha trains to different weights
    other = train_student(row_cache, output=tmp_path / "other", max_steps=6, alpha=0.9, **FAST)
    assert not np.allclose(other["train_losses"], cached["train_losses"])


def test_training_from_the_cache_equals_online_distillation_with_dkd(tmp_path, row_cache, teacher_row_by_row):
    options = dict(max_steps=4, loss="dkd", standardize_logits=True, **FAST)
    cached = train_student(row_cache, output=tmp_path / "cached", **options)
    online = train_student(row_cache, output=tmp_path / "online", online=True, **options)
    assert cached["train_losses"] == online["train_losses"]
    assert [set(entry) for entry in online["train_log"]] == [{"step", "loss", "loss_ce", "loss_tckd", "loss_nckd"}] * 4


def test_best_epoch_is_the_one_kept(tmp_path, tiny_cache):
    summary = train_student(tiny_cache, output=tmp_path / "s", epochs=3, learning_rate=3e-3, **FAST)
    best = max(summary["history"], key=lambda entry: entry["eval_accuracy"])
    model = AutoModelForImageClassification.from_pretrained(str(tmp_path / "s")).eval()
    cache, _ = load_cache(tiny_cache)
    rows = cache["validation"].with_format("torch", columns=["pixel_values", "labels"])
    batch = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil")))(
        rows.__getitems__(list(range(len(rows))))
    )
    with torch.no_grad():
        accuracy = (
            (model(pixel_values=batch["pixel_values"]).logits.argmax(-1) == batch["labels"]).float().mean().item()
        )
    assert accuracy == pytest.approx(best["eval_accuracy"])
    last = summary["history"][-1]
    assert (summary["last_eval_accuracy"], summary["last_epoch"]) == (last["eval_accuracy"], 3.0)
    assert (summary["best_eval_accuracy"], summary["best_epoch"], summary["saved_epoch"]) == (
        best["eval_accuracy"],
        best["epoch"],
        best["epoch"],
    )
    recorded = json.loads((tmp_path / "s" / TRAINING_RECORD).read_text())
    assert recorded["last_eval_accuracy"] == last["eval_accuracy"] and recorded["best_epoch"] == best["epoch"]
    assert (
        f"| validation accuracy | best {best['eval_accuracy']:.4f} (epoch {best['epoch']:g}), last "
        f"{last['eval_accuracy']:.4f} (epoch 3); the best epoch's weights are saved |"
    ) in (tmp_path / "s" / "README.md").read_text()
    from kdcache.student.card import summary_line

    assert f"at epoch {best['epoch']:g}, last {last['eval_accuracy']:.4f} at epoch 3 of 3" in summary_line(summary)


def test_without_checkpoints_the_last_epoch_is_saved_and_said_so(tmp_path, tiny_cache):
    summary = train_student(
        tiny_cache, output=tmp_path / "s", epochs=2, learning_rate=3e-3, save_checkpoints=False, **FAST
    )
    assert summary["saved_epoch"] == summary["last_epoch"] == 2.0
    card = (tmp_path / "s" / "README.md").read_text()
    assert ("the last epoch's weights are saved" in card) == (summary["best_epoch"] != 2.0)


def test_scratch_baseline_needs_no_teacher_logits(tmp_path, tiny_cache):
    summary = train_student(tiny_cache, output=tmp_path / "scratch", max_steps=3, alpha=0.0, **FAST)
    assert summary["recipe"]["alpha"] == 0.0 and len(summary["train_losses"]) == 3


def test_resume_continues_an_interrupted_run(tmp_path, tiny_cache, monkeypatch):
    whole = train_student(tiny_cache, output=tmp_path / "whole", epochs=2, **FAST)
    with crash_after_first_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, **FAST)
    assert not (tmp_path / "resumed").exists() and (tmp_path / "resumed.partial").exists()
    with pytest.raises(KdcacheError, match="interrupted training run; pass --resume"):
        train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, **FAST)
    resumed = train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, resume=True, **FAST)
    assert resumed["train_losses"][-3:] == whole["train_losses"][-3:]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[name].float(), b[name].float(), atol=1e-6) for name in a)


def test_a_second_run_on_the_same_output_is_refused(tmp_path, tiny_cache, monkeypatch):
    import os

    from kdcache.format.manifest import Manifest
    from kdcache.outputs import output_lock

    hashed = []
    real_verify_files = Manifest.verify_files
    monkeypatch.setattr(Manifest, "verify_files", lambda *args: (hashed.append(args), real_verify_files(*args)))
    with output_lock(tmp_path / "student"):  # as a run in another process holds it
        with pytest.raises(KdcacheError) as refused:
            train_student(tiny_cache, output=tmp_path / "student", max_steps=1, **FAST)
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"--output '{tmp_path / 'student'}' is being written by another kdcache run (pid {os.getpid()} on "
    )
    assert not hashed, "refused before the cache is verified: on a large cache that takes a while"
    assert sorted(tmp_path.iterdir()) == [], "no student, no work folder, no lock"


def test_a_run_leaves_only_its_student_and_a_refused_one_nothing(tmp_path, tiny_cache):
    students = tmp_path / "students"
    students.mkdir()
    (students / "notes.txt").write_text("mine")
    with pytest.raises(KdcacheError, match="--eval-split 'nope' is not in cache"):  # refused once the output is locked
        train_student(tiny_cache, output=students / "student", eval_split="nope", max_steps=1, **FAST)
    with pytest.raises(KdcacheError, match="--eval-split 'nope'"):
        train_student(tiny_cache, output=students / "new" / "student", eval_split="nope", max_steps=1, **FAST)
    assert sorted(path.name for path in students.iterdir()) == ["notes.txt"]
    train_student(tiny_cache, output=students / "student", max_steps=1, **FAST)
    assert sorted(path.name for path in students.iterdir()) == ["notes.txt", "student"]
    with pytest.raises(KdcacheError, match="exists; pass --overwrite"):
        train_student(tiny_cache, output=students / "student", max_steps=1, **FAST)
    assert sorted(path.name for path in students.iterdir()) == ["notes.txt", "student"]


def test_too_small_a_disk_is_refused_before_training(tmp_path, tiny_cache, monkeypatch):
    from kdcache import outputs
    from kdcache.student import trainer as train_module

    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 1_000_000)
    trained = []
    monkeypatch.setattr(train_module.DistillationTrainer, "train", lambda self, *args, **kwargs: trained.append(self))
    with pytest.raises(KdcacheError) as refused:
        train_student(tiny_cache, output=tmp_path / "student", epochs=2, **FAST)
    assert not trained
    assert re.fullmatch(
        r"--output '.*student' needs about [\d.]+ MB free for its checkpoints and the student, but its "
        r"file system has 1\.0 MB free; free some space or choose another --output",
        str(refused.value),
    )


def test_a_full_disk_while_saving_a_checkpoint_is_one_line_and_resumable(tmp_path, tiny_cache, monkeypatch):
    import errno

    from kdcache.student import trainer as train_module

    whole = train_student(tiny_cache, output=tmp_path / "whole", epochs=2, **FAST)
    real_save = train_module.DistillationTrainer._save_checkpoint
    saved = []

    def disk_fills_at_the_second_checkpoint(self, model, trial):
        if saved:  # as torch.save fails half-way through a checkpoint
            folder = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
            folder.mkdir()
            (folder / "model.safetensors").write_bytes(b"half a model")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_save(self, model, trial)
        saved.append(self.state.global_step)

    monkeypatch.setattr(train_module.DistillationTrainer, "_save_checkpoint", disk_fills_at_the_second_checkpoint)
    work = tmp_path / "student.partial"
    with pytest.raises(KdcacheError) as full:
        train_student(tiny_cache, output=tmp_path / "student", epochs=2, **FAST)
    message = str(full.value)
    assert "\n" not in message and message.startswith(f"the disk holding '{work}' is full (this run needs about ")
    assert message.endswith("run the same command with --resume to continue from the last checkpoint")
    assert sorted(folder.name for folder in work.glob("checkpoint-*")) == [f"checkpoint-{saved[0]}"]
    assert not (tmp_path / "student").exists()

    monkeypatch.setattr(train_module.DistillationTrainer, "_save_checkpoint", real_save)
    resumed = train_student(tiny_cache, output=tmp_path / "student", epochs=2, resume=True, **FAST)
    assert resumed["train_losses"][-3:] == whole["train_losses"][-3:]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "student")
    assert all(torch.allclose(a[name].float(), b[name].float(), atol=1e-6) for name in a)


def damaged_copy(tiny_cache, tmp_path, change, fix_checksum=False):
    """A copy of `tiny_cache` whose train split (one chunk file) is `change`d and written again in its place; with
    fix_checksum, the manifest records the new file, so that only the checks after the checksums can tell."""
    target = tmp_path / "damaged"
    shutil.copytree(tiny_cache, target)
    manifest = json.loads((target / MANIFEST).read_text())
    (chunk,) = manifest["dataset"]["splits"]["train"]["chunks"]
    changed = change(datasets.load_from_disk(str(tiny_cache))["train"])
    record = write_chunk_file(target / "train" / chunk["file"], changed.flatten_indices(keep_in_memory=True))
    if fix_checksum:
        manifest["dataset"]["splits"]["train"]["chunks"] = [record]
        (target / MANIFEST).write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    "change,fix_checksum,message",
    [
        (lambda split: split.select(range(len(split) - 2)), True, "has 22 rows, its manifest says 24"),
        (
            lambda split: split.map(lambda row: {LOGITS: [v * 1.01 for v in row[LOGITS]]}, keep_in_memory=True),
            False,
            r"file 'train/chunk-000000\.arrow' does not match its checksum",
        ),
    ],
)
def test_damaged_cache_is_refused(tmp_path, tiny_cache, change, fix_checksum, message):
    with pytest.raises(KdcacheError, match=message):
        train_student(
            damaged_copy(tiny_cache, tmp_path, change, fix_checksum), output=tmp_path / "s", max_steps=1, **FAST
        )
    assert not (tmp_path / "s").exists()


def test_unknown_format_version_is_refused(tmp_path, tiny_cache):
    target = damaged_copy(tiny_cache, tmp_path, lambda split: split)
    manifest = json.loads((target / MANIFEST).read_text())
    manifest["format_version"] = 0
    (target / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="format version 0.*recreate it"):
        train_student(target, output=tmp_path / "s", max_steps=1, **FAST)


def test_student_choices_and_label_checks(tmp_path, tiny_cache):
    given = save_mobilenet_student(tmp_path / "given")
    summary = train_student(tiny_cache, output=tmp_path / "a", student=str(given), max_steps=1, **FAST)
    assert summary["recipe"]["student"] == str(given)
    config_only = tmp_path / "config-only"
    AutoModelForImageClassification.from_pretrained(str(given)).config.save_pretrained(str(config_only))
    train_student(tiny_cache, output=tmp_path / "b", student=str(config_only), max_steps=1, **FAST)
    wrong_names = save_vit_teacher(tmp_path / "wrong", id2label={0: "cat", 1: "dog", 2: "bird"})
    with pytest.raises(KdcacheError, match="student's labels .* do not match"):
        train_student(tiny_cache, output=tmp_path / "c", student=str(wrong_names), max_steps=1, **FAST)
    with pytest.raises(KdcacheError, match="could not load the student 'no-such/student'"):
        train_student(tiny_cache, output=tmp_path / "d", student="no-such/student", max_steps=1, **FAST)


def test_bad_options_and_existing_output(tmp_path, tiny_cache):
    for options, message in [
        (dict(temperature=0), "temperature must be > 0"),
        (dict(alpha=2), r"alpha \(lambda\) must be in \[0, 1\]"),
        (dict(eval_split="nope"), "--eval-split 'nope' is not in cache"),
        (dict(learning_rate=0), "--learning-rate 0 must be > 0"),
    ]:
        with pytest.raises(KdcacheError, match=message):
            train_student(tiny_cache, output=tmp_path / "s", max_steps=1, **{**FAST, **options})
    (tmp_path / "exists").mkdir()
    with pytest.raises(KdcacheError, match="exists; pass --overwrite"):
        train_student(tiny_cache, output=tmp_path / "exists", max_steps=1, **FAST)
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(KdcacheError, match="holds files that kdcache train-student did not write"):
        train_student(tiny_cache, output=precious, overwrite=True, max_steps=1, **FAST)
    assert [path.name for path in precious.iterdir()] == ["notes.txt"], "never replaced, even with --overwrite"


def test_training_on_views_and_the_inconsistent_baseline(tmp_path, four_view_cache, tiny_cache):
    summary = train_student(four_view_cache, output=tmp_path / "views", epochs=2, **FAST)
    assert summary["recipe"]["views"] == 4 and len(summary["history"]) == 2
    baseline = train_student(tiny_cache, output=tmp_path / "baseline", epochs=1, student_only_augment=True, **FAST)
    assert baseline["recipe"]["student_only_augment"] is True
    with pytest.raises(KdcacheError, match="need a cache without views"):
        train_student(four_view_cache, output=tmp_path / "x", max_steps=1, online=True, **FAST)


def test_loss_terms_are_logged_beside_the_total(tmp_path, tiny_cache):
    summary = train_student(tiny_cache, output=tmp_path / "s", max_steps=3, alpha=0.3, temperature=2.0, **FAST)
    logs = summary["train_log"]
    assert len(logs) == 3
    for entry in logs:
        assert entry["loss"] == pytest.approx(0.7 * entry["loss_ce"] + 0.3 * 4.0 * entry["loss_kl"], rel=1e-4)
    scratch = train_student(tiny_cache, output=tmp_path / "scratch", max_steps=2, alpha=0.0, **FAST)
    assert all(
        "loss_kl" not in entry and entry["loss"] == pytest.approx(entry["loss_ce"], rel=1e-5)
        for entry in scratch["train_log"]
    )
    events = list((tmp_path / "s" / "runs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"]
    assert {"train/loss_ce", "train/loss_kl", "train/loss"} <= set(tags)


@pytest.mark.parametrize(
    "loss,temperature,distillation",
    [
        ("dkd", 4.0, lambda entry: entry["loss_tckd"] + 8.0 * entry["loss_nckd"]),
        ("dist", 1.0, lambda entry: entry["loss_inter"] + entry["loss_intra"]),
    ],
)
def test_each_loss_trains_and_logs_its_terms(tmp_path, tiny_cache, loss, temperature, distillation):
    summary = train_student(tiny_cache, output=tmp_path / "s", max_steps=3, alpha=0.3, loss=loss, **FAST)
    assert summary["recipe"]["loss"] == loss and summary["recipe"]["temperature"] == temperature
    assert len(summary["train_log"]) == 3
    for entry in summary["train_log"]:
        assert entry["loss"] == pytest.approx(
            0.7 * entry["loss_ce"] + 0.3 * temperature**2 * distillation(entry), rel=1e-4
        )
    assert f"| loss | {loss}: (1-alpha) CE + alpha T^2" in (tmp_path / "s" / "README.md").read_text()
    events = list((tmp_path / "s" / "runs").rglob("events.out.tfevents.*"))
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set(EventAccumulator(str(events[0].parent)).Reload().Tags()["scalars"])
    assert {f"train/loss_{name}" for name in {"dkd": ("tckd", "nckd"), "dist": ("inter", "intra")}[loss]} <= tags


def test_a_new_loss_is_one_declaration_and_one_function(tmp_path, tiny_cache, add_loss):
    """docs/recipes.md's "Adding a loss", done: a throwaway loss (kd at half weight) declared and given its function,
    and nothing else told of it, trains a step at its declared temperature, logs its terms and states its formula."""
    from kdcache.losses import Loss
    from kdcache.student.loss import distillation_loss

    calls = []

    def half_kd(student_logits, labels, teacher_logits, temperature, alpha, return_terms=False, standardize=False):
        calls.append((temperature, alpha, standardize))
        loss, terms = distillation_loss(student_logits, labels, teacher_logits, temperature, alpha, True, standardize)
        return (loss / 2, terms) if return_terms else loss / 2

    add_loss(Loss("half", 3.0, "kd at half weight", "T^2 KL({z}teacher/T, {z}student/T) / 2"), half_kd)
    summary = train_student(tiny_cache, output=tmp_path / "s", max_steps=1, eval_split=None, loss="half", **FAST)
    assert summary["recipe"]["loss"] == "half" and summary["recipe"]["temperature"] == 3.0
    assert calls == [(3.0, 0.5, False)], "its function, once, with the declared temperature and the options' alpha"
    (entry,) = summary["train_log"]
    assert entry["loss"] == pytest.approx(0.5 * (0.5 * entry["loss_ce"] + 0.5 * 3.0**2 * entry["loss_kl"]), rel=1e-4)
    card = (tmp_path / "s" / "README.md").read_text()
    assert "| loss | half: (1-alpha) CE + alpha T^2 KL(teacher/T, student/T) / 2, T=3.0, alpha=0.5 |" in card


def test_dkd_is_refused_on_two_classes_before_training(tmp_path, tiny_teacher):
    from helpers import make_images

    from kdcache.teacher.run import teacher_logits

    images, labels = make_images(8, 0)
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=LABELS[:2])})
    two = datasets.Dataset.from_dict({"image": images, "labels": [label % 2 for label in labels]}, features=features)
    datasets.DatasetDict({"train": two}).save_to_disk(str(tmp_path / "two"))
    teacher = save_vit_teacher(tmp_path / "teacher", id2label=dict(enumerate(LABELS[:2])))
    cache = teacher_logits(str(tmp_path / "two"), str(teacher), output=tmp_path / "cache", progress=False)
    with pytest.raises(
        KdcacheError, match=r"--loss dkd needs more than 2 classes .* has 2; use --loss kd or --loss dist"
    ) as refused:
        train_student(cache, output=tmp_path / "s", eval_split=None, max_steps=1, loss="dkd", **FAST)
    assert "\n" not in str(refused.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()
    summary = train_student(cache, output=tmp_path / "s", eval_split=None, max_steps=1, loss="dist", **FAST)
    assert summary["recipe"]["loss"] == "dist"


def test_training_on_mixed_views_with_and_without_labels(tmp_path, mixed_train_cache):
    for alpha in (1.0, 0.5):
        summary = train_student(mixed_train_cache, output=tmp_path / f"a{alpha}", epochs=1, alpha=alpha, **FAST)
        assert summary["recipe"]["mixed_views"] is True and np.isfinite(summary["train_losses"]).all()


def test_dkd_is_refused_on_mixed_views_and_dist_trains_on_them(tmp_path, mixed_train_cache):
    with pytest.raises(KdcacheError, match=r"--loss dkd needs one label per image, and cache .* mixes images"):
        train_student(mixed_train_cache, output=tmp_path / "dkd", max_steps=1, loss="dkd", **FAST)
    summary = train_student(mixed_train_cache, output=tmp_path / "dist", max_steps=2, loss="dist", **FAST)
    assert np.isfinite(summary["train_losses"]).all() and "loss_intra" in summary["train_log"][0]


def test_same_seed_same_machine_same_student(tmp_path, four_view_cache):
    runs = [
        train_student(four_view_cache, output=tmp_path / f"run{i}", max_steps=4, student_size=24, **FAST)
        for i in range(2)
    ]
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    a, b = weights(tmp_path / "run0"), weights(tmp_path / "run1")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_online_needs_the_teachers_input_size(tmp_path, tiny_cache):
    with pytest.raises(KdcacheError, match="--online runs the teacher on the student's input"):
        train_student(tiny_cache, output=tmp_path / "x", max_steps=1, online=True, student_size=24, **FAST)


def compressed_online_teacher(monkeypatch, top_k, dtype):
    """OnlineTeacher giving the teacher's logits compressed as a compact cache stores them, then rebuilt: the online
    equivalent of training from that cache."""
    from kdcache.format.codec import compress_logits, expand_logits

    forward = OnlineTeacher.forward

    def compressed(self, pixel_values):
        logits = forward(self, pixel_values)  # compressed on CPU, as stage one compresses (on a GPU too)
        stored = compress_logits(logits.cpu(), top_k, dtype)
        return expand_logits(**stored, classes=logits.shape[-1]).to(logits.device)

    monkeypatch.setattr(OnlineTeacher, "forward", compressed)


def test_a_compact_caches_loss_equals_the_online_loss_from_the_same_compressed_targets(
    compact_cache, tiny_dataset, tiny_teacher
):
    from kdcache.format.codec import compress_logits, expand_logits
    from kdcache.format.reader import logit_columns

    cache, manifest = load_cache(compact_cache)
    pipeline_ = ImagePipeline(AutoImageProcessor.from_pretrained(str(compact_cache), backend="pil"))
    collate = Collator(pipeline_, num_classes=3)
    teacher_model = load_classifier(str(tiny_teacher))
    # on the device stage one ran it on, fed as stage one feeds it: a GPU's logits differ from a CPU's in the last bits
    device = torch.device(manifest["device"])
    teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, LABELS)).to(device)
    online_rows = _online_rows(load_image_dataset(str(tiny_dataset))["train"], "image", "labels", pipeline_)
    cached_rows = cache["train"].with_format(
        "numpy", columns=["pixel_values", "labels", *logit_columns(cache["train"])]
    )
    torch.manual_seed(0)
    student = AutoModelForImageClassification.from_pretrained(
        str(save_mobilenet_student(compact_cache.parent / "s-compact"))
    ).eval()
    for start in range(0, 24, 8):
        rows = list(range(start, start + 8))
        cached = collate(cached_rows.__getitems__(rows))
        online = collate(online_rows.__getitems__(rows))
        assert torch.equal(cached["pixel_values"], online["pixel_values"])
        full = teacher(online["pixel_values"].to(device).contiguous(memory_format=torch.channels_last)).cpu()
        online_logits = expand_logits(**compress_logits(full, 1, torch.float16), classes=3)
        assert cached["teacher_logits"].shape == (8, 3) and cached["teacher_logits"].dtype == torch.float32
        assert torch.equal(cached["teacher_logits"], online_logits)
        assert not torch.allclose(cached["teacher_logits"], full, atol=1e-3), "the top-1 of 3 rebuilt is not the full"
        with torch.no_grad():
            student_logits = student(pixel_values=cached["pixel_values"]).logits
        for name, loss in LOSSES.items():
            temperature = LOSS_SPECS[name].temperature
            cached_loss = loss(student_logits, cached["labels"], cached["teacher_logits"], temperature, 0.5)
            online_loss = loss(student_logits, online["labels"], online_logits, temperature, 0.5)
            assert abs(cached_loss.item() - online_loss.item()) <= 1e-6, name


def test_training_from_a_compact_cache_equals_online_distillation_from_the_compressed_targets(
    tmp_path, teacher_row_by_row, monkeypatch, make_cache
):
    compact = make_cache(
        tmp_path / "cache", top_k=1, logits_dtype="fp16", batch_size=1
    )  # one row at a time, as the online teacher (helpers.teacher_one_row_at_a_time)
    cached = train_student(compact, output=tmp_path / "cached", max_steps=6, **FAST)
    compressed_online_teacher(monkeypatch, top_k=1, dtype=torch.float16)
    online = train_student(compact, output=tmp_path / "online", max_steps=6, online=True, **FAST)
    assert cached["train_losses"] == online["train_losses"]
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "online")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_compact_view_caches_and_ensembles_with_them_train(tmp_path, four_view_cache, make_cache):
    compact_views = make_cache(tmp_path / "compact-views", views=4, top_k=2, logits_dtype="fp16")
    summary = train_student(compact_views, output=tmp_path / "s", epochs=1, **FAST)
    assert summary["recipe"]["views"] == 4 and np.isfinite(summary["train_losses"]).all()
    # 2 of 3 classes and the tail's logit (the third class's own) rebuild the logits to float16's rounding: an ensemble
    # of the compact cache with itself trains like the full view cache alone, to that rounding
    full = train_student(four_view_cache, output=tmp_path / "full", max_steps=3, **FAST)
    both = train_student([compact_views, compact_views], output=tmp_path / "both", max_steps=3, **FAST)
    assert np.allclose(full["train_losses"], both["train_losses"], rtol=0, atol=1e-2)
