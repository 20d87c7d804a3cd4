"""Images without labels: label budgets (kdcache.labels), cached unlabeled splits and --extra-images (stage one),
training on rows without a label (stage two) and evaluating on them."""

import json

import datasets
import numpy as np
import pytest
import torch
from helpers import LABELS, make_dataset_dict, make_images
from transformers import AutoImageProcessor

from kdcache import KdcacheError
from kdcache.data import ImagePipeline, load_image_dataset
from kdcache.format.manifest import LABELS as LABEL_COLUMN
from kdcache.format.manifest import LOGITS
from kdcache.format.reader import describe, load_cache
from kdcache.format.replay import Collator
from kdcache.labels import NO_LABEL, labeled_subset, masked_labels
from kdcache.models import align_labels, load_classifier
from kdcache.outputs import TRAINING_RECORD
from kdcache.student.model import OnlineTeacher
from kdcache.student.rows import TrainRows, _online_rows
from kdcache.student.train import train_student
from kdcache.teacher.run import teacher_logits

FAST = dict(batch_size=8, progress=False, logging_steps=1)


def test_a_label_budget_is_seeded_stratified_and_keeps_unlabelled_rows_unlabelled():
    labels = np.array([0] * 40 + [1] * 20 + [2] * 10 + [NO_LABEL] * 5)
    keep = labeled_subset(labels, 0.3, seed=7)
    assert [int(keep[labels == c].sum()) for c in range(3)] == [12, 6, 3], "round(0.3 * n) of each class"
    assert not keep[labels == NO_LABEL].any()
    assert np.array_equal(keep, labeled_subset(labels.copy(), 0.3, seed=7)), "the seed alone decides"
    assert not np.array_equal(keep, labeled_subset(labels, 0.3, seed=8)), "another seed, other rows"
    # a larger budget is not required to contain a smaller one, but it keeps as many of each class as it says
    assert labeled_subset(labels, 1.0, seed=7).sum() == 70
    assert np.array_equal(masked_labels(labels, keep)[keep], labels[keep])
    assert (masked_labels(labels, keep)[~keep] == NO_LABEL).all()


def test_a_budget_that_leaves_a_class_without_a_label_is_refused_in_one_line():
    labels = np.array([0] * 40 + [1] * 3)
    with pytest.raises(KdcacheError, match=r"keeps no labelled row of class 'bean_rust' \(3 rows") as refused:
        labeled_subset(labels, 0.1, seed=0, names=LABELS)
    assert "\n" not in str(refused.value)


def test_cross_entropy_covers_the_labelled_rows_and_distillation_every_row_by_hand():
    from kdcache.student.loss import LOSSES, distillation_loss

    torch.manual_seed(0)
    student, teacher = torch.randn(6, 3), torch.randn(6, 3)
    labels = torch.tensor([0, NO_LABEL, 2, NO_LABEL, 1, NO_LABEL])
    temperature, alpha = 5.0, 0.5
    loss, terms = distillation_loss(student, labels, teacher, temperature, alpha, return_terms=True)
    # by hand, row by row: CE where a label exists, the KL term everywhere
    log_student = student.log_softmax(-1)
    ce_rows = [-log_student[i, labels[i]] for i in range(6) if labels[i] >= 0]
    p_teacher = (teacher / temperature).softmax(-1)
    kl_rows = (p_teacher * (p_teacher.log() - (student / temperature).log_softmax(-1))).sum(-1)
    per_row = [
        (1 - alpha) * (-log_student[i, labels[i]] / len(ce_rows) if labels[i] >= 0 else 0.0)
        + alpha * temperature**2 * kl_rows[i] / 6
        for i in range(6)
    ]
    assert torch.isclose(loss, torch.stack([torch.as_tensor(row) for row in per_row]).sum(), atol=1e-6)
    assert torch.isclose(terms["ce"], torch.stack(ce_rows).mean(), atol=1e-6)
    # a batch without any label: the distillation term alone, and a CE term of 0
    none = torch.full((6,), NO_LABEL)
    loss, terms = distillation_loss(student, none, teacher, temperature, alpha, return_terms=True)
    assert torch.isclose(loss, alpha * temperature**2 * kl_rows.mean(), atol=1e-6) and terms["ce"] == 0
    # a fully labelled batch is the plain mean, as before
    full = torch.tensor([0, 1, 2, 0, 1, 2])
    assert torch.equal(
        distillation_loss(student, full, teacher, temperature, 0.0), torch.nn.functional.cross_entropy(student, full)
    )
    # mixed labels: an all-zero row has no label
    soft = torch.nn.functional.one_hot(full, 3).float()
    soft[1] = 0
    expected = torch.stack([-(soft[i] * log_student[i]).sum() for i in range(6) if i != 1]).mean()
    assert torch.isclose(distillation_loss(student, soft, teacher, temperature, 0.0), expected, atol=1e-6)
    # dist reads labels only in its CE part; dkd needs a label per row
    assert torch.isfinite(LOSSES["dist"](student, labels, teacher, 1.0, alpha))
    with pytest.raises(KdcacheError, match="some rows of this batch have no label"):
        LOSSES["dkd"](student, labels, teacher, 4.0, alpha)


