"""Both stages on one CUDA GPU, end to end, with a ViT-B-sized teacher: what a GPU machine should check first.

    python benchmarks/gpu.py                                   # generated images, a ViT-B teacher with random weights
    python benchmarks/gpu.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans

1. Stage one (`kdcache.teacher_logits`) in fp32, bf16 and fp16: images/s of each (the teacher's loop: decoding,
   resizing, forward, chunk writes), and how far the bf16 and fp16 logits are from fp32's (largest absolute
   difference, top-1 agreement), over every cached row.
2. Stage two (`kdcache.train_student`, device cuda, precision auto) for --steps steps from the fp32 cache, and the
   same steps with the teacher run online: images/s of each.
3. `kdcache.evaluate_models` on the student and the teacher (accuracy, images/s, agreement with the cache).

Prints a table and writes benchmarks/results/gpu.json. Without a CUDA GPU it stops with one line (exit status 1).
The random teacher makes accuracies meaningless (about 1/3 on 3 classes); timings and precision gaps are real.
A first, small stage-one run warms the GPU up (kernel selection, allocator) so that fp32, measured first, is not
charged for it.
"""

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results" / "gpu.json"
LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]
PRECISIONS = ("fp32", "bf16", "fp16")


def fail(message: str) -> int:
    print(f"gpu.py: error: {message}", file=sys.stderr)
    return 1


