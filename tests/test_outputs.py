import contextlib
import errno
import os
import signal
import subprocess
import sys
import traceback
from pathlib import Path

import pytest
import typer

from kdcache import KdcacheError, outputs
from kdcache.errors import DataError
from kdcache.outputs import TRAINING_RECORD, OutputLocked, lock_file, output_lock, safe_output
from kdcache.student.train import train_student

REPO = Path(__file__).resolve().parents[1]

# A process that takes an output's lock, forks a child that outlives it (as a DataLoader worker does), says so, and
# waits to be killed.
HOLDER = """
import os, sys, time
from kdcache.outputs import output_lock
held = output_lock(sys.argv[1])
held.__enter__()
forked, ready = os.pipe()
child = os.fork()
if child == 0:  # fork's child handlers (kdcache.outputs' among them) have run once fork returns here
    os.write(ready, b"x")
    time.sleep(120)
    os._exit(0)
os.read(forked, 1)  # under load the child may not have run at all yet: wait until it has
print(os.getpid(), child, flush=True)
time.sleep(120)
"""


def test_a_second_writer_is_refused_with_one_line_naming_the_holder(tmp_path):
    output = tmp_path / "out"
    with output_lock(output) as path:
        assert path == tmp_path / "out.lock" and f"pid {os.getpid()}" in path.read_text()
        with pytest.raises(KdcacheError) as refused:
            with output_lock(output):
                pass
        message = str(refused.value)
        assert "\n" not in message and f"pid {os.getpid()}" in message and str(path) in message
        assert "being written by another kdcache run" in message
    assert not path.exists(), "a released lock leaves no file"
    with output_lock(output) as again:  # free again
        assert again.exists()
    assert sorted(tmp_path.iterdir()) == [], "the lock lives beside the output, not in it, and goes with its holder"


def test_a_lock_file_removed_while_a_contender_waited_on_it_is_not_the_lock(tmp_path, monkeypatch):
    """A contender that opened the lock file just before its holder removed it, and won the flock once the holder let
    go, holds a file that is no longer the lock: it must take the file now at the path instead."""
    output = tmp_path / "out"
    path = outputs.lock_file(output)
    real_open, opened, kept = os.open, [], []

    def open_then_lose_the_race(name, flags, mode=0o777):
        descriptor = real_open(name, flags, mode)
        if not opened:  # the holder removes the file between this open and the flock
            os.unlink(name)
            kept.append(os.dup(descriptor))  # its inode stays in use, so the new file cannot reuse its number
        opened.append(os.fstat(descriptor).st_ino)
        return descriptor

    monkeypatch.setattr(outputs.os, "open", open_then_lose_the_race)
    with output_lock(output) as held:
        assert len(opened) == 2 and opened[0] != opened[1]
        assert held.stat().st_ino == opened[1] and f"pid {os.getpid()}" in held.read_text()
    assert not path.exists()
    os.close(kept[0])


def test_a_lock_held_by_a_killed_process_does_not_block(tmp_path):
    output = tmp_path / "out"
    environment = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(output)], env=environment, stdout=subprocess.PIPE, text=True
    )
    pid, child = (int(value) for value in holder.stdout.readline().split())
    try:
        with pytest.raises(KdcacheError, match=f"pid {pid} on "):
            with output_lock(output):
                pass
        os.kill(pid, signal.SIGKILL)
        holder.wait(timeout=30)
        os.kill(child, 0)  # the child forked while the lock was held is alive: the lock must not stay with it
        assert lock_file(output).exists(), "a killed holder cannot remove its lock file"
        with output_lock(output):
            pass
        assert not lock_file(output).exists(), "the next holder removes it"
    finally:
        for process in (pid, child):
            try:
                os.kill(process, signal.SIGKILL)
            except ProcessLookupError:
                pass
        holder.wait(timeout=30)


