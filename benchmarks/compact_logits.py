"""What compact logits (`kdcache teacher-logits --logits-dtype fp16 --top-k K`) cost and save.

    python benchmarks/compact_logits.py bytes                      # bytes per image, 3, 100 and 1000 classes
    python benchmarks/compact_logits.py kl CACHE [CACHE ...]       # the soft targets' KL, per K, of full caches
    python benchmarks/compact_logits.py students --dataset D --teacher T --storages fp32,fp16-top10 --seeds 0 1 2

`bytes` makes caches of a tiny random teacher of 3, 100 and 1000 classes over 64 generated images, in every storage,
and measures the bytes per image of the logit columns and of whole rows (32 px pixels) from their Arrow buffers.

`kl` reads the float32 logits of full caches (every split, every view) and stores each row as every storage would,
rebuilt as stage two rebuilds it (kdcache.format.codec.compress_logits, expand_logits): mean and largest
KL(softmax(t/T) || softmax(rebuilt/T)) at T=1 and at the loss's T=5, and the teacher's mass at T=5 outside the top K.

`students` makes one cache per storage (ROOT/caches/STORAGE) and trains a student from each for every seed with the
same options (kdcache defaults, or --set KEY=VALUE), appending a line per student to
benchmarks/results/compact-logits-runs.jsonl: its best validation accuracy and, with --test, its test accuracy
(once per final student). `table` averages them per storage into benchmarks/results/compact-logits.json.
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
RUNS, TABLE = RESULTS / "compact-logits-runs.jsonl", RESULTS / "compact-logits.json"


def storage_options(name: str) -> dict:
    """'fp32', 'fp16', 'fp16-top10', 'fp32-top5': CacheOptions' logits_dtype and top_k."""
    dtype, _, top = name.partition("-top")
    return {"logits_dtype": dtype, "top_k": int(top) if top else None}


def bytes_per_image(cache) -> tuple[float, float]:
    """The bytes per image of the logit columns (teacher_logits, and a top-K cache's indices and tail) and of whole rows
    (the 32 px pixels and labels too), over every split, from their Arrow buffers as stored."""
    from kdcache.format.reader import load_cache, logit_columns

    cached, _ = load_cache(cache)
    logits = rows = everything = 0
    for split in cached.values():
        logits += sum(split.data.column(name).nbytes for name in logit_columns(split))
        everything += split.data.nbytes
        rows += len(split)
    return logits / rows, everything / rows