def generated_dataset(folder: Path, sizes: dict, seed: int = 0) -> str:
    """Images whose class shows in their colour and stripes (as in the tests), at a few sizes around 256 px."""
    import datasets
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    colours = [(200, 60, 40), (60, 170, 60), (50, 70, 200)]
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=LABELS)})
    splits = {}
    for name, count in sizes.items():
        images, labels = [], []
        for index in range(count):
            label = int(rng.integers(len(LABELS)))
            width, height = 256 + 16 * (index % 4), 256 + 8 * (index % 3)
            stripes = (np.arange(width)[None, :, None] % (3 + label)) * 12.0
            pixels = np.array(colours[label], np.float32) + rng.normal(0, 40, (height, width, 3)) + stripes
            images.append(Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB"))
            labels.append(label)
        splits[name] = datasets.Dataset.from_dict({"image": images, "labels": labels}, features=features)
    datasets.DatasetDict(splits).save_to_disk(str(folder))
    return str(folder)


def vit_b_teacher(folder: Path) -> str:
    """ViTConfig()'s defaults are ViT-B/16 at 224 px (86M parameters); random weights, a 3-class head."""
    import torch
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    torch.manual_seed(0)
    config = ViTConfig(
        num_labels=len(LABELS), id2label=dict(enumerate(LABELS)), label2id={n: i for i, n in enumerate(LABELS)}
    )
    ViTForImageClassification(config).save_pretrained(str(folder))
    ViTImageProcessorPil().save_pretrained(str(folder))
    return str(folder)


def loop_images_per_second(manifest: dict) -> float:
    """All splits' images over the time of the teacher's loops (the manifest records images/s per split)."""
    splits = manifest["dataset"]["splits"]
    images = sum(split["num_rows"] * split.get("views", 1) for split in splits.values())
    seconds = sum(
        split["num_rows"] * split.get("views", 1) / manifest["images_per_second"][name]
        for name, split in splits.items()
    )
    return images / seconds


def all_logits(cache: Path):
    import numpy as np

    from kdcache.format.columns import LOGITS
    from kdcache.format.reader import load_cache

    cached, _ = load_cache(cache)
    return np.concatenate([np.asarray(cached[name].with_format("numpy")[LOGITS], dtype=np.float32) for name in cached])


def run(args, work: Path) -> dict:
    import torch
    import transformers

    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.format.manifest import Manifest
    from kdcache.student.train import train_student
    from kdcache.teacher.run import teacher_logits

    dataset = args.dataset or generated_dataset(
        work / "dataset", {"train": args.train_images, "validation": 64, "test": 128}
    )
    teacher = args.teacher or vit_b_teacher(work / "teacher")
    results = {
        "gpu": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "dataset": args.dataset or f"generated ({args.train_images} train images)",
        "teacher": args.teacher or "ViTConfig() (ViT-B/16, random weights)",
        "stage_one": {},
        "stage_two": {},
    }

    teacher_logits(dataset, teacher, output=work / "warm-up", splits=[args.split], device="cuda", progress=False)
    caches = {}
    for precision in PRECISIONS:
        caches[precision] = teacher_logits(
            dataset,
            teacher,
            output=work / f"cache-{precision}",
            device="cuda",
            precision=precision,
            batch_size=args.batch_size,
            progress=False,
        )
        results["stage_one"][precision] = {
            "images_per_second": round(loop_images_per_second(Manifest.read(caches[precision])), 1)
        }
    reference = all_logits(caches["fp32"])
    for precision in PRECISIONS[1:]:
        logits = all_logits(caches[precision])
        results["stage_one"][precision].update(
            max_abs_logit_difference_vs_fp32=float(abs(logits - reference).max()),
            top1_agreement_with_fp32=float((logits.argmax(-1) == reference.argmax(-1)).mean()),
        )

    for mode, online in (("from_cache", False), ("online_teacher", True)):
        summary = train_student(
            caches["fp32"],
            output=work / f"student-{mode}",
            device="cuda",
            precision="auto",
            max_steps=args.steps,
            batch_size=args.train_batch_size,
            eval_split=None,
            save_checkpoints=False,
            online=online,
            progress=False,
            logging_steps=args.steps,
        )
        results["stage_two"][mode] = {
            "images_per_second": round(summary["steps"] * summary["recipe"]["batch_size"] / summary["seconds"], 1),
            "steps": summary["steps"],
            "batch_size": summary["recipe"]["batch_size"],
            "precision": summary["recipe"]["precision"],
            "device": summary["recipe"]["device"],
        }

    report = evaluate_models(
        [str(work / "student-from_cache"), teacher],
        split=args.split,
        cache=caches["fp32"],
        batch_size=args.batch_size,
        device="cuda",
        output=work / "eval",
        progress=False,
    )
    results["evaluate"] = {
        result["name"]: {
            "accuracy": result["accuracy"],
            "forward_images_per_second": result["speed"]["forward_images_per_second"],
            "top1_agreement_with_teacher": result["teacher_agreement"]["top1_agreement"],
        }
        for result in report["models"]
    }
    return results


def table(results: dict) -> str:
    lines = [
        f"{results['gpu']}: teacher {results['teacher']}, dataset {results['dataset']}",
        "",
        "stage one       images/s   max |logit - fp32|   top-1 agreement with fp32",
    ]
    for precision, row in results["stage_one"].items():
        lines.append(
            f"  {precision:<12} {row['images_per_second']:>9.1f}   "
            + (
                f"{row['max_abs_logit_difference_vs_fp32']:>18.4g}   {row['top1_agreement_with_fp32']:>27.4f}"
                if precision != "fp32"
                else f"{'-':>18}   {'-':>27}"
            )
        )
    lines += ["", "stage two       images/s   (steps x batch, precision, device)"]
    for mode, row in results["stage_two"].items():
        lines.append(
            f"  {mode:<14} {row['images_per_second']:>7.1f}   ({row['steps']} x {row['batch_size']}, "
            f"{row['precision']}, {row['device']})"
        )
    cached, online = (results["stage_two"][mode]["images_per_second"] for mode in ("from_cache", "online_teacher"))
    lines += [
        f"  from the cache: {cached / online:.2f}x the images/s of the online teacher",
        "",
        "evaluate              accuracy   forward images/s   top-1 agreement with the teacher",
    ]
    for name, row in results["evaluate"].items():
        lines.append(
            f"  {name[:20]:<20} {row['accuracy']:>8.4f}   {row['forward_images_per_second']:>16.1f}   "
            f"{row['top1_agreement_with_teacher']:>32.4f}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", help="a dataset folder or hub id (default: generated images)")
    parser.add_argument(
        "--teacher", help="a teacher folder or hub id (default: ViT-B from ViTConfig(), random weights)"
    )
    parser.add_argument("--split", default="test", help="the split to evaluate on (also the warm-up's)")
    parser.add_argument("--train-images", type=int, default=384, help="train images to generate")
    parser.add_argument("--batch-size", type=int, default=64, help="stage one's and evaluation's batch")
    parser.add_argument("--train-batch-size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=300, help="stage two's steps, from the cache and online")
    parser.add_argument(
        "--work", type=Path, help="keep the datasets, caches and students here (default: a temporary folder)"
    )
    parser.add_argument("--json", type=Path, default=RESULTS, help="where to write the results")
    args = parser.parse_args(argv)

    import torch

    if not torch.cuda.is_available():
        return fail("no CUDA GPU is visible (torch.cuda.is_available() is False); run this on a machine with one")
    from kdcache import KdcacheError

    started = time.perf_counter()
    try:
        if args.work:
            args.work.mkdir(parents=True, exist_ok=True)
            results = run(args, args.work)
        else:
            with tempfile.TemporaryDirectory(prefix="kdcache-gpu-") as work:
                results = run(args, Path(work))
    except KdcacheError as error:
        return fail(str(error))
    results["seconds"] = round(time.perf_counter() - started, 1)
    print(table(results))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")
    print(f"written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