def test_the_output_is_locked_for_the_block_and_released_even_on_an_error(tmp_path):
    output = tmp_path / "out"
    for fail in (True, False):
        with contextlib.suppress(KdcacheError), safe_output(output, REPORT):
            with pytest.raises(KdcacheError, match="is being written by another kdcache run"), output_lock(output):
                pass
            if fail:
                raise KdcacheError("a bad input")
        with output_lock(output):  # released on the way out
            pass
    assert sorted(path.name for path in tmp_path.iterdir()) == ["out"], "no lock, no work folder"


def test_a_lock_can_be_waited_for_and_goes_with_its_last_holder(tmp_path):
    """What the sweep's best/ is replaced under: a run waits for another's copy, then takes the lock; a run that
    waited in vain is refused as OutputLocked (which the sweep's final seeds take as "another process does them")."""
    import threading

    output, taken, release = tmp_path / "best", threading.Event(), threading.Event()

    def holder():
        with output_lock(output):
            taken.set()
            release.wait(10)

    thread = threading.Thread(target=holder)
    thread.start()
    taken.wait(10)
    with pytest.raises(OutputLocked, match="is being written by another kdcache run"), output_lock(output, wait=0.3):
        pass
    threading.Timer(0.3, release.set).start()
    with output_lock(output, wait=10):  # taken once the holder lets it go
        assert lock_file(output).exists()
    thread.join()
    assert list(tmp_path.iterdir()) == [], "no lock file left"


def test_a_full_disk_is_one_line_and_only_the_scratch_is_removed(tmp_path, monkeypatch):
    work = tmp_path / "out.partial"
    (work / "done").mkdir(parents=True)
    (work / "done" / "data").write_text("finished")
    (work / "half.tmp").mkdir()
    (work / "half.tmp" / "data").write_text("half")
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 0)

    with pytest.raises(KdcacheError) as full, safe_output(tmp_path / "out", RESUMABLE) as folder:
        folder.on_disk_full(3_500_000, scratch=lambda: [work / "half.tmp", work / "never-written"])
        raise OSError(errno.ENOSPC, "No space left on device")
    message = str(full.value)
    assert (
        "\n" not in message
        and str(work) in message
        and "3.5 MB" in message
        and "run the same command again" in message
    )
    assert (work / "done" / "data").read_text() == "finished" and not (work / "half.tmp").exists()
    with output_lock(tmp_path / "out"):  # released on the way out
        pass


def test_what_counts_as_a_full_disk(tmp_path, monkeypatch):
    assert outputs.is_disk_full(OSError(errno.ENOSPC, "No space left on device"))
    assert outputs.is_disk_full(OSError(errno.EDQUOT, "Disk quota exceeded"))
    try:
        try:
            raise OSError(errno.ENOSPC, "No space left on device")
        except OSError as cause:
            raise RuntimeError("saving the chunk failed") from cause
    except RuntimeError as wrapped:
        assert outputs.is_disk_full(wrapped)
    assert outputs.is_disk_full(Exception("Error while serializing: IoError(Os { code: 28, kind: StorageFull })"))
    assert not outputs.is_disk_full(OSError(errno.EACCES, "Permission denied"))
    assert not outputs.is_disk_full(ValueError("no such column"))
    torch_writer = RuntimeError(
        "[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file data/0"
    )
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 10**12)
    assert not outputs.is_disk_full(torch_writer, tmp_path), "with room to spare it is some other write error"
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 4096)
    assert outputs.is_disk_full(torch_writer, tmp_path)


def test_free_space_check_counts_the_work_already_done(tmp_path, monkeypatch):
    work = tmp_path / "out.partial"
    work.mkdir()
    (work / "chunk").write_bytes(b"x" * 4000)
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 7000)
    outputs.check_free_space(tmp_path / "out", 10_000, "the cache", work)  # 7000 free + 4000 written
    with pytest.raises(KdcacheError) as refused:
        outputs.check_free_space(tmp_path / "out", 10_000, "the cache")
    assert str(refused.value) == (
        f"--output '{tmp_path / 'out'}' needs about 10.0 KB free for the cache, but its file "
        "system has 7.0 KB free; free some space or choose another --output"
    )


