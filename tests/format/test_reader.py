"""kdcache.format.reader: a damaged cache is refused in one line before any training."""

import json
import shutil

import datasets
import numpy as np
import pytest
from helpers import flip_bit

from kdcache import KdcacheError
from kdcache.format.columns import LOGITS
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import load_cache


def test_damaged_cache_is_refused(tmp_path, tiny_cache):
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_cache, damaged)
    manifest = json.loads((damaged / MANIFEST).read_text())
    manifest["dataset"]["splits"]["train"]["chunks"][0]["sha256"] = "0" * 64
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="'train/chunk-000000.arrow' does not match its checksum"):
        load_cache(damaged)
    manifest["dataset"]["splits"]["train"]["chunks"] = []
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="split 'train' lists other files than its manifest"):
        load_cache(damaged)
    manifest["format_version"] = 99
    (damaged / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(KdcacheError, match="format version 99"):
        load_cache(damaged)
    (damaged / MANIFEST).unlink()
    with pytest.raises(KdcacheError, match="not a kdcache cache"):
        load_cache(damaged)


def test_a_flipped_bit_in_any_chunk_is_refused_in_one_line_before_training(tmp_path, make_cache):
    from kdcache.student.train import train_student

    good = make_cache(tmp_path / "good", chunk_size=8)
    manifest = json.loads((good / MANIFEST).read_text())
    chunks = [
        (split, chunk["file"]) for split, entry in manifest["dataset"]["splits"].items() for chunk in entry["chunks"]
    ]
    assert len(chunks) == 7
    for split, file in chunks:
        damaged = tmp_path / f"damaged-{split}-{file}"
        shutil.copytree(good, damaged)
        chunk = datasets.Dataset.from_file(str(damaged / split / file))
        first_row_logits = np.asarray(chunk.with_format("numpy")[0][LOGITS], dtype="<f4").tobytes()
        offset = (damaged / split / file).read_bytes().find(first_row_logits)
        assert offset > 0
        flip_bit(damaged / split / file, offset, bit=3)  # the first row's first logit, in the mantissa
        # datasets alone reads the damaged cache without complaint, and a different logit:
        unchecked = datasets.load_from_disk(str(damaged))[split].with_format("numpy")
        start = sum(c["rows"] for c in manifest["dataset"]["splits"][split]["chunks"][: int(file[6:12])])
        expected = datasets.load_from_disk(str(good))[split].with_format("numpy")[start][LOGITS]
        assert not np.array_equal(unchecked[start][LOGITS], expected)
        with pytest.raises(KdcacheError) as refused:
            load_cache(damaged)
        assert str(refused.value) == (
            f"cache '{damaged}' file '{split}/{file}' does not match its checksum; the cache is damaged: recreate it "
            "with kdcache teacher-logits"
        )
        # three processes of a launch hash a third of the files each: exactly one of them finds the damaged one
        refusals = []
        for index in range(3):
            try:
                load_cache(damaged, share=(index, 3))
            except KdcacheError as error:
                refusals.append(str(error))
        assert refusals == [str(refused.value)]
    with pytest.raises(KdcacheError, match="does not match its checksum"):
        train_student(damaged, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.partial").exists()
    truncated = tmp_path / "truncated"
    shutil.copytree(good, truncated)
    (truncated / "test" / "chunk-000001.arrow").write_bytes((good / "test" / "chunk-000001.arrow").read_bytes()[:-100])
    with pytest.raises(KdcacheError, match=r"file 'test/chunk-000001\.arrow' does not match its checksum"):
        load_cache(truncated)
