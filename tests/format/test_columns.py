"""The cache's columns, declared once (kdcache.format.columns): a new column is its declaration, its writer and its
consumer; the declarations give the format-5 schema and manifest; the docs list every column."""

import re
from pathlib import Path

import datasets
import numpy as np
import torch

from kdcache.format import columns
from kdcache.format.columns import LOGITS, Column, Layout, per_view, split_features
from kdcache.format.manifest import Manifest
from kdcache.format.reader import describe, load_cache

TOP1 = "teacher_top1"

# The throwaway column: the teacher's top-1 class on each view, declared as a real column would be.
TEACHER_TOP1 = Column(
    TOP1,
    "the teacher's top-1 class on each view",
    columns.every_split,
    lambda layout: per_view(layout, "int16"),
    teacher_output=True,
    manifest_entry=lambda layout: {"name": TOP1, "dtype": "int16", "classes": len(layout.label_names)},
    info=lambda manifest: ("teacher top-1", f"int16 of {manifest['columns'][TOP1]['classes']} classes"),
    recipe=lambda options: {TOP1: "argmax of the logits"},  # every new cache has it: caches before it are stale
    upgrade=lambda described: described.setdefault(TOP1, None),  # older caches: no such column
)


def write_top1(monkeypatch):
    """Its writer: each batch gets the column's values under its name, before stage one writes the chunk."""
    from kdcache.teacher import batches as batches_module

    real_write = batches_module._write_chunk

    def write_chunk(path, batches, job):
        for batch in batches:
            batch[TOP1] = np.asarray(batch[LOGITS]).argmax(-1).astype(np.int16)
        real_write(path, batches, job)

    monkeypatch.setattr(batches_module, "_write_chunk", write_chunk)


def test_a_throwaway_column_is_declared_written_read_back_and_served_with_its_view(
    tmp_path, monkeypatch, make_cache, view_cache
):
    from kdcache.format.replay import ViewRows
    from kdcache.teacher.verify import verify_teacher_logits

    monkeypatch.setattr(columns, "COLUMNS", (*columns.COLUMNS, TEACHER_TOP1))
    write_top1(monkeypatch)
    path = make_cache(tmp_path / "cache", views=3, chunk_size=8)  # the inputs and options of view_cache

    cached, manifest = load_cache(path)  # verified: files, rows, labels
    before, _ = load_cache(view_cache)
    for split in cached:
        rows = cached[split].with_format("numpy")[:]
        assert np.array_equal(rows[TOP1], rows[LOGITS].argmax(-1))
        assert np.array_equal(rows[LOGITS], before[split].with_format("numpy")[:][LOGITS]), "the rest as it was"
    assert cached["train"].features[TOP1] == datasets.List(datasets.Value("int16"), length=3)  # one per view
    assert cached["test"].features[TOP1] == datasets.Value("int16")
    assert manifest["columns"][TOP1] == {"name": TOP1, "dtype": "int16", "classes": 3}
    assert "  teacher top-1   int16 of 3 classes" in describe(path).splitlines()
    assert manifest.fingerprint != Manifest.read(view_cache).fingerprint, "a rerun would keep a cache without it"

    # its consumers: stage two's rows serve view k's top-1 with view k; verify reads it beside the logits
    rows = ViewRows(cached["train"], manifest.view_recipe, seed=0)
    for row, item in zip([0, 7, 20], rows.__getitems__([0, 7, 20])):
        k = rows.view_index(row)
        assert item[TOP1] == cached["train"][row][TOP1][k] == int(torch.as_tensor(item[LOGITS]).argmax())
    assert verify_teacher_logits(path, sample=6, progress=False)["passed"]

    # a cache made before the column: its manifest upgraded in memory, no line in kdcache info, no such column
    older, older_manifest = load_cache(view_cache)
    assert older_manifest["columns"][TOP1] is None and "teacher top-1" not in describe(view_cache)
    assert TOP1 not in older["train"].column_names
    assert TOP1 not in ViewRows(older["train"], older_manifest.view_recipe, seed=0).__getitems__([0])[0]