def test_training_estimate_counts_the_checkpoints_kept():
    import torch

    model = torch.nn.Linear(100, 10)  # 1010 float32 weights
    weights = 1010 * 4
    assert outputs.training_bytes(model, checkpoints=0) == weights + outputs.SAVED_FOLDER_BYTES
    assert outputs.training_bytes(model, checkpoints=2) == 3 * weights * 3 + weights + outputs.SAVED_FOLDER_BYTES


def test_lock_file_of_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert lock_file(".") == tmp_path.parent / f"{tmp_path.name}.lock"
    assert lock_file("a/b/") == tmp_path / "a" / "b.lock"


REPORT = outputs.OutputKind("a test report", "the test stage", "report.json")
RESUMABLE = outputs.OutputKind("a test cache", "the test stage", "manifest.json", finished="final", resumable=True)


def write_output(output, kind, fail=False):
    with outputs.safe_output(output, kind) as folder:
        assert folder.work == output.with_name(output.name + ".partial") and folder.path == output
        folder.finished.mkdir(parents=True, exist_ok=True)  # a resumable stage makes its own work folder
        (folder.finished / kind.marker).write_text("new")
        (folder.work / "scratch").write_text("work in progress")
        if fail:
            raise KdcacheError("failed half-way")


def test_safe_output_refuses_a_foreign_folder_and_leaves_it_as_it_is(tmp_path):
    precious = tmp_path / "precious"
    precious.mkdir()
    (precious / "notes.txt").write_text("keep me")
    with pytest.raises(KdcacheError) as refused:
        write_output(precious, REPORT)
    assert str(refused.value) == (
        f"--output '{precious}' holds files that the test stage did not write (it is not a test report: it has no "
        "report.json); kdcache replaces only its own outputs: choose a new or empty --output"
    )
    (tmp_path / "a-file").write_text("")
    with pytest.raises(KdcacheError, match="'.*a-file' is a file; a test report is a folder"):
        write_output(tmp_path / "a-file", REPORT)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a-file", "precious"], "no lock, no work folder"
    assert [path.name for path in precious.iterdir()] == ["notes.txt"]


def test_safe_output_moves_the_finished_work_into_place_only_on_success(tmp_path):
    output = tmp_path / "report"
    write_output(output, REPORT)
    assert sorted(path.name for path in output.iterdir()) == ["report.json", "scratch"]
    with pytest.raises(KdcacheError, match="failed half-way"):
        write_output(output, REPORT, fail=True)  # an output of its own kind is replaced, but only by finished work
    assert sorted(path.name for path in tmp_path.iterdir()) == ["report"], "nothing half-written left, no lock"
    (tmp_path / "empty").mkdir()
    write_output(tmp_path / "empty", REPORT)
    assert (tmp_path / "empty" / "report.json").read_text() == "new"

    cache = tmp_path / "cache"
    with pytest.raises(KdcacheError, match="failed half-way"):
        write_output(cache, RESUMABLE, fail=True)
    assert not cache.exists() and (tmp_path / "cache.partial" / "scratch").exists(), "kept for resuming"
    write_output(cache, RESUMABLE)
    assert [path.name for path in cache.iterdir()] == ["manifest.json"] and not (tmp_path / "cache.partial").exists()


def test_safe_output_leaves_the_output_alone_when_the_stage_wrote_nothing(tmp_path):
    output = tmp_path / "cache"
    write_output(output, RESUMABLE)

    with outputs.safe_output(output, RESUMABLE):
        pass  # nothing to do
    assert (output / "manifest.json").read_text() == "new"


def test_a_full_disk_in_a_stage_that_keeps_nothing_does_not_say_work_is_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(outputs, "free_bytes", lambda folder: 0)
    with pytest.raises(KdcacheError) as full, safe_output(tmp_path / "report", REPORT) as folder:
        folder.on_disk_full(2_000_000, then="run the same command again", kept=False)
        raise OSError(errno.ENOSPC, "No space left on device")
    assert str(full.value) == (
        f"the disk holding '{tmp_path / 'report.partial'}' is full (this run needs about 2.0 MB in all; 0 bytes free "
        "now); free some space, then run the same command again"
    )
    assert list(tmp_path.iterdir()) == [], "no work folder, no lock"


