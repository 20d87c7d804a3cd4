import errno
import json
import re
import shutil

import datasets
import numpy as np
import pytest
import torch
from helpers import LABELS, make_dataset_dict, old_format_copy, save_vit_teacher
from transformers import AutoImageProcessor, AutoModelForImageClassification

from kdcache import KdcacheError
from kdcache.format import manifest as manifest_module
from kdcache.format.manifest import LOGITS, MANIFEST, PIXELS
from kdcache.format.reader import describe, load_cache
from kdcache.teacher import batches as batches_module
from kdcache.teacher import run as run_module
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


def cached_logits(path, split):
    return datasets.load_from_disk(str(path))[split].with_format("numpy")[:][LOGITS]


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


def test_resume_after_a_crash_equals_an_uninterrupted_run(tmp_path, tiny_dataset, tiny_teacher, monkeypatch):
    whole = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "whole", batch_size=4, chunk_size=8, progress=False
    )
    real_write = batches_module._write_chunk
    written = []

    def crash_after_two_chunks(path, columns, names):
        if len(written) == 2:
            raise KeyboardInterrupt  # as if the user pressed Ctrl-C half-way
        written.append(f"{path.parent.name}/{path.name}")
        real_write(path, columns, names)

    monkeypatch.setattr(batches_module, "_write_chunk", crash_after_two_chunks)
    with pytest.raises(KeyboardInterrupt):
        teacher_logits(
            str(tiny_dataset),
            str(tiny_teacher),
            output=tmp_path / "resumed",
            batch_size=4,
            chunk_size=8,
            progress=False,
        )
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
    resumed = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "resumed", batch_size=4, chunk_size=8, progress=False
    )
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
def chunked_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    """An uninterrupted run with CHUNKED, for the interrupted ones to equal chunk file for chunk file."""
    return teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path_factory.mktemp("c") / "c", **CHUNKED)


def assert_same_chunks(path, reference):
    """The same chunk files (their sizes and checksums in the manifest, which load_cache checks), so the same rows."""
    a, b = (json.loads((folder / MANIFEST).read_text()) for folder in (path, reference))
    assert a["fingerprint"] == b["fingerprint"] and a["dataset"]["splits"] == b["dataset"]["splits"]
    load_cache(path)


def test_a_chunk_damaged_between_a_kill_and_the_resume_is_computed_again(
    tmp_path, tiny_dataset, tiny_teacher, chunked_cache, monkeypatch, capsys
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
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **CHUNKED)
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
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **CHUNKED)
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
    tmp_path, tiny_dataset, tiny_teacher, chunked_cache, monkeypatch
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
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **CHUNKED)
    assert recomputed == ["train/chunk-000001.arrow"]
    assert_same_chunks(output, chunked_cache)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["cache"]


def test_an_up_to_date_cache_that_fails_its_check_is_made_again(
    tmp_path, tiny_dataset, tiny_teacher, chunked_cache, capsys
):
    output = tmp_path / "cache"
    shutil.copytree(chunked_cache, output)
    flip_bit(output / "validation" / "chunk-000001.arrow", 200)
    capsys.readouterr()
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **CHUNKED)
    assert capsys.readouterr().out.splitlines()[0] == (
        f"cache '{output}' file 'validation/chunk-000001.arrow' does not match its checksum; it is made again (its "
        "inputs have not changed)"
    )
    assert_same_chunks(output, chunked_cache)
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, **CHUNKED)
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


def test_the_storage_format_is_not_part_of_the_fingerprint(
    tmp_path, tiny_cache, tiny_dataset, tiny_teacher, monkeypatch, capsys
):
    # a new file layout (format 4 was one) must not make every cache of the same inputs look out of date
    monkeypatch.setattr(manifest_module, "FORMAT_VERSION", 6)
    monkeypatch.setattr(manifest_module, "SUPPORTED_FORMAT_VERSIONS", (1, 2, 3, 4, 5, 6))
    later = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "later", batch_size=8, progress=False
    )
    later_manifest = json.loads((later / MANIFEST).read_text())
    assert later_manifest["format_version"] == 6
    assert later_manifest["fingerprint"] == json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    # so a rerun keeps a cache of an older format as it is: it loads as it is
    old = old_format_copy(tiny_cache, tmp_path / "old", version=2)
    before = {path.name: path.stat().st_mtime_ns for path in old.rglob("*") if path.is_file()}
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=old, batch_size=8, progress=False)
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