def test_cached_loss_equals_online_loss_with_unlabelled_rows(tiny_cache, tiny_dataset, tiny_teacher):
    """A label budget hides the same labels from both ways of training, and their losses agree batch by batch."""
    from helpers import save_mobilenet_student
    from transformers import AutoModelForImageClassification

    from kdcache.student.loss import distillation_loss

    cache, _ = load_cache(tiny_cache)
    pipeline_ = ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil"))
    collate = Collator(pipeline_)
    teacher_model = load_classifier(str(tiny_teacher))
    teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, LABELS))
    labels = np.asarray(cache["train"][LABEL_COLUMN])
    budget = masked_labels(labels, labeled_subset(labels, 0.25, seed=3))
    assert (budget == NO_LABEL).sum() == 18
    online_rows = TrainRows(
        _online_rows(load_image_dataset(str(tiny_dataset))["train"], "image", "labels", pipeline_), labels=budget
    )
    cached_rows = TrainRows(
        cache["train"].with_format("numpy", columns=["pixel_values", "labels", LOGITS]), labels=budget
    )
    student = AutoModelForImageClassification.from_pretrained(
        str(save_mobilenet_student(tiny_cache.parent / "s-unlabelled"))
    ).eval()
    for start in range(0, 24, 8):
        rows = list(range(start, start + 8))
        cached, online = collate(cached_rows.__getitems__(rows)), collate(online_rows.__getitems__(rows))
        assert torch.equal(cached["pixel_values"], online["pixel_values"])
        assert torch.equal(cached["labels"], online["labels"]) and torch.equal(
            cached["labels"], torch.as_tensor(budget[rows])
        )
        online_logits = teacher(online["pixel_values"])
        with torch.no_grad():
            student_logits = student(pixel_values=cached["pixel_values"]).logits
        for alpha in (0.5, 0.0):
            cached_loss = distillation_loss(student_logits, cached["labels"], cached["teacher_logits"], 5.0, alpha)
            online_loss = distillation_loss(student_logits, online["labels"], online_logits, 5.0, alpha)
            assert abs(cached_loss.item() - online_loss.item()) <= 1e-6


def test_training_with_a_label_budget_equals_online_and_records_it(tmp_path, row_cache, teacher_row_by_row):
    tiny_cache = (
        row_cache  # computed one row at a time, as the online teacher here (helpers.teacher_one_row_at_a_time)
    )
    options = dict(max_steps=6, labeled_fraction=0.5, seed=3, **FAST)
    cached = train_student(tiny_cache, output=tmp_path / "cached", **options)
    online = train_student(tiny_cache, output=tmp_path / "online", online=True, **options)
    assert cached["train_losses"] == online["train_losses"]
    assert cached["recipe"]["labeled_rows"] == 12 and cached["recipe"]["training_rows"] == 24
    assert cached["recipe"]["labeled_fraction"] == 0.5
    full = train_student(tiny_cache, output=tmp_path / "full", max_steps=6, seed=3, **FAST)
    assert not np.allclose(full["train_losses"], cached["train_losses"]), "the hidden labels mattered"
    card = (tmp_path / "cached" / "README.md").read_text()
    assert "12 of the 24 training images labelled" in card
    # alpha 0: the labelled half alone, the baseline of a budget curve
    scratch = train_student(tiny_cache, output=tmp_path / "scratch", alpha=0.0, epochs=1, labeled_fraction=0.5, **FAST)
    assert scratch["recipe"]["training_rows"] == 12 and scratch["recipe"]["labeled_rows"] == 12
    assert scratch["steps"] == 2, "12 rows in batches of 8"


