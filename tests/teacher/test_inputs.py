"""Stage one's checks before any work (kdcache.teacher.inputs, CacheOptions): bad inputs and options, outputs it must
not replace, the disk estimate."""

import json
import re

import datasets
import pytest
from helpers import make_dataset_dict

from kdcache import KdcacheError
from kdcache.format.manifest import MANIFEST
from kdcache.teacher import run as run_module
from kdcache.teacher.run import teacher_logits


def test_input_errors_are_one_clear_line(tmp_path, tiny_dataset, tiny_teacher):
    cases = [
        (
            dict(dataset="no-such-org/no-such-dataset"),
            "could not load dataset 'no-such-org/no-such-dataset'.*pass a local path with --dataset",
        ),
        (
            dict(teacher="no-such-org/no-such-model"),
            "could not load the image processor 'no-such-org/no-such-model'.*--teacher",
        ),
        (dict(teacher=str(tmp_path)), "could not load the image processor from the folder"),
        (dict(splits=["nope"]), "split 'nope' is not in dataset"),
        (dict(label_column="nope"), "--label-column 'nope' is not a column"),
        (dict(precision="bf16", device="cpu"), "needs a CUDA device"),
        (dict(batch_size=0), "at least 1"),
    ]
    for overrides, message in cases:
        arguments = dict(dataset=str(tiny_dataset), teacher=str(tiny_teacher), output=tmp_path / "out", progress=False)
        arguments.update(overrides)
        with pytest.raises(KdcacheError, match=message):
            teacher_logits(**arguments)
        assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(batch_size=0), r"^--batch-size 0 must be at least 1$"),
        (dict(chunk_size=0), r"^--chunk-size 0 must be at least 1$"),
        (dict(views=0), r"^--views 0 must be at least 1 \(1: the one clean view of each image\)$"),
        (dict(precision="fp64"), r"^--precision 'fp64' is not one of fp32, bf16, fp16$"),
        (dict(num_workers=-1), r"^--num-workers -1 must be >= 0$"),
        (dict(view_seed=-1), r"^--view-seed -1 must be >= 0$"),
        (dict(views=2, mix_alpha=-0.5), r"^--mix-alpha -0.5 must be >= 0 \(0: no mixing\)$"),
    ],
)
def test_bad_options_are_refused_in_one_line_before_any_work(tmp_path, options, message):
    from kdcache.options import CacheOptions

    with pytest.raises(KdcacheError, match=message):
        CacheOptions(**options).check()
    # the stage checks them first: neither the dataset nor the teacher is looked for, nothing is written
    with pytest.raises(KdcacheError, match=message):
        teacher_logits("no-such/dataset", "no-such/teacher", output=tmp_path / "out", progress=False, **options)
    assert list(tmp_path.iterdir()) == []


def test_options_whole_and_one_by_one(tmp_path, tiny_dataset, tiny_teacher):
    from kdcache.options import CacheOptions

    whole = CacheOptions(splits=["test"], batch_size=0, chunk_size=5)
    with pytest.raises(KdcacheError, match="--batch-size 0"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "c", options=whole, progress=False)
    out = teacher_logits(  # the keywords win
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "c", options=whole, batch_size=4, progress=False
    )
    assert list(json.loads((out / MANIFEST).read_text())["dataset"]["splits"]) == ["test"]
    assert whole.batch_size == 0, "the options given are left as they were"


