"""Cached views and mixed views: replayed exactly from the stored source and parameters, whatever the chunking and
batching."""

import datasets
import numpy as np
import pytest
import torch
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kdcache.format import manifest as manifest_module
from kdcache.format.columns import LOGITS, PIXELS
from kdcache.format.reader import load_cache
from kdcache.teacher.run import teacher_logits


def test_view_replay_is_exact(view_cache, tiny_teacher):
    """Rebuilding a cached view from the image and its stored parameters, and running the teacher on it, gives
    the stored logits."""
    from kdcache.data import ImagePipeline, ViewRecipe, from_raw_source

    cache, manifest = load_cache(view_cache)
    train = cache["train"]
    assert (
        manifest["format_version"] == manifest_module.FORMAT_VERSION
        and manifest["dataset"]["splits"]["train"]["views"] == 3
    )
    assert train.features["teacher_logits"].shape == (3, 3) and train.features["views"].shape == (3, 5)
    assert PIXELS in cache["validation"].column_names and "views" not in cache["validation"].column_names
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    processor = AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil")
    model = AutoModelForImageClassification.from_pretrained(str(tiny_teacher)).eval()
    pipeline = ImagePipeline(processor)
    distinct = 0
    for row in (0, 5, 11, 23):
        image = from_raw_source(train[row]["source"], train[row]["source_shape"])
        views = np.asarray(train[row]["views"])
        rendered = [recipe.render(image, view) for view in views]
        distinct += len({r.tobytes() for r in rendered})
        with torch.no_grad():
            logits = model(pixel_values=pipeline.normalize(torch.from_numpy(np.stack(rendered)))).logits.numpy()
        assert np.abs(logits - np.asarray(train[row]["teacher_logits"])).max() <= 1e-5
    assert distinct == 12, "each view of each row is a different crop"


def test_views_do_not_depend_on_chunking_or_batching(tmp_path, view_cache, make_cache):
    other = make_cache(tmp_path / "other", views=3, batch_size=5, chunk_size=16, splits=["train"])
    a = datasets.load_from_disk(str(view_cache))["train"].with_format("numpy")[:]
    b = datasets.load_from_disk(str(other))["train"].with_format("numpy")[:]
    assert np.array_equal(a["views"], b["views"])
    assert np.abs(a["teacher_logits"] - b["teacher_logits"]).max() <= 1e-5


@pytest.fixture(scope="module")
def mixed_cache(make_cache):
    return make_cache(views=3, mix_alpha=1.0, chunk_size=8)


def rebuild_mixed_views(train, recipe, row):
    """A row's mixed views, rebuilt from the stored sources and parameters alone: uint8 views, partners' views, weights."""
    from kdcache.data import from_raw_source

    def source(index):
        return from_raw_source(train[index]["source"], train[index]["source_shape"])

    record = train[row]
    own = np.stack([recipe.render(source(row), view) for view in record["views"]])
    partners = np.stack(
        [recipe.render(source(int(b)), view) for b, view in zip(record["mix_partners"], record["mix_views"])]
    )
    return torch.from_numpy(own), torch.from_numpy(partners), torch.tensor(record["mix_weights"])


def test_mixed_view_replay_is_exact(mixed_cache, tiny_teacher):
    """A mixed view rebuilt from the cache (both sources, both boxes, the weight) and run through the teacher gives
    the stored logits."""
    from kdcache.data import ImagePipeline, ViewRecipe

    cache, manifest = load_cache(mixed_cache)
    train = cache["train"]
    assert (
        manifest["format_version"] == manifest_module.FORMAT_VERSION
        and manifest["views"]["recipe"]["mix_alpha"] == 1.0
    )
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    pipeline = ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil"))
    model = AutoModelForImageClassification.from_pretrained(str(tiny_teacher)).eval()
    for row in (0, 7, 13, 23):
        own, partners, weights = rebuild_mixed_views(train, recipe, row)
        assert (weights >= 0.5).all() and (weights < 1).all() and row not in train[row]["mix_partners"]
        with torch.no_grad():
            logits = model(pixel_values=pipeline.mix(own, partners, weights)).logits.numpy()
            unmixed = model(pixel_values=pipeline.normalize(own)).logits.numpy()
        stored = np.asarray(train[row][LOGITS])
        assert np.abs(logits - stored).max() <= 1e-5
        assert np.abs(unmixed - stored).max() > 1e-3, "the teacher saw the mixed image, not the view alone"


def test_mixed_views_depend_on_seed_and_row_alone(tmp_path, mixed_cache, tiny_dataset, tiny_teacher, make_cache):
    other = make_cache(tmp_path / "other", views=3, mix_alpha=1.0, batch_size=5, chunk_size=16, splits=["train"])
    a = datasets.load_from_disk(str(mixed_cache))["train"].with_format("numpy")[:]
    b = datasets.load_from_disk(str(other))["train"].with_format("numpy")[:]
    for column in ("views", "mix_partners", "mix_views", "mix_weights", "source_shape"):
        assert np.array_equal(a[column], b[column]), column
    assert np.abs(a[LOGITS] - b[LOGITS]).max() <= 1e-5
    reseeded = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "reseeded",
        views=3,
        mix_alpha=1.0,
        view_seed=1,
        splits=["train"],
        progress=False,
    )
    c = datasets.load_from_disk(str(reseeded))["train"].with_format("numpy")[:]
    assert not np.array_equal(a["mix_partners"], c["mix_partners"])
