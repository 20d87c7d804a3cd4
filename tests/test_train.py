import contextlib
import json
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import COLOURS, LABELS, save_mobilenet_student, save_vit_teacher
from transformers import AutoImageProcessor, AutoModelForImageClassification, TrainerCallback, pipeline

from kdcache import KdcacheError
from kdcache.data import ImagePipeline, load_image_dataset
from kdcache.format.manifest import LOGITS, MANIFEST
from kdcache.format.reader import load_cache
from kdcache.models import align_labels, load_classifier
from kdcache.student.loss import LOSSES
from kdcache.student.model import OnlineTeacher
from kdcache.student.rows import Collator, _online_rows
from kdcache.student.train import train_student
from kdcache.teacher.work import write_chunk_file

FAST = dict(batch_size=8, progress=False, logging_steps=1)


def weights(folder):
    return AutoModelForImageClassification.from_pretrained(str(folder)).state_dict()


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
            cached_loss = loss(student_logits, cached["labels"], cached["teacher_logits"])
            online_loss = loss(student_logits, online["labels"], online_logits)
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


def test_trained_student_is_a_pipeline_with_label_names_and_a_model_card(tmp_path, tiny_cache):
    summary = train_student(tiny_cache, output=tmp_path / "student", epochs=2, learning_rate=3e-3, **FAST)
    out = tmp_path / "student"
    assert summary["best_eval_accuracy"] is not None and len(summary["history"]) == 2
    classifier = pipeline("image-classification", model=str(out))
    from PIL import Image

    predictions = classifier(Image.new("RGB", (40, 36), COLOURS[0]))
    assert {p["label"] for p in predictions} == set(LABELS)
    card = (out / "README.md").read_text()
    manifest = json.loads((tiny_cache / MANIFEST).read_text())
    for fact in (
        manifest["fingerprint"],
        "T=5.0",
        "alpha=0.5",
        "2 epochs",
        f"{summary['best_eval_accuracy']:.4f}",
        f"`{Path(manifest['teacher']['name_or_path']).name}`",
    ):
        assert fact in card
    recorded = json.loads((out / "kdcache_training.json").read_text())
    assert recorded["recipe"]["cache_fingerprint"] == manifest["fingerprint"]
    assert any((out / "runs").rglob("events.out.tfevents.*")), "TensorBoard logs are kept with the model"
    assert not (tmp_path / "student.partial").exists()


def test_the_model_card_has_the_hubs_metadata_and_no_absolute_path(tmp_path, tiny_cache):
    """The card as the Hub reads it (huggingface_hub.ModelCard): the metric, a model-index with the accuracy of the
    epoch kept on the split it was chosen on; inputs read from folders named by their folder's name, never by the
    path they were read from (a pushed card would publish it)."""
    from huggingface_hub import ModelCard

    output = tmp_path / "students" / "tiny-distilled"
    summary = train_student(tiny_cache, output=output, epochs=2, learning_rate=3e-3, **FAST)
    card = ModelCard.load(output / "README.md")
    metadata = card.data.to_dict()
    assert metadata["library_name"] == "transformers" and metadata["pipeline_tag"] == "image-classification"
    assert metadata["metrics"] == ["accuracy"] and "kdcache" in metadata["tags"]
    assert "datasets" not in metadata and "base_model" not in metadata, "a local dataset and a student from scratch"
    (result,) = card.data.eval_results
    assert (result.task_type, result.metric_type, result.dataset_split) == (
        "image-classification",
        "accuracy",
        "validation",
    )
    assert result.metric_value == summary["best_eval_accuracy"] and result.dataset_name == "tiny"
    assert card.data.model_name == "tiny-distilled"
    manifest = json.loads((tiny_cache / MANIFEST).read_text())
    for absolute in (
        str(tmp_path),
        str(tiny_cache),
        manifest["teacher"]["name_or_path"],
        manifest["dataset"]["name_or_path"],
    ):
        assert absolute not in card.content
    assert not re.search(r"(^|[\s`'\"(])/[A-Za-z]", card.content), "no absolute path of any kind"
    assert 'pipeline("image-classification", model="tiny-distilled")' in card.content