def test_a_full_disk_before_the_stage_names_its_needs_is_one_line_and_other_errors_pass_through(tmp_path):
    with pytest.raises(KdcacheError) as full, safe_output(tmp_path / "report", REPORT):
        raise OSError(errno.EDQUOT, "Disk quota exceeded")
    assert str(full.value) == (
        "the disk is full; finished work is kept: free some space, then run the same command again to resume"
    )
    with pytest.raises(PermissionError), safe_output(tmp_path / "report", REPORT):
        raise PermissionError(errno.EACCES, "Permission denied")
    assert list(tmp_path.iterdir()) == []


CHUNKS = outputs.OutputKind(
    "a test cache",
    "the test stage",
    "manifest.json",
    resumable=True,
    holds=lambda work: f"{len(list(work.glob('chunk-*')))} chunks" if any(work.glob("chunk-*")) else None,
    resume="rerun the same command with --resume",
)


@pytest.mark.parametrize(
    "error, chunks, kept",
    [
        (KdcacheError("a bad option"), 0, False),  # nothing the next run could use: nothing left
        (KdcacheError("a bad option"), 2, True),  # refused with work done: kept, and said so
        (RuntimeError("a crash"), 2, True),
        (KeyboardInterrupt(), 2, True),
        (DataError("unreadable image in split 'train', row 3"), 2, False),  # the data must change: never resumed
    ],
)
def test_a_failed_stage_leaves_nothing_or_ends_by_saying_what_it_kept_and_how_to_resume(tmp_path, error, chunks, kept):
    output, work = tmp_path / "cache", tmp_path / "cache.partial"
    with pytest.raises(type(error)) as failed, safe_output(output, CHUNKS) as folder:
        folder.work.mkdir()
        (folder.work / "plan.json").write_text("{}")
        for index in range(chunks):
            (folder.work / f"chunk-{index}").write_text("rows")
        raise error
    notes = getattr(failed.value, "__notes__", [])
    if kept:
        assert notes == [
            f"'{work}' holds resumable work (2 chunks): rerun the same command with --resume to continue it"
        ]
        assert sorted(path.name for path in tmp_path.iterdir()) == ["cache.partial"]
    else:
        assert notes == [] and list(tmp_path.iterdir()) == [], "no work folder, no lock"


def test_an_error_that_speaks_of_the_work_folder_leaves_it_as_it_says(tmp_path):
    work = tmp_path / "cache.partial"
    with pytest.raises(KdcacheError) as refused, safe_output(tmp_path / "cache", CHUNKS):
        work.mkdir()
        raise KdcacheError(f"'{work}' holds an interrupted run; pass --resume to continue it")
    assert not hasattr(refused.value, "__notes__") and work.is_dir()


def test_the_command_line_ends_a_refusal_or_an_interruption_with_what_was_kept(tmp_path):
    from typer.testing import CliRunner

    from kdcache.cli import friendly

    def refused():
        error = KdcacheError("a bad option")
        error.add_note("'x.partial' holds resumable work (2 chunks): rerun the same command to continue it")
        raise error

    def interrupted():
        raise KeyboardInterrupt

    app = typer.Typer()
    app.command("refused")(friendly(refused))
    app.command("interrupted")(friendly(interrupted))
    result = CliRunner().invoke(app, ["refused"])
    assert result.exit_code == 1 and result.output.splitlines() == [
        "kdcache: error: a bad option; 'x.partial' holds resumable work (2 chunks): rerun the same command to "
        "continue it"
    ]
    result = CliRunner().invoke(app, ["interrupted"])
    assert result.exit_code == 130
    assert result.output.splitlines() == ["kdcache: interrupted; run the same command again to resume"]


# The rule at work in the stages that resume: stage one (chunks) and train-student (checkpoints).


