"""Several processes: 2 CPU processes on this machine, over gloo, launched by accelerate as a user would (on CPU
where there is a GPU too: its own two-process test is tests/test_devices.py's, on a host with two).

Stage one with 2 processes gives the same cache as with 1, resumes chunk by chunk after a process stops, and ends
every process with one line on a bad image; stage two trains data-parallel at the same global batch as 1 process.
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from helpers import make_dataset_dict

from kdcache.format.columns import LABELS, LOGITS, PIXELS, ROW, SOURCE, VIEWS
from kdcache.format.manifest import MANIFEST
from kdcache.outputs import TRAINING_RECORD
from kdcache.teacher.run import teacher_logits

REPO = Path(__file__).resolve().parents[1]
# accelerate's torchrun-based launcher (--multi_gpu) also starts CPU processes; its --cpu one starts a single process
LAUNCH = [
    sys.executable,
    "-m",
    "accelerate.commands.launch",
    "--multi_gpu",
    "--num_processes",
    "2",
    "--num_machines",
    "1",
    "--mixed_precision",
    "no",
    "--dynamo_backend",
    "no",
    "--main_process_port",
    "0",
]
STAGE_ONE = dict(batch_size=4, chunk_size=8)  # 7 chunks: train 3, validation 2, test 2


def gloo_problem():
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        return "this torch has no gloo backend"
    try:
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
    except OSError as error:
        return f"no local TCP port for a process group ({error})"
    return None


pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(gloo_problem() is not None, reason=f"cannot start a gloo process group: {gloo_problem()}"),
]


def run(command, **env):
    """A command with this worktree's kdcache, one torch thread per process (2 processes share 2 cores)."""
    environment = dict(
        os.environ,
        OMP_NUM_THREADS="1",
        CUDA_VISIBLE_DEVICES="",  # CPU processes on a GPU host too (2 processes would want a GPU each)
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    environment.update(env)
    return subprocess.run(
        [str(part) for part in command], env=environment, capture_output=True, text=True, timeout=300
    )


def kdcache(*arguments, **env):
    return run([sys.executable, "-m", "kdcache", *arguments], **env)


def assert_same_cache(a: Path, b: Path):
    one, other = (json.loads((path / MANIFEST).read_text()) for path in (a, b))
    assert one["fingerprint"] == other["fingerprint"]
    assert one["dataset"]["splits"] == other["dataset"]["splits"]  # rows, views, logits checksums
    for split in one["dataset"]["splits"]:
        x, y = (datasets.load_from_disk(str(path))[split] for path in (a, b))
        assert x.column_names == y.column_names
        x, y = x.with_format("numpy")[:], y.with_format("numpy")[:]
        assert np.array_equal(x[ROW], np.arange(len(x[ROW]))) and np.array_equal(x[ROW], y[ROW])
        assert np.array_equal(x[LABELS], y[LABELS])
        np.testing.assert_allclose(x[LOGITS], y[LOGITS], rtol=0, atol=1e-5)
        for column in (PIXELS, VIEWS, SOURCE):
            if column in x:
                assert all(np.array_equal(p, q) for p, q in zip(x[column], y[column])), column


def one_process_cache(output, dataset, teacher, **options):
    """The reference, made in this process with one torch thread, as each of the two processes has."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return teacher_logits(
            str(dataset), str(teacher), output=output, progress=False, device="cpu", **STAGE_ONE, **options
        )
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def clean_reference(tmp_path_factory, tiny_dataset, tiny_teacher):
    return one_process_cache(tmp_path_factory.mktemp("one") / "cache", tiny_dataset, tiny_teacher)


@pytest.fixture(scope="module")
def views_reference(tmp_path_factory, tiny_dataset, tiny_teacher):
    return one_process_cache(tmp_path_factory.mktemp("one-views") / "cache", tiny_dataset, tiny_teacher, views=2)


def test_two_processes_make_the_same_cache_as_one(tmp_path, tiny_dataset, tiny_teacher, clean_reference):
    arguments = [
        "teacher-logits",
        "--dataset",
        tiny_dataset,
        "--teacher",
        tiny_teacher,
        "--output",
        tmp_path / "two",
        "--batch-size",
        STAGE_ONE["batch_size"],
        "--chunk-size",
        STAGE_ONE["chunk_size"],
        "--num-processes",
        "2",
    ]
    done = kdcache(*arguments)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("kdcache cache:") == 1, "the summary is printed once, by the main process"
    assert "process 0 of 2]" in done.stderr and "process 1 of 2]" not in done.stderr, "one progress bar: the main's"
    manifest = json.loads((tmp_path / "two" / MANIFEST).read_text())
    assert manifest["processes"] == 2
    assert_same_cache(clean_reference, tmp_path / "two")
    assert not (tmp_path / "two.partial").exists()

    again = kdcache(*arguments)  # every process learns from the main one that there is nothing to do
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("is up to date") == 1
    assert json.loads((tmp_path / "two" / MANIFEST).read_text())["created"] == manifest["created"]


# teacher_logits (2 views per train image) with _write_chunk wrapped: every process logs the chunks it writes,
# and process CRASH_RANK stops as at a Ctrl-C after writing CRASH_AFTER chunks.
CHUNK_LOGGING_STAGE_ONE = (
    """
import os, sys
from kdcache.teacher import batches as cache
from kdcache.teacher.run import teacher_logits
from kdcache.runtime import end_process

written, real_write = [], cache._write_chunk

def write_chunk(path, batches, job):
    if os.environ["RANK"] == os.environ.get("CRASH_RANK") and len(written) == int(os.environ["CRASH_AFTER"]):
        raise KeyboardInterrupt
    real_write(path, batches, job)
    written.append(path)
    with open(os.environ["CHUNK_LOG"], "a") as log:
        log.write(f"{path.parent.name}/{path.name}\\n")

cache._write_chunk = write_chunk
dataset, teacher, output = sys.argv[1:4]
teacher_logits(dataset, teacher, output=output, views=2, progress=False, **%r)
end_process(0)  # as kdcache's command line does under a launch
"""
    % STAGE_ONE
)


def test_a_stopped_process_resumes_by_chunk_and_a_bad_image_ends_all_with_one_line(
    tmp_path, tiny_dataset, tiny_teacher, views_reference
):
    script = tmp_path / "chunk_logging_stage_one.py"
    script.write_text(CHUNK_LOGGING_STAGE_ONE)
    output, work = tmp_path / "resumed", tmp_path / "resumed.partial"
    # Process 1 takes chunks 1, 3, 5 of the 7 (train 1, validation 0, test 0) and stops before its second.
    crashed = run(
        [*LAUNCH, script, tiny_dataset, tiny_teacher, output],
        CRASH_RANK="1",
        CRASH_AFTER="1",
        CHUNK_LOG=tmp_path / "first.log",
    )
    assert crashed.returncode != 0 and "KeyboardInterrupt" in crashed.stderr
    assert not output.exists() and (work / "splits" / "train" / "chunk-000001.arrow").exists()
    assert not (work / "splits" / "validation" / "chunk-000000.arrow").exists()
    before = set((tmp_path / "first.log").read_text().split())

    resumed = run([*LAUNCH, script, tiny_dataset, tiny_teacher, output], CHUNK_LOG=tmp_path / "second.log")
    assert resumed.returncode == 0, resumed.stderr
    after = (tmp_path / "second.log").read_text().split()
    assert not before & set(after), "finished chunks are not recomputed"
    assert len(before) + len(after) == 7 and len(set(after)) == len(after)
    assert_same_cache(views_reference, output)
    assert not work.exists()

    # An unreadable image in process 1's share (train row 12, chunk 1): that process says so and stops, the other
    # is ended by the launcher, and nothing hangs.
    broken = make_dataset_dict().cast_column("image", datasets.Image(decode=False))
    rows = broken["train"].to_dict()
    rows["image"][12] = {"bytes": b"not an image at all", "path": None}
    broken["train"] = datasets.Dataset.from_dict(rows, features=broken["train"].features).cast_column(
        "image", datasets.Image()
    )
    broken.save_to_disk(str(tmp_path / "broken"))
    failed = kdcache(
        "teacher-logits",
        "--dataset",
        tmp_path / "broken",
        "--teacher",
        tiny_teacher,
        "--output",
        tmp_path / "never",
        "--chunk-size",
        "8",
        "--num-processes",
        "2",
    )
    assert failed.returncode == 1
    assert failed.stderr.count("kdcache: error:") == 1, failed.stderr
    assert "unreadable image in split 'train', row 12" in failed.stderr and "Traceback" not in failed.stderr
    assert not (tmp_path / "never").exists()


# train_student under the launcher, each process writing the summaries it returns.
TRAINING = """
import json, os, sys
from kdcache.runtime import end_process
from kdcache.student.train import train_student

cache, views_cache, student, output = sys.argv[1:5]
summary = train_student(cache, output=output, student=student, **%r)
views = train_student(views_cache, output=output + "-views", epochs=2, batch_size=8, logging_steps=1, progress=False)
with open(f"{output}-summary-{os.environ['RANK']}.json", "w") as file:
    json.dump({"summary": summary, "views": views}, file)
end_process(0)
"""
STAGE_TWO = dict(epochs=3, batch_size=8, learning_rate=1e-3, logging_steps=1, progress=False)


def test_two_processes_train_a_student_like_one_at_the_same_global_batch(tmp_path, tiny_cache, views_reference):
    from helpers import COLOURS, LABELS, save_vit_teacher
    from PIL import Image
    from transformers import AutoModelForImageClassification, pipeline

    from kdcache.student.train import train_student

    # A student without BatchNorm (a tiny ViT, no dropout): then a global batch split in two halves, whose gradients
    # DDP averages, is the same computation as the whole batch on one process, and the runs must agree step by step.
    # (With BatchNorm, as in the default MobileNetV2, each process normalises over its own half: close, not equal.)
    student = save_vit_teacher(tmp_path / "student", seed=3)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = train_student(tiny_cache, output=tmp_path / "one", student=str(student), device="cpu", **STAGE_TWO)
    finally:
        torch.set_num_threads(threads)
    script = tmp_path / "training.py"
    script.write_text(TRAINING % STAGE_TWO)
    done = run([*LAUNCH, script, tiny_cache, views_reference, student, tmp_path / "two"])
    assert done.returncode == 0, done.stderr
    results = [json.loads((tmp_path / f"two-summary-{rank}.json").read_text()) for rank in (0, 1)]
    two = results[0]["summary"]
    for result in results[1:]:  # every process returns the same summary, but for its own wall time
        assert {**result["summary"], "seconds": 0} == {**two, "seconds": 0}

    assert two["recipe"]["processes"] == 2 and two["recipe"]["batch_size"] == 8
    assert two["steps"] == one["steps"] == 9, "the same global batch: 24 rows, 3 steps per epoch"
    np.testing.assert_allclose(two["train_losses"], one["train_losses"], rtol=1e-4)
    # The validation accuracy is gathered from both processes' halves of the split: the same as on one process.
    assert [e["eval_accuracy"] for e in two["history"]] == [e["eval_accuracy"] for e in one["history"]]
    assert two["best_eval_accuracy"] == one["best_eval_accuracy"]

    out = tmp_path / "two"
    a, b = (
        AutoModelForImageClassification.from_pretrained(str(path)).state_dict() for path in (tmp_path / "one", out)
    )
    assert all(torch.allclose(a[name], b[name], atol=1e-4) for name in a)
    predictions = pipeline("image-classification", model=str(out))(Image.new("RGB", (40, 36), COLOURS[0]))
    assert {p["label"] for p in predictions} == set(LABELS)
    assert "batch 8 (2 processes of 4)" in (out / "README.md").read_text()
    assert json.loads((out / TRAINING_RECORD).read_text())["recipe"]["processes"] == 2
    assert sorted(path.name for path in tmp_path.iterdir() if path.is_dir()) == [
        "one",
        "student",
        "two",
        "two-views",
    ], "one output folder per run, no work folder left"

    # The default student (MobileNetV2) on a cache with 2 views per image: each process replays its rows' views
    views = results[0]["views"]
    assert views["recipe"]["views"] == 2 and views["steps"] == 6 and np.isfinite(views["train_losses"]).all()


def test_two_processes_share_the_checksums_and_both_refuse_a_damaged_cache(tmp_path, clean_reference):
    import shutil

    damaged = tmp_path / "damaged"
    shutil.copytree(clean_reference, damaged)
    chunk = damaged / "train" / "chunk-000001.arrow"  # the second chunk file: process 1's share of the hashing
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 1
    chunk.write_bytes(bytes(data))
    done = run([*LAUNCH, "-m", "kdcache", "train-student", damaged, "--output", tmp_path / "student", "--epochs", "1"])
    message = f"cache '{damaged}' file 'train/chunk-000001.arrow' does not match its checksum"
    assert done.returncode != 0
    assert (done.stdout + done.stderr).count(message) == 1, done.stdout + done.stderr  # printed once, by the main one
    assert not (tmp_path / "student").exists() and not (tmp_path / "student.partial").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_more_processes_than_gpus_end_in_one_line_and_leave_nothing(tmp_path, tiny_dataset, tiny_teacher):
    """`accelerate launch` (not kdcache's --num-processes, which refuses before launching) with one process more than
    the machine has GPUs: every process stops before its first collective, the first one saying why."""
    gpus = torch.cuda.device_count()
    launch = list(LAUNCH)
    launch[launch.index("--num_processes") + 1] = str(gpus + 1)
    command = ["-m", "kdcache", "teacher-logits", "--dataset", tiny_dataset, "--teacher", tiny_teacher]
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", ",".join(map(str, range(gpus))))
    done = run([*launch, *command, "--output", tmp_path / "cache"], CUDA_VISIBLE_DEVICES=visible)
    assert done.returncode != 0
    said = f"the launcher started {gpus + 1} processes on this machine, which has {gpus} GPU"
    assert done.stderr.count(said) == 1, done.stderr
    assert "invalid usage" not in done.stderr, done.stderr  # NCCL's own failure, which this line replaces
    assert not (tmp_path / "cache").exists() and not (tmp_path / "cache.partial").exists()