def test_the_chunks_written_during_the_run_become_the_cache_without_a_copy(
    tmp_path, tiny_dataset, tiny_teacher, monkeypatch
):
    real_write = batches_module._write_chunk
    written = {}  # split/file -> (inode, size) of each chunk file as the run wrote it

    def write_and_note(path, *args):
        real_write(path, *args)
        written[f"{path.parent.name}/{path.name}"] = (path.stat().st_ino, path.stat().st_size)

    monkeypatch.setattr(batches_module, "_write_chunk", write_and_note)
    output = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "cache", batch_size=4, chunk_size=8, progress=False
    )
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
        "preprocessor_config.json",
        "test",
        "train",
        "validation",
    ]


def flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


def test_a_flipped_bit_in_any_chunk_is_refused_in_one_line_before_training(tmp_path, tiny_dataset, tiny_teacher):
    from kdcache.student.train import train_student

    good = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=tmp_path / "good", batch_size=8, chunk_size=8, progress=False
    )
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


def test_older_formats_verify_their_logits_checksum_in_blocks(tmp_path, view_cache):
    from kdcache.format.manifest import logits_sha256

    old = old_format_copy(view_cache, tmp_path / "v3", version=3)
    cache, manifest = load_cache(old)
    assert manifest["format_version"] == 3
    for split in cache:  # blocks of one row, of a few rows, and one block: the checksum of the whole column
        for block_bytes in (1, 100, 1000, 2**30):
            assert logits_sha256(cache[split], block_bytes=block_bytes) == manifest.split(split)["logits_sha256"]
    raw = json.loads((old / MANIFEST).read_text())
    raw["dataset"]["splits"]["validation"]["logits_sha256"] = "0" * 64
    (old / MANIFEST).write_text(json.dumps(raw))
    with pytest.raises(KdcacheError, match="split 'validation': teacher logits do not match their checksum"):
        load_cache(old)


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


@pytest.fixture(scope="module")
def view_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    output = tmp_path_factory.mktemp("views") / "cache"
    return teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=output, views=3, batch_size=8, chunk_size=8, progress=False
    )


def test_view_replay_is_exact(view_cache, tiny_teacher):
    """Rebuilding a cached view from the image and its stored parameters, and running the teacher on it, gives
    the stored logits."""
    from kdcache.data import ImagePipeline, ViewRecipe, from_raw_source

    cache, manifest = load_cache(view_cache)
    train = cache["train"]
    assert (
        manifest["format_version"] == manifest_module.FORMAT_VERSION
        and manifest["dataset"]["splits"]["train"]["views"] == 3
    )
    assert train.features["teacher_logits"].shape == (3, 3) and train.features["views"].shape == (3, 5)
    assert PIXELS in cache["validation"].column_names and "views" not in cache["validation"].column_names
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    processor = AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil")
    model = AutoModelForImageClassification.from_pretrained(str(tiny_teacher)).eval()
    pipeline = ImagePipeline(processor)
    distinct = 0
    for row in (0, 5, 11, 23):
        image = from_raw_source(train[row]["source"], train[row]["source_shape"])
        views = np.asarray(train[row]["views"])
        rendered = [recipe.render(image, view) for view in views]
        distinct += len({r.tobytes() for r in rendered})
        with torch.no_grad():
            logits = model(pixel_values=pipeline.normalize(torch.from_numpy(np.stack(rendered)))).logits.numpy()
        assert np.abs(logits - np.asarray(train[row]["teacher_logits"])).max() <= 1e-5
    assert distinct == 12, "each view of each row is a different crop"