def test_the_card_names_hub_inputs_by_their_hub_ids_and_a_hub_student_as_base_model():
    """card_metadata and model_card on a summary of a run whose dataset, teacher and student came from the hub (no
    network here: the card is written from the summary and manifest alone)."""
    from huggingface_hub import ModelCard

    from kdcache.student.card import model_card

    recipe = dict(
        teacher="merve/beans-vit-224", cache="/home/someone/caches/beans", cache_fingerprint="0123456789abcdef",
        student="google/mobilenet_v2_1.0_224", student_parameters=2_230_000, online=False, alpha=0.5,
        temperature=5.0, loss="kd", learning_rate=1e-3, scheduler="cosine", batch_size=32, weight_decay=0.05,
        seed=42, processes=1,
    )  # fmt: skip
    summary = dict(
        output="/home/someone/students/beans-student", recipe=recipe, eval_split="validation", epochs=20.0,
        steps=660, best_eval_accuracy=0.95, best_epoch=14.0, last_eval_accuracy=0.93, last_epoch=20.0,
        saved_epoch=14.0,
    )  # fmt: skip
    manifest = {
        "dataset": {"name_or_path": "beans", "revision": "abc123"},
        "teacher": {"name_or_path": "merve/beans-vit-224", "weights_sha256": "f" * 64},
    }
    card = ModelCard(model_card(summary, manifest, ["angular_leaf_spot", "bean_rust", "healthy"], "me/beans-student"))
    assert card.data.datasets == ["beans"] and card.data.base_model == "google/mobilenet_v2_1.0_224"
    (result,) = card.data.eval_results
    assert (result.dataset_type, result.dataset_revision, result.metric_value) == ("beans", "abc123", 0.95)
    assert card.data.model_name == "me/beans-student"
    assert "`merve/beans-vit-224`" in card.content and "on `beans`" in card.content
    assert 'model="me/beans-student"' in card.content and "/home/someone" not in card.content


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
    recorded = json.loads((tmp_path / "s" / "kdcache_training.json").read_text())
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


class StopAfterFirstSave(TrainerCallback):
    def on_save(self, args, state, control, **kwargs):
        raise KeyboardInterrupt


@contextlib.contextmanager
def crash_after_first_save(monkeypatch):
    """Training runs in the block stop (as a Ctrl-C would) right after their first checkpoint."""
    from kdcache.student import trainer as train_module

    original = train_module.DistillationTrainer.__init__

    def with_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StopAfterFirstSave)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.DistillationTrainer, "__init__", with_crash)
        yield


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
    import re

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
    from pathlib import Path

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


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    from kdcache.teacher.run import teacher_logits

    output = tmp_path_factory.mktemp("train-views") / "cache"
    return teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, views=4, batch_size=8, progress=False)


def test_view_rows_cover_every_view_once_per_cycle_and_replay_it(view_cache):
    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.student.rows import ViewRows

    cache, manifest = load_cache(view_cache)
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    rows = ViewRows(cache["train"], recipe, seed=3)
    train = cache["train"].with_format("numpy")
    used = {row: [] for row in range(len(rows))}
    for epoch in range(8):
        rows.epoch = epoch
        items = rows.__getitems__(list(range(len(rows))))
        for row, item in enumerate(items):
            k = rows.view_index(row)
            used[row].append(k)
            image = from_raw_source(cache["train"][row]["source"], cache["train"][row]["source_shape"])
            assert torch.equal(item["pixel_values"], torch.from_numpy(recipe.render(image, train[row]["views"][k])))
            assert np.allclose(item[LOGITS], train[row][LOGITS][k])
    for ks in used.values():
        assert sorted(ks[:4]) == [0, 1, 2, 3] and sorted(ks[4:]) == [0, 1, 2, 3]
    assert len({tuple(ks) for ks in used.values()}) > 1, "images do not all walk their views in the same order"


def test_training_on_views_and_the_inconsistent_baseline(tmp_path, view_cache, tiny_cache):
    summary = train_student(view_cache, output=tmp_path / "views", epochs=2, **FAST)
    assert summary["recipe"]["views"] == 4 and len(summary["history"]) == 2
    baseline = train_student(tiny_cache, output=tmp_path / "baseline", epochs=1, student_only_augment=True, **FAST)
    assert baseline["recipe"]["student_only_augment"] is True
    with pytest.raises(KdcacheError, match="need a cache without views"):
        train_student(view_cache, output=tmp_path / "x", max_steps=1, online=True, **FAST)