def test_the_declarations_give_the_format_5_schema():
    """What stage one has written since format 5: a cache written before reads, and resumes, as it was."""
    names = ["a", "b", "c"]
    assert split_features(Layout(names, (3, 32, 32))) == datasets.Features(
        {
            "row_index": datasets.Value("int64"),
            "labels": datasets.ClassLabel(names=names),
            "teacher_logits": datasets.List(datasets.Value("float32"), length=3),
            "pixel_values": datasets.Array3D(shape=(3, 32, 32), dtype="uint8"),
        }
    )
    mixed_top_k = split_features(Layout(names, (3, 32, 32), "float16", top_k=2, views=4, mixed=True))
    assert list(mixed_top_k) == [
        "row_index",
        "labels",
        "teacher_logits",
        "teacher_logits_indices",
        "teacher_logits_tail",
        "views",
        "source",
        "source_shape",
        "mix_partners",
        "mix_views",
        "mix_weights",
    ]
    assert mixed_top_k == datasets.Features(
        {
            "row_index": datasets.Value("int64"),
            "labels": datasets.ClassLabel(names=names),
            "teacher_logits": datasets.Array2D(shape=(4, 2), dtype="float16"),
            "teacher_logits_indices": datasets.Array2D(shape=(4, 2), dtype="int16"),
            "teacher_logits_tail": datasets.List(datasets.Value("float32"), length=4),
            "views": datasets.Array2D(shape=(4, 5), dtype="int32"),
            "source": datasets.Value("binary"),
            "source_shape": datasets.List(datasets.Value("int32"), length=3),
            "mix_partners": datasets.List(datasets.Value("int32"), length=4),
            "mix_views": datasets.Array2D(shape=(4, 5), dtype="int32"),
            "mix_weights": datasets.List(datasets.Value("float32"), length=4),
        }
    )
    compact = split_features(Layout(names, (3, 32, 32), "float16", top_k=1))
    assert compact["teacher_logits_indices"] == datasets.List(datasets.Value("int16"), length=1)
    assert compact["teacher_logits_tail"] == datasets.Value("float32")


def test_the_declarations_give_the_format_5_manifest_columns(tiny_cache, compact_cache):
    compact_note = (
        "with top_k=K, teacher_logits holds the K largest logits (descending), teacher_logits_indices their classes, "
        "and teacher_logits_tail the log-mean-exp of the other logits, the logit of every other class"
    )
    expected = {
        "labels": "labels",
        "teacher_logits": {
            "name": "teacher_logits",
            "dtype": "float32",
            "length": 3,
            "order": "dataset labels",
            "per_view_shape": "(views, classes) in view splits",
            "top_k": None,
            "indices": "teacher_logits_indices",
            "tail": "teacher_logits_tail",
            "compact": compact_note,
        },
        "pixel_values": {"name": "pixel_values", "dtype": "uint8", "shape": [3, 32, 32], "splits": "without views"},
        "row_index": "row_index",
        "views": {
            "name": "views",
            "dtype": "int32",
            "fields": ["x0", "y0", "x1", "y1", "flip"],
            "splits": "with views",
        },
        "source": {
            "name": "source",
            "dtype": "binary",
            "shape_column": "source_shape",
            "splits": "with views: the source image's raw RGB bytes (height, width, 3), reduced to the recipe's "
            "source_size, to rebuild each view",
        },
        "mix": {
            "partners": "mix_partners",
            "views": "mix_views",
            "weights": "mix_weights",
            "splits": "with mixed views: the partner row, its view, and the weight of the row's own view",
        },
    }
    assert Manifest.read(tiny_cache)["columns"] == expected
    expected["teacher_logits"].update(dtype="float16", top_k=1)
    assert Manifest.read(compact_cache)["columns"] == expected


def test_every_column_has_its_row_in_the_docs():
    """docs/cache-format.md's table: each declared column, with what it holds as declared, and no other."""
    text = (Path(__file__).resolve().parents[2] / "docs" / "cache-format.md").read_text()
    rows = dict(re.findall(r"^\| `(\w+)` \|.*\| ([^|]+) \|$", text, flags=re.MULTILINE))
    assert rows == {column.name: column.holds for column in columns.COLUMNS}
