"""Keeping a stage's output safe on a real machine: never a folder that is not the stage's own replaced, nothing
half-written in the output's place, one writer per output, enough disk before the work starts, and a full disk during
the work reported as one line with the finished work kept for resuming.

A stage writes its output inside `with safe_output(...) as folder`, which refuses a foreign folder, holds the
output's lock (`output_lock`) for the block, moves the finished work into place only when the block succeeds, and
turns a full disk anywhere in the block into one line. Inside, the main process refuses early with
`check_free_space`, and every process tells `folder.on_disk_full` what a full disk would interrupt.
"""

import contextlib
import errno
import json
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import DataError, KdcacheError
from kdcache.runtime import agreed, check_writable_parent, is_main, move_into_place

LOCK_SUFFIX = ".lock"
# What train-student writes into every student folder (its summary and recipe): also how a student folder is told
# from anyone else's, and what the sweep reads of each trial.
TRAINING_RECORD = "kdcache_training.json"
# What datasets writes into each saved folder besides the rows (dataset_info.json, state.json, the Arrow schema and
# footer), each file taking whole disk blocks.
SAVED_FOLDER_BYTES = 16 * 1024
# torch's zip writer reports a full disk without an errno ("PytorchStreamWriter failed writing file ..."): such an
# error counts as a full disk when the file system is left with less than this.
NEARLY_FULL_BYTES = 64 * 1024**2
RESUME = "run the same command again to resume"  # what a full disk's message tells, unless the stage says otherwise


def lock_file(output: str | Path) -> Path:
    """The lock of an output: a file beside it (not inside the folder that is renamed into place), which exists only
    while a run holds it."""
    absolute = Path(os.path.abspath(output))  # abspath: '.' and '..' have a name to put beside
    return absolute.with_name(absolute.name + LOCK_SUFFIX)


# The descriptors of the locks this process holds. A child forked while one is held (a DataLoader worker) closes its
# copies at once: a flock belongs to the open file, so a copy kept by a child would hold the lock after its parent
# was killed. Closing a copy never releases the parent's lock.
_held_locks: set[int] = set()


def _close_held_locks_in_child() -> None:
    for descriptor in _held_locks:
        with contextlib.suppress(OSError):
            os.close(descriptor)
    _held_locks.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_close_held_locks_in_child)


class OutputLocked(KdcacheError):
    """The output's lock is held by another run (output_lock)."""


@contextlib.contextmanager
def output_lock(output: str | Path, flag: str = "--output", wait: float = 0):
    """Hold the lock of `output` for the block, or refuse (at once, or after `wait` seconds of trying), naming the
    run that holds it.

    The lock is the kernel's (flock) on the file OUTPUT.lock beside the output: the kernel releases it when its holder
    ends in any way, so a killed run never leaves a lock that blocks the next one. The holder writes its pid, host and
    start time into the file for the message of a run that finds it taken, and removes the file before it lets the
    lock go, so that a finished or refused run leaves nothing beside the output. A run that opened the file just
    before it was removed and then wins its lock holds a file no longer at that path: it sees that (the path's inode
    is not its file's) and starts over with a new file, so two runs never hold the locks of two different files.
    """
    import fcntl

    path = lock_file(output)
    created = _missing_folders(path.parent)
    check_writable_parent(Path(output), flag)
    deadline = time.monotonic() + wait
    while True:
        try:
            descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as error:
            raise KdcacheError(
                f"{flag} '{output}' cannot be locked ({error.strerror or error}: {path}); choose another {flag}"
            ) from None
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as error:
            os.close(descriptor)
            if error.errno in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                if time.monotonic() < deadline:
                    time.sleep(0.1)
                    continue
                raise OutputLocked(
                    f"{flag} '{output}' is being written by another kdcache run ({_holder(path)}); wait for it to "
                    f"end or choose another {flag} (lock file {path})"
                ) from None
            raise KdcacheError(
                f"{flag} '{output}' cannot be locked ({error.strerror or error}: {path}); choose another {flag}"
            ) from None
        if _same_file(path, descriptor):
            break
        os.close(descriptor)  # the file was removed by the run that held it: lock the one at the path now
    _held_locks.add(descriptor)
    try:
        _write_holder(
            descriptor, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
        )
        yield path
    finally:
        with contextlib.suppress(OSError):
            if _same_file(path, descriptor):  # a user may have removed it, and another run made a new one
                path.unlink()  # while the lock is held: no run can have locked this file and still be using it
        _held_locks.discard(descriptor)
        os.close(descriptor)  # releases the lock
        if not os.path.lexists(output):  # a refused run: the folders made for the output go too, if still empty
            for folder in created:
                try:
                    folder.rmdir()
                except OSError:
                    break