def test_resume_compares_the_label_options():
    from kdcache.options import TrainingOptions, run_options

    recorded = run_options(TrainingOptions(labeled_fraction=0.5, unlabeled_splits=["unlabeled"]))
    assert recorded["labeled_fraction"] == 0.5 and recorded["unlabeled_splits"] == ["unlabeled"]


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """A folder of image files without class subfolders: images nobody labelled."""
    folder = tmp_path_factory.mktemp("photos") / "photos"
    folder.mkdir()
    for index, image in enumerate(make_images(10, seed=11)[0]):
        image.save(folder / f"{index:02d}.png")
    return folder


@pytest.fixture(scope="module")
def extra_cache(tmp_path_factory, photos, make_cache):
    output = tmp_path_factory.mktemp("extra") / "cache"
    return make_cache(output, extra_images=str(photos))


def test_extra_images_are_cached_as_an_unlabelled_split(extra_cache, tiny_cache, photos):
    cache, manifest = load_cache(extra_cache)
    assert list(cache) == ["train", "validation", "test", "unlabeled"]
    assert len(cache["unlabeled"]) == 10 and set(cache["unlabeled"][LABEL_COLUMN]) == {NO_LABEL}
    assert manifest.labeled_rows("unlabeled") == 0 and manifest.labeled_rows("train") == 24
    assert manifest.dataset["extra_images"] == {"name_or_path": str(photos), "split": None, "cached_as": "unlabeled"}
    # the labelled splits are those of a cache without extra images, logits and all
    plain, plain_manifest = load_cache(tiny_cache)
    assert np.array_equal(np.asarray(cache["train"][LOGITS]), np.asarray(plain["train"][LOGITS]))
    assert manifest.fingerprint != plain_manifest.fingerprint
    assert "(no labels)" in describe(extra_cache) and "images from" in describe(extra_cache)


def test_a_dataset_without_labels_is_cached_verified_and_trained_from(tmp_path, photos, make_cache):
    from kdcache.teacher.verify import verify_teacher_logits

    cache = make_cache(tmp_path / "cache", dataset=photos)
    cached, manifest = load_cache(cache)
    assert manifest.label_names == LABELS, "no split has labels: the teacher's classes"
    assert manifest.labeled_rows("train") == 0 and manifest["fingerprint"]
    assert verify_teacher_logits(cache, sample=4, progress=False)["passed"]
    summary = train_student(cache, output=tmp_path / "student", alpha=1.0, eval_split=None, max_steps=2, **FAST)
    assert summary["recipe"]["labeled_rows"] == 0 and np.isfinite(summary["train_losses"]).all()