def test_dataset_problems(tmp_path, tiny_teacher):
    unlabeled = make_dataset_dict({"train": 6}).remove_columns("labels")
    unlabeled.save_to_disk(str(tmp_path / "unlabeled"))
    with pytest.raises(KdcacheError, match="--label-column 'disease' is not a column of the dataset"):
        teacher_logits(
            str(tmp_path / "unlabeled"),
            str(tiny_teacher),
            output=tmp_path / "o1",
            label_column="disease",
            progress=False,
        )
    # without a label column, the images are cached without labels (tests/test_labels.py)

    # datasets cannot reload an empty split written by save_to_disk; parquet files are how one arrives.
    empty = make_dataset_dict({"train": 6, "validation": 3})
    (tmp_path / "empty" / "data").mkdir(parents=True)
    empty["train"].to_parquet(str(tmp_path / "empty" / "data" / "train-00000-of-00001.parquet"))
    empty["validation"].select([]).to_parquet(str(tmp_path / "empty" / "data" / "validation-00000-of-00001.parquet"))
    with pytest.raises(KdcacheError, match="split 'validation' .* is empty"):
        teacher_logits(str(tmp_path / "empty"), str(tiny_teacher), output=tmp_path / "o2", progress=False)

    broken = make_dataset_dict({"train": 6}).cast_column("image", datasets.Image(decode=False))
    rows = broken["train"].to_dict()
    rows["image"][4] = {"bytes": b"not an image at all", "path": None}
    broken["train"] = datasets.Dataset.from_dict(rows, features=broken["train"].features).cast_column(
        "image", datasets.Image()
    )
    broken.save_to_disk(str(tmp_path / "broken"))
    with pytest.raises(KdcacheError, match="unreadable image in split 'train', row 4"):
        teacher_logits(str(tmp_path / "broken"), str(tiny_teacher), output=tmp_path / "o3", progress=False)
    assert not any((tmp_path / name).exists() for name in ("o1", "o2", "o3"))


def test_output_not_writable(tmp_path, tiny_dataset, tiny_teacher):
    # A regular file where a folder should be: unwritable even for root, unlike chmod.
    (tmp_path / "a-file").write_text("")
    with pytest.raises(KdcacheError, match="cannot be created.*choose another --output"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "a-file" / "cache", progress=False)


def test_output_that_is_not_a_cache_is_never_replaced(tmp_path, tiny_dataset, tiny_teacher):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(KdcacheError, match="not a kdcache cache"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=precious, overwrite=True, progress=False)
    assert (precious / "notes.txt").read_text() == "keep me"


def test_mixing_needs_views(tmp_path, tiny_dataset, tiny_teacher):
    with pytest.raises(KdcacheError, match="--mix-alpha mixes augmented views"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "x", mix_alpha=1.0, progress=False)


def test_too_small_a_disk_is_refused_before_the_teacher_runs(tmp_path, tiny_dataset, tiny_teacher, monkeypatch):
    from kdcache import outputs

    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 100_000)
    ran = []
    monkeypatch.setattr(run_module, "run_split", lambda *args: ran.append(args))
    output = tmp_path / "cache"
    with pytest.raises(KdcacheError) as refused:
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, progress=False)
    message = str(refused.value)
    assert "\n" not in message and not ran
    assert re.fullmatch(
        rf"--output '{re.escape(str(output))}' needs about [\d.]+ KB free for the cache, but its file system "
        r"has 100\.0 KB free; free some space or choose another --output",
        message,
    ), message
    assert not output.exists()


@pytest.mark.parametrize("views,mix_alpha", [(1, 0.0), (3, 0.0), (3, 1.0)])
def test_disk_estimate_is_close_to_the_peak_of_a_run(tmp_path, monkeypatch, views, mix_alpha, make_cache):
    from kdcache import outputs

    estimates, peaks = [], []
    real_check, real_finish = run_module.check_free_space, run_module._finish
    monkeypatch.setattr(
        run_module,
        "check_free_space",
        lambda output, needed, *args: (estimates.append(needed), real_check(output, needed, *args)),
    )

    def measured(folder, *args):
        chunks = real_finish(folder, *args)
        peaks.append(outputs.bytes_under(folder.work))  # every chunk, its record, the splits' JSON files
        return chunks

    monkeypatch.setattr(run_module, "_finish", measured)
    make_cache(tmp_path / "c", views=views, mix_alpha=mix_alpha, chunk_size=8)
    assert peaks[0] <= estimates[0] <= 1.3 * peaks[0], (estimates, peaks)


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(top_k=3), "--top-k 3 keeps every one of the 3 classes; give a K below 3"),
        (dict(top_k=0), "--top-k 0 must be at least 1"),
        (dict(logits_dtype="bf16"), "--logits-dtype 'bf16' is not one of fp32, fp16"),
    ],
)
def test_bad_compact_settings_are_refused_before_the_teacher_runs(
    tmp_path, tiny_dataset, tiny_teacher, options, message
):
    with pytest.raises(KdcacheError, match=re.escape(message)):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "c", progress=False, **options)
    assert not (tmp_path / "c").exists() and not (tmp_path / "c.partial").exists()
