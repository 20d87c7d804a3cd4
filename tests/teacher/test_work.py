"""The resumable work folder (kdcache.teacher.work): a run resumed after a crash or a damaged chunk equals an
uninterrupted one."""

import json
import shutil

import numpy as np
import pytest
from helpers import cached_logits, flip_bit

from kdcache import KdcacheError
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import load_cache
from kdcache.teacher import batches as batches_module
from kdcache.teacher import run as run_module
from kdcache.teacher.run import teacher_logits


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, monkeypatch, make_cache):
    whole = make_cache(tmp_path / "whole", batch_size=4, chunk_size=8)
    real_write = batches_module._write_chunk
    written = []

    def crash_after_two_chunks(path, columns, names):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way
        written.append(f"{path.parent.name}/{path.name}")
        real_write(path, columns, names)

    monkeypatch.setattr(batches_module, "_write_chunk", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        make_cache(tmp_path / "resumed", batch_size=4, chunk_size=8)
    assert not (tmp_path / "resumed").exists(), "the final folder must appear only when complete"
    assert (tmp_path / "resumed.partial").exists()

    recomputed = []
    monkeypatch.setattr(
        batches_module,
        "_write_chunk",
        lambda path, columns, names: (
            recomputed.append(f"{path.parent.name}/{path.name}"),
            real_write(path, columns, names),
        ),
    )
    resumed = make_cache(tmp_path / "resumed", batch_size=4, chunk_size=8)
    assert not set(written) & set(recomputed), "finished chunks must not be recomputed"
    assert len(written) + len(recomputed) == 3 + 2 + 2  # train 24 rows, validation 12, test 12, 8 per chunk
    assert not (tmp_path / "resumed.partial").exists()
    a, b = json.loads((whole / MANIFEST).read_text()), json.loads((resumed / MANIFEST).read_text())
    assert a["fingerprint"] == b["fingerprint"]
    assert a["dataset"]["splits"] == b["dataset"]["splits"]  # row counts and logits checksums
    for split in ("train", "validation", "test"):
        assert np.array_equal(cached_logits(whole, split), cached_logits(resumed, split))


CHUNKED = dict(batch_size=4, chunk_size=8, progress=False)  # 7 chunks: train 3, validation 2, test 2


@pytest.fixture(scope="module")
def chunked_cache(make_cache):
    """An uninterrupted run with CHUNKED, for the interrupted ones to equal chunk file for chunk file."""
    return make_cache(**CHUNKED)


def assert_same_chunks(path, reference):
    """The same chunk files (their sizes and checksums in the manifest, which load_cache checks), so the same rows."""
    a, b = (json.loads((folder / MANIFEST).read_text()) for folder in (path, reference))
    assert a["fingerprint"] == b["fingerprint"] and a["dataset"]["splits"] == b["dataset"]["splits"]
    load_cache(path)


def test_a_chunk_damaged_between_a_kill_and_the_resume_is_computed_again(
    tmp_path, chunked_cache, monkeypatch, capsys, make_cache
):
    real_write = batches_module._write_chunk
    written = []

    def crash_after_five_chunks(path, *args):
        if len(written) == 5:
            raise KeyboardInterrupt
        real_write(path, *args)
        written.append(f"{path.parent.name}/{path.name}")

    monkeypatch.setattr(batches_module, "_write_chunk", crash_after_five_chunks)
    output, work = tmp_path / "cache", tmp_path / "cache.partial"
    with pytest.raises(KeyboardInterrupt):
        make_cache(output, **CHUNKED)
    assert len(written) == 5
    # what a crash of the machine, a failing disk or a user can leave: a truncated file, a changed bit, a file gone,
    # a record gone, a record that says another row count
    chunks, records = work / "splits", work / "records"
    truncated = chunks / "train" / "chunk-000000.arrow"
    size = truncated.stat().st_size
    truncated.write_bytes(truncated.read_bytes()[: size // 2])
    flipped = chunks / "train" / "chunk-000001.arrow"
    flip_bit(flipped, flipped.stat().st_size // 2)
    (chunks / "train" / "chunk-000002.arrow").unlink()
    (records / "validation" / "chunk-000000.json").unlink()
    miscounted = records / "validation" / "chunk-000001.json"
    miscounted.write_text(json.dumps({**json.loads(miscounted.read_text()), "rows": 8}))
    capsys.readouterr()

    recomputed = []
    monkeypatch.setattr(
        batches_module,
        "_write_chunk",
        lambda path, *args: (recomputed.append(f"{path.parent.name}/{path.name}"), real_write(path, *args)),
    )
    make_cache(output, **CHUNKED)
    assert recomputed == written + ["test/chunk-000000.arrow", "test/chunk-000001.arrow"]
    said = [line for line in capsys.readouterr().out.splitlines() if line.startswith("chunk ")]
    reasons = [
        f"its file has {size // 2} bytes, its record {size}",
        "its file does not match its checksum",
        "its file is missing",
        "it has no record: its run stopped before writing it, or the record was removed",
        "its record says 8 rows, not 4",
    ]
    chunk_names = ["train/0", "train/1", "train/2", "validation/0", "validation/1"]
    assert said == [
        f"chunk {name} in '{work}' cannot be carried over ({reason}); it is computed again"
        for name, reason in zip(chunk_names, reasons)
    ]
    assert_same_chunks(output, chunked_cache)
    assert not work.exists()


def test_a_cache_that_fails_its_final_check_is_not_moved_into_place(
    tmp_path, tiny_dataset, tiny_teacher, chunked_cache, monkeypatch, make_cache
):
    from typer.testing import CliRunner

    from kdcache.cli import app

    real_write_cache = run_module._write_cache

    def damage_after_writing(folder, *args):  # as if a chunk changed on disk after it was hashed
        real_write_cache(folder, *args)
        flip_bit(folder.finished / "train" / "chunk-000001.arrow", 100)

    monkeypatch.setattr(run_module, "_write_cache", damage_after_writing)
    output, work = tmp_path / "cache", tmp_path / "cache.partial"
    arguments = ["teacher-logits", "--dataset", str(tiny_dataset), "--teacher", str(tiny_teacher)]
    arguments += ["--output", str(output), "--batch-size", "4", "--chunk-size", "8"]
    failed = CliRunner().invoke(app, arguments)
    assert failed.exit_code == 1 and "Traceback" not in failed.stderr
    assert [line for line in failed.stderr.splitlines() if "error" in line] == [
        f"kdcache: error: cache '{work / 'cache'}' file 'train/chunk-000001.arrow' does not match its checksum: the "
        f"cache failed its final check, so '{output}' was not written; run the same command again to compute the "
        "damaged chunks again"
    ]
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.partial"], "no cache, no lock"

    monkeypatch.setattr(run_module, "_write_cache", real_write_cache)
    real_write, recomputed = batches_module._write_chunk, []
    monkeypatch.setattr(
        batches_module,
        "_write_chunk",
        lambda path, *args: (recomputed.append(f"{path.parent.name}/{path.name}"), real_write(path, *args)),
    )
    make_cache(output, **CHUNKED)
    assert recomputed == ["train/chunk-000001.arrow"]
    assert_same_chunks(output, chunked_cache)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


def test_an_up_to_date_cache_that_fails_its_check_is_made_again(tmp_path, chunked_cache, capsys, make_cache):
    output = tmp_path / "cache"
    shutil.copytree(chunked_cache, output)
    flip_bit(output / "validation" / "chunk-000001.arrow", 200)
    capsys.readouterr()
    make_cache(output, **CHUNKED)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"cache '{output}' file 'validation/chunk-000001.arrow' does not match its checksum; it is made again (its "
        "inputs have not changed)"
    )
    assert_same_chunks(output, chunked_cache)
    make_cache(output, **CHUNKED)
    assert "is up to date" in capsys.readouterr().out


def test_a_run_leaves_only_its_cache_and_a_refused_one_nothing(tmp_path, tiny_dataset, tiny_teacher, monkeypatch):
    from kdcache import outputs

    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    output = folder / "cache"

    def run(**options):
        return teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **{**CHUNKED, **options})

    def left():
        return sorted(path.name for path in folder.iterdir())

    with outputs.output_lock(output):  # another run holds the output
        with pytest.raises(KdcacheError, match="being written by another kdcache run"):
            run()
    assert left() == ["notes.txt"]
    with pytest.raises(KdcacheError, match="split 'nope' is not in dataset"):  # refused once it holds the lock
        run(splits=["nope"])
    with pytest.raises(KdcacheError, match="split 'nope'"):  # the folders made for the output go too
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=folder / "new" / "cache", splits=["nope"])
    with monkeypatch.context() as patched:
        patched.setattr(outputs, "free_bytes", lambda folder: 100_000)
        with pytest.raises(KdcacheError, match="needs about"):
            run()
    assert left() == ["notes.txt"]
    run(splits=["test"])
    assert left() == ["cache", "notes.txt"]
    run(splits=["test"])  # up to date
    assert left() == ["cache", "notes.txt"]
    with pytest.raises(KdcacheError, match="made from other inputs"):
        run(splits=["test"], precision="fp32", view_seed=1, views=2, view_splits=["test"])
    assert left() == ["cache", "notes.txt"]
