"""Shipping the student: what `kdcache export` keeps of its accuracy and what it buys in size and speed, over seeds:
what `benchmarks/results/export.json` is.

    python benchmarks/export.py --cache data/beans--effl0-beans \\
        --students data/students/k1-defaults-s0 data/students/k1-defaults-s1 data/students/k1-defaults-s2 \\
        [--qat-students data/students/k1-qat-s0 ...] --root data/export-benchmark

For each student (one per seed): `kdcache.export` with --int8 dynamic and with --int8 static (calibrated on
--calibration-rows images of the cache's training split, its views replayed), and each quantization-aware student
(issue 34's part 3: its folder's kdcache_training.json says so) exported as kdcache does by default (static). Every
model then runs on every row of --split, each image through the student's own image processor as pipeline() feeds
it: test accuracy, top-1 agreement with the fp32 PyTorch student and with the teacher (the cache's logits of the same
rows), size on disk, and speed as `kdcache evaluate --speed` measures it (kdcache.speed: batch-1 latency median and
p90 over 100 runs after warm-up, throughput at batch 32) at each of --threads. Rows: fp32 PyTorch, fp32 ONNX, int8
dynamic, int8 static, int8 QAT; figures mean ± sd over the students. Run it on a quiet machine, one process at a
time: the speeds are the machine's (its processor is recorded).
"""

import argparse
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

import kdcache
from kdcache.data import decode_images, find_label_column, load_image_dataset, load_image_processor, undecoded
from kdcache.format.reader import load_cache, rebuilt_logits
from kdcache.models import align_labels, load_classifier
from kdcache.onnx_runtime import EXPORT_RECORD, FP32_MODEL, INT8_MODEL, OnnxClassifier
from kdcache.speed import measure_speed, torch_threads

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("fp32 PyTorch", "fp32 ONNX", "int8 dynamic", "int8 static", "int8 QAT")


def processor_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def split_rows(cache: Path, split: str):
    """The split's images (decoded, RGB), labels and the cache's teacher logits, in the dataset's label order."""
    cached, manifest = load_cache(cache)
    data = manifest.dataset
    rows = load_image_dataset(data["name_or_path"], data.get("revision"))[split]
    column = data["image_column"]
    images = decode_images(undecoded(rows, column), column, list(range(len(rows))), split)
    label_column = find_label_column({split: rows}, data["label_column"])
    labels = np.asarray(rows[label_column][:], dtype=np.int64)
    teacher = rebuilt_logits(cached[split].with_format("numpy")[:], len(manifest.label_names)).numpy()
    return images, labels, teacher, manifest


def logits_of(run, pixel_values, batch: int = 32) -> np.ndarray:
    with torch.inference_mode():
        return np.concatenate(
            [run(pixel_values[start : start + batch]) for start in range(0, len(pixel_values), batch)]
        )


def speeds(kind: str, model, file: Path | None, sample, threads: list[int]) -> dict:
    figures = {}
    for count in threads:
        if file is None:
            with torch_threads(count):
                figures[str(count)] = measure_speed(lambda pixels: model(pixel_values=pixels), sample, count)
        else:
            session = OnnxClassifier(file, threads=count)
            figures[str(count)] = measure_speed(lambda pixels, s=session: s(pixel_values=pixels), sample, count)
        print(f"    {kind:<13} {count} thread(s): {figures[str(count)]['batch_1_latency_ms_median']:.2f} ms batch 1")
    return figures


def measure_student(student: Path, qat: Path | None, args, images, labels, teacher, names) -> list[dict]:
    """One student's rows: its exports made under ROOT, each model's figures on the split."""
    exports = {}
    for mode in ("dynamic", "static"):
        exports[mode] = args.root / f"{student.name}-{mode}"
        kdcache.export(
            student,
            exports[mode],
            int8=mode,
            calibration=args.cache if mode == "static" else None,
            check_cache=args.cache,
            calibration_rows=args.calibration_rows,
            overwrite=True,
            progress=False,
        )
    if qat is not None:
        exports["qat"] = args.root / f"{qat.name}-qat"
        kdcache.export(
            qat,
            exports["qat"],
            calibration=args.cache,
            calibration_rows=args.calibration_rows,
            overwrite=True,
            progress=False,
        )
    processor = load_image_processor(str(student), flag="--students")
    pixel_values = processor(images, return_tensors="pt")["pixel_values"]
    model = load_classifier(str(student), what="student", flag="--students")
    mapping = align_labels(model.config.id2label, names, "student")  # output index of each dataset class
    models = [
        ("fp32 PyTorch", student, None, lambda x: model(pixel_values=x).logits.numpy()),
        ("fp32 ONNX", exports["static"], exports["static"] / FP32_MODEL, None),
        ("int8 dynamic", exports["dynamic"], exports["dynamic"] / INT8_MODEL, None),
        ("int8 static", exports["static"], exports["static"] / INT8_MODEL, None),
    ]
    if qat is not None:
        models.append(("int8 QAT", exports["qat"], exports["qat"] / INT8_MODEL, None))
    student_top1, rows = None, []
    for kind, folder, file, run in models:
        if file is not None:
            session = OnnxClassifier(file)
            run = session.logits
        predictions = logits_of(run, pixel_values)[:, mapping].argmax(1)  # in the dataset's label order
        student_top1 = predictions if student_top1 is None else student_top1
        labelled = labels >= 0
        size = file.stat().st_size if file is not None else sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        row = {
            "kind": kind,
            "student": str(qat if kind == "int8 QAT" else student),
            "test_accuracy": float((predictions[labelled] == labels[labelled]).mean()),
            "agreement_with_fp32_student": float((predictions == student_top1).mean()),
            "agreement_with_teacher": float((predictions == teacher.argmax(1)).mean()),
            "bytes": size,
            "speed": speeds(kind, model, file, pixel_values[:32], args.threads),
        }
        if file is not None:
            row["export"] = json.loads((folder / EXPORT_RECORD).read_text())["check"]
        rows.append(row)
    return rows