def test_student_only_augment_pairs_fresh_views_with_the_clean_logits(tiny_cache, tiny_dataset):
    from kdcache.data import ViewRecipe, undecoded
    from kdcache.student.rows import ViewRows

    cache, _ = load_cache(tiny_cache)
    images = undecoded(load_image_dataset(str(tiny_dataset))["train"], "image").select_columns(["image"])
    merged = datasets.concatenate_datasets([cache["train"].select_columns(["labels", LOGITS]), images], axis=1)
    rows = ViewRows(merged, ViewRecipe((32, 32), 2), seed=0, fresh=True)
    first = rows.__getitems__([0, 1])
    rows.epoch = 1
    second = rows.__getitems__([0, 1])
    assert not torch.equal(first[0]["pixel_values"], second[0]["pixel_values"]), "a new view each epoch"
    assert first[0][LOGITS] == second[0][LOGITS] == cache["train"][0][LOGITS], "always the clean view's logits"


def test_student_size_is_the_same_box_resized(tmp_path, view_cache, tiny_cache):
    from PIL import Image

    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.student.rows import ViewRows, resize_pixels

    cache, manifest = load_cache(view_cache)
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    rows = ViewRows(cache["train"], recipe, seed=0, student_size=(20, 20))
    train = cache["train"]
    for row, item in zip((2, 17), rows.__getitems__([2, 17])):
        view = train[row]["views"][rows.view_index(row)]
        x0, y0, x1, y1, flip = view
        source = from_raw_source(train[row]["source"], train[row]["source_shape"])
        expected = np.asarray(source.resize((20, 20), recipe.resample, box=(x0, y0, x1, y1))).transpose(2, 0, 1)
        assert torch.equal(item["pixel_values"], torch.from_numpy(expected[:, :, ::-1].copy() if flip else expected))
    # a clean cached view (the teacher's 32 px) is resized whole to the student's size
    clean, _ = load_cache(tiny_cache)
    collate = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil")), (20, 20), 3)
    batch = collate(clean["validation"].with_format("torch", columns=["pixel_values", "labels"]).__getitems__([0, 1]))
    stored = clean["validation"][0]["pixel_values"]
    assert batch["pixel_values"].shape == (2, 3, 20, 20)
    assert batch["pixel_values"].is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(
        batch["pixel_values"][0],
        collate.pipeline.normalize(
            torch.from_numpy(
                resize_pixels(np.asarray(stored, dtype=np.uint8), (20, 20), collate.pipeline.processor.resample)
            )[None]
        )[0],
    )
    # trained and saved at that size: the saved processor feeds the student 20x20 pixels
    train_student(view_cache, output=tmp_path / "small", max_steps=2, student_size=20, **FAST)
    classifier = pipeline("image-classification", model=str(tmp_path / "small"))
    assert classifier.image_processor(Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape[-2:] == (
        20,
        20,
    )
    assert len(classifier(Image.new("RGB", (50, 40)))) == 3


def test_ema_is_what_is_saved_and_both_load_as_pipelines(tmp_path, tiny_cache, monkeypatch):
    from PIL import Image

    from kdcache.student import trainer as train_module

    kept = []

    class Recorded(train_module.StudentEMA):
        def __init__(self, decay):
            super().__init__(decay)
            kept.append(self)

    monkeypatch.setattr(train_module, "StudentEMA", Recorded)
    train_student(
        tiny_cache, output=tmp_path / "ema", epochs=2, ema_decay=0.5, eval_split=None, save_checkpoints=False, **FAST
    )
    train_student(tiny_cache, output=tmp_path / "plain", epochs=2, eval_split=None, save_checkpoints=False, **FAST)
    averaged = kept[0].ema.module.state_dict()
    saved, plain = weights(tmp_path / "ema"), weights(tmp_path / "plain")
    for name, value in saved.items():
        assert torch.allclose(value.float(), averaged[name].float()), name
    assert any(not torch.allclose(saved[name].float(), plain[name].float()) for name in saved), (
        "the EMA is not the last step"
    )
    for folder in ("ema", "plain"):
        assert len(pipeline("image-classification", model=str(tmp_path / folder))(Image.new("RGB", (40, 36)))) == 3
    recorded = json.loads((tmp_path / "ema" / "kdcache_training.json").read_text())
    assert (
        recorded["recipe"]["ema_decay"] == 0.5 and "EMA with decay 0.5" in (tmp_path / "ema" / "README.md").read_text()
    )


def test_the_ema_forgets_the_random_initial_weights_within_a_few_steps():
    from torch.optim.swa_utils import AveragedModel

    from kdcache.student.ema import ema_decay_at, warmed_up_ema

    assert ema_decay_at(0.99, 0) == 0.1 and ema_decay_at(0.99, 1000) == 0.99
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3))
    averaged = AveragedModel(model, multi_avg_fn=warmed_up_ema(0.999), use_buffers=True)
    averaged.update_parameters(model)  # the first update copies the weights as they are: the random ones
    with torch.no_grad():
        for step in range(30):
            model[0].weight.fill_(1.0)
            model[1].num_batches_tracked.fill_(step + 1)
            averaged.update_parameters(model)
    # the random weights' share is the product of the warmed-up decays (2/11 * 3/12 * ... < 1e-4), not 0.999**30
    assert torch.allclose(averaged.module[0].weight, torch.ones(3, 4), atol=1e-3)
    assert averaged.module[1].num_batches_tracked.item() == 30, "integer buffers follow the model"


