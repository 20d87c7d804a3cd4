"""The trained student's folder and model card (kdcache.student.card): a pipeline with label names, the hub's
metadata."""

import json
import re
from pathlib import Path

from helpers import COLOURS, FAST, LABELS
from transformers import pipeline

from kdcache.format.manifest import MANIFEST
from kdcache.outputs import TRAINING_RECORD
from kdcache.student.train import train_student


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
    recorded = json.loads((out / TRAINING_RECORD).read_text())
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


def test_the_card_declares_the_license_given_else_the_teachers_or_the_datasets(tmp_path):
    """--license, or the teacher's card's `license:`, else the dataset's (local folders here; a hub id's card is read
    from the hub's cache on this machine only), else none."""
    from huggingface_hub import ModelCard

    from kdcache.student.card import model_card

    teacher, dataset = tmp_path / "teacher", tmp_path / "dataset"
    teacher.mkdir(), dataset.mkdir()
    recipe = dict(
        teacher=str(teacher), cache="c", cache_fingerprint="0" * 16, student="MobileNetV2Config() from scratch",
        student_parameters=1000, online=False, alpha=0.5, temperature=4.0, loss="kd", learning_rate=1e-3,
        scheduler="cosine", batch_size=32, weight_decay=0.05, seed=42,
    )  # fmt: skip
    summary = dict(output="s", recipe=recipe, eval_split=None, epochs=1.0, steps=1, best_eval_accuracy=None)
    manifest = {
        "dataset": {"name_or_path": str(dataset), "revision": None},
        "teacher": {"name_or_path": str(teacher), "weights_sha256": "f" * 64},
    }

    def license(given=None):
        return ModelCard(model_card(summary, manifest, ["a", "b"], license=given)).data.license

    assert license() is None, "no card says one"
    (dataset / "README.md").write_text("---\nlicense: cc-by-4.0\n---\n# data\n")
    assert license() == "cc-by-4.0"
    (teacher / "README.md").write_text("---\nlicense: mit\ntags: [x]\n---\n# teacher\n")
    assert license() == "mit", "the teacher's first"
    assert license("apache-2.0") == "apache-2.0", "--license wins"
    manifest["teacher"]["name_or_path"] = "someone/not-in-the-cache"
    assert license() == "cc-by-4.0", "a hub teacher whose card this machine has not: the dataset's"