def tiny_teacher(path: Path, names: list[str]) -> Path:
    """A random ViT of 32 px with `names` as its classes: what its logits are does not change their bytes."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        id2label=dict(enumerate(names)),
        label2id={name: index for index, name in enumerate(names)},
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(str(path))
    ViTImageProcessorPil(size={"height": 32, "width": 32}).save_pretrained(str(path))
    return path


def bytes_table(args):
    import datasets

    from kdcache.teacher.run import teacher_logits

    results = []
    with tempfile.TemporaryDirectory() as folder:
        folder = Path(folder)
        for classes in (3, 100, 1000):
            names = [f"class-{index}" for index in range(classes)]
            rng = np.random.default_rng(0)
            images = [rng.integers(0, 255, (32, 32, 3), dtype=np.uint8) for _ in range(64)]
            features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=names)})
            data = datasets.Dataset.from_dict(
                {"image": images, "label": [index % classes for index in range(64)]}, features=features
            )
            datasets.DatasetDict({"train": data}).save_to_disk(str(folder / f"data-{classes}"))
            teacher = tiny_teacher(folder / f"teacher-{classes}", names)
            for storage in ("fp32", "fp16", "fp16-top10", "fp16-top5", "fp16-top1"):
                options = storage_options(storage)
                if options["top_k"] and options["top_k"] >= classes:
                    continue
                cache = teacher_logits(
                    str(folder / f"data-{classes}"),
                    str(teacher),
                    output=folder / f"cache-{classes}-{storage}",
                    progress=False,
                    **options,
                )
                logits, row = bytes_per_image(cache)
                results.append(
                    {"classes": classes, "storage": storage, "logit_bytes_per_image": logits, "row_bytes_32px": row}
                )
                print(json.dumps(results[-1]), flush=True)
    write_results({"bytes": results})


def kl_table(args):
    import torch

    from kdcache.format.codec import compress_logits, expand_logits
    from kdcache.format.reader import load_cache, logit_columns
    from kdcache.student.loss import soft_target_kl

    results = []
    for cache in args.caches:
        cached, manifest = load_cache(cache)
        if manifest.top_k or manifest.logits_dtype != "float32":
            raise SystemExit(f"{cache}: give a cache of float32 logits of every class, to compress here")
        logits = torch.cat(
            [
                torch.as_tensor(
                    np.asarray(split.with_format("numpy", columns=logit_columns(split))[:]["teacher_logits"])
                )
                .float()
                .reshape(-1, len(manifest.label_names))
                for split in cached.values()
            ]
        )
        classes = logits.shape[-1]
        for storage in ["fp16"] + [f"fp16-top{k}" for k in args.top_k if k < classes]:
            options = storage_options(storage)
            dtype = torch.float16 if options["logits_dtype"] == "fp16" else torch.float32
            rebuilt = expand_logits(**compress_logits(logits, options["top_k"], dtype), classes=classes)
            line = {"cache": str(cache), "classes": classes, "targets": len(logits), "storage": storage}
            # the yardstick: how far the teacher's targets at T=5 are from knowing nothing (the uniform distribution)
            line["kl_to_uniform_mean_T5"] = float(soft_target_kl(logits, torch.zeros_like(logits), 5.0).mean())
            for temperature in (1.0, 5.0):
                kl = soft_target_kl(logits, rebuilt, temperature)
                line[f"kl_mean_T{temperature:g}"] = float(kl.mean())
                line[f"kl_max_T{temperature:g}"] = float(kl.max())
            if options["top_k"]:
                probabilities = (logits / 5.0).softmax(-1)
                kept = probabilities.topk(options["top_k"], dim=-1).values.sum(-1)
                line["mass_outside_top_k_T5"] = float((1 - kept).mean())
                # the road not taken: a tail logit that keeps the tail's mass at T=5 rather than at T=1 (the loss's
                # temperature is stage two's choice, unknown when the cache is written)
                values, indices = logits.topk(options["top_k"], dim=-1)
                rest = logits.scatter(-1, indices, float("-inf")) / 5.0
                tail = 5.0 * (torch.logsumexp(rest, -1) - np.log(classes - options["top_k"]))
                at_t5 = tail[:, None].expand(-1, classes).clone().scatter(-1, indices, values)
                line["kl_mean_T5_tail_kept_at_T5"] = float(soft_target_kl(logits, at_t5, 5.0).mean())
            results.append(line)
            print(json.dumps(line), flush=True)
    write_results({"kl": results})


def students(args):
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.student.train import train_student
    from kdcache.teacher.run import teacher_logits

    root = Path(args.root)
    overrides = dict(parse_setting(item) for item in args.set)
    for storage in args.storages.split(","):
        cache = teacher_logits(
            args.dataset, args.teacher, output=root / "caches" / storage, progress=False, **storage_options(storage)
        )
        for seed in args.seeds:
            student = root / "students" / f"{storage}-s{seed}"
            started = time.time()
            summary = train_student(cache, output=student, seed=seed, overwrite=True, progress=False, **overrides)
            line = {
                "storage": storage,
                "seed": seed,
                "training": overrides,
                "validation_accuracy": summary["best_eval_accuracy"],
                "best_epoch": summary["best_epoch"],
                "curve": [round(entry["eval_accuracy"], 4) for entry in summary["history"]],
                "stage_two_minutes": round((time.time() - started) / 60, 2),
                "dataset": args.dataset,
                "teacher": args.teacher,
                "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
            }
            if args.test:  # once per final student, after every choice was made on validation
                report = evaluate_models(
                    [str(student)],
                    dataset=args.dataset,
                    split="test",
                    cache=str(cache),
                    output=student / "eval-test",
                    progress=False,
                )
                line["test_accuracy"] = report["models"][0]["accuracy"]
            RESULTS.mkdir(parents=True, exist_ok=True)
            with open(RUNS, "a") as runs:
                runs.write(json.dumps(line) + "\n")
            print(json.dumps(line), flush=True)


def table(args):
    lines = [json.loads(line) for line in RUNS.read_text().splitlines() if line.strip()]
    rows = {}
    for line in lines:
        rows.setdefault((line["storage"], json.dumps(line["training"], sort_keys=True)), []).append(line)
    summary = []
    for (storage, training), runs in rows.items():
        row = {"storage": storage, "training": json.loads(training), "seeds": [run["seed"] for run in runs]}
        for key in ("validation_accuracy", "test_accuracy"):
            values = [run[key] for run in runs if key in run]
            if len(values) == len(runs):
                row[key] = {"mean": round(statistics.mean(values), 4), "sd": round(statistics.stdev(values), 4)}
        summary.append(row)
        print(json.dumps(row))
    write_results({"students": summary})


def write_results(update: dict) -> None:
    RESULTS.mkdir(parents=True, exist_ok=True)
    current = json.loads(TABLE.read_text()) if TABLE.exists() else {}
    current.update(update)
    TABLE.write_text(json.dumps(current, indent=2) + "\n")


def parse_setting(item: str):
    key, _, value = item.partition("=")
    return key, json.loads(value)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("bytes").set_defaults(run=bytes_table)
    kl = commands.add_parser("kl")
    kl.add_argument("caches", nargs="+")
    kl.add_argument("--top-k", type=lambda text: [int(k) for k in text.split(",")], default=[1, 2, 5, 10, 20, 50])
    kl.set_defaults(run=kl_table)
    run = commands.add_parser("students")
    run.add_argument("--dataset", required=True)
    run.add_argument("--teacher", required=True)
    run.add_argument("--storages", default="fp32,fp16-top10")
    run.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    run.add_argument("--root", default="data/compact-logits")
    run.add_argument("--set", action="append", default=[], help="KEY=JSON, a training option for every student")
    run.add_argument("--test", action="store_true")
    run.set_defaults(run=students)
    commands.add_parser("table").set_defaults(run=table)
    args = parser.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()
