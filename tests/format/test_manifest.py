"""Format compatibility (kdcache.format.manifest): caches of the older format versions still load, verify and train."""

import json
import shutil

import datasets
import numpy as np
import pytest
import torch
from helpers import cached_logits, old_format_copy

from kdcache import KdcacheError
from kdcache.format.columns import LOGITS, PIXELS
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import describe, load_cache


def test_older_formats_verify_their_logits_checksum_in_blocks(tmp_path, view_cache):
    from kdcache.format.manifest import logits_sha256

    old = old_format_copy(view_cache, tmp_path / "v3", version=3)
    cache, manifest = load_cache(old)
    assert manifest["format_version"] == 3
    for split in cache:  # blocks of one row, of a few rows, and one block: the checksum of the whole column
        for block_bytes in (1, 100, 1000, 2**30):
            assert logits_sha256(cache[split], block_bytes=block_bytes) == manifest.split(split)["logits_sha256"]
    raw = json.loads((old / MANIFEST).read_text())
    raw["dataset"]["splits"]["validation"]["logits_sha256"] = "0" * 64
    (old / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(KdcacheError, match="split 'validation': teacher logits do not match their checksum"):
        load_cache(old)


def test_caches_of_format_version_1_still_load(tmp_path, tiny_cache):
    old = old_format_copy(tiny_cache, tmp_path / "v1", version=1)
    assert (old / "train" / "data-00000-of-00001.arrow").exists() and not (
        old / "train" / "chunk-000000.arrow"
    ).exists()
    cache, loaded = load_cache(old)
    assert loaded["format_version"] == 1 and len(cache["train"]) == 24
    from kdcache.student.train import train_student

    train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)


def test_view_caches_of_format_version_2_still_load_and_train(tmp_path, view_cache):
    """Format 2 kept each view split's source image as its file (an image column) instead of raw pixels."""
    import io

    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.format.replay import ViewRows
    from kdcache.student.train import train_student

    def as_png(row):
        buffer = io.BytesIO()
        from_raw_source(row["source"], row["source_shape"]).save(buffer, format="PNG")
        return {"image": {"bytes": buffer.getvalue(), "path": None}}

    cache = datasets.load_from_disk(str(view_cache))
    train = cache["train"].map(
        as_png,
        remove_columns=["source", "source_shape"],
        features=datasets.Features(
            {
                **{k: v for k, v in cache["train"].features.items() if k not in ("source", "source_shape")},
                "image": datasets.Image(),
            }
        ),
    )
    old = old_format_copy(view_cache, tmp_path / "v2", version=2, rows=datasets.DatasetDict({**cache, "train": train}))
    manifest = json.loads((old / MANIFEST).read_text())
    for key in ("source_size", "mix_alpha"):
        manifest["views"]["recipe"].pop(key)
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded, _ = load_cache(old)
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    new_rows, old_rows = ViewRows(load_cache(view_cache)[0]["train"], recipe, 0), ViewRows(loaded["train"], recipe, 0)
    for new_item, old_item in zip(new_rows.__getitems__([0, 9]), old_rows.__getitems__([0, 9])):
        assert torch.equal(new_item[PIXELS], old_item[PIXELS])
    train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)


def test_caches_of_format_version_4_still_load_and_train(tmp_path, tiny_cache):
    from kdcache.student.train import train_student

    old = tmp_path / "v4"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 4  # format 4 wrote float32 logits of every class, and its columns had no top_k
    for key in ("top_k", "indices", "tail", "compact"):
        manifest["columns"]["teacher_logits"].pop(key)
    (old / MANIFEST).write_text(json.dumps(manifest))
    cache, loaded = load_cache(old)
    assert loaded["format_version"] == 4 and loaded.top_k is None and loaded.logits_dtype == "float32"
    assert np.array_equal(cache["train"].with_format("numpy")[:][LOGITS], cached_logits(tiny_cache, "train"))
    assert "float32, computed in fp32" in describe(old)
    summary = train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)
    assert np.isfinite(summary["train_losses"]).all()
