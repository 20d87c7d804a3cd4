"""Process-level settings shared by every stage: allocator tuning, device choice, atomic folder writes."""

import ctypes
import os
import shutil
import sys
from pathlib import Path

from kdcache import KdcacheError

_malloc_tuned = False


def tune_malloc() -> bool:
    """Keep glibc from returning large buffers to the OS after every forward/backward pass.

    By default glibc serves allocations above a threshold with mmap and unmaps them on free, so every
    training step pays page faults to map and zero the same activation buffers again; on a 2-core CPU that
    halves throughput (BENCHMARKS.md). `mallopt` sets the same knobs as MALLOC_MMAP_MAX_=0 and
    MALLOC_TRIM_THRESHOLD_, at run time, for this process only. The cost is a higher resident peak (freed
    memory stays in the heap for reuse). Set KDCACHE_MALLOC_TUNING=0 to opt out.
    """
    global _malloc_tuned
    if _malloc_tuned or os.environ.get("KDCACHE_MALLOC_TUNING", "1") == "0":
        return _malloc_tuned
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_max = -1, -4  # from glibc's malloc.h
        _malloc_tuned = bool(libc.mallopt(m_mmap_max, 0)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (OSError, AttributeError):  # not glibc (musl, ...): nothing to tune
        _malloc_tuned = False
    return _malloc_tuned


def pick_device(device: str = "auto"):
    import torch

    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        chosen = torch.device(device)
    except RuntimeError:
        raise KdcacheError(f"--device '{device}' is not a device name; use auto, cpu, cuda, cuda:1 or mps") from None
    if chosen.type == "cuda" and not torch.cuda.is_available():
        raise KdcacheError(f"--device '{device}' asked for CUDA but no CUDA GPU is available; use --device cpu")
    return chosen


def check_writable_parent(path: Path, what: str) -> None:
    """Fail early, before hours of work, if the output cannot be created."""
    parent = path.resolve().parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdcacheError(f"{what} '{path}' cannot be created ({error.strerror}); choose another --output") from None
    if not os.access(parent, os.W_OK | os.X_OK):
        raise KdcacheError(f"{what} '{path}' is in a folder that is not writable ({parent}); choose another --output")


def move_into_place(finished: Path, destination: Path) -> None:
    """Rename a completed folder onto its final name; an existing destination is swapped out, then removed."""
    old = destination.with_name(destination.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if destination.exists():
        destination.rename(old)
    finished.rename(destination)
    if old.exists():
        shutil.rmtree(old)


def slug(name_or_path: str) -> str:
    """A folder-name-safe short name: 'merve/beans-vit-224' -> 'beans-vit-224'."""
    text = str(name_or_path).rstrip("/\\")
    base = text.replace("\\", "/").split("/")[-1] or "dataset"
    return "".join(ch if ch.isalnum() or ch in "-_." else "-" for ch in base)
