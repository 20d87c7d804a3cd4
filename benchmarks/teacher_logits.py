"""Stage one's throughput against the teacher's raw batched forward on pre-made tensors, side by side in one run.

    python benchmarks/teacher_logits.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans
    python benchmarks/teacher_logits.py --dataset ../shared/data/beans --teacher vit-b --split validation

`--teacher vit-b` builds a ViT-B/16-sized classifier from ViTConfig() with random weights (timing only).
Each round times (a) the raw forward over tensors prepared beforehand and (b) `kdcache.teacher_logits` on the same
rows, alternating, and prints the images/s of each and their ratio. The raw forward is timed both in the default
(contiguous) memory format and in channels_last, which stage one uses; the faster of the two is the baseline. Stage one is timed twice: its loop (decode,
resize, forward, chunk writes; what the progress bar shows) and end to end (model load, hashing, assembly, rename).
"""

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch

from kdcache.data import (
    ImagePipeline,
    decode_images,
    find_image_column,
    find_label_column,
    load_image_dataset,
    load_image_processor,
    undecoded,
)
from kdcache.models import load_classifier
from kdcache.runtime import tune_malloc
from kdcache.teacher.run import teacher_logits


def vit_b_teacher(folder: Path, names: list[str]) -> str:
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    config = ViTConfig(
        num_labels=len(names), id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}
    )
    ViTForImageClassification(config).save_pretrained(str(folder))
    ViTImageProcessorPil().save_pretrained(str(folder))
    return str(folder)


def raw_forward(model, tensors, batch_size, memory_format):
    """The teacher alone on batches already in memory, in the given memory format (stage one uses channels_last)."""
    model = model.to(memory_format=memory_format)
    batches = [
        tensors[s : s + batch_size].contiguous(memory_format=memory_format) for s in range(0, len(tensors), batch_size)
    ]
    started = time.perf_counter()
    with torch.inference_mode():
        for batch in batches:
            model(pixel_values=batch)
    return len(tensors) / (time.perf_counter() - started)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True, help="a model folder or hub id, or vit-b")
    parser.add_argument("--split", default="validation")
    parser.add_argument("--limit", type=int, default=None, help="use the first N rows of the split")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--num-workers", type=int, default=None)
    args = parser.parse_args()
    tune_malloc()  # stage one does this itself; the raw baseline gets the same allocator

    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    dataset = load_image_dataset(args.dataset)
    split = dataset[args.split]
    if args.limit:
        split = split.select(range(min(args.limit, len(split))))
    dataset = type(dataset)({args.split: split})
    dataset.save_to_disk(str(work / "data"))  # so that stage one and the baseline read the same rows
    image_column, label_column = find_image_column(split), find_label_column({args.split: split})
    teacher = args.teacher
    if teacher == "vit-b":
        teacher = vit_b_teacher(work / "vit-b", split.features[label_column].names)

    processor = load_image_processor(teacher)
    model = load_classifier(teacher)
    images = decode_images(undecoded(split, image_column), image_column, list(range(len(split))), args.split)
    tensors = ImagePipeline(processor)(images)
    del images
    print(
        f"teacher {args.teacher}, {len(split)} images of split '{args.split}', batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}"
    )

    raw, loop, whole = [], [], []
    for round_index in range(args.rounds):
        contiguous = raw_forward(model, tensors, args.batch_size, torch.contiguous_format)
        channels_last = raw_forward(model, tensors, args.batch_size, torch.channels_last)
        print(
            f"round {round_index + 1}: raw forward contiguous {contiguous:.1f} img/s, channels_last {channels_last:.1f} img/s"
        )
        raw.append(max(contiguous, channels_last))  # the faster of the two is the baseline
        output = work / f"cache-{round_index}"
        started = time.perf_counter()
        teacher_logits(
            str(work / "data"),
            teacher,
            output=output,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
            progress=False,
        )
        elapsed = time.perf_counter() - started
        manifest = json.loads((output / "kdcache.json").read_text())
        loop.append(manifest["images_per_second"][args.split])
        whole.append(len(split) / elapsed)
        print(
            f"round {round_index + 1}: best raw forward {raw[-1]:.1f} img/s | stage one loop {loop[-1]:.1f} img/s "
            f"({loop[-1] / raw[-1]:.3f} of raw) | stage one end to end {whole[-1]:.1f} img/s ({whole[-1] / raw[-1]:.3f})"
        )
    ratio_loop = statistics.median(done / r for done, r in zip(loop, raw))
    ratio_whole = statistics.median(w / r for w, r in zip(whole, raw))
    print(
        f"median: raw {statistics.median(raw):.1f} img/s, stage one loop {statistics.median(loop):.1f} img/s, "
        f"end to end {statistics.median(whole):.1f} img/s; ratio to raw: loop {ratio_loop:.3f}, end to end {ratio_whole:.3f}"
    )


if __name__ == "__main__":
    main()