def _missing_folders(folder: Path) -> list[Path]:
    """`folder` and those of its parents that do not exist, deepest first."""
    missing = []
    while not folder.exists() and folder != folder.parent:
        missing.append(folder)
        folder = folder.parent
    return missing


def _same_file(path: Path, descriptor: int) -> bool:
    try:
        named, opened = os.stat(path), os.fstat(descriptor)
    except OSError:
        return False
    return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)


def _write_holder(descriptor: int, text: str) -> None:
    os.ftruncate(descriptor, 0)
    os.pwrite(descriptor, text.encode(), 0)


def _holder(path: Path) -> str:
    try:
        text = path.read_text().strip()
    except OSError:
        text = ""
    return text or "its pid is not recorded"


@dataclass(frozen=True)
class OutputKind:
    """What a stage writes: how its finished output is told from anyone else's folder, and how it is built."""

    name: str  # in messages: "a kdcache cache"
    writer: str  # in messages: "kdcache teacher-logits"
    marker: str  # a file that every output of this kind holds (and no one else's folder is likely to)
    finished: str | None = None  # the folder in OUTPUT.partial that becomes OUTPUT; None: OUTPUT.partial itself
    resumable: bool = False  # a failed run's OUTPUT.partial is kept for the next run to continue
    # With `resumable`: what a failed run's OUTPUT.partial holds that the next run continues ("3 finished chunks"),
    # or None when it holds nothing the next run can use (it is then removed); and how the user continues it.
    holds: Callable[[Path], str | None] | None = None
    resume: str = "rerun the same command"
    # Written in place, marked first: the demo, whose stages record the paths of what they read (a cache names its
    # dataset and teacher), which a rename would leave pointing nowhere. A half-written one is marked as the demo's,
    # so the next run replaces it.
    in_place: bool = False


@dataclass(frozen=True)
class _DiskFull:
    """What a full disk would interrupt (OutputFolder.on_disk_full), for its one-line report."""

    needed: int
    then: str
    scratch: Callable[[], Iterable[Path]] | None
    kept: bool  # False: a stage whose work folder goes with a failure keeps no finished work


@dataclass
class OutputFolder:
    """An output being written: the stage writes in `work`, and `finished` becomes `path` when the stage succeeds."""

    path: Path
    work: Path
    finished: Path
    disk_full: _DiskFull | None = None  # set by on_disk_full, read by safe_output if the disk fills up

    def on_disk_full(
        self,
        needed: int,
        then: str = RESUME,
        scratch: Callable[[], Iterable[Path]] | None = None,
        kept: bool = True,
    ) -> None:
        """Should the disk fill up during the rest of the block: name the work folder and the `needed` bytes, remove
        the paths `scratch()` lists (half-written files; the finished work stays for resuming), and tell the user
        `then`. `kept` False: the stage resumes nothing (its work folder goes with the failure), and the message says
        nothing is kept."""
        self.disk_full = _DiskFull(int(needed), then, scratch, kept)


def check_not_foreign(output: Path, kind: OutputKind, flag: str = "--output") -> None:
    """Refuse an `output` that is a file, or a folder that is neither empty nor an output of `kind`."""
    if output.exists() and not output.is_dir():
        raise KdcacheError(f"{flag} '{output}' is a file; {kind.name} is a folder: choose another {flag}")
    if output.exists() and any(output.iterdir()) and not (output / kind.marker).is_file():
        raise KdcacheError(
            f"{flag} '{output}' holds files that {kind.writer} did not write (it is not {kind.name}: it has no "
            f"{kind.marker}); kdcache replaces only its own outputs: choose a new or empty {flag}"
        )