def test_views_do_not_depend_on_chunking_or_batching(tmp_path, view_cache, tiny_dataset, tiny_teacher):
    other = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "other",
        views=3,
        batch_size=5,
        chunk_size=16,
        splits=["train"],
        progress=False,
    )
    a = datasets.load_from_disk(str(view_cache))["train"].with_format("numpy")[:]
    b = datasets.load_from_disk(str(other))["train"].with_format("numpy")[:]
    assert np.array_equal(a["views"], b["views"])
    assert np.abs(a["teacher_logits"] - b["teacher_logits"]).max() <= 1e-5


def test_caches_of_format_version_1_still_load(tmp_path, tiny_cache):
    old = old_format_copy(tiny_cache, tmp_path / "v1", version=1)
    assert (old / "train" / "data-00000-of-00001.arrow").exists() and not (
        old / "train" / "chunk-000000.arrow"
    ).exists()
    cache, loaded = load_cache(old)
    assert loaded["format_version"] == 1 and len(cache["train"]) == 24
    from kdcache.student.train import train_student

    train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)


@pytest.fixture(scope="module")
def mixed_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    output = tmp_path_factory.mktemp("mixed") / "cache"
    return teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=output,
        views=3,
        mix_alpha=1.0,
        batch_size=8,
        chunk_size=8,
        progress=False,
    )


def rebuild_mixed_views(train, recipe, row):
    """A row's mixed views, rebuilt from the stored sources and parameters alone: uint8 views, partners' views, weights."""
    from kdcache.data import from_raw_source

    def source(index):
        return from_raw_source(train[index]["source"], train[index]["source_shape"])

    record = train[row]
    own = np.stack([recipe.render(source(row), view) for view in record["views"]])
    partners = np.stack(
        [recipe.render(source(int(b)), view) for b, view in zip(record["mix_partners"], record["mix_views"])]
    )
    return torch.from_numpy(own), torch.from_numpy(partners), torch.tensor(record["mix_weights"])


def test_mixed_view_replay_is_exact(mixed_cache, tiny_teacher):
    """A mixed view rebuilt from the cache (both sources, both boxes, the weight) and run through the teacher gives
    the stored logits."""
    from kdcache.data import ImagePipeline, ViewRecipe

    cache, manifest = load_cache(mixed_cache)
    train = cache["train"]
    assert (
        manifest["format_version"] == manifest_module.FORMAT_VERSION
        and manifest["views"]["recipe"]["mix_alpha"] == 1.0
    )
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    pipeline = ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_teacher), backend="pil"))
    model = AutoModelForImageClassification.from_pretrained(str(tiny_teacher)).eval()
    for row in (0, 7, 13, 23):
        own, partners, weights = rebuild_mixed_views(train, recipe, row)
        assert (weights >= 0.5).all() and (weights < 1).all() and row not in train[row]["mix_partners"]
        with torch.no_grad():
            logits = model(pixel_values=pipeline.mix(own, partners, weights)).logits.numpy()
            unmixed = model(pixel_values=pipeline.normalize(own)).logits.numpy()
        stored = np.asarray(train[row][LOGITS])
        assert np.abs(logits - stored).max() <= 1e-5
        assert np.abs(unmixed - stored).max() > 1e-3, "the teacher saw the mixed image, not the view alone"


def test_mixed_views_depend_on_seed_and_row_alone(tmp_path, mixed_cache, tiny_dataset, tiny_teacher):
    other = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "other",
        views=3,
        mix_alpha=1.0,
        batch_size=5,
        chunk_size=16,
        splits=["train"],
        progress=False,
    )
    a = datasets.load_from_disk(str(mixed_cache))["train"].with_format("numpy")[:]
    b = datasets.load_from_disk(str(other))["train"].with_format("numpy")[:]
    for column in ("views", "mix_partners", "mix_views", "mix_weights", "source_shape"):
        assert np.array_equal(a[column], b[column]), column
    assert np.abs(a[LOGITS] - b[LOGITS]).max() <= 1e-5
    reseeded = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "reseeded",
        views=3,
        mix_alpha=1.0,
        view_seed=1,
        splits=["train"],
        progress=False,
    )
    c = datasets.load_from_disk(str(reseeded))["train"].with_format("numpy")[:]
    assert not np.array_equal(a["mix_partners"], c["mix_partners"])


