"""Memory and disk writes of both stages as the dataset grows: does anything grow with the number of rows?

    OMP_NUM_THREADS=1 python benchmarks/scale.py                       # 1,000, 10,000 and 100,000 rows
    OMP_NUM_THREADS=1 python benchmarks/scale.py --rows 1000,2000 --steps 20 --keep

For each N in --rows it generates (untimed, under --root) a dataset of N training rows and --validation-rows
validation rows of 64x64 PNG images in 1000 classes (cheap, low-entropy stripes whose colours and period come from
the label, a few hundred bytes each), written in pieces by `datasets.Dataset.from_generator`; once, a tiny ViT
teacher (64 px, patch 16, width 32, 1 layer, 1000 classes) and a config-only MobileNetV2 student (depth 0.35),
both with random weights. Then, each in a fresh process of its own so that its peak is the stage's own:

  cache  `teacher_logits(data, teacher, output=cache, progress=False)` on both splits: images/s (end to end, and
         the teacher loop's figure from the manifest), seconds, and the bytes the process wrote against the
         cache's size on disk (the cache is written once: its chunks are renamed into place, not copied);
  load   `load_cache(cache)`, verification included (every chunk file hashed; `datasets` imported before the
         clock starts): seconds;
  train  `train_student(cache, ...)` for --steps steps of --batch-size at 64 px, no evaluation, no checkpoints:
         steps/s (after the first --warmup steps) and seconds to the first step (the start-up: loading and
         verifying the cache, building the student and the Trainer).

Memory of each stage's process: `peak RSS` is the kernel's high-water mark of its resident set (VmHWM in
/proc/self/status, read at the end; getrusage's ru_maxrss is recorded too, but after exec it carries the hiwater
mark of the forking parent, this script with torch imported, so it is not the stage's own). RSS counts the
file-backed pages of memory-mapped files (the Arrow files of the dataset and the cache, the libraries) that the
process has touched, as well as its own memory: `anon` is the peak of RssAnon (the process's own memory) and `file`
the peak of RssFile + RssShmem (mapped pages, which the kernel can drop), both sampled every --interval seconds by a
thread. DataLoader workers are measured apart: the peak of their RSS summed, sampled the same way (pages shared with
the parent since the fork count in both), and ru_maxrss of RUSAGE_CHILDREN (the largest reaped one). Bytes written:
/proc/self/io `wchar` (bytes handed to write()) and `write_bytes` (bytes sent to storage), from just before the
stage's call to just after; the kernel folds a reaped child's figures into its parent's, so each worker's last
sampled figures are also reported apart (they should write nothing).

What `file` shows (kernel 6.18 here, read_ahead_kb 8192): a fault on a memory-mapped file maps the whole large folio
that readahead put in the page cache, up to 2 MB, however little of it is read. train_student reads its rows from
the cache's memory-mapped Arrow files: before kdcache.runtime.MappedFiles (which unmaps the cache files' pages after
every batch), 200 random batches mapped 1.6 GB of a 1.7 GB cache into the process's RSS (clean file pages, which
the kernel drops under pressure; peak RSS 2.46x from 10k to 100k rows), while its anonymous memory stayed flat.
KDCACHE_RELEASE_MAPPED=0 measures training without it.

Prints a table per stage and, per stage, the ratio of the peaks at the two largest N (the target: at most 1.2),
and writes benchmarks/results/scale.json (--json). Linux only (/proc). --stages runs some of the stages (`load` or
`train` without `cache` need the caches kept by an earlier run with --keep). The caches are written to the page
cache and loaded from it, so `load` measures hashing from memory, not the disk. Everything generated under --root is
deleted at the end unless --keep; existing datasets of the same size under --root are reused.
"""

import argparse
import io
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results" / "scale.json"
CLASSES, SIZE = 1000, 64
TARGET = 1.2  # peak RSS at the largest N over the next largest, per stage


# ---------------------------------------------------------------------------------------------- measuring a stage


def _status(pid="self") -> dict:
    """VmRSS, VmHWM, RssAnon, RssFile, RssShmem of a process, in bytes."""
    values = {}
    with open(f"/proc/{pid}/status") as file:
        for line in file:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem"):
                values[key] = int(value.split()[0]) * 1024
    return values


def _io(pid="self") -> dict:
    with open(f"/proc/{pid}/io") as file:
        return {key: int(value) for key, value in (line.split(": ") for line in file if line.strip())}


