import json

import datasets
import numpy as np
from transformers import AutoModelForImageClassification

from kdcache.demo import DIGIT_NAMES, build_digits_dataset, run_demo


def rows(path):
    loaded = datasets.load_from_disk(str(path))
    return {name: (np.stack([np.asarray(image) for image in split["image"]]), list(split["label"])) for name, split in loaded.items()}


def test_digits_dataset_is_deterministic_and_stratified(tmp_path):
    first, again, other = (build_digits_dataset(tmp_path / name, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
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
