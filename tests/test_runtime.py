import ctypes.util
import sys
from pathlib import Path

import pytest

from kdcache import KdcacheError, runtime


def test_malloc_tuning_applies_on_glibc_and_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(runtime, "_malloc_tuned", False)
    monkeypatch.setenv("KDCACHE_MALLOC_TUNING", "0")
    assert runtime.tune_malloc() is False
    monkeypatch.delenv("KDCACHE_MALLOC_TUNING")
    expected = sys.platform.startswith("linux") and "libc.so" in (ctypes.util.find_library("c") or "")
    assert runtime.tune_malloc() is expected


def test_device_names_are_checked():
    assert runtime.pick_device("cpu").type == "cpu"
    with pytest.raises(KdcacheError, match="not a device name"):
        runtime.pick_device("gpu0")


def test_move_into_place_replaces_atomically(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "file").write_text("new")
    (tmp_path / "dest").mkdir()
    (tmp_path / "dest" / "file").write_text("old")
    runtime.move_into_place(tmp_path / "new", tmp_path / "dest")
    assert (tmp_path / "dest" / "file").read_text() == "new"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dest"]


def test_a_plain_run_is_not_distributed(monkeypatch):
    """Without a launcher's environment nothing is started: the single-process path stays as it was."""
    for name in runtime._WORLD_SIZE + runtime._RANK + runtime._LOCAL_WORLD_SIZE:
        monkeypatch.delenv(name, raising=False)
    assert runtime.launched_processes() == 1 and runtime.is_main() and runtime.is_main(None)
    assert runtime.distributed("auto") is None
    monkeypatch.setenv("WORLD_SIZE", "1")  # accelerate launch of one process
    assert runtime.distributed("cpu") is None
    with pytest.raises(KdcacheError, match="as it is"), runtime.agreed(None):
        raise KdcacheError("as it is")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "2")
    assert runtime.launched_processes() == 4 and not runtime.is_main()
    # once a stage has joined its launch, its place in it says: the first process is the main one
    first, third = (runtime.Processes(count=4, index=index, local_count=4, device="cpu") for index in (0, 2))
    assert runtime.is_main(first) and not runtime.is_main(third)


def test_more_launched_processes_than_gpus_are_refused_in_one_line_before_any_collective(monkeypatch):
    """`accelerate launch --num_processes 2` on a one-GPU machine: NCCL would fail later with 'invalid usage'."""
    import torch

    for name in runtime._WORLD_SIZE + runtime._RANK + runtime._LOCAL_WORLD_SIZE + runtime._LOCAL_RANK:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: pytest.fail("no process group may start"))
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    for local_rank, said_here in (("0", True), ("1", False)):
        monkeypatch.setenv("LOCAL_RANK", local_rank)
        with pytest.raises(KdcacheError) as refused:
            runtime.distributed("auto")
        assert str(refused.value) == (
            "the launcher started 2 processes on this machine, which has 1 GPU (one process per GPU); launch "
            "--num_processes 1, or give --device cpu for CPU processes"
        )
        assert getattr(refused.value, "reported_elsewhere", False) is not said_here


def test_an_output_that_is_the_current_folder_or_a_parent_is_refused(tmp_path, monkeypatch):
    from kdcache import KdcacheError
    from kdcache.runtime import output_path

    work = tmp_path / "project"
    work.mkdir()
    monkeypatch.chdir(work)
    for output in (".", "..", str(work), str(tmp_path), "./"):
        with pytest.raises(KdcacheError, match="is the current folder or one of its parents"):
            output_path(output)
    assert output_path("data/cache") == Path("data/cache")


def test_an_output_url_is_refused_in_one_line_except_a_local_file_url(tmp_path):
    from kdcache import KdcacheError
    from kdcache.runtime import output_path

    for url in ("s3://bucket/cache", "memory://cache", "hf://datasets/me/cache"):
        with pytest.raises(
            KdcacheError, match=r"is a \w+:// URL; kdcache writes its outputs on a filesystem"
        ) as refused:
            output_path(url)
        assert "\n" not in str(refused.value)
    assert output_path(f"file://{tmp_path}/cache") == tmp_path / "cache"


def mapped_rss_kb(path) -> int:
    """The resident KB of this process's mappings of `path` (/proc/self/smaps)."""
    total, inside = 0, False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            if "-" in line.split(" ", 1)[0] and len(line.split()) >= 5:
                inside = line.rstrip().endswith(str(path))
            elif inside and line.startswith("Rss:"):
                total += int(line.split()[1])
    return total


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps and madvise are Linux's")
def test_mapped_files_under_the_folders_are_unmapped_on_every_read_and_read_back_the_same(tmp_path):
    import mmap

    from kdcache.runtime import MappedFiles

    data = bytes(range(256)) * 4096 * 4  # 4 MB
    inside, outside = tmp_path / "cache" / "chunk.arrow", tmp_path / "other.bin"
    inside.parent.mkdir()
    for path in (inside, outside):
        path.write_bytes(data)
    with open(inside, "rb") as a, open(outside, "rb") as b:
        mine, theirs = (
            mmap.mmap(a.fileno(), 0, access=mmap.ACCESS_READ),
            mmap.mmap(b.fileno(), 0, access=mmap.ACCESS_READ),
        )
        touched = sum(mine[offset] + theirs[offset] for offset in range(0, len(data), 4096))
        assert mapped_rss_kb(inside) >= 4000 and mapped_rss_kb(outside) >= 4000
        mapped = MappedFiles([tmp_path / "cache"])
        assert mapped.mappings() and all(end > start for start, end in mapped.mappings())
        mapped.read()
        assert mapped_rss_kb(inside) == 0 and mapped_rss_kb(outside) >= 4000, "only files under the folders"
        assert (
            mine[:] == data and sum(mine[offset] + theirs[offset] for offset in range(0, len(data), 4096)) == touched
        )
        assert mapped_rss_kb(inside) >= 4000
        mapped.read()
        assert mapped_rss_kb(inside) == 0
        mine.close()
        assert mapped.mappings() == [], "a file unmapped since is never touched: its range may hold other memory now"
        mapped.read()
        assert theirs[:] == data
        theirs.close()