def test_labels_alone_from_a_split_without_a_labelled_row_are_refused_in_one_line(tmp_path, photos, make_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    cache = make_cache(dataset=photos)  # no label column: every label -1
    message = (
        "kdcache: error: --alpha 0 learns from labels alone, and the training split 'train' has no labelled row "
        "(every label is -1): nothing to learn from; give --alpha above 0 to learn from the teacher"
    )
    train = ["train-student", str(cache), "--alpha", "0", "--eval-split", "none", "--output", str(tmp_path / "s")]
    for budget in ([], ["--labeled-fraction", "0.1"]):
        result = CliRunner().invoke(app, train + budget)
        assert result.exit_code == 1 and result.output.strip().splitlines() == [message], result.output
        assert list(tmp_path.iterdir()) == [], "no student, no work folder, no lock"


def test_rows_labelled_minus_one_are_unlabelled_and_train_with_the_others(tmp_path, tiny_teacher):
    dataset = make_dataset_dict()
    train = dataset["train"]
    dataset["train"] = train.cast(train.features).map(
        lambda row, index: {"labels": NO_LABEL if index % 2 else row["labels"]}, with_indices=True
    )
    dataset.save_to_disk(str(tmp_path / "data"))
    cache = teacher_logits(str(tmp_path / "data"), str(tiny_teacher), output=tmp_path / "cache", progress=False)
    assert load_cache(cache)[1].labeled_rows("train") == 12
    summary = train_student(cache, output=tmp_path / "student", max_steps=3, **FAST)
    assert summary["recipe"]["labeled_rows"] == 12 and summary["recipe"]["training_rows"] == 24
    with pytest.raises(KdcacheError, match="--loss dkd splits the teacher's outputs") as refused:
        train_student(cache, output=tmp_path / "dkd", max_steps=1, loss="dkd", **FAST)
    assert "\n" not in str(refused.value)


def test_unlabelled_splits_train_by_default_and_are_refused_where_they_cannot_help(tmp_path, extra_cache):
    summary = train_student(extra_cache, output=tmp_path / "default", epochs=1, **FAST)
    assert summary["recipe"]["unlabeled_splits"] == ["unlabeled"] and summary["recipe"]["training_rows"] == 34
    assert summary["steps"] == 5, "34 rows in batches of 8"
    none = train_student(extra_cache, output=tmp_path / "none", epochs=1, unlabeled_splits=[], **FAST)
    assert none["recipe"]["training_rows"] == 24
    scratch = train_student(extra_cache, output=tmp_path / "scratch", epochs=1, alpha=0.0, **FAST)
    assert scratch["recipe"]["unlabeled_splits"] == [] and scratch["recipe"]["training_rows"] == 24
    refusals = [
        (dict(alpha=0.0, unlabeled_splits=["unlabeled"]), "--alpha 0 learns from labels alone"),
        (dict(unlabeled_splits=["photos"]), "--unlabeled-splits names 'photos', which is not a split"),
        (dict(unlabeled_splits=["validation"]), "the evaluation split"),
        (dict(labeled_fraction=0.0), "--labeled-fraction 0.0 must be > 0"),
        (dict(labeled_fraction=0.01), "keeps no labelled row of class"),
        (dict(loss="dkd"), "--loss dkd splits the teacher's outputs"),
        (dict(online=True, unlabeled_splits=["unlabeled"]), "--online reads the training split's images"),
        (dict(eval_split="unlabeled", unlabeled_splits=[]), "--eval-split 'unlabeled' has 10 rows without a label"),
    ]
    for options, message in refusals:
        with pytest.raises(KdcacheError, match=message) as refused:
            train_student(extra_cache, output=tmp_path / "refused", max_steps=1, **{**FAST, **options})
        assert "\n" not in str(refused.value)
        assert not (tmp_path / "refused").exists() and not (tmp_path / "refused.partial").exists()


def test_mixed_views_of_unlabelled_images_pair_with_their_own_split(tmp_path, photos, make_cache):
    from kdcache.format.replay import ViewRows

    cache = make_cache(tmp_path / "cache", extra_images=str(photos), views=2, mix_alpha=1.0)
    cached, manifest = load_cache(cache)
    assert manifest.views_of("unlabeled") == 2 and manifest.views_of("validation") == 1
    joined = datasets.concatenate_datasets([cached["train"], cached["unlabeled"]])
    labels = np.concatenate([np.asarray(cached["train"][LABEL_COLUMN]), np.asarray(cached["unlabeled"][LABEL_COLUMN])])
    offsets = np.repeat([0, 24], [24, 10])
    rows = ViewRows(joined, manifest.view_recipe, seed=0, labels=labels, offsets=offsets)
    alone = ViewRows(cached["unlabeled"], manifest.view_recipe, seed=0)
    rows.view_index = alone.view_index = lambda row: 1  # the same view of each row, wherever the row sits
    for position in range(10):  # an unlabelled row's partner is a row of its own split, rendered the same
        together, by_itself = rows.__getitems__([24 + position])[0], alone.__getitems__([position])[0]
        assert torch.equal(together["partner_pixels"], by_itself["partner_pixels"])
        assert together["labels"] == NO_LABEL and together["partner_labels"] == NO_LABEL
    collate = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(cache), backend="pil")), None, 3)
    batch = collate(rows.__getitems__([0, 1, 24, 25]))
    assert (batch["labels"][:2].sum(-1) > 0.99).all() and (batch["labels"][2:] == 0).all()
    summary = train_student(cache, output=tmp_path / "student", epochs=1, labeled_fraction=0.5, **FAST)
    assert summary["recipe"]["training_rows"] == 34 and summary["recipe"]["labeled_rows"] == 12


