"""Stage one (kdcache.teacher.run): the cache equals a plain teacher loop, its columns and manifest, labels matched by
name, reruns and fingerprints, file URLs."""

import json
import re

import datasets
import numpy as np
import pytest
import torch
from helpers import LABELS, cached_logits, make_dataset_dict, old_format_copy, save_vit_teacher
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kdcache import KdcacheError
from kdcache.format import manifest as manifest_module
from kdcache.format.columns import PIXELS
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import describe, load_cache
from kdcache.teacher import batches as batches_module
from kdcache.teacher.run import teacher_logits


def reference_logits(dataset_path, teacher_path, split):
    """The plain loop the cache must reproduce: teacher(**processor(images)).logits, batch by batch."""
    processor = AutoImageProcessor.from_pretrained(str(teacher_path), backend="pil")
    model = AutoModelForImageClassification.from_pretrained(str(teacher_path)).eval()
    rows = datasets.load_from_disk(str(dataset_path))[split]
    outputs = []
    with torch.no_grad():
        for start in range(0, len(rows), 5):
            images = [image.convert("RGB") for image in rows[start : start + 5]["image"]]
            outputs.append(model(**processor(images, return_tensors="pt")).logits)
    return torch.cat(outputs).numpy(), model.config.id2label


def test_cached_logits_equal_a_plain_teacher_loop(tiny_cache, tiny_dataset, tiny_teacher):
    for split in ("train", "validation", "test"):
        expected, _ = reference_logits(tiny_dataset, tiny_teacher, split)
        got = cached_logits(tiny_cache, split)
        assert got.dtype == np.float32 and got.shape == expected.shape
        assert np.abs(got - expected).max() <= 1e-5


def test_cache_columns_rows_and_manifest(tiny_cache, tiny_dataset):
    cache, manifest = load_cache(tiny_cache)
    source = datasets.load_from_disk(str(tiny_dataset))
    for split in source:
        assert cache[split]["labels"][:] == source[split]["labels"][:]
        assert cache[split]["row_index"][:] == list(range(len(source[split])))
        assert cache[split].features[PIXELS].dtype == "uint8"
        assert manifest["dataset"]["splits"][split]["num_rows"] == len(source[split])
    assert manifest["format_version"] == manifest_module.FORMAT_VERSION == 5
    assert manifest["label_names"] == LABELS
    assert manifest["teacher_to_dataset"] == [0, 1, 2]
    assert len(manifest["teacher"]["weights_sha256"]) == 64
    assert manifest["image_processor"]["size"] == {"height": 32, "width": 32}
    assert (tiny_cache / "preprocessor_config.json").exists()
    text = describe(tiny_cache)
    assert manifest["fingerprint"] in text and "validation" in text
    size = re.search(r"size on disk +([\d.]+) KB, ([\d.]+) KB per image \(48 images\)", text)
    assert size and float(size[2]) == pytest.approx(float(size[1]) / 48, abs=0.1), text


def test_stored_pixels_reproduce_the_processor_exactly(tiny_cache, tiny_dataset, tiny_teacher):
    from kdcache.data import ImagePipeline

    processor = AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil")
    rows = datasets.load_from_disk(str(tiny_dataset))["validation"]
    expected = processor([image.convert("RGB") for image in rows["image"]], return_tensors="pt")["pixel_values"]
    stored = datasets.load_from_disk(str(tiny_cache))["validation"].with_format("torch")[:][PIXELS]
    assert torch.equal(ImagePipeline(processor).normalize(stored), expected)


def test_permuted_teacher_labels_give_permuted_logits(tmp_path, tiny_dataset, tiny_teacher):
    # Same weights, but the config names the outputs in another order: output i now means permuted[i].
    permuted = {0: LABELS[2], 1: LABELS[0], 2: LABELS[1]}
    teacher = save_vit_teacher(tmp_path / "permuted", id2label=permuted)
    out = teacher_logits(
        str(tiny_dataset), str(teacher), output=tmp_path / "cache", splits=["validation"], progress=False
    )
    raw, _ = reference_logits(tiny_dataset, teacher, "validation")
    got = cached_logits(out, "validation")
    # dataset label j (LABELS[j]) is the teacher output whose name is LABELS[j]
    assert np.abs(got - raw[:, [1, 2, 0]]).max() <= 1e-5
    assert json.loads((out / MANIFEST).read_text())["teacher_to_dataset"] == [1, 2, 0]


def test_teacher_with_another_head_is_refused(tmp_path, tiny_dataset):
    imagenet_like = save_vit_teacher(tmp_path / "t4", id2label={0: "cat", 1: "dog", 2: "car", 3: "tree"})
    with pytest.raises(KdcacheError, match="4 output classes but the dataset has 3.*fine-tune the teacher"):
        teacher_logits(str(tiny_dataset), str(imagenet_like), output=tmp_path / "c4", progress=False)
    other_names = save_vit_teacher(tmp_path / "t3", id2label={0: "cat", 1: "dog", 2: "healthy"})
    with pytest.raises(KdcacheError, match="do not match the dataset's.*no match for angular_leaf_spot, bean_rust"):
        teacher_logits(str(tiny_dataset), str(other_names), output=tmp_path / "c3", progress=False)
    assert not (tmp_path / "c4").exists() and not (tmp_path / "c3").exists()