def _children(pid: int) -> list[int]:
    """The live descendants of `pid` (DataLoader workers and whatever they start)."""
    found = []
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            with open(f"/proc/{pid}/task/{task}/children") as file:
                kids = [int(kid) for kid in file.read().split()]
        except OSError:
            continue
        for kid in kids:
            found += [kid, *_children(kid)]
    return found


class Monitor:
    """Peaks of this process's RSS (anon, file) and of its children's, sampled by a thread; bytes written."""

    def __init__(self, interval: float):
        self.interval, self.stopping = interval, threading.Event()
        self.peak = dict(rss=0, anon=0, file=0, workers_rss=0, workers_anon=0)
        self.workers_io = {}  # pid -> its last /proc/PID/io seen
        self.thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Monitor":
        self.rss_before = _status()["VmRSS"]
        self.io_before = _io()
        self.sample()
        self.thread.start()
        return self

    def sample(self) -> None:
        own = _status()
        self.peak["rss"] = max(self.peak["rss"], own["VmRSS"])
        self.peak["anon"] = max(self.peak["anon"], own["RssAnon"])
        self.peak["file"] = max(self.peak["file"], own["RssFile"] + own["RssShmem"])
        rss = anon = 0
        for pid in _children(os.getpid()):
            try:
                status, written = _status(pid), _io(pid)
            except (OSError, ValueError):  # gone between the listing and the read
                continue
            # a zombie (a worker exited, not yet reaped) has no memory lines
            rss, anon = rss + status.get("VmRSS", 0), anon + status.get("RssAnon", 0)
            self.workers_io[pid] = written
        self.peak["workers_rss"] = max(self.peak["workers_rss"], rss)
        self.peak["workers_anon"] = max(self.peak["workers_anon"], anon)

    def _run(self) -> None:
        while not self.stopping.wait(self.interval):
            self.sample()

    def stop(self) -> dict:
        self.stopping.set()
        self.thread.join()
        self.sample()
        after, own = _io(), _status()
        written = {key: after[key] - self.io_before[key] for key in ("wchar", "write_bytes")}
        workers = {key: sum(seen[key] for seen in self.workers_io.values()) for key in ("wchar", "write_bytes")}
        return {
            "rss_before": self.rss_before,  # after the imports, before the stage's call
            # VmHWM, not getrusage's ru_maxrss: the kernel carries the hiwater mark of the process that exec'd into
            # ru_maxrss, and that was the parent script's (torch imported, models built) at the fork
            "peak_rss": max(own["VmHWM"], self.peak["rss"]),  # VmHWM, exact but for the kernel's lazy counters
            "ru_maxrss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
            "peak_rss_sampled": self.peak["rss"],
            "peak_anon": self.peak["anon"],
            "peak_file": self.peak["file"],
            "workers": len(self.workers_io),
            "workers_peak_rss_sum": self.peak["workers_rss"],
            "workers_peak_anon_sum": self.peak["workers_anon"],
            "children_max_rss": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024,
            # this process and its reaped workers together (the kernel folds a reaped child's I/O into its parent's)
            "wchar": written["wchar"],
            "write_bytes": written["write_bytes"],
            "workers_wchar": workers["wchar"],
            "workers_write_bytes": workers["write_bytes"],
        }


def _file_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


def stage_cache(args) -> dict:
    from kdcache.outputs import bytes_under
    from kdcache.teacher.run import teacher_logits

    monitor = Monitor(args.interval).start()
    started = time.perf_counter()
    teacher_logits(args.dataset, args.teacher, output=args.cache, progress=False)
    seconds = time.perf_counter() - started
    figures = monitor.stop()
    manifest = json.loads((Path(args.cache) / "kdcache.json").read_text())
    splits = manifest["dataset"]["splits"]
    images = sum(split["num_rows"] for split in splits.values())
    return {
        **figures,
        "seconds": seconds,
        "images": images,
        "images_per_second": images / seconds,
        "loop_images_per_second": manifest["images_per_second"],
        "cache_bytes": bytes_under(Path(args.cache)),  # allocated blocks
        "cache_file_bytes": _file_bytes(Path(args.cache)),
        "chunk_bytes": sum(chunk["bytes"] for split in splits.values() for chunk in split["chunks"]),
    }