def test_mixing_needs_views(tmp_path, tiny_dataset, tiny_teacher):
    with pytest.raises(KdcacheError, match="--mix-alpha mixes augmented views"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output=tmp_path / "x", mix_alpha=1.0, progress=False)


def test_view_caches_of_format_version_2_still_load_and_train(tmp_path, view_cache):
    """Format 2 kept each view split's source image as its file (an image column) instead of raw pixels."""
    import io

    from kdcache.data import ViewRecipe, from_raw_source
    from kdcache.student.rows import ViewRows
    from kdcache.student.train import train_student

    def as_png(row):
        buffer = io.BytesIO()
        from_raw_source(row["source"], row["source_shape"]).save(buffer, format="PNG")
        return {"image": {"bytes": buffer.getvalue(), "path": None}}

    cache = datasets.load_from_disk(str(view_cache))
    train = cache["train"].map(
        as_png,
        remove_columns=["source", "source_shape"],
        features=datasets.Features(
            {
                **{k: v for k, v in cache["train"].features.items() if k not in ("source", "source_shape")},
                "image": datasets.Image(),
            }
        ),
    )
    old = old_format_copy(view_cache, tmp_path / "v2", version=2, rows=datasets.DatasetDict({**cache, "train": train}))
    manifest = json.loads((old / MANIFEST).read_text())
    for key in ("source_size", "mix_alpha"):
        manifest["views"]["recipe"].pop(key)
    (old / MANIFEST).write_text(json.dumps(manifest))
    loaded, _ = load_cache(old)
    recipe = ViewRecipe.from_dict(manifest["views"]["recipe"])
    new_rows, old_rows = ViewRows(load_cache(view_cache)[0]["train"], recipe, 0), ViewRows(loaded["train"], recipe, 0)
    for new_item, old_item in zip(new_rows.__getitems__([0, 9]), old_rows.__getitems__([0, 9])):
        assert torch.equal(new_item[PIXELS], old_item[PIXELS])
    train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)


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


# Stage one in another process, stopped after its first chunk (holding the output's lock, with a DataLoader worker
# forked) until the file named by its last argument appears.
PAUSED_RUN = """
import sys, time
from pathlib import Path
from kdcache.teacher import batches as cache
from kdcache.teacher.run import teacher_logits
dataset, teacher, output, go = sys.argv[1:5]
real_write = cache._write_chunk
written = []
def write_then_wait(path, *args):
    real_write(path, *args)
    written.append(path)
    if len(written) == 1:
        print("paused", flush=True)
        while not Path(go).exists():
            time.sleep(0.05)
cache._write_chunk = write_then_wait
teacher_logits(dataset, teacher, output=output, batch_size=8, chunk_size=8, num_workers=1, progress=False)
print("done", flush=True)
"""


