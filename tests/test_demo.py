import json

import datasets
import numpy as np
import pytest
from transformers import AutoModelForImageClassification

from kdcache.demo import DIGIT_NAMES, build_digits_dataset, run_demo


def rows(path):
    loaded = datasets.load_from_disk(str(path))
    return {
        name: (np.stack([np.asarray(image) for image in split["image"]]), list(split["label"]))
        for name, split in loaded.items()
    }


def test_digits_dataset_is_deterministic_and_stratified(tmp_path):
    first, again, other = (
        build_digits_dataset(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1))
    )
    a, b, c = rows(first), rows(again), rows(other)
    for name in ("train", "validation", "test"):
        assert np.array_equal(a[name][0], b[name][0]) and a[name][1] == b[name][1]
    assert not np.array_equal(a["test"][0], c["test"][0]), "another seed, another split"
    sizes = {name: len(labels) for name, (_, labels) in a.items()}
    assert sum(sizes.values()) == 1797 and sizes["train"] > 2 * sizes["test"]
    assert a["train"][0].shape[1:] == (32, 32, 3) and a["train"][0].dtype == np.uint8
    for name in ("train", "validation", "test"):
        assert set(a[name][1]) == set(range(10)), "every digit in every split"
    assert datasets.load_from_disk(str(first))["train"].features["label"].names == DIGIT_NAMES


@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_its_outputs(tmp_path, capsys):
    results = run_demo(tmp_path / "demo", quick=True, progress=False)
    root = tmp_path / "demo"
    for folder in ("digits", "teacher", "cache", "student-distilled", "student-scratch", "eval"):
        assert (root / folder).is_dir(), folder
    assert (root / "cache" / "kdcache.json").exists()
    assert (root / "eval" / "comparison.png").exists()
    for student in ("student-distilled", "student-scratch"):
        AutoModelForImageClassification.from_pretrained(str(root / student))
    recorded = json.loads((root / "demo.json").read_text())
    assert recorded == json.loads(json.dumps(results))
    assert set(recorded["accuracy"]) == {"teacher", "scratch", "distilled"}
    assert recorded["seconds_per_epoch"]["cached"] > 0 and recorded["seconds_per_epoch"]["online"] > 0
    table = capsys.readouterr().out
    assert "student distilled from the cache" in table and "seconds per training epoch" in table


def test_a_folder_the_demo_did_not_write_is_refused_and_left_intact(tmp_path, monkeypatch):
    import time

    import pytest

    from kdcache import KdcacheError, demo

    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "holiday.jpg").write_bytes(b"a photo")
    built = []
    monkeypatch.setattr(demo, "build_digits_dataset", lambda *args, **kwargs: built.append(args))
    started = time.perf_counter()
    with pytest.raises(KdcacheError) as refused:
        run_demo(photos, quick=True, progress=False)
    assert time.perf_counter() - started < 5 and not built, "refused before any work"
    message = str(refused.value)
    assert "\n" not in message and message.startswith(
        f"--output '{photos}' holds files that kdcache demo did not write"
    )
    assert sorted(path.name for path in photos.iterdir()) == ["holiday.jpg"]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["photos"], "no lock file left beside it either"
    assert (photos / "holiday.jpg").read_bytes() == b"a photo"
    (tmp_path / "a-file").write_text("")
    with pytest.raises(KdcacheError, match="is a file"):
        run_demo(tmp_path / "a-file", quick=True, progress=False)


def test_the_demo_replaces_only_its_own_folder_or_an_empty_one(tmp_path):
    from kdcache.demo import DEMO_MARKER, DEMO_OUTPUT
    from kdcache.outputs import guards_output, safe_output

    @guards_output
    def claim(root):
        with safe_output(root, DEMO_OUTPUT):
            return sorted(path.name for path in root.iterdir())

    earlier = tmp_path / "earlier"
    assert claim(earlier) == [DEMO_MARKER]  # new: created and marked
    (earlier / "cache").mkdir()
    (earlier / "cache" / "data.arrow").write_bytes(b"old run")
    (earlier / "demo.json").write_text("{}")
    assert claim(earlier) == [DEMO_MARKER]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert claim(empty) == [DEMO_MARKER]