def test_evaluate_on_a_split_without_labels_reports_agreement_and_why_accuracy_is_missing(
    tmp_path, extra_cache, tiny_teacher, photos
):
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.evaluation.report import describe as describe_report

    report = evaluate_models(
        [str(tiny_teacher)], split="unlabeled", cache=str(extra_cache), output=tmp_path / "e", progress=False
    )
    result = report["models"][0]
    assert result["accuracy"] is None and "has no labels" in result["no_accuracy"]
    assert (
        result["teacher_agreement"]["top1_agreement"] == 1.0
        and result["teacher_agreement"]["teacher_accuracy"] is None
    )
    text = describe_report(report)
    assert "accuracy    none: split 'unlabeled' has no labels" in text
    assert json.loads((tmp_path / "e" / "metrics.json").read_text())["rows"] == 10
    with pytest.raises(KdcacheError, match="has no labels, so there is no accuracy to measure") as refused:
        evaluate_models([str(tiny_teacher)], dataset=str(photos), split="train", output=tmp_path / "f", progress=False)
    assert "\n" not in str(refused.value)


def test_the_command_line_caches_extra_images_and_trains_with_a_label_budget(
    tmp_path, tiny_dataset, tiny_teacher, photos
):
    from typer.testing import CliRunner

    from kdcache.cli import app

    cache = tmp_path / "cache"
    command = [
        "teacher-logits",
        "--dataset",
        str(tiny_dataset),
        "--teacher",
        str(tiny_teacher),
        "--output",
        str(cache),
    ]
    result = CliRunner().invoke(app, command + ["--extra-images", str(photos), "--extra-split", "photos"])
    assert result.exit_code == 0, result.output
    assert "photos" in result.output and "(no labels)" in result.output
    train = ["train-student", str(cache), "--batch-size", "8", "--epochs", "1"]
    result = CliRunner().invoke(app, train + ["--output", str(tmp_path / "s"), "--labeled-fraction", "0.5"])
    assert result.exit_code == 0, result.output
    recipe = json.loads((tmp_path / "s" / TRAINING_RECORD).read_text())["recipe"]
    assert recipe["unlabeled_splits"] == ["photos"] and recipe["labeled_rows"] == 12 and recipe["training_rows"] == 34
    result = CliRunner().invoke(app, train + ["--output", str(tmp_path / "n"), "--unlabeled-splits", "none"])
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "n" / TRAINING_RECORD).read_text())["recipe"]["training_rows"] == 24
    result = CliRunner().invoke(app, train + ["--output", str(tmp_path / "x"), "--labeled-fraction", "2"])
    assert result.exit_code == 1 and result.output.strip().splitlines() == [
        "kdcache: error: --labeled-fraction 2.0 must be > 0 and <= 1 (the share of the training split's rows whose "
        "labels are kept)"
    ]


def test_a_split_whose_labels_are_a_plain_integer_column_is_cached_with_a_warning_naming_it(
    tmp_path, tiny_teacher, caplog
):
    """A CSV-born dataset: its labels in `target`, plain int64 (not a ClassLabel), which stage one does not take for
    labels: it says so in one line naming the column and the flag, and what the flag then does."""
    dataset = make_dataset_dict({"train": 6, "validation": 3})
    for name in dataset:
        dataset[name] = dataset[name].rename_column("labels", "target").cast_column("target", datasets.Value("int64"))
    dataset.save_to_disk(str(tmp_path / "csv-born"))
    with caplog.at_level("WARNING", logger="kdcache"):
        cache = teacher_logits(str(tmp_path / "csv-born"), str(tiny_teacher), output=tmp_path / "c", progress=False)
    (warning,) = [record.getMessage() for record in caplog.records if record.levelname == "WARNING"]
    assert "\n" not in warning
    assert warning.startswith("splits 'train', 'validation' have no label column") and "column 'target' may" in warning
    assert "--label-column NAME" in warning and "ClassLabel(names=[...])" in warning
    assert load_cache(cache)[1].labeled_rows("train") == 0
    # what the warning says to do: cast, then name it; the labels and their names are the ClassLabel's
    for name in dataset:
        dataset[name] = dataset[name].cast_column("target", datasets.ClassLabel(names=LABELS))
    dataset.save_to_disk(str(tmp_path / "cast"))
    caplog.clear()
    with caplog.at_level("WARNING", logger="kdcache"):
        cache = teacher_logits(
            str(tmp_path / "cast"), str(tiny_teacher), output=tmp_path / "l", label_column="target", progress=False
        )
    assert not [record for record in caplog.records if record.levelname == "WARNING"]
    _, manifest = load_cache(cache)
    assert manifest.labeled_rows("train") == 6 and manifest.label_names == LABELS
