"""Stage one's resumable work folder, CACHE.partial/: chunk files hashed as they are written, their records, the plan,
and what a resumed run carries over (each chunk hashed again first)."""

import contextlib
import hashlib
import json
import logging
import os
import shutil
from pathlib import Path

from kdcache.errors import first_line
from kdcache.format.manifest import MANIFEST
from kdcache.outputs import (
    OutputKind,
)

log = logging.getLogger("kdcache")


def finished_chunks(work: Path) -> str | None:
    """What a failed run leaves for the next to carry over (carried_over checks each first): its chunks' records."""
    count = len(list((work / RECORDS).glob("*/*.json")))
    return f"{count} finished chunk{'s' if count != 1 else ''}" if count else None


# The chunks are written in CACHE.partial/splits, which becomes CACHE.partial/cache when all are written (and then
# CACHE, by safe_output); their checksums wait in CACHE.partial/records.
CACHE_OUTPUT = OutputKind(
    "a kdcache cache",
    "kdcache teacher-logits",
    MANIFEST,
    finished="cache",
    resumable=True,
    holds=finished_chunks,
)


def carried_over(work: Path, split: str, index: int, rows: int) -> bool:
    """Whether chunk `index` of `split`, written by an earlier run, is kept: its record says `rows` rows, and its file
    has the recorded size and sha256. Any other (its file truncated or changed by a crash of the machine or a failing
    disk, its file or its record gone or unreadable) is removed with its record, said in one line, and computed
    again."""
    chunk = chunk_path(work, split, index)
    record_path = chunk_record_path(chunk)
    if not record_path.exists() and not chunk.exists():
        return False  # not written yet
    damage = None
    try:
        record = json.loads(record_path.read_text()) if record_path.exists() else None
        if record is None:
            damage = "it has no record: its run stopped before writing it, or the record was removed"
        elif not isinstance(record, dict) or record.get("file") != chunk.name:
            damage = "its record names another file"
        elif record.get("rows") != rows:
            damage = f"its record says {record.get('rows')} rows, not {rows}"
        elif not chunk.exists():
            damage = "its file is missing"
        elif chunk.stat().st_size != record.get("bytes"):
            damage = f"its file has {chunk.stat().st_size} bytes, its record {record.get('bytes')}"
        else:
            with open(chunk, "rb") as handle:
                if hashlib.file_digest(handle, "sha256").hexdigest() != record.get("sha256"):
                    damage = "its file does not match its checksum"
    except (OSError, ValueError) as error:
        damage = f"it cannot be read: {first_line(error)}"
    if damage is None:
        return True
    log.warning(f"chunk {split}/{index} in '{work}' cannot be carried over ({damage}); it is computed again")
    for path in (chunk, record_path):
        with contextlib.suppress(OSError):
            path.unlink()
    return False


def undo_unfinished_finish(work: Path) -> None:
    """Put back the chunks of a run stopped while finishing (after _finish renamed them, before safe_output moved
    the cache into place), so that the work folder is again one that resumes."""
    finishing = work / CACHE_OUTPUT.finished
    if not finishing.is_dir():
        return
    if (work / SPLITS).exists():  # not a state _finish leaves: start over rather than guess
        shutil.rmtree(work)
        return
    finishing.rename(work / SPLITS)
    for entry in (work / SPLITS).iterdir():
        if not entry.is_dir():  # dataset_dict.json, the manifest, the processor: written again by _finish
            entry.unlink()


# In the work folder: the chunks of each split, in the layout of the finished cache, and each chunk's record.
SPLITS, RECORDS = "splits", "records"


def chunk_path(work: Path, split: str, index: int) -> Path:
    return work / SPLITS / split / f"chunk-{index:06d}.arrow"


def chunk_record_path(chunk: Path) -> Path:
    """Where the checksum of a chunk waits for the manifest: outside the folder that becomes the cache."""
    return chunk.parents[2] / RECORDS / chunk.parent.name / f"{chunk.stem}.json"


def partial_path(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def is_written(chunk: Path) -> bool:
    """A chunk counts once its record exists, which is written after the chunk file is complete."""
    return chunk_record_path(chunk).exists() and chunk.exists()


class _HashingWriter:
    """A binary file that hashes what is written through it: the chunk's checksum costs no second read."""

    def __init__(self, file, digest):
        self.file, self.digest, self.closed = file, digest, False

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.closed = True  # the file itself is closed by its owner


def write_chunk_file(path: Path, rows) -> dict:
    """Write a Dataset's rows as one Arrow IPC stream, the format of datasets' own shards (its features in the schema's
    metadata), first as PATH.tmp and renamed once complete; returns its record for the manifest: file, rows, bytes and
    the sha256 of its bytes, computed while they are written. `rows` has no indices mapping (as `Dataset.from_dict`
    makes it; `flatten_indices` one that has), since its table is written as it is."""
    import pyarrow as pa

    table = rows.data.table  # the schema carries datasets' features
    partial = partial_path(path)
    digest = hashlib.sha256()
    with open(partial, "wb") as file:
        sink = pa.PythonFile(_HashingWriter(file, digest), mode="w")
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        file.flush()
        os.fsync(file.fileno())  # the manifest will vouch for these bytes: they must be on disk, not in a cache
    partial.rename(path)
    return {"file": path.name, "rows": len(rows), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}
