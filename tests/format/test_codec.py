"""Compact caches (kdcache.format.codec): float16 and top-k logits, stored compressed and rebuilt as the full
cache's."""

import json

import numpy as np
import torch
from helpers import cached_logits

from kdcache.format.codec import compress_logits, expand_logits
from kdcache.format.columns import LOGITS
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import describe, load_cache
from kdcache.student.loss import soft_target_kl


def test_compact_caches_store_the_full_caches_logits_compressed(compact_cache, tiny_cache):
    from kdcache.format.codec import compress_logits, expand_logits
    from kdcache.format.columns import LOGIT_INDICES, LOGIT_TAIL
    from kdcache.format.reader import rebuilt_logits

    full, full_manifest = load_cache(tiny_cache)
    compact, manifest = load_cache(compact_cache)
    assert manifest["format_version"] == 5 and manifest.top_k == 1 and manifest.logits_dtype == "float16"
    assert full_manifest.top_k is None and full_manifest.logits_dtype == "float32"
    features = compact["train"].features
    assert features[LOGITS].feature.dtype == "float16" and features[LOGITS].length == 1
    assert features[LOGIT_INDICES].feature.dtype == "int16" and features[LOGIT_TAIL].dtype == "float32"
    for split in ("train", "validation", "test"):
        logits = torch.as_tensor(cached_logits(tiny_cache, split))
        expected = compress_logits(logits, top_k=1, dtype=torch.float16)
        stored = compact[split].with_format("numpy")[:]
        assert np.array_equal(stored[LOGITS], expected["values"].numpy())
        assert np.array_equal(stored[LOGIT_INDICES], expected["indices"].numpy())
        assert np.array_equal(stored[LOGIT_TAIL], expected["tail"].numpy())
        assert torch.equal(rebuilt_logits(stored, 3), expand_logits(**expected, classes=3))
        assert np.array_equal(stored["pixel_values"], full[split].with_format("numpy")[:]["pixel_values"])
    # what the logits are stored as is part of what the cache is: another fingerprint, and a rerun is a no-op
    assert manifest.fingerprint != full_manifest.fingerprint
    text = describe(compact_cache)
    assert "float16, the top 1 of 3 classes per view" in text


def test_float16_logits_alone_and_their_own_fingerprint(tmp_path, tiny_cache, capsys, make_cache):
    half = make_cache(tmp_path / "half", logits_dtype="fp16")
    cache, manifest = load_cache(half)
    assert manifest.logits_dtype == "float16" and manifest.top_k is None
    assert cache["train"].features[LOGITS].feature.dtype == "float16"
    full = cached_logits(tiny_cache, "train")
    assert np.array_equal(cached_logits(half, "train"), full.astype(np.float16))
    assert manifest.fingerprint != json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    make_cache(half, logits_dtype="fp16")
    assert "up to date" in capsys.readouterr().out


def test_compact_view_caches_compress_each_views_logits(tmp_path, view_cache, make_cache):
    from kdcache.format.codec import compress_logits
    from kdcache.format.columns import LOGIT_INDICES, LOGIT_TAIL
    from kdcache.format.reader import rebuilt_logits

    compact = make_cache(tmp_path / "compact", views=3, chunk_size=8, top_k=2, logits_dtype="fp16")
    rows = load_cache(compact)[0]["train"].with_format("numpy")[:]
    assert rows[LOGITS].shape == rows[LOGIT_INDICES].shape == (24, 3, 2) and rows[LOGIT_TAIL].shape == (24, 3)
    expected = compress_logits(torch.as_tensor(cached_logits(view_cache, "train")), top_k=2, dtype=torch.float16)
    assert np.array_equal(rows[LOGITS], expected["values"].numpy())
    assert np.array_equal(rows[LOGIT_INDICES], expected["indices"].numpy())
    assert rebuilt_logits(rows, 3).shape == (24, 3, 3)


def test_the_command_line_writes_a_compact_cache(tmp_path, tiny_dataset, tiny_teacher):
    from typer.testing import CliRunner

    from kdcache.cli import app

    output = tmp_path / "cli-compact"
    result = CliRunner().invoke(
        app,
        [
            "teacher-logits",
            "--dataset",
            str(tiny_dataset),
            "--teacher",
            str(tiny_teacher),
            "--output",
            str(output),
            "--top-k",
            "2",
            "--logits-dtype",
            "fp16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "float16, the top 2 of 3 classes per view" in result.output


def test_float32_logits_are_stored_as_they_are_and_float16_within_its_rounding():
    logits = torch.randn(6, 40) * 4
    assert torch.equal(expand_logits(**compress_logits(logits)), logits)
    half = compress_logits(logits, dtype=torch.float16)
    assert half["values"].dtype == torch.float16 and set(half) == {"values"}
    rebuilt = expand_logits(**half)
    assert rebuilt.dtype == torch.float32
    assert (rebuilt - logits).abs().max() <= logits.abs().max() * 2**-11  # half a float16 step
    assert soft_target_kl(logits, rebuilt, 5.0).max() < 1e-5


def test_top_k_keeps_the_k_largest_exactly_and_the_rest_of_the_mass_spread_evenly():
    torch.manual_seed(0)
    logits = torch.randn(5, 3, 50) * 3  # (rows, views, classes): any leading shape
    stored = compress_logits(logits, top_k=4)
    assert stored["values"].shape == stored["indices"].shape == (5, 3, 4) and stored["tail"].shape == (5, 3)
    assert stored["indices"].dtype == torch.int16
    values, indices = logits.topk(4, dim=-1)
    assert torch.equal(stored["values"], values) and torch.equal(stored["indices"].long(), indices)
    rebuilt = expand_logits(**stored, classes=50)
    assert rebuilt.shape == logits.shape
    p, q = logits.softmax(-1), rebuilt.softmax(-1)
    # at T=1 (TinyViT's rule): each top-K class keeps its probability, the others share the rest of the mass equally
    assert torch.allclose(q.gather(-1, indices), p.gather(-1, indices), atol=1e-6)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, indices, False)
    tail = q[outside].reshape(5, 3, 46)
    assert torch.allclose(tail, tail[..., :1].expand_as(tail))
    assert torch.allclose(tail.sum(-1), p[outside].reshape(5, 3, 46).sum(-1), atol=1e-6)
    # the cost shrinks as K grows, and at T=5 as at T=1
    costs = [
        soft_target_kl(logits, expand_logits(**compress_logits(logits, k), classes=50), 5.0).mean()
        for k in (1, 10, 40)
    ]
    assert costs[0] > costs[1] > costs[2] > 0
    # class indices past int16's range are stored as int32
    assert compress_logits(torch.randn(2, 40000), top_k=3)["indices"].dtype == torch.int32
