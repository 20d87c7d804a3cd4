"""`kdcache verify` reruns the teacher: it passes a good cache, catches logits altered with their checksums fixed
up (which the checksums alone cannot), and refuses a teacher with other weights."""

import json
import shutil

import datasets
import numpy as np
import pytest
from helpers import save_vit_teacher
from typer.testing import CliRunner

from kdcache import KdcacheError
from kdcache.cli import app
from kdcache.format.columns import LOGITS
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import load_cache
from kdcache.teacher.verify import describe, verify_teacher_logits
from kdcache.teacher.work import write_chunk_file


@pytest.fixture(scope="module")
def view_caches(tmp_path_factory, make_cache):
    """A cache with views of train and a clean validation split, and one of mixed views."""
    folder = tmp_path_factory.mktemp("verify")
    views = make_cache(folder / "views", views=2, splits=["train", "validation"])
    mixed = make_cache(folder / "mixed", views=2, mix_alpha=1.0, splits=["train"])
    return views, mixed


def altered_copy(cache, target, split="train", row=5, change=lambda logits: np.roll(logits, 1, axis=-1)):
    """A copy of `cache` whose logits of one row are changed, its chunk file written again and the manifest's checksum
    of that file written again to match."""
    shutil.copytree(cache, target)
    manifest = json.loads((target / MANIFEST).read_text())
    chunks, first = manifest["dataset"]["splits"][split]["chunks"], 0
    index = 0
    while row >= first + chunks[index]["rows"]:
        first, index = first + chunks[index]["rows"], index + 1
    path = target / split / chunks[index]["file"]
    rows = datasets.Dataset.from_file(str(path))
    logits = np.asarray(rows.with_format("numpy")[LOGITS], dtype=np.float32)
    logits[row - first] = change(logits[row - first])
    altered = datasets.Dataset.from_dict({**rows[:], LOGITS: logits}, features=rows.features)
    chunks[index] = write_chunk_file(path, altered)
    (target / MANIFEST).write_text(json.dumps(manifest))
    load_cache(target)  # the checksums pass: only rerunning the teacher can tell
    return target


def test_a_good_cache_passes_clean_views_and_mixed_views(tiny_cache, view_caches):
    for cache in (tiny_cache, *view_caches):
        report = verify_teacher_logits(cache, sample=10, progress=False)
        assert report["passed"] and report["top1_mismatches"] == 0, describe(report)
        assert report["max_abs_difference"] <= 1e-5
        manifest = json.loads((cache / MANIFEST).read_text())
        assert set(report["splits"]) == set(manifest["dataset"]["splits"])
        assert all(split["checked"] == 10 for split in report["splits"].values())
        assert "passed" in describe(report)


@pytest.mark.parametrize("which", ["clean", "views", "mixed"])
def test_logits_altered_with_their_checksums_fail(tmp_path, tiny_cache, view_caches, which):
    cache = {"clean": tiny_cache, "views": view_caches[0], "mixed": view_caches[1]}[which]
    altered = altered_copy(cache, tmp_path / "altered")
    # every (row, view) pair of train is sampled, so the altered row is among them
    report = verify_teacher_logits(altered, sample=1000, progress=False)
    assert not report["passed"] and report["splits"]["train"]["max_abs_difference"] > 1e-3
    assert report["splits"]["train"]["top1_mismatches"] >= 1
    assert "FAILED" in describe(report) and "recreate the cache" in describe(report)
    others = [split for name, split in report["splits"].items() if name != "train"]
    assert all(split["max_abs_difference"] <= 1e-5 for split in others)


def test_a_small_change_fails_only_above_the_tolerance(tmp_path, tiny_cache):
    altered = altered_copy(tiny_cache, tmp_path / "altered", change=lambda logits: logits + 0.01)
    assert not verify_teacher_logits(altered, sample=1000, progress=False)["passed"]
    report = verify_teacher_logits(altered, sample=1000, tolerance=0.02, progress=False)
    assert report["passed"] and report["top1_mismatches"] == 0


def test_the_command_exits_non_zero_on_a_bad_cache(tmp_path, tiny_cache):
    good = CliRunner().invoke(app, ["verify", str(tiny_cache), "--sample", "4"])
    assert good.exit_code == 0 and "passed: max |logit difference|" in good.output
    bad = CliRunner().invoke(app, ["verify", str(altered_copy(tiny_cache, tmp_path / "bad")), "--sample", "100"])
    assert bad.exit_code == 1 and "FAILED" in bad.output


def test_another_teacher_is_refused_and_a_local_copy_is_accepted(tmp_path, tiny_cache, tiny_teacher):
    other = save_vit_teacher(tmp_path / "other", seed=1)
    with pytest.raises(
        KdcacheError, match=r"--teacher '.*other' has other weights than the teacher that made cache"
    ) as refused:
        verify_teacher_logits(tiny_cache, teacher=str(other), progress=False)
    assert "\n" not in str(refused.value)

    offline = tmp_path / "offline"  # a cache whose teacher is a hub id this machine cannot reach
    shutil.copytree(tiny_cache, offline)
    manifest = json.loads((offline / MANIFEST).read_text())
    manifest["teacher"]["name_or_path"] = "kdcache-tests/no-such-teacher"
    (offline / MANIFEST).write_text(json.dumps(manifest))
    with pytest.raises(
        KdcacheError,
        match=r"could not load the teacher 'kdcache-tests/no-such-teacher' .* pass a local folder with --teacher",
    ):
        verify_teacher_logits(offline, progress=False)
    assert verify_teacher_logits(offline, teacher=str(tiny_teacher), sample=4, progress=False)["passed"]

    result = CliRunner().invoke(app, ["verify", str(tiny_cache), "--teacher", str(other)])
    # transformers' own "Loading weights" progress bar may come first; kdcache's message is one line
    lines = [
        line
        for line in result.output.replace("\r", "\n").splitlines()
        if line.strip() and not line.startswith("Loading weights")
    ]
    assert result.exit_code == 1 and len(lines) == 1 and "other weights" in lines[0]


def test_bad_settings_are_one_line(tiny_cache):
    with pytest.raises(KdcacheError, match="--sample 0 must be at least 1"):
        verify_teacher_logits(tiny_cache, sample=0, progress=False)
    with pytest.raises(KdcacheError, match="--tolerance -1 must be >= 0"):
        verify_teacher_logits(tiny_cache, tolerance=-1, progress=False)


def test_a_compact_cache_passes_and_an_altered_one_fails(tmp_path, compact_cache):
    report = verify_teacher_logits(compact_cache, sample=10, progress=False)
    assert report["passed"] and report["top1_mismatches"] == 0, describe(report)
    assert report["max_abs_difference"] <= 1e-5  # beyond float16's rounding of what is stored
    altered = altered_copy(compact_cache, tmp_path / "altered", change=lambda logits: logits + np.float16(0.5))
    report = verify_teacher_logits(altered, sample=1000, progress=False)
    assert not report["passed"] and report["splits"]["train"]["max_abs_difference"] > 0.4
