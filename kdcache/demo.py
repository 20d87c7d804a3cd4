"""`kdcache demo`: the whole pipeline, offline, on scikit-learn's handwritten digits, in a few minutes.

A small ViT teacher is fitted first (the one step a real user has already done); then the same functions as the
real commands run: teacher_logits, train_student twice (distilled, and alpha=0 from scratch, same recipe) plus a
few online steps for timing, and evaluate_models on all three.
"""

import json
import logging
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from kdcache.outputs import OutputKind, guards_output, safe_output
from kdcache.runtime import move_into_place, tune_malloc

log = logging.getLogger("kdcache")
DIGIT_NAMES = [str(digit) for digit in range(10)]
# The demo replaces its output folder on every run; this file, written first into a folder it creates, is how it knows
# a folder is its own. Any other folder that is not empty is refused, never emptied.
DEMO_MARKER = ".kdcache-demo"
DEMO_OUTPUT = OutputKind("a kdcache demo folder", "kdcache demo", DEMO_MARKER, in_place=True)


def build_digits_dataset(path: str | Path, seed: int = 0, image_size: int = 32, limit: int | None = None) -> Path:
    """load_digits (1,797 8x8 images, 10 classes) as a DatasetDict of RGB images: train 60%, validation 20%,
    test 20%, stratified by class with a fixed seed. Deterministic: the same seed writes the same rows."""
    import datasets
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    parts = {"train": [], "validation": [], "test": []}
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))
        if limit:
            rows = rows[: max(3, limit // 10)]
        first, second = int(len(rows) * 0.6), int(len(rows) * 0.8)
        parts["train"] += rows[:first].tolist()
        parts["validation"] += rows[first:second].tolist()
        parts["test"] += rows[second:].tolist()
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=DIGIT_NAMES)})
    splits = {}
    for name, rows in parts.items():
        rows = sorted(rows)
        images = [
            Image.fromarray(pixels[i], "L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")
            for i in rows
        ]
        splits[name] = datasets.Dataset.from_dict(
            {"image": images, "label": digits.target[rows].tolist()}, features=features
        )
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.DatasetDict(splits).save_to_disk(str(partial))
    move_into_place(partial, path)
    return path