def start_paused_run(dataset, teacher, output, go):
    import os
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parents[1]
    # as many torch threads as this process, which made the reference: the logits are then the same bit for bit
    environment = dict(
        os.environ,
        OMP_NUM_THREADS=str(torch.get_num_threads()),
        PYTHONPATH=os.pathsep.join(filter(None, [str(repo), os.environ.get("PYTHONPATH")])),
    )
    run = subprocess.Popen(
        [sys.executable, "-c", PAUSED_RUN, str(dataset), str(teacher), str(output), str(go)],
        env=environment,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    line = run.stdout.readline().strip()
    if line != "paused":
        run.kill()
        raise AssertionError(f"the first run did not start: {line} {run.stderr.read()[-2000:]}")
    return run


def assert_same_cache(path, reference):
    """The same inputs, rows and columns; the chunk files (and so their checksums) differ with the chunk size."""
    a, b = (json.loads((folder / MANIFEST).read_text()) for folder in (path, reference))
    assert a["fingerprint"] == b["fingerprint"]
    for split in a["dataset"]["splits"].values():
        split.pop("chunks")
    for split in b["dataset"]["splits"].values():
        split.pop("chunks")
    assert a["dataset"]["splits"] == b["dataset"]["splits"]  # fingerprints, row counts, views
    (x, _), (y, _) = load_cache(path), load_cache(reference)
    for split in x:
        for column in x[split].column_names:
            assert np.array_equal(x[split].with_format("numpy")[column], y[split].with_format("numpy")[column])


def test_a_second_run_on_the_same_output_is_refused_while_the_first_runs(
    tmp_path, tiny_dataset, tiny_teacher, tiny_cache
):
    from typer.testing import CliRunner

    from kdcache.cli import app

    output = tmp_path / "cache"
    first = start_paused_run(tiny_dataset, tiny_teacher, output, tmp_path / "go")
    try:
        second = CliRunner().invoke(
            app,
            [
                "teacher-logits",
                "--dataset",
                str(tiny_dataset),
                "--teacher",
                str(tiny_teacher),
                "--output",
                str(output),
                "--batch-size",
                "8",
                "--chunk-size",
                "8",
            ],
        )
        assert second.exit_code == 1
        assert second.stderr.count("\n") == 1, second.stderr
        assert second.stderr.startswith(
            f"kdcache: error: --output '{output}' is being written by another kdcache run (pid {first.pid} on "
        )
        assert str(tmp_path / "cache.lock") in second.stderr
        (tmp_path / "go").touch()
        out, err = first.communicate(timeout=300)
    finally:
        first.kill()
    assert first.returncode == 0 and out.strip() == "done" and "Traceback" not in err, err[-2000:]
    assert not (tmp_path / "cache.partial").exists()
    assert_same_cache(output, tiny_cache)


def test_a_run_killed_while_it_holds_the_lock_does_not_block_the_next(
    tmp_path, tiny_dataset, tiny_teacher, tiny_cache, monkeypatch
):
    import os
    import signal

    output = tmp_path / "cache"
    first = start_paused_run(tiny_dataset, tiny_teacher, output, tmp_path / "never")
    os.kill(first.pid, signal.SIGKILL)  # its DataLoader worker outlives it for a few seconds
    first.communicate(timeout=60)
    real_write = batches_module._write_chunk
    recomputed = []
    monkeypatch.setattr(
        batches_module, "_write_chunk", lambda path, *args: (recomputed.append(path.name), real_write(path, *args))
    )
    teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, batch_size=8, chunk_size=8, progress=False)
    assert len(recomputed) == 3 + 2 + 2 - 1, "the killed run's chunk is kept"
    assert_same_cache(output, tiny_cache)


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


