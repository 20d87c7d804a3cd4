"""Stage one on 1 process against N processes of one launch, on this machine, alternating in one run.

    python benchmarks/teacher_logits_processes.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans

Each round runs `kdcache teacher-logits` twice from scratch, as a user would: (a) one process with all the cores as
torch threads (OMP_NUM_THREADS = cores), (b) `--num-processes N` with cores / N threads each; both with kdcache's
default DataLoader workers (on CPU: 1 per process when it has 2 cores or more, else 0). It prints images/s of the
work (the manifest's `seconds`, measured by the main process from the start of its teacher loop to the manifest: every process's
chunks, the wait for the slowest, the assembly) and end to end (the command's wall time: imports, launcher, model
loading and hashing included), the ratio N-process / 1-process of each (the median over rounds), and whether the
two caches' checksums are equal (they are when each process has as many torch threads: a convolution's
float sums depend on how its work is split among threads).
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def stage_one(data: Path, teacher: str, output: Path, processes: int, threads: int, args) -> dict:
    command = [
        sys.executable,
        "-m",
        "kdcache",
        "teacher-logits",
        "--dataset",
        str(data),
        "--teacher",
        teacher,
        "--output",
        str(output),
        "--batch-size",
        str(args.batch_size),
        "--num-processes",
        str(processes),
    ]
    environment = dict(
        os.environ,
        OMP_NUM_THREADS=str(threads),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    seconds = time.perf_counter() - started
    manifest = json.loads((output / "kdcache.json").read_text())
    splits = manifest["dataset"]["splits"]
    images = sum(split["num_rows"] for split in splits.values())
    # Not the per-split images_per_second: with several processes, different splits are computed at the same time.
    work = images / manifest["seconds"]
    shutil.rmtree(output)
    return {
        "work": work,
        "whole": images / seconds,
        # format 4: the chunk files' checksums (the same chunking in both runs); before: one of each split's logits
        "checksums": {
            name: [chunk["sha256"] for chunk in split["chunks"]] if "chunks" in split else split["logits_sha256"]
            for name, split in splits.items()
        },
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--splits", default="validation,test")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cores = os.cpu_count() or 1

    from kdcache.data import load_image_dataset

    work = Path(tempfile.mkdtemp(prefix="kdcache-processes-"))
    try:
        dataset = load_image_dataset(args.dataset)
        dataset = type(dataset)({name: dataset[name] for name in args.splits.split(",")})
        dataset.save_to_disk(str(work / "data"))  # both runs read the same rows from the same place
        rows = sum(len(split) for split in dataset.values())
        print(
            f"teacher {args.teacher}, {rows} images of {args.splits}, batch {args.batch_size}, {cores} cores: "
            f"1 process x {cores} threads vs {args.processes} processes x {max(1, cores // args.processes)} threads"
        )
        one, many = [], []
        for round_index in range(args.rounds):
            one.append(stage_one(work / "data", args.teacher, work / "one", 1, cores, args))
            many.append(
                stage_one(
                    work / "data", args.teacher, work / "many", args.processes, max(1, cores // args.processes), args
                )
            )
            print(
                f"round {round_index + 1}: work {one[-1]['work']:.1f} -> {many[-1]['work']:.1f} img/s "
                f"({many[-1]['work'] / one[-1]['work']:.2f}x) | end to end {one[-1]['whole']:.1f} -> "
                f"{many[-1]['whole']:.1f} img/s ({many[-1]['whole'] / one[-1]['whole']:.2f}x)"
            )
        ratio_work = statistics.median(m["work"] / o["work"] for o, m in zip(one, many))
        ratio_whole = statistics.median(m["whole"] / o["whole"] for o, m in zip(one, many))
        same = all(o["checksums"] == m["checksums"] for o, m in zip(one, many))
        print(
            f"median: 1 process work {statistics.median(o['work'] for o in one):.1f} img/s, end to end "
            f"{statistics.median(o['whole'] for o in one):.1f}; {args.processes} processes work "
            f"{statistics.median(m['work'] for m in many):.1f}, end to end {statistics.median(m['whole'] for m in many):.1f}; "
            f"ratio {args.processes}/1: work {ratio_work:.2f}, end to end {ratio_whole:.2f}; "
            f"logits checksums {'equal' if same else 'DIFFER'} between the two"
        )
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
