"""What a cache's load costs, checksums included: `load_cache` of two caches, alternated over rounds, each time's
median and the median of the per-round ratios (the machine is shared: the ratio is the figure to quote).

    python benchmarks/cache_load.py CACHE_A CACHE_B [--rounds 7]

Used for BENCHMARKS.md "Cache format 4": a format-4 cache (every chunk file hashed at load) against a format-2 cache
of the same inputs (the logits column hashed). The files are read once before timing, so both come from the page
cache: the figure is the hashing and opening, not the disk.
"""

import argparse
import statistics
import time


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("first")
    parser.add_argument("second")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()

    from kdcache.format.reader import load_cache

    def seconds(path):
        started = time.perf_counter()
        load_cache(path)
        return time.perf_counter() - started

    seconds(args.first), seconds(args.second)  # warm the page cache and the imports
    times = {args.first: [], args.second: []}
    for _ in range(args.rounds):
        for path in (args.first, args.second):
            times[path].append(seconds(path))
    for path, values in times.items():
        print(f"{path}: median {statistics.median(values):.3f} s (min {min(values):.3f}, max {max(values):.3f})")
    ratios = [a / b for a, b in zip(times[args.first], times[args.second])]
    print(
        f"ratio first/second: median {statistics.median(ratios):.2f} (per round {', '.join(f'{r:.1f}' for r in ratios)})"
    )


if __name__ == "__main__":
    main()