def test_ema_with_evaluation_and_resume(tmp_path, tiny_cache, monkeypatch):
    whole = train_student(tiny_cache, output=tmp_path / "whole", epochs=2, ema_decay=0.8, **FAST)
    with crash_after_first_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, ema_decay=0.8, **FAST)
    resumed = train_student(tiny_cache, output=tmp_path / "resumed", epochs=2, ema_decay=0.8, resume=True, **FAST)
    assert resumed["train_losses"][-3:] == whole["train_losses"][-3:], "training resumed from the training weights"
    assert [e["eval_accuracy"] for e in resumed["history"]] == [e["eval_accuracy"] for e in whole["history"]]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[name].float(), b[name].float(), atol=1e-6) for name in a)


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


@pytest.fixture(scope="module")
def mixed_train_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    from kdcache.teacher.run import teacher_logits

    output = tmp_path_factory.mktemp("train-mixed") / "cache"
    return teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=output, views=2, mix_alpha=1.0, batch_size=8, progress=False
    )


def test_mixed_rows_rebuild_the_teachers_input_and_mix_the_labels(mixed_train_cache, tiny_teacher):
    from kdcache.data import ViewRecipe
    from kdcache.student.rows import ViewRows

    cache, manifest = load_cache(mixed_train_cache)
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    rows = ViewRows(cache["train"], recipe, seed=1)
    collate = Collator(
        ImagePipeline(AutoImageProcessor.from_pretrained(str(mixed_train_cache), backend="pil")), None, 3
    )
    teacher_model = load_classifier(str(tiny_teacher))
    teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, LABELS))
    for epoch in (0, 1):
        rows.epoch = epoch
        items = rows.__getitems__(list(range(8)))
        batch = collate(items)
        assert (batch["teacher_logits"] - teacher(batch["pixel_values"])).abs().max() <= 1e-5, (
            "the teacher's own input"
        )
        for item, labels in zip(items, batch["labels"]):
            expected = torch.zeros(3)
            expected[int(item["labels"])] += float(item["mix_weights"])
            expected[int(item["partner_labels"])] += 1 - float(item["mix_weights"])
            assert torch.allclose(labels, expected)


def test_training_on_mixed_views_with_and_without_labels(tmp_path, mixed_train_cache):
    for alpha in (1.0, 0.5):
        summary = train_student(mixed_train_cache, output=tmp_path / f"a{alpha}", epochs=1, alpha=alpha, **FAST)
        assert summary["recipe"]["mixed_views"] is True and np.isfinite(summary["train_losses"]).all()


def test_dkd_is_refused_on_mixed_views_and_dist_trains_on_them(tmp_path, mixed_train_cache):
    with pytest.raises(KdcacheError, match=r"--loss dkd needs one label per image, and cache .* mixes images"):
        train_student(mixed_train_cache, output=tmp_path / "dkd", max_steps=1, loss="dkd", **FAST)
    summary = train_student(mixed_train_cache, output=tmp_path / "dist", max_steps=2, loss="dist", **FAST)
    assert np.isfinite(summary["train_losses"]).all() and "loss_intra" in summary["train_log"][0]


def test_same_seed_same_machine_same_student(tmp_path, view_cache):
    runs = [
        train_student(view_cache, output=tmp_path / f"run{i}", max_steps=4, student_size=24, **FAST) for i in range(2)
    ]
    assert runs[0]["train_losses"] == runs[1]["train_losses"]
    a, b = weights(tmp_path / "run0"), weights(tmp_path / "run1")
    assert all(torch.equal(a[name], b[name]) for name in a)