def stage_load(args) -> dict:
    import datasets  # noqa: F401 (imported by load_cache on first use: its import is not the load's cost)

    from kdcache.format.reader import load_cache

    monitor = Monitor(args.interval).start()
    started = time.perf_counter()
    cached, manifest = load_cache(args.cache)  # verify=True: every chunk file hashed
    seconds = time.perf_counter() - started
    figures = monitor.stop()
    return {**figures, "seconds": seconds, "rows": {name: len(split) for name, split in cached.items()}}


def stage_train(args) -> dict:
    from transformers import TrainerCallback

    from kdcache.student.train import train_student

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.times = []

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(time.perf_counter())

    timer = StepTimer()
    monitor = Monitor(args.interval).start()
    started = time.perf_counter()
    train_student(
        args.cache,
        output=args.output,
        student=args.student,
        student_size=SIZE,
        max_steps=args.steps,
        batch_size=args.batch_size,
        eval_split=None,
        save_checkpoints=False,
        logging_steps=max(1, args.steps // 4),
        callbacks=[timer],
        progress=False,
        overwrite=True,
    )
    seconds = time.perf_counter() - started
    figures = monitor.stop()
    warmup = max(1, min(args.warmup, len(timer.times) - 1))  # the clock starts at the end of step `warmup`
    timed = len(timer.times) - warmup
    return {
        **figures,
        "seconds": seconds,
        "steps": len(timer.times),
        "timed_steps": timed,
        "steps_per_second": timed / (timer.times[-1] - timer.times[warmup - 1]) if timed else None,
        "seconds_to_first_step": timer.times[0] - started,
    }


STAGES = {"cache": stage_cache, "load": stage_load, "train": stage_train}


# ------------------------------------------------------------------------------------------------- the inputs


def class_names() -> list[str]:
    return [f"class_{index:04d}" for index in range(CLASSES)]


def _png(label: int, row: int, grid) -> bytes:
    """A 64x64 image of two colours in stripes, both drawn from the label; the row shifts the stripes."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(label)
    first, second = rng.integers(0, 256, (2, 3))
    y, x = grid
    coordinate = (x if label % 2 else y) + ((x + y) if (label // 2) % 2 else 0)
    mask = ((coordinate + row) // (2 + label % 7)) % 2
    pixels = np.where(mask[..., None] == 1, first, second).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(out, "PNG")
    return out.getvalue()


def _rows(count: int, seed: int):
    import numpy as np

    grid = np.mgrid[0:SIZE, 0:SIZE]
    for row in range(count):
        label = (row * 7919 + seed) % CLASSES  # every class, in a scrambled order
        yield {"image": {"bytes": _png(label, row, grid), "path": None}, "labels": label}


def make_dataset(folder: Path, rows: int, validation_rows: int, scratch: Path) -> Path:
    """A DatasetDict of `rows` training and `validation_rows` validation images, saved with save_to_disk; each
    split is written by from_generator in pieces (memory stays flat), into `scratch`, which is deleted after."""
    import datasets

    done = folder / "scale-rows.json"
    if done.exists() and json.loads(done.read_text()) == [rows, validation_rows]:
        return folder
    shutil.rmtree(folder, ignore_errors=True)
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=class_names())})
    splits = {
        name: datasets.Dataset.from_generator(
            _rows, features=features, cache_dir=str(scratch), gen_kwargs={"count": count, "seed": seed}
        )
        for name, count, seed in (("train", rows, 0), ("validation", validation_rows, 1))
    }
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    shutil.rmtree(scratch, ignore_errors=True)
    done.write_text(json.dumps([rows, validation_rows]))
    return folder


def make_models(root: Path) -> tuple[Path, Path]:
    """A tiny ViT teacher for 64 px inputs and 1000 classes with a PIL image processor, and a config-only MobileNetV2
    (train_student builds it from scratch), both with random weights."""
    import torch
    from transformers import MobileNetV2Config, ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    names = class_names()
    labels = dict(id2label=dict(enumerate(names)), label2id={name: i for i, name in enumerate(names)})
    teacher, student = root / "teacher", root / "student-config"
    config = ViTConfig(
        image_size=SIZE,
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=CLASSES,
        **labels,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).eval().save_pretrained(str(teacher))
    ViTImageProcessorPil(size={"height": SIZE, "width": SIZE}).save_pretrained(str(teacher))
    MobileNetV2Config(image_size=SIZE, depth_multiplier=0.35, num_labels=CLASSES, **labels).save_pretrained(
        str(student)
    )
    return teacher, student


# ------------------------------------------------------------------------------------------------- running it


def run_stage(stage: str, args, result: Path, **paths) -> dict:
    """One stage in a fresh process (this script with --stage), its figures read back from `result`."""
    command = [sys.executable, str(Path(__file__).resolve()), "--stage", stage, "--result", str(result)]
    command += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--batch-size", str(args.batch_size)]
    command += ["--interval", str(args.interval)]
    for key, value in paths.items():
        command += [f"--{key}", str(value)]
    environment = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(args.root / "hf-cache"),  # nothing of this run lands in ~/.cache
        TRANSFORMERS_VERBOSITY="error",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])),
    )
    started = time.perf_counter()
    subprocess.run(command, env=environment, check=True)
    figures = json.loads(result.read_text())
    figures["process_seconds"] = time.perf_counter() - started  # imports included
    result.unlink()
    return figures


def measure(args) -> dict:
    args.root.mkdir(parents=True, exist_ok=True)
    teacher, student = make_models(args.root)
    results = []
    for rows in args.rows:
        data = args.root / f"data-{rows}"
        started = time.perf_counter()
        make_dataset(data, rows, args.validation_rows, args.root / "generating")
        print(f"{rows} rows: dataset ready in {time.perf_counter() - started:.0f} s (not timed below)", flush=True)
        cache, output = args.root / f"cache-{rows}", args.root / f"student-{rows}"
        if "cache" in args.stages:
            shutil.rmtree(cache, ignore_errors=True)  # stage one from scratch
        result = args.root / "stage-result.json"
        row = {"rows": rows, "validation_rows": args.validation_rows, "dataset_bytes": _file_bytes(data)}
        paths = {
            "cache": dict(dataset=data, teacher=teacher, cache=cache),
            "load": dict(cache=cache),
            "train": dict(cache=cache, student=student, output=output),
        }
        for stage in args.stages:
            row[stage] = run_stage(stage, args, result, **paths[stage])
        results.append(row)
        done = ", ".join(f"{stage} {row[stage]['seconds']:.1f} s" for stage in args.stages)
        print(f"{rows} rows: {done}", flush=True)
    return {
        "machine": f"{platform.machine()}, {os.cpu_count()} cores, OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}",
        "settings": {
            "image_size": SIZE,
            "classes": CLASSES,
            "validation_rows": args.validation_rows,
            "steps": args.steps,
            "warmup": args.warmup,
            "batch_size": args.batch_size,
            "interval": args.interval,
        },
        "results": results,
        "ratios": ratios(results),
        "target": TARGET,
    }


def ratios(results: list) -> dict:
    """Per stage, each peak at the largest N over the same peak at the next largest."""
    if len(results) < 2:
        return {}
    small, large = sorted(results, key=lambda row: row["rows"])[-2:]
    out = {"rows": [small["rows"], large["rows"]]}
    for stage in STAGES:
        if stage in large:
            out[stage] = {
                key: round(large[stage][key] / small[stage][key], 3) for key in ("peak_rss", "peak_anon", "peak_file")
            }
    return out


def _mb(count: float) -> str:
    return f"{count / 1e6:,.0f}"


MEMORY = [
    ("peak RSS", lambda f: _mb(f["peak_rss"])),
    ("anon", lambda f: _mb(f["peak_anon"])),
    ("file", lambda f: _mb(f["peak_file"])),
]
COLUMNS = {
    "cache": [
        ("img/s", lambda f: f"{f['images_per_second']:,.0f}"),
        ("loop img/s", lambda f: f"{f['loop_images_per_second']['train']:,.0f}"),
        ("s", lambda f: f"{f['seconds']:.1f}"),
        *MEMORY,
        ("workers RSS", lambda f: _mb(f["workers_peak_rss_sum"])),
        ("wchar", lambda f: _mb(f["wchar"])),
        ("write_bytes", lambda f: _mb(f["write_bytes"])),
        ("workers wchar", lambda f: _mb(f["workers_wchar"])),
        ("cache on disk", lambda f: _mb(f["cache_bytes"])),
        ("wchar / cache", lambda f: f"{f['wchar'] / f['cache_file_bytes']:.3f}"),
    ],
    "load": [
        ("s", lambda f: f"{f['seconds']:.2f}"),
        *MEMORY,
        ("RSS before", lambda f: _mb(f["rss_before"])),
        ("wchar", lambda f: _mb(f["wchar"])),
    ],
    "train": [
        ("steps/s", lambda f: f"{f['steps_per_second'] or 0:.2f}"),
        ("s to 1st step", lambda f: f"{f['seconds_to_first_step']:.1f}"),
        ("s", lambda f: f"{f['seconds']:.1f}"),
        *MEMORY,
        ("workers RSS", lambda f: _mb(f["workers_peak_rss_sum"])),
        ("wchar", lambda f: _mb(f["wchar"])),
    ],
}


def table(summary: dict) -> str:
    results, settings = summary["results"], summary["settings"]
    titles = {
        "cache": "stage one: teacher_logits (train + validation splits)",
        "load": "train-student start-up: load_cache, verified",
        "train": f"train_student: {settings['steps']} steps of {settings['batch_size']} at {SIZE} px",
    }
    lines = [
        f"{summary['machine']}; MB = 10^6 bytes; peak RSS = VmHWM; anon, file = sampled peaks of RssAnon, "
        "RssFile + RssShmem"
    ]
    for stage, columns in COLUMNS.items():
        if stage not in results[0]:
            continue
        lines += ["", titles[stage], "| rows | " + " | ".join(header for header, _ in columns) + " |"]
        lines.append("|---:" * (len(columns) + 1) + "|")
        for row in results:
            lines.append(f"| {row['rows']:,} | " + " | ".join(cell(row[stage]) for _, cell in columns) + " |")
    found = summary["ratios"]
    if found:
        small, large = found["rows"]
        lines += ["", f"peak at {large:,} rows / peak at {small:,} rows (target: peak RSS <= {TARGET}):"]
        for stage in STAGES:
            if stage in found:
                figures = found[stage]
                verdict = "ok" if figures["peak_rss"] <= TARGET else "OVER"
                lines.append(
                    f"  {stage:<6} peak RSS {figures['peak_rss']:.3f} ({verdict})   anon {figures['peak_anon']:.3f}   "
                    f"file {figures['peak_file']:.3f}"
                )
    return "\n".join(lines)


def cleanup(root: Path, rows: list[int]) -> None:
    """Remove what this script made under `root` (and `root` itself when that leaves it empty)."""
    made = ["teacher", "student-config", "hf-cache", "generating", "stage-result.json"]
    made += [f"{kind}-{count}" for count in rows for kind in ("data", "cache", "student")]
    made += [
        f"{kind}-{count}{suffix}"
        for count in rows
        for kind in ("cache", "student")
        for suffix in (".partial", ".lock")
    ]
    for name in made:
        path = root / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()
    if root.is_dir() and not any(root.iterdir()):
        root.rmdir()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", default="1000,10000,100000", help="training rows of each run, comma-separated")
    parser.add_argument("--validation-rows", type=int, default=256)
    parser.add_argument("--root", type=Path, default=Path("/tmp/kdcache-scale"), help="where the data is generated")
    parser.add_argument("--steps", type=int, default=200, help="training steps of stage two")
    parser.add_argument("--warmup", type=int, default=10, help="steps not counted in steps/s")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--interval", type=float, default=0.02, help="seconds between memory samples")
    parser.add_argument("--stages", default="cache,load,train", help="which stages to run (cache is needed first)")
    parser.add_argument("--keep", action="store_true", help="keep the generated data, caches and students")
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    # one stage, in its own process (run by the script itself)
    parser.add_argument("--stage", choices=sorted(STAGES), help=argparse.SUPPRESS)
    for name in ("result", "dataset", "teacher", "cache", "student", "output"):
        parser.add_argument(f"--{name}", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.update(HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")  # children too

    if args.stage:
        Path(args.result).write_text(json.dumps(STAGES[args.stage](args)))
        return
    args.rows = [int(count) for count in args.rows.split(",")]
    args.stages = [stage for stage in STAGES if stage in args.stages.split(",")]
    args.root = args.root.resolve()
    started = time.perf_counter()
    try:
        summary = measure(args)
    finally:
        if not args.keep:
            cleanup(args.root, args.rows)
    summary["seconds"] = round(time.perf_counter() - started, 1)
    print(table(summary))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(summary, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