def test_generic_label_names_need_an_explicit_by_index(tmp_path, tiny_dataset):
    generic = save_vit_teacher(tmp_path / "generic", id2label={i: f"LABEL_{i}" for i in range(3)})
    with pytest.raises(KdcacheError, match="--match-labels-by-index"):
        teacher_logits(str(tiny_dataset), str(generic), output=tmp_path / "c", progress=False)
    out = teacher_logits(
        str(tiny_dataset),
        str(generic),
        output=tmp_path / "c",
        splits=["test"],
        match_labels_by_index=True,
        progress=False,
    )
    raw, _ = reference_logits(tiny_dataset, generic, "test")
    assert np.abs(cached_logits(out, "test") - raw).max() <= 1e-5


def test_the_storage_format_is_not_part_of_the_fingerprint(tmp_path, tiny_cache, monkeypatch, capsys, make_cache):
    # a new file layout (format 4 was one) must not make every cache of the same inputs look out of date
    monkeypatch.setattr(manifest_module, "FORMAT_VERSION", 6)
    monkeypatch.setattr(manifest_module, "SUPPORTED_FORMAT_VERSIONS", (1, 2, 3, 4, 5, 6))
    later = make_cache(tmp_path / "later")
    later_manifest = json.loads((later / MANIFEST).read_text())
    assert later_manifest["format_version"] == 6
    assert later_manifest["fingerprint"] == json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    # so a rerun keeps a cache of an older format as it is: it loads as it is
    old = old_format_copy(tiny_cache, tmp_path / "old", version=2)
    before = {path.name: path.stat().st_mtime_ns for path in old.rglob("*") if path.is_file()}
    make_cache(old)
    assert "up to date" in capsys.readouterr().out
    assert {path.name: path.stat().st_mtime_ns for path in old.rglob("*") if path.is_file()} == before


def test_rerun_is_a_noop_and_other_inputs_are_refused(tmp_path, tiny_dataset, tiny_teacher, capsys):
    out = teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "c", splits=["test"], progress=False)
    created = json.loads((out / MANIFEST).read_text())["created"]
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=out, splits=["test"], progress=False)
    assert "up to date" in capsys.readouterr().out
    assert json.loads((out / MANIFEST).read_text())["created"] == created

    other = save_vit_teacher(tmp_path / "other", seed=1)
    with pytest.raises(KdcacheError, match="other inputs.*--overwrite"):
        teacher_logits(str(tiny_dataset), str(other), output=out, splits=["test"], progress=False)
    assert json.loads((out / MANIFEST).read_text())["created"] == created, "a refused run must not touch the cache"
    teacher_logits(str(tiny_dataset), str(other), output=out, splits=["test"], overwrite=True, progress=False)
    raw, _ = reference_logits(tiny_dataset, other, "test")
    assert np.abs(cached_logits(out, "test") - raw).max() <= 1e-5


def test_the_chunks_written_during_the_run_become_the_cache_without_a_copy(tmp_path, monkeypatch, make_cache):
    real_write = batches_module._write_chunk
    written = {}  # split/file -> (inode, size) of each chunk file as the run wrote it

    def write_and_note(path, *args):
        real_write(path, *args)
        written[f"{path.parent.name}/{path.name}"] = (path.stat().st_ino, path.stat().st_size)

    monkeypatch.setattr(batches_module, "_write_chunk", write_and_note)
    output = make_cache(tmp_path / "cache", batch_size=4, chunk_size=8)
    arrow_files = {f"{path.parent.name}/{path.name}": path for path in output.glob("*/*.arrow")}
    assert len(written) == 3 + 2 + 2 and set(arrow_files) == set(written)
    for name, path in arrow_files.items():
        assert (path.stat().st_ino, path.stat().st_size) == written[name], f"{name} was copied, not moved"
    cache, manifest = load_cache(output)
    for split in ("train", "validation", "test"):  # datasets maps the chunk files themselves
        assert [file["filename"] for file in cache[split].cache_files] == [
            str(output / split / chunk["file"]) for chunk in manifest.split(split)["chunks"]
        ]
        assert sum(chunk["rows"] for chunk in manifest.split(split)["chunks"]) == len(cache[split])
    assert sorted(path.name for path in output.iterdir()) == [
        "dataset_dict.json",
        MANIFEST,
        "kdcache_config.yaml",
        "preprocessor_config.json",
        "test",
        "train",
        "validation",
    ]


def test_an_empty_split_saved_with_save_to_disk_is_named(tmp_path, tiny_teacher):
    source = make_dataset_dict({"train": 6, "validation": 3, "test": 3})
    source["test"] = source["test"].select([])
    source.save_to_disk(str(tmp_path / "with-empty-test"))
    with pytest.raises(KdcacheError) as refused:
        teacher_logits(str(tmp_path / "with-empty-test"), str(tiny_teacher), output=tmp_path / "o", progress=False)
    assert str(refused.value) == (
        f"split 'test' of dataset '{tmp_path / 'with-empty-test'}' is empty; leave it out with --splits"
    )
    out = teacher_logits(
        str(tmp_path / "with-empty-test"),
        str(tiny_teacher),
        output=tmp_path / "o",
        splits=["train", "validation"],
        progress=False,
    )
    assert json.loads((out / MANIFEST).read_text())["dataset"]["splits"]["validation"]["num_rows"] == 3


def test_fsspecs_local_file_urls_are_written_and_remote_urls_refused(tmp_path, tiny_dataset, tiny_teacher):
    cache = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=f"file://{tmp_path}/by-url", splits=["test"], progress=False
    )
    assert cache == tmp_path / "by-url" and load_cache(cache)[1].splits["test"]["num_rows"] == 12
    with pytest.raises(KdcacheError, match="--output 'memory://cache' is a memory:// URL"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output="memory://cache", progress=False)
    assert not any(path.name.startswith("memory") for path in tmp_path.iterdir())
