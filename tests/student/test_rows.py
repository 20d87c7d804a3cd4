"""Training rows (kdcache.student.rows): view replay, student-only augmentation, the student's size, mixed rows."""

import datasets
import numpy as np
import torch
from helpers import FAST, LABELS
from transformers import AutoImageProcessor, pipeline

from kdcache.data import ImagePipeline, load_image_dataset
from kdcache.format.manifest import LOGITS
from kdcache.format.reader import load_cache
from kdcache.format.replay import Collator
from kdcache.models import align_labels, load_classifier
from kdcache.student.model import OnlineTeacher
from kdcache.student.train import train_student


def test_view_rows_cover_every_view_once_per_cycle_and_replay_it(four_view_cache):
    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.format.replay import ViewRows

    cache, manifest = load_cache(four_view_cache)
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


def test_student_only_augment_pairs_fresh_views_with_the_clean_logits(tiny_cache, tiny_dataset):
    from kdcache.data import ViewRecipe, undecoded
    from kdcache.format.replay import ViewRows

    cache, _ = load_cache(tiny_cache)
    images = undecoded(load_image_dataset(str(tiny_dataset))["train"], "image").select_columns(["image"])
    merged = datasets.concatenate_datasets([cache["train"].select_columns(["labels", LOGITS]), images], axis=1)
    rows = ViewRows(merged, ViewRecipe((32, 32), 2), seed=0, fresh=True)
    first = rows.__getitems__([0, 1])
    rows.epoch = 1
    second = rows.__getitems__([0, 1])
    assert not torch.equal(first[0]["pixel_values"], second[0]["pixel_values"]), "a new view each epoch"
    assert first[0][LOGITS] == second[0][LOGITS] == cache["train"][0][LOGITS], "always the clean view's logits"


def test_student_size_is_the_same_box_resized(tmp_path, four_view_cache, tiny_cache):
    from PIL import Image

    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.format.replay import ViewRows, resize_pixels

    cache, manifest = load_cache(four_view_cache)
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
    train_student(four_view_cache, output=tmp_path / "small", max_steps=2, student_size=20, **FAST)
    classifier = pipeline("image-classification", model=str(tmp_path / "small"))
    assert classifier.image_processor(Image.new("RGB", (50, 40)), return_tensors="pt")["pixel_values"].shape[-2:] == (
        20,
        20,
    )
    assert len(classifier(Image.new("RGB", (50, 40)))) == 3


def test_mixed_rows_rebuild_the_teachers_input_and_mix_the_labels(mixed_train_cache, tiny_teacher):
    from kdcache.data import ViewRecipe
    from kdcache.format.replay import ViewRows

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
