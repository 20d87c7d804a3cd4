"""A real trained teacher with 100 classes, offline: "two-digit numbers" composed from scikit-learn's load_digits.

    python benchmarks/many_classes.py build --root /work/many-classes [--seed 0] [--epochs 30]

writes ROOT/dataset (a DatasetDict: image, label "00".."99") and ROOT/teacher (a small ResNet that transformers loads
as an image classifier, with a PIL ViT image processor), skipping what exists; then

    kdcache teacher-logits --dataset ROOT/dataset --teacher ROOT/teacher --output ROOT/cache-full

caches it like any teacher. Used to measure what a few-class dataset cannot show: what compressing 100-way soft
targets costs.

Each image is a left digit and a right digit side by side (two 8x8 digits, 8x16, upscaled to 32x32 RGB); the class
is 10 * left + right. The 1,797 source digits are first split into disjoint train / validation / test pools (60/20/20,
stratified by digit, fixed seed: the same pools as `kdcache demo`'s digits), and each split is composed only from its
own pool, so validation and test are held-out handwriting, not new pairings of training images. The teacher is
trained on fresh random pairs from the train pool every epoch (the augmentation; the pool never meets validation or
test), and is reported on validation only.
"""

import argparse
import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch

NAMES = [f"{number:02d}" for number in range(100)]
SPLITS = ("train", "validation", "test")
BUILDER = "benchmarks/many_classes.py"


