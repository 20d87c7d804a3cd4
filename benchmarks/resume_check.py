"""What stage one's checks of its own work cost, against the teacher's work: side by side, in one run.

    python benchmarks/resume_check.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \
        --json benchmarks/results/resume-check.json

(a) The resume check: a run stopped once every chunk is written (before it finishes) leaves them all in
CACHE.partial; the next run hashes each against its record before it carries it over. Timed here over all the
chunks, as `_plan_work` does it (`carried_over`), from the page cache (warm: a resume soon after a kill) and with the
chunk files evicted from it first (cold: a resume after a reboot; posix_fadvise DONTNEED on the fsynced files, so
the reads go to the disk, or to whatever caches it below this machine's page cache),
against the teacher's work the chunks carried over save: the time of the chunk loop (decode, resize, forward, chunk
writes) of the same run. Then the real resume, end to end, computing nothing.
(b) The final check: every run hashes the finished cache once more, with the rest of `load_cache`'s checks, before
it moves it into place (`_check_finished`); timed in a fresh run and in the resume, against the chunk loop.
Each ratio is the median time of the check over the median of the two chunk loops of the same run.
"""

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from kdcache.format.manifest import Manifest
from kdcache.options import CacheOptions
from kdcache.outputs import bytes_under
from kdcache.teacher import run as run_module


class Timed:
    """Replace a function of kdcache.teacher.run with one that records its wall time in `seconds` on every call."""

    def __init__(self, name: str):
        self.name, self.real, self.seconds = name, getattr(run_module, name), []
        setattr(run_module, name, self)

    def __call__(self, *args, **kwargs):
        started = time.perf_counter()
        try:
            return self.real(*args, **kwargs)
        finally:
            self.seconds.append(time.perf_counter() - started)


class Stop(Exception):
    """Ends a run once every chunk is written, before it finishes: what a kill at that moment leaves."""


def evict(paths) -> None:
    for path in paths:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(descriptor, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(descriptor)


def significant(value: float) -> float:
    return float(f"{value:.3g}")


def check_all(work: Path, chunks: list[tuple[str, int, int]]) -> float:
    started = time.perf_counter()
    kept = [run_module.carried_over(work, split, index, rows) for split, index, rows in chunks]
    seconds = time.perf_counter() - started
    if not all(kept):
        raise SystemExit("resume_check.py: error: a chunk written by this run did not pass its own check")
    return seconds


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--rounds", type=int, default=5, help="rounds of the resume check, warm and cold each")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--root", default=None, help="where the caches are written (default: a temporary folder)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    root = Path(tempfile.mkdtemp(prefix="resume-check-", dir=args.root))
    loop, final = Timed("_compute_chunks"), Timed("_check_finished")
    real_write_cache = run_module._write_cache
    options = dict(batch_size=args.batch_size, progress=False)
    try:
        fresh = run_module.teacher_logits(args.dataset, args.teacher, output=root / "fresh", **options)
        manifest = Manifest.read(fresh)
        splits = manifest.dataset["splits"]
        chunks = [
            (name, index, chunk["rows"])
            for name, split in splits.items()
            for index, chunk in enumerate(split["chunks"])
        ]

        def stop_before_finishing(*args_, **kwargs):
            raise Stop

        run_module._write_cache = stop_before_finishing
        try:
            run_module.teacher_logits(args.dataset, args.teacher, output=root / "resumed", **options)
        except Stop:
            pass
        run_module._write_cache = real_write_cache
        work = root / "resumed.partial"
        files = [run_module.chunk_path(work, name, index) for name, index, _ in chunks]
        warm, cold = [], []
        for _ in range(args.rounds):
            warm.append(check_all(work, chunks))
            evict(files)
            cold.append(check_all(work, chunks))
        planned = Timed("_plan")
        started = time.perf_counter()
        run_module.teacher_logits(args.dataset, args.teacher, output=root / "resumed", **options)
        resume_seconds = time.perf_counter() - started
        teacher = loop.seconds[:2]  # the fresh run's and the stopped run's chunk loops: every chunk computed
        cache_bytes = sum(chunk["bytes"] for split in splits.values() for chunk in split["chunks"])
        result = {
            "command": "python benchmarks/resume_check.py "
            + " ".join(f"--{key.replace('_', '-')} {value}" for key, value in vars(args).items() if value is not None),
            "dataset": args.dataset,
            "teacher": args.teacher,
            "images": sum(split["num_rows"] for split in splits.values()),
            "chunks": len(chunks),
            "chunk_size": CacheOptions().chunk_size,
            "chunk_bytes": cache_bytes,
            "cache_bytes_on_disk": bytes_under(fresh),
            "torch_threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "load_average_at_end": os.getloadavg(),
            "teacher_chunk_loop_seconds": [round(value, 3) for value in teacher],
            "resume_check_seconds": {"warm": [significant(v) for v in warm], "cold": [significant(v) for v in cold]},
            "resume_check_to_teacher": {
                kind: significant(statistics.median(values) / statistics.median(teacher))
                for kind, values in (("warm", warm), ("cold", cold))
            },
            "resume_check_megabytes_per_second": {
                kind: round(cache_bytes / statistics.median(values) / 1e6, 1)
                for kind, values in (("warm", warm), ("cold", cold))
            },
            "resume_end_to_end_seconds": round(resume_seconds, 2),
            "resume_plan_seconds": round(planned.seconds[-1], 3),
            "resume_chunk_loop_seconds": round(loop.seconds[-1], 3),  # no chunk left: the loader's start
            "final_check_seconds": {"fresh": significant(final.seconds[0]), "resumed": significant(final.seconds[-1])},
            "final_check_to_teacher": significant(statistics.median(final.seconds) / statistics.median(teacher)),
        }
    finally:
        shutil.rmtree(root, ignore_errors=True)
    print(
        f"{result['images']} images, {result['chunks']} chunks of {result['chunk_size']} rows, "
        f"{result['chunk_bytes'] / 1e6:.1f} MB of chunk files"
    )
    print(f"teacher's chunk loop (every chunk computed): {', '.join(f'{s:.1f} s' for s in teacher)}")
    for kind, values in (("warm", warm), ("cold", cold)):
        print(
            f"resume check of every chunk, {kind}: median {statistics.median(values):.3f} s "
            f"({result['resume_check_megabytes_per_second'][kind]} MB/s), "
            f"{result['resume_check_to_teacher'][kind]:.4f} of the teacher's work it saves"
        )
    print(
        f"resume end to end (nothing computed): {result['resume_end_to_end_seconds']} s, of which planning "
        f"(hashing included) {result['resume_plan_seconds']} s"
    )
    print(
        f"final check (load_cache's checks of the finished cache): fresh {result['final_check_seconds']['fresh']} s, "
        f"resumed {result['final_check_seconds']['resumed']} s, {result['final_check_to_teacher']:.4f} of the "
        "teacher's chunk loop"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
