"""--bad-images (kdcache.teacher.images): an image folder with a damaged JPEG and an empty file, cached with skip
(both listed in the manifest and by kdcache info, the other images cached exactly as a folder without them is, and a
student trained on them) and refused with fail in one line; the share limit; the choice in the fingerprint."""

import io
import re
import shutil
from pathlib import Path

import datasets
import numpy as np
import pytest
from helpers import FAST, LABELS, make_images

from kdcache import KdcacheError
from kdcache.format.manifest import Manifest
from kdcache.format.reader import describe, load_cache
from kdcache.student.train import train_student
from kdcache.teacher.run import teacher_logits

BAD_ROWS = {1: "03-damaged.jpg", 25: "zz-empty.jpg"}  # rows as datasets' imagefolder orders the files


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Two image folders (a subfolder per class) of the same 24 JPEG images: `clean`, and `bad`, which also holds a
    JPEG cut in half (row 1: its header reads, its data does not) and an empty file (row 25)."""
    root = tmp_path_factory.mktemp("folders")
    images, labels = make_images(24, seed=3)
    for index, (image, label) in enumerate(zip(images, labels)):
        (root / "clean" / "train" / LABELS[label]).mkdir(parents=True, exist_ok=True)
        image.save(root / "clean" / "train" / LABELS[label] / f"{index:02d}.jpg")
    shutil.copytree(root / "clean", root / "bad")
    encoded = io.BytesIO()
    images[0].save(encoded, "JPEG")
    (root / "bad" / "train" / LABELS[0] / BAD_ROWS[1]).write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    (root / "bad" / "train" / LABELS[2] / BAD_ROWS[25]).write_bytes(b"")
    return root / "clean", root / "bad"


@pytest.fixture(scope="module")
def skipped_cache(tmp_path_factory, folders, make_cache):
    return make_cache(
        tmp_path_factory.mktemp("skip") / "cache", dataset=folders[1], bad_images="skip", max_bad_share=0.1
    )


@pytest.fixture(scope="module")
def clean_cache(tmp_path_factory, folders, make_cache):
    return make_cache(tmp_path_factory.mktemp("clean") / "cache", dataset=folders[0])


def test_skip_leaves_the_bad_images_out_and_lists_them(skipped_cache, clean_cache, folders):
    cache, manifest = load_cache(skipped_cache)
    skipped = manifest.skipped_images("train")
    assert {entry["row"]: Path(entry["file"]).name for entry in skipped} == BAD_ROWS
    assert skipped[0]["reason"].startswith("OSError: image file is truncated") and skipped[1]["reason"] == "empty file"
    # the kept rows are the cache's, row_index naming each one's row in the source split
    assert manifest.split("train")["num_rows"] == manifest.labeled_rows("train") == len(cache["train"]) == 24
    assert cache["train"]["row_index"] == [row for row in range(26) if row not in BAD_ROWS]
    source = datasets.load_dataset(str(folders[1]))["train"]
    assert manifest.split("train")["fingerprint"] == source._fingerprint  # the dataset's, as it was given
    # ... cached exactly as the same images without the bad files
    clean, _ = load_cache(clean_cache)
    for column in ("labels", "teacher_logits", "pixel_values"):
        assert np.array_equal(np.asarray(cache["train"][column]), np.asarray(clean["train"][column])), column

    info = describe(skipped_cache).splitlines()
    assert [line for line in info if "skipped row" in line] == [
        f"      skipped row 1: {skipped[0]['file']} ({skipped[0]['reason']})",
        f"      skipped row 25: {skipped[1]['file']} (empty file)",
    ]
    assert info[-1] == "  skipped images  2 unreadable or empty, left out (--bad-images skip): train 2"
    assert "skipped" not in describe(clean_cache)


def test_a_student_trains_on_the_kept_rows(skipped_cache, tmp_path):
    cached = train_student(skipped_cache, output=tmp_path / "cached", max_steps=1, eval_split=None, **FAST)
    assert cached["recipe"]["training_rows"] == 24 and len(cached["train_losses"]) == 1
    # the online mode reads the source's images: the same kept rows, so none of the bad ones is decoded
    online = train_student(skipped_cache, output=tmp_path / "online", epochs=1, eval_split=None, online=True, **FAST)
    assert online["recipe"]["training_rows"] == 24


def test_fail_names_the_first_bad_file_the_count_and_the_flag(folders, tiny_teacher, tmp_path):
    with pytest.raises(KdcacheError) as refused:
        teacher_logits(str(folders[1]), str(tiny_teacher), output=tmp_path / "cache", progress=False)
    message = str(refused.value)
    assert "\n" not in message
    assert re.match(
        r"unreadable image in split 'train', row 1 \('.*/03-damaged\.jpg'\) \(OSError: image file is truncated .*\); "
        r"a quick scan of the split finds 1 more empty or unidentifiable image file \(.*\); fix or remove them, or "
        r"pass --bad-images skip to leave every unreadable image out \(the manifest lists them\)",
        message,
    ), message


def test_more_bad_images_than_the_share_allows_are_refused_in_one_line(folders, tiny_teacher, tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import app

    command = ["teacher-logits", "--dataset", str(folders[1]), "--teacher", str(tiny_teacher)]
    command += ["--output", str(tmp_path / "cache"), "--bad-images", "skip"]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    said = [line for line in result.stderr.splitlines() if line.startswith("kdcache:")]  # not the loading bars
    assert said == [result.stderr.strip().splitlines()[-1]]
    assert said[0].startswith("kdcache: error: 2 of the 26 images of split 'train' are unreadable or empty (7.7%; ")
    assert "more than --max-bad-share 0.05 allows; check that the dataset is the one meant" in said[0]
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()


def test_the_fingerprint_covers_the_choice(clean_cache, folders, make_cache, tmp_path):
    """A cache made with skip is never taken for one made with fail, nor the other way round, even of a folder
    without a bad image (their rows are the same: the choice is what tells them apart)."""
    with pytest.raises(KdcacheError, match="holds a cache made from other inputs"):
        make_cache(clean_cache, dataset=folders[0], bad_images="skip")
    skipped = make_cache(tmp_path / "cache", dataset=folders[0], bad_images="skip")
    manifest = Manifest.read(skipped)
    assert manifest.fingerprint != Manifest.read(clean_cache).fingerprint and manifest.skipped_images("train") == []
    with pytest.raises(KdcacheError, match="holds a cache made from other inputs"):
        make_cache(skipped, dataset=folders[0])