def digit_pools(seed: int = 0) -> tuple[np.ndarray, dict[str, list[np.ndarray]]]:
    """load_digits' 8-bit pixels (1797, 8, 8), and per split the source rows of each digit: 60/20/20 per digit, as
    kdcache demo's build_digits_dataset splits them for the same seed. The three pools are disjoint."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    pixels = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)
    rng = np.random.default_rng(seed)
    pools = {split: [] for split in SPLITS}
    for digit in range(10):
        rows = rng.permutation(np.flatnonzero(digits.target == digit))
        first, second = int(len(rows) * 0.6), int(len(rows) * 0.8)
        for split, part in zip(SPLITS, (rows[:first], rows[first:second], rows[second:])):
            pools[split].append(np.sort(part))
    return pixels, pools


def sample_pairs(pools: list[np.ndarray], per_class: int, rng: np.random.Generator) -> np.ndarray:
    """(100 * per_class, 3) rows of (left source row, right source row, label), in a random order: per_class pairs of
    each class, each digit drawn from its pool (without replacement within a class where the pool is large enough)."""
    rows = []
    for label in range(100):
        left, right = divmod(label, 10)
        lefts = rng.choice(pools[left], per_class, replace=per_class > len(pools[left]))
        rights = rng.choice(pools[right], per_class, replace=per_class > len(pools[right]))
        rows.append(np.stack([lefts, rights, np.full(per_class, label)], axis=1))
    rows = np.concatenate(rows)
    return rows[rng.permutation(len(rows))]


def compose(pixels: np.ndarray, left: int, right: int, image_size: int = 32):
    """Two 8x8 digits side by side (8x16), upscaled bilinearly to image_size x image_size, as an RGB PIL image."""
    from PIL import Image

    pair = np.concatenate([pixels[left], pixels[right]], axis=1)
    return Image.fromarray(pair, "L").resize((image_size, image_size), Image.BILINEAR).convert("RGB")


def dataset_plan(seed: int, per_class: tuple[int, int, int]) -> dict[str, np.ndarray]:
    """The rows build_dataset composes, per split: a function of the seed and per_class alone."""
    _, pools = digit_pools(seed)
    rng = np.random.default_rng([seed, 1])
    return {split: sample_pairs(pools[split], count, rng) for split, count in zip(SPLITS, per_class)}


def build_dataset(
    path: str | Path, seed: int = 0, image_size: int = 32, per_class: tuple[int, int, int] = (40, 10, 10)
) -> Path:
    """The 100-class two-digit-numbers DatasetDict (image: datasets.Image, label: ClassLabel "00".."99"), with
    per_class[i] images of each class in split i, saved with save_to_disk. Deterministic for a seed. Each split's
    DatasetInfo.description records the recipe (JSON), which fit_teacher reads to rebuild the train pool."""
    import datasets

    from kdcache.runtime import move_into_place

    per_class = tuple(int(count) for count in per_class)
    pixels, pools = digit_pools(seed)
    plan = dataset_plan(seed, per_class)
    recipe = {
        "builder": BUILDER,
        "seed": seed,
        "image_size": image_size,
        "per_class": list(per_class),
        "pool_sizes": {split: sum(len(pool) for pool in pools[split]) for split in SPLITS},
    }
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=NAMES)})
    splits = {}
    for split, rows in plan.items():
        images = [compose(pixels, left, right, image_size) for left, right, _ in rows]
        info = datasets.DatasetInfo(description=json.dumps(recipe), features=features)
        splits[split] = datasets.Dataset.from_dict(
            {"image": images, "label": rows[:, 2].tolist()}, features=features, info=info
        )
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    datasets.DatasetDict(splits).save_to_disk(str(partial))
    move_into_place(partial, path)
    return path


def dataset_recipe(dataset) -> dict:
    """The recipe build_dataset recorded, checked against the rows: a few rows of each split are composed again."""
    recipe = json.loads(dataset["train"].info.description or "{}")
    if recipe.get("builder") != BUILDER:
        raise SystemExit(f"not a dataset written by {BUILDER}.build_dataset (no recipe in its DatasetInfo)")
    pixels, _ = digit_pools(recipe["seed"])
    plan = dataset_plan(recipe["seed"], tuple(recipe["per_class"]))
    for split in SPLITS:
        for index in (0, len(plan[split]) // 2, len(plan[split]) - 1):
            left, right, label = plan[split][index]
            row = dataset[split][int(index)]
            expected = np.asarray(compose(pixels, left, right, recipe["image_size"]))
            if row["label"] != label or not np.array_equal(np.asarray(row["image"].convert("RGB")), expected):
                raise SystemExit(f"{split} row {index} differs from the recipe in the dataset's DatasetInfo")
    return recipe


def teacher_config():
    """A small ResNet (basic blocks, one per stage, 32-64-128-256 channels): 32x32 -> 8x8 after the stem, 1x1 after
    the last stage, so that the pooled features keep where each digit is (a global pool over a larger map would
    have to learn left from right at the borders)."""
    from transformers import ResNetConfig

    return ResNetConfig(
        num_channels=3,
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="basic",
        num_labels=len(NAMES),
        id2label=dict(enumerate(NAMES)),
        label2id={name: index for index, name in enumerate(NAMES)},
    )


def soft_target_stats(logits: torch.Tensor, temperatures=(1.0, 5.0)) -> dict:
    """Mean max-probability and mean entropy (nats; log(100) = 4.61 is uniform) of softmax(logits / T)."""
    stats = {}
    for temperature in temperatures:
        probabilities = torch.softmax(logits.double() / temperature, dim=-1)
        entropy = -(probabilities * torch.log(probabilities.clamp_min(1e-300))).sum(-1)
        stats[f"T={temperature:g}"] = {
            "mean_max_probability": round(probabilities.max(-1).values.mean().item(), 4),
            "mean_entropy_nats": round(entropy.mean().item(), 4),
        }
    return stats


def fit_teacher(
    dataset_path: str | Path,
    output: str | Path,
    seed: int = 0,
    epochs: int = 30,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    progress: bool = True,
) -> dict:
    """Fit the ResNet teacher with plain cross-entropy (no label smoothing: it would flatten the dark knowledge the
    benchmark measures) on fresh random pairs from the train pool every epoch, as many as the train split holds.
    Saves model, ViTImageProcessorPil (32x32, mean/std 0.5) and many_classes_teacher.json (the training record:
    validation accuracy per epoch, soft-target statistics) into output. Returns the record."""
    import datasets
    from tqdm.auto import tqdm
    from transformers import ResNetForImageClassification, ViTImageProcessorPil

    from kdcache.data import ImagePipeline
    from kdcache.runtime import move_into_place

    started = time.perf_counter()
    dataset = datasets.load_from_disk(str(dataset_path))
    if dataset["train"].features["label"].names != NAMES:
        raise SystemExit(f"{dataset_path}: the label names are not 00..99")
    recipe = dataset_recipe(dataset)
    pixels, pools = digit_pools(recipe["seed"])
    size = recipe["image_size"]
    processor = ViTImageProcessorPil(size={"height": size, "width": size}, image_mean=[0.5] * 3, image_std=[0.5] * 3)
    pipeline = ImagePipeline(processor)

    def inputs(images):
        return pipeline.normalize(torch.from_numpy(pipeline.pixels(images)))

    validation = dataset["validation"]
    validation_inputs = inputs([image.convert("RGB") for image in validation["image"]])
    validation_labels = torch.tensor(validation["label"][:])

    torch.manual_seed(seed)
    model = ResNetForImageClassification(teacher_config())
    parameters = sum(p.numel() for p in model.parameters())
    per_epoch = len(dataset["train"])
    steps_per_epoch = math.ceil(per_epoch / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    rng = np.random.default_rng([seed, 2])

    @torch.no_grad()
    def validation_logits():
        model.eval()
        logits = torch.cat([model(pixel_values=batch).logits for batch in validation_inputs.split(256)])
        model.train()
        return logits

    history = []
    model.train()
    with tqdm(total=epochs * steps_per_epoch, desc="fitting the 100-class teacher", disable=not progress) as bar:
        for epoch in range(epochs):
            rows = sample_pairs(pools["train"], per_epoch // 100, rng)
            train_inputs = inputs([compose(pixels, left, right, size) for left, right, _ in rows])
            train_labels = torch.from_numpy(rows[:, 2].astype(np.int64))
            losses = []
            for batch in torch.arange(len(rows)).split(batch_size):
                loss = model(pixel_values=train_inputs[batch], labels=train_labels[batch]).loss
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                schedule.step()
                losses.append(loss.item())
                bar.update()
            accuracy = (validation_logits().argmax(-1) == validation_labels).float().mean().item()
            history.append({"epoch": epoch + 1, "train_loss": round(float(np.mean(losses)), 4), "val_acc": accuracy})
            bar.set_postfix(loss=f"{np.mean(losses):.3f}", val_acc=f"{accuracy:.4f}")
    seconds = time.perf_counter() - started
    logits = validation_logits()
    record = {
        "dataset": str(dataset_path),
        "dataset_recipe": recipe,
        "architecture": "ResNetForImageClassification (basic blocks, depths 1-1-1-1, 32-64-128-256 channels)",
        "parameters": parameters,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "learning_rate": learning_rate,
        "optimizer": "AdamW (weight decay 0.05), one-cycle schedule, plain cross-entropy",
        "train_images_per_epoch": len(rows),
        "training_seconds": round(seconds, 1),
        "torch_threads": torch.get_num_threads(),
        "validation_accuracy": (logits.argmax(-1) == validation_labels).float().mean().item(),
        "validation_soft_targets": soft_target_stats(logits),
        "history": history,
    }
    output = Path(output)
    partial = output.with_name(output.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    model.eval().save_pretrained(str(partial))
    processor.save_pretrained(str(partial))
    (partial / "many_classes_teacher.json").write_text(json.dumps(record, indent=2) + "\n")
    move_into_place(partial, output)
    return record


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    build = commands.add_parser("build", help="write ROOT/dataset and ROOT/teacher, skipping what exists")
    build.add_argument("--root", default="data/many-classes")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--image-size", type=int, default=32)
    build.add_argument("--per-class", default="40,10,10", help="images per class in train,validation,test")
    build.add_argument("--epochs", type=int, default=30)
    build.add_argument("--no-progress", action="store_true")
    args = parser.parse_args()

    root = Path(args.root)
    root.mkdir(parents=True, exist_ok=True)
    dataset, teacher = root / "dataset", root / "teacher"
    if dataset.exists():
        print(f"{dataset}: exists, kept")
    else:
        per_class = tuple(int(count) for count in args.per_class.split(","))
        build_dataset(dataset, seed=args.seed, image_size=args.image_size, per_class=per_class)
        print(f"{dataset}: written")
    import datasets

    for split, rows in datasets.load_from_disk(str(dataset)).items():
        print(f"  {split}: {len(rows)} images")
    if teacher.exists():
        print(f"{teacher}: exists, kept")
        record = json.loads((teacher / "many_classes_teacher.json").read_text())
    else:
        record = fit_teacher(dataset, teacher, seed=args.seed, epochs=args.epochs, progress=not args.no_progress)
        print(f"{teacher}: written")
    print(
        f"  {record['architecture']}, {record['parameters']:,} parameters, {record['epochs']} epochs in "
        f"{record['training_seconds']:.0f} s; validation accuracy {record['validation_accuracy']:.4f}"
    )
    for temperature, stats in record["validation_soft_targets"].items():
        print(
            f"  validation soft targets at {temperature}: mean max-probability {stats['mean_max_probability']:.4f}, "
            f"mean entropy {stats['mean_entropy_nats']:.4f} nats (uniform: {math.log(100):.4f})"
        )


if __name__ == "__main__":
    main()