def test_a_full_disk_mid_run_is_one_line_and_the_run_resumes(
    tmp_path, tiny_dataset, tiny_teacher, tiny_cache, monkeypatch
):
    output, work = tmp_path / "cache", tmp_path / "cache.partial"
    real_write, real_finish = batches_module._write_chunk, run_module._finish
    written = []

    def disk_fills_after_one_chunk(path, *args):
        if written:  # as the writer fails: half a chunk is on disk
            path.with_name(path.name + ".tmp").write_bytes(b"half a chunk")
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write(path, *args)
        written.append(path)

    def disk_fills_after_finishing(*args):  # the chunks are renamed into the cache, its manifest is not written
        real_finish(*args)
        raise OSError(errno.ENOSPC, "No space left on device")

    options = dict(output=output, batch_size=8, chunk_size=8, progress=False)
    monkeypatch.setattr(batches_module, "_write_chunk", disk_fills_after_one_chunk)
    with pytest.raises(KdcacheError) as full:
        teacher_logits(str(tiny_dataset), str(tiny_teacher), **options)
    message = str(full.value)
    assert "\n" not in message and message.startswith(f"the disk holding '{work}' is full (this run needs about ")
    assert message.endswith("finished work is kept: free some space, then run the same command again to resume")
    assert written[0].is_file() and not list(work.glob("splits/*/*.tmp")) and not output.exists()

    recomputed = []
    monkeypatch.setattr(
        batches_module, "_write_chunk", lambda path, *args: (recomputed.append(path.name), real_write(path, *args))
    )
    monkeypatch.setattr(run_module, "_finish", disk_fills_after_finishing)
    with pytest.raises(KdcacheError, match="is full"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), **options)
    assert len(recomputed) == 3 + 2 + 2 - 1 and not output.exists()
    assert (work / "cache" / "train" / "chunk-000000.arrow").exists() and not (work / "splits").exists()

    monkeypatch.setattr(run_module, "_finish", real_finish)
    teacher_logits(str(tiny_dataset), str(tiny_teacher), **options)
    assert len(recomputed) == 6, "the third run puts the chunks back and finishes again, computing nothing"
    assert_same_cache(output, tiny_cache)


@pytest.mark.parametrize("views,mix_alpha", [(1, 0.0), (3, 0.0), (3, 1.0)])
def test_disk_estimate_is_close_to_the_peak_of_a_run(
    tmp_path, tiny_dataset, tiny_teacher, monkeypatch, views, mix_alpha
):
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
    teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "c",
        views=views,
        mix_alpha=mix_alpha,
        batch_size=8,
        chunk_size=8,
        progress=False,
    )
    assert peaks[0] <= estimates[0] <= 1.3 * peaks[0], (estimates, peaks)


def test_compact_caches_store_the_full_caches_logits_compressed(compact_cache, tiny_cache):
    from kdcache.format.codec import compress_logits, expand_logits
    from kdcache.format.manifest import LOGIT_INDICES, LOGIT_TAIL
    from kdcache.format.reader import rebuilt_logits

    full, full_manifest = load_cache(tiny_cache)
    compact, manifest = load_cache(compact_cache)
    assert manifest["format_version"] == 5 and manifest.top_k == 1 and manifest.logits_dtype == "float16"
    assert full_manifest.top_k is None and full_manifest.logits_dtype == "float32"
    features = compact["train"].features
    assert features[LOGITS].feature.dtype == "float16" and features[LOGITS].length == 1
    assert features[LOGIT_INDICES].feature.dtype == "int16" and features[LOGIT_TAIL].dtype == "float32"
    for split in ("train", "validation", "test"):
        logits = torch.as_tensor(cached_logits(tiny_cache, split))
        expected = compress_logits(logits, top_k=1, dtype=torch.float16)
        stored = compact[split].with_format("numpy")[:]
        assert np.array_equal(stored[LOGITS], expected["values"].numpy())
        assert np.array_equal(stored[LOGIT_INDICES], expected["indices"].numpy())
        assert np.array_equal(stored[LOGIT_TAIL], expected["tail"].numpy())
        assert torch.equal(rebuilt_logits(stored, 3), expand_logits(**expected, classes=3))
        assert np.array_equal(stored["pixel_values"], full[split].with_format("numpy")[:]["pixel_values"])
    # what the logits are stored as is part of what the cache is: another fingerprint, and a rerun is a no-op
    assert manifest.fingerprint != full_manifest.fingerprint
    text = describe(compact_cache)
    assert "float16, the top 1 of 3 classes per view" in text