def test_online_needs_the_teachers_input_size(tmp_path, tiny_cache):
    with pytest.raises(KdcacheError, match="--online runs the teacher on the student's input"):
        train_student(tiny_cache, output=tmp_path / "x", max_steps=1, online=True, student_size=24, **FAST)


def test_the_students_batchnorm_keeps_a_running_average_not_the_last_batch():
    from kdcache.student.model import BATCHNORM_MOMENTUM, build_student

    student = build_student(None, ["a", "b", "c"], (3, 32, 32), seed=0)
    norms = [module for module in student.modules() if isinstance(module, torch.nn.BatchNorm2d)]
    assert norms and all(norm.momentum == BATCHNORM_MOMENTUM for norm in norms)
    batch_means = []
    norms[0].register_forward_hook(lambda module, inputs, output: batch_means.append(inputs[0].mean((0, 2, 3))))
    student.train()
    with torch.no_grad():  # two batches with very different statistics: the running mean must remember the first
        student(pixel_values=torch.zeros(4, 3, 32, 32))
        student(pixel_values=torch.full((4, 3, 32, 32), 5.0))
    assert not torch.allclose(norms[0].running_mean, batch_means[-1], atol=1e-3)
    # from zeros: m * first, then (1 - m) * that + m * second
    expected = (1 - BATCHNORM_MOMENTUM) * BATCHNORM_MOMENTUM * batch_means[0] + BATCHNORM_MOMENTUM * batch_means[1]
    assert torch.allclose(norms[0].running_mean, expected, atol=1e-5)


# Teacher ensembles: several caches of the same rows and views, their teachers' probabilities averaged at T.


def make_cache(folder, dataset, teacher, **settings):
    from kdcache.teacher.run import teacher_logits

    return teacher_logits(str(dataset), str(teacher), output=folder, batch_size=8, progress=False, **settings)


@pytest.fixture(scope="module")
def second_cache(tmp_path_factory, tiny_dataset):
    """The tiny dataset cached by another tiny teacher (other initial weights): a second member of an ensemble."""
    folder = tmp_path_factory.mktemp("ensemble")
    return make_cache(folder / "cache", tiny_dataset, save_vit_teacher(folder / "teacher", seed=1))


