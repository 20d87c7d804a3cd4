"""kdcache.format.replay.replayed_batch: a cache's rows as stage two's first epoch served them, for the export stage
to calibrate and check on: a clean split's stored pixels resized, a view split's stored views rendered, at the
student's size, through the student's processor, with the teacher's logits of exactly that view."""

import numpy as np
import torch
from transformers import AutoImageProcessor

from kdcache.data import ImagePipeline, from_raw_source
from kdcache.format.columns import LOGITS, PIXELS
from kdcache.format.reader import load_cache
from kdcache.format.replay import ViewRows, replayed_batch, resize_pixels


def pipeline_of(cache):
    return ImagePipeline(AutoImageProcessor.from_pretrained(str(cache), backend="pil"))


def test_a_clean_split_is_its_stored_pixels_resized(tiny_cache):
    cached, manifest = load_cache(tiny_cache)
    pipeline, rows = pipeline_of(tiny_cache), [0, 5, 7]
    batch = replayed_batch(cached, manifest, "validation", rows, pipeline, (20, 20))
    stored = cached["validation"].with_format("numpy")[rows]
    resample = pipeline.processor.resample
    resized = np.stack([resize_pixels(pixels.astype(np.uint8), (20, 20), resample) for pixels in stored[PIXELS]])
    assert torch.equal(batch["pixel_values"], pipeline.normalize(torch.from_numpy(resized)))
    assert batch["labels"].tolist() == stored["labels"].tolist()
    assert np.allclose(batch["teacher_logits"].numpy(), stored[LOGITS])


def test_a_view_split_is_the_view_the_first_epoch_drew_at_the_students_size(view_cache):
    cached, manifest = load_cache(view_cache)
    pipeline, rows, recipe = pipeline_of(view_cache), [1, 2, 9], manifest.view_recipe
    batch = replayed_batch(cached, manifest, "train", rows, pipeline, (16, 16), seed=0)
    first_epoch = ViewRows(cached["train"], recipe, seed=0)
    train = cached["train"].with_format("numpy")
    for position, row in enumerate(rows):
        k = first_epoch.view_index(row)
        image = from_raw_source(cached["train"][row]["source"], cached["train"][row]["source_shape"])
        view = torch.from_numpy(recipe.render(image, train[row]["views"][k], (16, 16)))[None]
        assert torch.equal(batch["pixel_values"][position : position + 1], pipeline.normalize(view))
        assert np.allclose(batch["teacher_logits"][position].numpy(), train[row][LOGITS][k])