def test_float16_logits_alone_and_their_own_fingerprint(tmp_path, tiny_dataset, tiny_teacher, tiny_cache, capsys):
    half = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "half",
        batch_size=8,
        logits_dtype="fp16",
        progress=False,
    )
    cache, manifest = load_cache(half)
    assert manifest.logits_dtype == "float16" and manifest.top_k is None
    assert cache["train"].features[LOGITS].feature.dtype == "float16"
    full = cached_logits(tiny_cache, "train")
    assert np.array_equal(cached_logits(half, "train"), full.astype(np.float16))
    assert manifest.fingerprint != json.loads((tiny_cache / MANIFEST).read_text())["fingerprint"]
    teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=half, batch_size=8, logits_dtype="fp16", progress=False
    )
    assert "up to date" in capsys.readouterr().out


def test_compact_view_caches_compress_each_views_logits(tmp_path, view_cache, tiny_dataset, tiny_teacher):
    from kdcache.format.codec import compress_logits
    from kdcache.format.manifest import LOGIT_INDICES, LOGIT_TAIL
    from kdcache.format.reader import rebuilt_logits

    compact = teacher_logits(
        str(tiny_dataset),
        str(tiny_teacher),
        output=tmp_path / "compact",
        views=3,
        batch_size=8,
        chunk_size=8,
        top_k=2,
        logits_dtype="fp16",
        progress=False,
    )
    rows = load_cache(compact)[0]["train"].with_format("numpy")[:]
    assert rows[LOGITS].shape == rows[LOGIT_INDICES].shape == (24, 3, 2) and rows[LOGIT_TAIL].shape == (24, 3)
    expected = compress_logits(torch.as_tensor(cached_logits(view_cache, "train")), top_k=2, dtype=torch.float16)
    assert np.array_equal(rows[LOGITS], expected["values"].numpy())
    assert np.array_equal(rows[LOGIT_INDICES], expected["indices"].numpy())
    assert rebuilt_logits(rows, 3).shape == (24, 3, 3)


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


def test_the_command_line_writes_a_compact_cache(tmp_path, tiny_dataset, tiny_teacher):
    from typer.testing import CliRunner

    from kdcache.cli import app

    output = tmp_path / "cli-compact"
    result = CliRunner().invoke(
        app,
        [
            "teacher-logits",
            "--dataset",
            str(tiny_dataset),
            "--teacher",
            str(tiny_teacher),
            "--output",
            str(output),
            "--top-k",
            "2",
            "--logits-dtype",
            "fp16",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "float16, the top 2 of 3 classes per view" in result.output


def test_fsspecs_local_file_urls_are_written_and_remote_urls_refused(tmp_path, tiny_dataset, tiny_teacher):
    cache = teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=f"file://{tmp_path}/by-url", splits=["test"], progress=False
    )
    assert cache == tmp_path / "by-url" and load_cache(cache)[1].splits["test"]["num_rows"] == 12
    with pytest.raises(KdcacheError, match="--output 'memory://cache' is a memory:// URL"):
        teacher_logits(str(tiny_dataset), str(tiny_teacher), output="memory://cache", progress=False)
    assert not any(path.name.startswith("memory") for path in tmp_path.iterdir())


def test_caches_of_format_version_4_still_load_and_train(tmp_path, tiny_cache):
    from kdcache.student.train import train_student

    old = tmp_path / "v4"
    shutil.copytree(tiny_cache, old)
    manifest = json.loads((old / MANIFEST).read_text())
    manifest["format_version"] = 4  # format 4 wrote float32 logits of every class, and its columns had no top_k
    for key in ("top_k", "indices", "tail", "compact"):
        manifest["columns"]["teacher_logits"].pop(key)
    (old / MANIFEST).write_text(json.dumps(manifest))
    cache, loaded = load_cache(old)
    assert loaded["format_version"] == 4 and loaded.top_k is None and loaded.logits_dtype == "float32"
    assert np.array_equal(cache["train"].with_format("numpy")[:][LOGITS], cached_logits(tiny_cache, "train"))
    assert "float32, computed in fp32" in describe(old)
    summary = train_student(old, output=tmp_path / "student", max_steps=2, batch_size=8, progress=False)
    assert np.isfinite(summary["train_losses"]).all()
