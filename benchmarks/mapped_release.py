"""What kdcache.runtime.MappedFiles costs and saves, per batch, read as train-student reads a cache.

    OMP_NUM_THREADS=1 python benchmarks/scale.py --rows 100000 --stages cache --keep --json /tmp/scale-cache.json
    OMP_NUM_THREADS=1 python benchmarks/mapped_release.py /tmp/kdcache-scale/cache-100000

Reads --batches random batches of --batch-size rows of the train split (pixels, labels, logits: the columns of a
cached K=1 training run) in this one process, in --rounds rounds that alternate reading alone and reading with
`MappedFiles.read()` after every batch, and reports per batch: the wall time of the read, the CPU time of
`MappedFiles.read()` (the lookup in /proc/self/maps and the madvise calls), the file pages one batch maps (RssFile
after a batch read from a released state, minus before) and the peak of RssFile over the round. Linux only.
Writes benchmarks/results/mapped-release.json.
"""

import argparse
import json
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results" / "mapped-release.json"


def rss_file_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssFile:"):
                return int(line.split()[1]) / 1000
    return float("nan")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cache")
    parser.add_argument("--batches", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from kdcache.format.columns import PIXELS
    from kdcache.format.reader import load_cache, logit_columns
    from kdcache.runtime import MappedFiles

    cached, _ = load_cache(args.cache)
    train = cached["train"]
    rows = train.with_format("numpy", columns=[PIXELS, "labels", *logit_columns(train)])
    mapped = MappedFiles([args.cache])
    rng = np.random.default_rng(0)
    results = []
    for round_ in range(args.rounds):
        for release in (False, True):
            mapped.read()  # every round starts from a released state
            before = rss_file_mb()
            rows.__getitems__(rng.integers(0, len(rows), args.batch_size).tolist())
            one_batch = rss_file_mb() - before
            mapped.read()
            read_seconds = release_cpu = 0.0
            peak = rss_file_mb()
            for _ in range(args.batches):
                started = time.perf_counter()
                rows.__getitems__(rng.integers(0, len(rows), args.batch_size).tolist())
                read_seconds += time.perf_counter() - started
                peak = max(peak, rss_file_mb())
                if release:
                    started = time.process_time()
                    mapped.read()
                    release_cpu += time.process_time() - started
            line = {
                "round": round_ + 1,
                "release": release,
                "read_ms_per_batch": round(1000 * read_seconds / args.batches, 2),
                "release_cpu_ms_per_batch": round(1000 * release_cpu / args.batches, 2),
                "one_batch_maps_mb": round(one_batch, 1),
                "peak_rss_file_mb": round(peak, 1),
                "cache_mappings": len(mapped.mappings()),
                "all_mappings": sum(1 for _ in open("/proc/self/maps")),
            }
            results.append(line)
            print(json.dumps(line), flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps({"cache": args.cache, "batch_size": args.batch_size, "results": results}, indent=2) + "\n"
    )


if __name__ == "__main__":
    main()