def fit_teacher(dataset_path: Path, output: Path, seed: int, epochs: int, progress: bool = True) -> Path:
    """A small ViT fitted with plain cross-entropy: the stand-in for the fine-tuned teacher a user brings."""
    import datasets
    from tqdm.auto import tqdm
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    from kdcache.data import ImagePipeline

    train = datasets.load_from_disk(str(dataset_path))["train"]
    processor = ViTImageProcessorPil(size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    inputs = ImagePipeline(processor)([image.convert("RGB") for image in train["image"]])
    labels = torch.tensor(train["label"][:])
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=256,
        num_labels=10,
        id2label=dict(enumerate(DIGIT_NAMES)),
        label2id={name: index for index, name in enumerate(DIGIT_NAMES)},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.05)
    steps = epochs * math.ceil(len(labels) / 64)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=2e-3, total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    with tqdm(total=steps, desc="fitting the demo teacher", disable=not progress) as bar:
        for _ in range(epochs):
            for batch in torch.randperm(len(labels), generator=generator).split(64):
                loss = model(pixel_values=inputs[batch], labels=labels[batch]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                schedule.step()
                bar.update()
    model.eval().save_pretrained(str(output))
    processor.save_pretrained(str(output))
    return output


def student_config(folder: Path) -> str:
    """A MobileNetV2 sized for 32x32 inputs, as a config-only folder: train_student builds it from scratch."""
    from transformers import MobileNetV2Config

    MobileNetV2Config(image_size=32, depth_multiplier=0.5, num_labels=10).save_pretrained(str(folder))
    return str(folder)


@guards_output
def run_demo(output: str | Path = "data/demo", quick: bool = False, seed: int = 0, progress: bool = True) -> dict:
    root = Path(output)
    # a folder that is neither new, empty nor an earlier demo's is refused, before the imports below (seconds); a
    # second demo on the same folder is refused too, as it would empty it under the first
    with safe_output(root, DEMO_OUTPUT):
        return _run_demo(root, quick, seed, progress)


def _run_demo(root: Path, quick: bool, seed: int, progress: bool) -> dict:
    from kdcache.cache import teacher_logits
    from kdcache.evaluation import evaluate_models
    from kdcache.train import train_student

    tune_malloc()
    started = time.perf_counter()
    say = log.info if progress else (lambda *args, **kwargs: None)
    settings = (
        dict(teacher_epochs=3, student_epochs=2, limit=300)
        if quick
        else dict(teacher_epochs=60, student_epochs=15, limit=None)
    )

    say("[1/5] building the digits dataset (scikit-learn's load_digits, upscaled to 32x32 RGB)")
    dataset = build_digits_dataset(root / "digits", seed=0, limit=settings["limit"])
    say("[2/5] fitting a small ViT teacher")
    teacher = fit_teacher(dataset, root / "teacher", seed, settings["teacher_epochs"], progress)
    say("[3/5] kdcache teacher-logits: the teacher runs once")
    cache = teacher_logits(str(dataset), str(teacher), output=root / "cache", progress=progress)
    say("[4/5] kdcache train-student: distilled, from scratch, and a few online steps for timing")
    student = student_config(root / "student-config")
    # the demo's own recipe, checked on the digits' validation split; beans' defaults are not tuned for 32 px digits
    recipe = dict(student=student, epochs=settings["student_epochs"], learning_rate=2e-3, seed=seed, progress=progress)
    distilled = train_student(cache, output=root / "student-distilled", **recipe)
    scratch = train_student(cache, output=root / "student-scratch", alpha=0.0, **recipe)
    timing = dict(
        student=student,
        max_steps=8 if quick else 20,
        eval_split=None,
        save_checkpoints=False,
        seed=seed,
        progress=False,
    )
    cached_steps = train_student(cache, output=root / "timing-cached", **timing)
    online_steps = train_student(cache, output=root / "timing-online", online=True, **timing)
    steps_per_epoch = distilled["steps"] / distilled["epochs"]
    cached_epoch = cached_steps["seconds"] / cached_steps["steps"] * steps_per_epoch
    online_epoch = online_steps["seconds"] / online_steps["steps"] * steps_per_epoch
    for folder in ("timing-cached", "timing-online"):
        shutil.rmtree(root / folder)
    say("[5/5] kdcache evaluate on the test split")
    report = evaluate_models(
        [str(teacher), str(root / "student-scratch"), str(root / "student-distilled")],
        dataset=str(dataset),
        split="test",
        cache=str(cache),
        output=root / "eval",
        progress=progress,
    )
    results = {
        "accuracy": {
            name: report["models"][i]["accuracy"] for i, name in enumerate(("teacher", "scratch", "distilled"))
        },
        "parameters": {
            name: report["models"][i]["parameters"] for i, name in enumerate(("teacher", "scratch", "distilled"))
        },
        "seconds_per_epoch": {"cached": round(cached_epoch, 2), "online": round(online_epoch, 2)},
        "validation_accuracy": {
            "scratch": scratch["best_eval_accuracy"],
            "distilled": distilled["best_eval_accuracy"],
        },
        "seed": seed,
        "quick": quick,
        "seconds": round(time.perf_counter() - started, 1),
    }
    (root / "demo.json").write_text(json.dumps(results, indent=2) + "\n")
    log.info(demo_table(results))
    return results


def demo_table(results: dict) -> str:
    accuracy, parameters, epoch = results["accuracy"], results["parameters"], results["seconds_per_epoch"]
    rows = [
        ("teacher (ViT, run once)", "teacher"),
        ("student from scratch (alpha=0)", "scratch"),
        ("student distilled from the cache", "distilled"),
    ]
    lines = ["", f"{'model':<34}{'test accuracy':>14}{'parameters':>13}"]
    lines += [f"{label:<34}{accuracy[key]:>14.4f}{parameters[key]:>13,}" for label, key in rows]
    lines.append(
        f"\nseconds per training epoch: {epoch['cached']:.2f} from the cache, {epoch['online']:.2f} with the teacher "
        f"online ({epoch['online'] / epoch['cached']:.2f}x); demo took {results['seconds']:.0f} s"
    )
    return "\n".join(lines)
