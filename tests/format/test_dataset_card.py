"""kdcache.format.dataset_card: a pushed cache's README.md is a valid DatasetCard whose YAML describes the cache, and
whose configs let plain `datasets.load_dataset` read the logits from the pushed layout."""

import json

import datasets
import numpy as np
from huggingface_hub import DatasetCard

from kdcache.format.columns import LOGIT_INDICES, LOGITS
from kdcache.format.dataset_card import _source_license, dataset_card
from kdcache.format.manifest import MANIFEST
from kdcache.format.remote import push_cache
from kdcache.format.stores import Address


def test_the_card_validates_and_describes_the_cache(tiny_cache):
    manifest = json.loads((tiny_cache / MANIFEST).read_text())
    card = DatasetCard(dataset_card(manifest, Address(repo_id="me/beans-logits")).content)  # parsed and validated
    data = card.data.to_dict()
    assert data["configs"] == [
        {
            "config_name": "default",
            "data_files": [
                {"split": name, "path": f"{name}/chunk-*.arrow"} for name in ("train", "validation", "test")
            ],
        }
    ]
    meta = data["kdcache"]
    assert meta["fingerprint"] == manifest["fingerprint"]
    assert meta["teacher"]["weights_sha256"] == manifest["teacher"]["weights_sha256"]
    assert meta["splits"] == {
        "train": {"rows": 24, "views": 1},
        "validation": {"rows": 12, "views": 1},
        "test": {"rows": 12, "views": 1},
    }
    assert meta["logits"] == {"dtype": "float32", "top_k": None, "classes": 3} and meta["views"] == 1
    assert "license" not in data  # the tiny dataset's has none: never guessed
    assert "kdcache train-student hf://datasets/me/beans-logits" in card.text
    assert 'datasets.load_dataset("me/beans-logits")' in card.text


def test_load_dataset_reads_the_logits_from_the_pushed_layout(tmp_path, tiny_cache, compact_cache):
    for cache in (tiny_cache, compact_cache):
        pushed = tmp_path / cache.name
        push_cache(cache, f"file://{pushed}", progress=False)
        read = datasets.load_dataset(str(pushed), cache_dir=str(tmp_path / "hf-cache"))
        original = datasets.load_from_disk(str(cache))
        assert sorted(read) == sorted(original)
        for split in original:
            for column in (LOGITS, LOGIT_INDICES):
                if column in original[split].column_names:
                    assert np.array_equal(
                        np.asarray(read[split].with_format("numpy")[column]),
                        np.asarray(original[split].with_format("numpy")[column]),
                    )
            assert read[split].features == original[split].features


def test_the_source_license_is_read_from_its_card_when_there_is_one(tmp_path):
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# photos\n")
    assert _source_license(str(tmp_path)) == "mit"
    assert _source_license(str(tmp_path / "no-card")) is None