@contextlib.contextmanager
def safe_output(output: Path, kind: OutputKind, processes=None, flag: str = "--output"):
    """Write a stage's output safely: yields an OutputFolder whose `work` (OUTPUT.partial) the stage writes in.

    First a foreign `output` is refused (`check_not_foreign`), and its lock taken for the block (`output_lock`); a
    kind that does not resume starts from an empty work folder. When the block succeeds, `finished` replaces `output`
    (if the stage wrote it: a stage with nothing to do leaves the output as it is) and the work folder goes; when it
    fails, the output is untouched and the work folder is removed, or kept for the next run to resume and said so
    (`_after_failure`). A full disk in the block (ENOSPC, EDQUOT, or the writers' own words for it) becomes one
    KdcacheError, after removing the half-written files that `folder.on_disk_full` named. Under several `processes`
    the main one alone acts; the others learn of its errors, and wait for its rename.
    """
    work = output if kind.in_place else output.with_name(output.name + ".partial")
    folder = OutputFolder(output, work, work / kind.finished if kind.finished else work)
    main = processes is None or is_main(processes)  # a stage that runs as one process acts in whichever runs it
    # The lock is released last: a full disk is reported (its scratch removed) while the output is still this run's.
    with contextlib.ExitStack() as lock, _full_disk_in_one_line(folder):
        with agreed(processes):
            if main:
                check_not_foreign(output, kind, flag)  # before the lock: a foreign folder is refused as it is
                # the lock also refuses an output whose parent cannot be written
                lock.enter_context(output_lock(output, flag))
                if kind.in_place:
                    _claim_in_place(output, kind, flag)
                elif not kind.resumable:
                    _fresh_folder(work, flag)
        try:
            yield folder
        except BaseException as error:
            if main and not kind.in_place:
                _after_failure(folder, kind, error)
            raise
        with agreed(processes):
            if main and not kind.in_place and folder.finished.is_dir():
                move_into_place(folder.finished, output)
                shutil.rmtree(work, ignore_errors=True)


def _after_failure(folder: OutputFolder, kind: OutputKind, error: BaseException) -> None:
    """What a failed stage leaves of its work folder: nothing, unless the next run can continue it, and then the error
    ends by saying so (a note: the CLI puts it at the end of the error's one line, Python at the end of a traceback).
    An error that names the work folder itself (a full disk, an earlier run to --resume) has said what it keeps; an
    error in the data (DataError) leaves nothing to resume, since the data must change and with it the fingerprint."""
    work = folder.work
    kept = kind.resumable and work.is_dir() and not isinstance(error, DataError)
    if kept and (str(work) in str(error) or is_disk_full(error, work)):
        return
    held = (kind.holds(work) if kind.holds else "the finished work") if kept else None
    if held is None:
        shutil.rmtree(work, ignore_errors=True)
    else:
        error.add_note(f"'{work}' holds resumable work ({held}): {kind.resume} to continue it")


@contextlib.contextmanager
def _full_disk_in_one_line(folder: OutputFolder):
    try:
        yield
    except KdcacheError:
        raise
    except Exception as error:
        if not is_disk_full(error, folder.work if folder.disk_full else None):
            raise
        raise _disk_full_error(folder) from None


def _fresh_folder(folder: Path, flag: str) -> None:
    try:
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir(parents=True)
    except OSError as error:
        raise KdcacheError(f"cannot write under '{folder.parent}' ({error.strerror}); choose another {flag}") from None


def _claim_in_place(output: Path, kind: OutputKind, flag: str) -> None:
    """Empty `output` (new, empty, or an earlier output of `kind`) and mark it as `kind`'s before anything else."""
    if output.exists():
        for entry in output.iterdir():  # the folder itself stays: it may be the working directory, or a link
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()
    try:
        output.mkdir(parents=True, exist_ok=True)
        (output / kind.marker).write_text(f"written by {kind.writer}, which replaces this folder on its next run\n")
    except OSError as error:
        raise KdcacheError(f"{flag} '{output}' cannot be written ({error.strerror}); choose another {flag}") from None