def summary(runs: list[dict], threads: list[int]) -> list[dict]:
    """Mean ± sd of each kind over the students."""

    def mean_sd(values):
        return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0}

    table = []
    for kind in KINDS:
        mine = [run for run in runs if run["kind"] == kind]
        if not mine:
            continue
        row = {"kind": kind, "students": len(mine)}
        for key in ("test_accuracy", "agreement_with_fp32_student", "agreement_with_teacher", "bytes"):
            row[key] = mean_sd([run[key] for run in mine])
        for count in threads:
            for key in ("batch_1_latency_ms_median", "batch_1_latency_ms_p90", "throughput_images_per_second"):
                row[f"{key}_{count}_threads"] = mean_sd([run["speed"][str(count)][key] for run in mine])
        table.append(row)
    return table


def print_table(table: list[dict], threads: list[int]) -> None:
    header = f"{'model':<13} {'test accuracy':>15} {'agree student':>13} {'agree teacher':>13} {'MB':>6}"
    header += "".join(f" {f'ms b1 {t}t (p90)':>16} {f'img/s b32 {t}t':>13}" for t in threads)
    print(header)
    for row in table:
        line = (
            f"{row['kind']:<13} {row['test_accuracy']['mean']:.3f} ± {row['test_accuracy']['sd']:.3f}"
            f" {row['agreement_with_fp32_student']['mean']:13.3f} {row['agreement_with_teacher']['mean']:13.3f}"
            f" {row['bytes']['mean'] / 1e6:6.2f}"
        )
        for t in threads:
            median = row[f"batch_1_latency_ms_median_{t}_threads"]["mean"]
            p90 = row[f"batch_1_latency_ms_p90_{t}_threads"]["mean"]
            line += (
                f" {f'{median:.2f} ({p90:.2f})':>16} {row[f'throughput_images_per_second_{t}_threads']['mean']:13.1f}"
            )
        print(line)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cache", type=Path, required=True, help="The cache the students were trained from.")
    parser.add_argument("--students", type=Path, nargs="+", required=True, help="One student folder per seed.")
    parser.add_argument("--qat-students", type=Path, nargs="*", default=[], help="Quantization-aware ones, paired.")
    parser.add_argument("--split", default="test")
    parser.add_argument("--calibration-rows", type=int, default=128)
    parser.add_argument("--threads", default="1,2", help="Thread counts to time at, comma-separated.")
    parser.add_argument("--root", type=Path, default=Path("data/export-benchmark"), help="Where the exports go.")
    parser.add_argument("--json", type=Path, default=RESULTS / "export.json")
    args = parser.parse_args()
    args.threads = [int(count) for count in args.threads.split(",")]
    if args.qat_students and len(args.qat_students) != len(args.students):
        parser.error("--qat-students: give one per student (the same seeds, in the same order)")
    args.root.mkdir(parents=True, exist_ok=True)
    started = time.time()
    images, labels, teacher, manifest = split_rows(args.cache, args.split)
    runs = []
    for position, student in enumerate(args.students):
        qat = args.qat_students[position] if args.qat_students else None
        print(f"{student}{f' and {qat}' if qat else ''}: exporting, then {len(images)} rows of {args.split}")
        runs += measure_student(student, qat, args, images, labels, teacher, manifest.label_names)
    table = summary(runs, args.threads)
    print_table(table, args.threads)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "cache": str(args.cache),
        "split": args.split,
        "rows": len(images),
        "calibration_rows": args.calibration_rows,
        "threads": args.threads,
        "machine": {"processor": processor_name(), "cpus": os.cpu_count(), "torch": torch.__version__},
        "minutes": round((time.time() - started) / 60, 1),
        "table": table,
        "runs": runs,
    }
    args.json.write_text(json.dumps(result, indent=2) + "\n")
    print(f"written to {args.json}")


if __name__ == "__main__":
    main()