def test_an_ensemble_distils_from_its_teachers_probabilities_averaged_by_hand(
    tmp_path, tiny_cache, second_cache, monkeypatch
):
    from kdcache.student.trainer import DistillationTrainer

    seen = []  # each training step's rows, teacher logits, student logits and loss, as compute_loss had them
    compute_loss = DistillationTrainer.compute_loss

    def recording(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = compute_loss(self, model, inputs, return_outputs=True)
        if model.training:
            seen.append({key: value.detach().clone() for key, value in inputs.items()})
            seen[-1].update(student=outputs.logits.detach().clone(), loss=loss.detach().clone())
        return (loss, outputs) if return_outputs else loss

    monkeypatch.setattr(DistillationTrainer, "compute_loss", recording)
    temperature, alpha = 4.0, 0.7
    summary = train_student(
        [tiny_cache, second_cache],
        output=tmp_path / "ensemble",
        teacher_weights=[1, 3],
        temperature=temperature,
        alpha=alpha,
        max_steps=3,
        eval_split=None,
        **FAST,
    )
    # by hand: each cache's rows, the student's input as the collator makes it, and the average of the teachers'
    # softmax at T with the weights normalised (1/4, 3/4)
    collate = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil")))
    rows = collate(load_cache(tiny_cache)[0]["train"].with_format("numpy").__getitems__(list(range(24))))
    member_logits = [
        torch.as_tensor(np.asarray(load_cache(cache)[0]["train"].with_format("numpy")[LOGITS])).double()
        for cache in (tiny_cache, second_cache)
    ]
    averaged = 0.25 * torch.softmax(member_logits[0] / temperature, -1) + 0.75 * torch.softmax(
        member_logits[1] / temperature, -1
    )
    assert not torch.allclose(member_logits[0], member_logits[1], atol=0.1), "two different teachers"
    assert len(seen) == 3
    for step in seen:
        order = [  # which cache row each of the batch's images is, found by its pixels
            next(row for row in range(24) if torch.equal(rows["pixel_values"][row], image))
            for image in step["pixel_values"]
        ]
        assert torch.equal(step["labels"], rows["labels"][order])
        targets = torch.softmax(step["teacher_logits"].double() / temperature, -1)
        assert torch.allclose(targets, averaged[order], rtol=0, atol=1e-6), "the targets the loss sees"
        student = step["student"].double()
        kl = (averaged[order] * (averaged[order].log() - torch.log_softmax(student / temperature, -1))).sum(-1)
        by_hand = (1 - alpha) * torch.nn.functional.cross_entropy(
            student, step["labels"]
        ) + alpha * temperature**2 * kl.mean()
        assert step["loss"].item() == pytest.approx(by_hand.item(), rel=1e-5), "the loss value"
    recipe = summary["recipe"]
    fingerprints = [json.loads((cache / MANIFEST).read_text())["fingerprint"] for cache in (tiny_cache, second_cache)]
    assert recipe["cache"] == [str(tiny_cache), str(second_cache)] and recipe["cache_fingerprint"] == fingerprints
    assert recipe["teacher_weights"] == [0.25, 0.75] and len(recipe["teacher"]) == 2
    card = (tmp_path / "ensemble" / "README.md").read_text()
    assert "an ensemble of 2 teachers" in card and all(fingerprint in card for fingerprint in fingerprints)
    assert "(0.25, weights sha256" in card and "(0.75, weights sha256" in card


@pytest.mark.parametrize("cache", ["tiny_cache", "view_cache"])
def test_an_ensemble_of_a_cache_with_itself_trains_exactly_like_the_cache(tmp_path, request, cache):
    cache = request.getfixturevalue(cache)
    options = dict(epochs=2, learning_rate=3e-3, **FAST)
    alone = train_student(cache, output=tmp_path / "alone", **options)
    twice = train_student([cache, cache], output=tmp_path / "twice", **options)
    assert twice["recipe"]["cache"] == [str(cache)] * 2, "the ensemble's path was taken"
    assert twice["train_losses"] == alone["train_losses"] and len(alone["train_losses"]) == 6
    assert twice["history"] == alone["history"]
    a, b = weights(tmp_path / "alone"), weights(tmp_path / "twice")
    assert all(torch.equal(a[name], b[name]) for name in a)


@pytest.fixture(scope="module")
def mismatched_caches(tmp_path_factory, tiny_dataset, tiny_teacher):
    """Caches that cannot join the tiny cache, or the view cache, in an ensemble: each differs in one way."""
    from helpers import make_dataset_dict

    folder = tmp_path_factory.mktemp("mismatched")
    make_dataset_dict(seed=7).save_to_disk(str(folder / "other-data"))  # same splits and sizes, other images
    smaller_teacher = save_vit_teacher(folder / "teacher-24", seed=1, image_size=24)
    return {
        "other rows": make_cache(folder / "other-rows", folder / "other-data", tiny_teacher),
        "other pixels": make_cache(folder / "other-pixels", tiny_dataset, smaller_teacher),
        "other view seed": make_cache(folder / "other-seed", tiny_dataset, tiny_teacher, views=4, view_seed=1),
    }


@pytest.mark.parametrize(
    "first,other,message",
    [
        (
            "tiny_cache",
            "other rows",
            r"split 'train' was made from other rows than cache '.*tiny-cache' \(fingerprint",
        ),
        ("tiny_cache", "view_cache", r"has 4 views per image of split 'train' and cache '.*tiny-cache' 1; make"),
        ("view_cache", "other view seed", r"draws the views of split 'train' otherwise than cache .*\(seed 1 vs 0\)"),
        ("tiny_cache", "other pixels", r"split 'train' holds other pixels than cache '.*tiny-cache' \(rows 0 to 23\)"),
    ],
)
def test_caches_of_other_rows_or_views_are_refused(tmp_path, request, mismatched_caches, first, other, message):
    first = request.getfixturevalue(first)
    other = mismatched_caches[other] if other in mismatched_caches else request.getfixturevalue(other)
    with pytest.raises(KdcacheError, match=message) as refused:
        train_student([first, other], output=tmp_path / "s", max_steps=1, **FAST)
    assert "\n" not in str(refused.value) and str(other) in str(refused.value)
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.partial").exists()


def test_the_command_line_trains_an_ensemble(tmp_path, tiny_cache, second_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    command = ["train-student", str(tiny_cache), str(second_cache), "--output", str(tmp_path / "s"), "--epochs", "1"]
    command += ["--batch-size", "8", "--eval-split", "none"]
    result = CliRunner().invoke(app, command + ["--teacher-weights", "0.5,x"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "kdcache: error: --teacher-weights '0.5,x' is not a comma-separated list of numbers, one per cache (e.g. 0.5,0.5)"
    ]
    result = CliRunner().invoke(app, command + ["--teacher-weights", "2,1"])
    assert result.exit_code == 0, result.output
    recorded = json.loads((tmp_path / "s" / "kdcache_training.json").read_text())["recipe"]
    assert recorded["cache"] == [str(tiny_cache), str(second_cache)]
    assert recorded["teacher_weights"] == pytest.approx([2 / 3, 1 / 3])


def compressed_online_teacher(monkeypatch, top_k, dtype):
    """OnlineTeacher giving the teacher's logits compressed as a compact cache stores them, then rebuilt: the online
    equivalent of training from that cache."""
    from kdcache.format.codec import compress_logits, expand_logits

    forward = OnlineTeacher.forward

    def compressed(self, pixel_values):
        logits = forward(self, pixel_values)
        return expand_logits(**compress_logits(logits, top_k, dtype), classes=logits.shape[-1])

    monkeypatch.setattr(OnlineTeacher, "forward", compressed)


def test_a_compact_caches_loss_equals_the_online_loss_from_the_same_compressed_targets(
    compact_cache, tiny_dataset, tiny_teacher
):
    from kdcache.format.codec import compress_logits, expand_logits
    from kdcache.format.reader import logit_columns

    cache, _ = load_cache(compact_cache)
    pipeline_ = ImagePipeline(AutoImageProcessor.from_pretrained(str(compact_cache), backend="pil"))
    collate = Collator(pipeline_, num_classes=3)
    teacher_model = load_classifier(str(tiny_teacher))
    teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, LABELS))
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
        full = teacher(online["pixel_values"])
        online_logits = expand_logits(**compress_logits(full, 1, torch.float16), classes=3)
        assert cached["teacher_logits"].shape == (8, 3) and cached["teacher_logits"].dtype == torch.float32
        assert torch.equal(cached["teacher_logits"], online_logits)
        assert not torch.allclose(cached["teacher_logits"], full, atol=1e-3), "the top-1 of 3 rebuilt is not the full"
        with torch.no_grad():
            student_logits = student(pixel_values=cached["pixel_values"]).logits
        for name, loss in LOSSES.items():
            cached_loss = loss(student_logits, cached["labels"], cached["teacher_logits"])
            online_loss = loss(student_logits, online["labels"], online_logits)
            assert abs(cached_loss.item() - online_loss.item()) <= 1e-6, name


def test_training_from_a_compact_cache_equals_online_distillation_from_the_compressed_targets(
    tmp_path, tiny_dataset, tiny_teacher, teacher_row_by_row, monkeypatch
):
    from kdcache.teacher.run import teacher_logits

    compact = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "cache",
        top_k=1,
        logits_dtype="fp16",
        batch_size=1,
        progress=False,
    )  # one row at a time, as the online teacher (helpers.teacher_one_row_at_a_time)
    cached = train_student(compact, output=tmp_path / "cached", max_steps=6, **FAST)
    compressed_online_teacher(monkeypatch, top_k=1, dtype=torch.float16)
    online = train_student(compact, output=tmp_path / "online", max_steps=6, online=True, **FAST)
    assert cached["train_losses"] == online["train_losses"]
    a, b = weights(tmp_path / "cached"), weights(tmp_path / "online")
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_compact_view_caches_and_ensembles_with_them_train(tmp_path, tiny_dataset, tiny_teacher, view_cache):
    from kdcache.teacher.run import teacher_logits

    compact_views = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "compact-views",
        views=4,
        batch_size=8,
        top_k=2,
        logits_dtype="fp16",
        progress=False,
    )
    summary = train_student(compact_views, output=tmp_path / "s", epochs=1, **FAST)
    assert summary["recipe"]["views"] == 4 and np.isfinite(summary["train_losses"]).all()
    # 2 of 3 classes and the tail's logit (the third class's own) rebuild the logits to float16's rounding: an ensemble
    # of the compact cache with itself trains like the full view cache alone, to that rounding
    full = train_student(view_cache, output=tmp_path / "full", max_steps=3, **FAST)
    both = train_student([compact_views, compact_views], output=tmp_path / "both", max_steps=3, **FAST)
    assert np.allclose(full["train_losses"], both["train_losses"], rtol=0, atol=1e-2)