def _disk_full_error(folder: OutputFolder) -> KdcacheError:
    full = folder.disk_full
    if full is None:  # before the stage said what a full disk would interrupt
        return KdcacheError(f"the disk is full; finished work is kept: free some space, then {RESUME}")
    if full.scratch is not None:
        for path in full.scratch():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                with contextlib.suppress(OSError):
                    path.unlink()
    figures = [f"this run needs about {human_bytes(full.needed)} in all"]
    free = free_bytes(folder.work)
    if free is not None:
        figures.append(f"{human_bytes(free)} free now")
    kept = "finished work is kept: " if full.kept else ""
    return KdcacheError(
        f"the disk holding '{folder.work}' is full ({'; '.join(figures)}); {kept}free some space, then {full.then}"
    )


def is_disk_full(error: BaseException, folder: Path | None = None) -> bool:
    """Whether `error`, or an error it came from, says the disk (or the user's quota) is full."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text or "StorageFull" in text:
            return True
        if isinstance(error, RuntimeError) and ("PytorchStreamWriter" in text or "inline_container" in text):
            free = free_bytes(folder) if folder is not None else None
            if free is not None and free < NEARLY_FULL_BYTES:
                return True
        error = error.__cause__ or error.__context__
    return False


def free_bytes(folder: str | Path) -> int | None:
    """Free bytes for this user on the file system of `folder` (or of its nearest existing parent)."""
    path = Path(os.path.abspath(folder))
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        return shutil.disk_usage(path).free
    except OSError:
        return None


def bytes_under(folder: Path) -> int:
    """The disk space the files under `folder` take: their allocated blocks, which is what they cost the free space
    (a small file takes a whole block)."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                status = os.lstat(os.path.join(root, name))
                total += status.st_blocks * 512 if hasattr(status, "st_blocks") else status.st_size
    return total


def check_free_space(output: Path, needed: int, what: str, work: Path | None = None, flag: str = "--output") -> None:
    """Refuse, before the work starts, an output whose file system cannot hold the `needed` bytes. What `work` (the
    partial folder) already holds counts as written: it is finished work resumed, or stale work about to be removed."""
    free = free_bytes(output)
    if free is None:
        return  # a file system that does not say: the disk-full report is the guard
    have = bytes_under(work) if work is not None and work.is_dir() else 0
    if free + have < needed:
        raise KdcacheError(
            f"{flag} '{output}' needs about {human_bytes(needed - have)} free for {what}, but its file system has "
            f"{human_bytes(free)} free; free some space or choose another {flag}"
        )


def human_bytes(count: float) -> str:
    for unit in ("bytes", "KB", "MB", "GB", "TB"):
        if abs(count) < 1000 or unit == "TB":
            return f"{count:.0f} {unit}" if unit == "bytes" else f"{count:.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def write_json(path: Path, content: dict) -> None:
    """Write `content` as indented JSON to `path` through a temporary file: a reader never finds half of it."""
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    partial.replace(path)


def training_bytes(model, checkpoints: int) -> int:
    """The disk a training run needs at its peak: the checkpoints kept (weights, and AdamW's two moments of each
    weight), plus the one written before the oldest is removed, plus the final model."""
    weights = sum(tensor.numel() * tensor.element_size() for tensor in (*model.parameters(), *model.buffers()))
    return (3 * weights * (checkpoints + 1) if checkpoints else 0) + weights + SAVED_FOLDER_BYTES


def unfinished_checkpoints(work: Path) -> list[Path]:
    """Trainer checkpoints that a failure cut short: the Trainer writes trainer_state.json into a checkpoint last."""
    return [
        folder
        for folder in work.glob("checkpoint-*")
        if folder.is_dir() and not (folder / "trainer_state.json").exists()
    ]
