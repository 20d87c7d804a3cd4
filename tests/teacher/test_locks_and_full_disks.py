"""Stage one against other runs and full disks: one run per output at a time, a killed run's lock, a disk that fills
mid-run."""

import errno
import json

import numpy as np
import pytest
import torch

from kdcache import KdcacheError
from kdcache.format.manifest import MANIFEST
from kdcache.format.reader import load_cache
from kdcache.teacher import batches as batches_module
from kdcache.teacher import run as run_module
from kdcache.teacher.run import teacher_logits

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

    repo = Path(__file__).resolve().parents[2]
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
    tmp_path, tiny_dataset, tiny_teacher, tiny_cache, monkeypatch, make_cache
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
    make_cache(output, chunk_size=8)
    assert len(recomputed) == 3 + 2 + 2 - 1, "the killed run's chunk is kept"
    assert_same_cache(output, tiny_cache)


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