def test_stage_one_refused_for_an_unreadable_image_leaves_nothing_and_a_crash_says_what_it_kept(
    tmp_path, tiny_teacher, monkeypatch
):
    import datasets
    from helpers import make_dataset_dict
    from typer.testing import CliRunner

    from kdcache.cli import app
    from kdcache.teacher import batches

    broken = make_dataset_dict().cast_column("image", datasets.Image(decode=False))
    rows = broken["train"].to_dict()
    rows["image"][12] = {"bytes": b"not an image at all", "path": None}  # in chunk 1: chunk 0 is written first
    broken["train"] = datasets.Dataset.from_dict(rows, features=broken["train"].features).cast_column(
        "image", datasets.Image()
    )
    broken.save_to_disk(str(tmp_path / "broken"))
    command = ["teacher-logits", "--teacher", str(tiny_teacher), "--chunk-size", "8", "--batch-size", "8"]
    result = CliRunner().invoke(
        app, command + ["--dataset", str(tmp_path / "broken"), "--output", str(tmp_path / "c")]
    )
    said = [line for line in result.output.splitlines() if line.startswith("kdcache:")]  # not the progress bars
    assert result.exit_code == 1 and said == [result.output.strip().splitlines()[-1]], result.output
    assert said[0].startswith("kdcache: error: unreadable image in split 'train', row 12") and "partial" not in said[0]
    # fixed, the data is another input (another fingerprint): its chunks could never be resumed, so none are kept
    assert sorted(path.name for path in tmp_path.iterdir()) == ["broken"]

    written = []
    real_write = batches._write_chunk

    def crash_after_two_chunks(path, *args):
        if len(written) == 2:
            raise RuntimeError("the machine's memory ran out")
        real_write(path, *args)
        written.append(path)

    monkeypatch.setattr(batches, "_write_chunk", crash_after_two_chunks)
    dataset = tmp_path / "data"
    make_dataset_dict().save_to_disk(str(dataset))
    result = CliRunner().invoke(app, command + ["--dataset", str(dataset), "--output", str(tmp_path / "c")])
    work = tmp_path / "c.partial"
    assert isinstance(result.exception, RuntimeError)
    last = traceback.format_exception(result.exception)[-1].strip()  # what Python prints last under a traceback
    assert last == f"'{work}' holds resumable work (2 finished chunks): rerun the same command to continue it"
    monkeypatch.setattr(batches, "_write_chunk", real_write)
    result = CliRunner().invoke(app, command + ["--dataset", str(dataset), "--output", str(tmp_path / "c")])
    assert result.exit_code == 0 and not work.exists() and (tmp_path / "c" / "kdcache.json").exists()


def test_train_student_interrupted_says_to_resume_only_once_it_has_a_checkpoint(tmp_path, tiny_cache, monkeypatch):
    from helpers import crash_after_first_save
    from typer.testing import CliRunner

    from kdcache.cli import app

    output, work = tmp_path / "s", tmp_path / "s.partial"
    command = ["train-student", str(tiny_cache), "--output", str(output), "--epochs", "2", "--batch-size", "8"]
    with crash_after_first_save(monkeypatch):
        result = CliRunner().invoke(app, command)
    assert result.exit_code == 130 and result.output.strip().splitlines()[-1:] == [
        f"kdcache: interrupted; '{work}' holds resumable work (a checkpoint at step 3): rerun the same command "
        "with --resume to continue it"
    ]
    result = CliRunner().invoke(app, [*command, "--resume"])
    assert result.exit_code == 0 and not work.exists() and (output / TRAINING_RECORD).exists()
    # interrupted before its first checkpoint, a run has nothing to resume: it leaves nothing
    from transformers import TrainerCallback

    class StopAtBegin(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_student(
            tiny_cache, output=tmp_path / "t", epochs=2, batch_size=8, callbacks=[StopAtBegin()], progress=False
        )
    assert not (tmp_path / "t.partial").exists() and not (tmp_path / "t").exists()
