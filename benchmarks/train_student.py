"""Stage two's cost, side by side in one run: seconds per epoch of

  (a) the student trained with cross-entropy only (alpha=0),
  (b) the student distilled from the cache,
  (c) the student distilled online, the teacher run on every batch (the tutorial's way),
  (d) with --views-cache: the student distilled from a cache of K augmented views (each step rebuilds its views
      from the stored source pixels and crop boxes, mixed ones with their partner's, in DataLoader workers),
  floor: the fastest way to train that student here: forward + backward + AdamW step in channels_last on
      in-memory tensors, no Trainer, no data.

    python benchmarks/train_student.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \
        --views-cache data/quality/caches/mixed16 --student-size 128

With --student-size S every figure is at S x S pixels (the floor too); without it, at the teacher's input size.

(a), (b) and (c) run through `kdcache.train_student` (Trainer, the same code as the CLI) for --steps steps without
evaluation or checkpoints; a callback times each step, and the first --warmup steps are not counted. Rounds
alternate a, b, c, floor so that drift in the machine's speed hits all of them alike; ratios are medians of the
per-round ratios. Seconds per epoch = seconds per step x steps in an epoch of the train split.
"""

import argparse
import math
import statistics
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoImageProcessor, TrainerCallback

from kdcache.data import ImagePipeline
from kdcache.format.columns import LOGITS, PIXELS
from kdcache.format.reader import load_cache
from kdcache.format.replay import Collator
from kdcache.options import TrainingOptions
from kdcache.runtime import tune_malloc
from kdcache.student.loss import distillation_loss
from kdcache.student.model import build_student
from kdcache.student.train import train_student
from kdcache.teacher.run import teacher_logits


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def trainer_seconds_per_step(cache, work, warmup, steps, batch_size, **options):
    timer = StepTimer()
    train_student(
        cache,
        output=work,
        max_steps=warmup + steps,
        batch_size=batch_size,
        eval_split=None,
        save_checkpoints=False,
        callbacks=[timer],
        progress=False,
        overwrite=True,
        **options,
    )
    return (timer.times[-1] - timer.times[warmup - 1]) / steps


def floor_seconds_per_step(cache, manifest, warmup, steps, batch_size, student_size):
    """forward + backward + AdamW step of the same student, in channels_last, on batches already in memory."""
    cached, _ = load_cache(cache, verify=False)
    size = (student_size, student_size) if student_size else None
    collate = Collator(ImagePipeline(AutoImageProcessor.from_pretrained(str(cache), backend="pil")), size)
    rows = cached["train"].with_format("numpy", columns=[PIXELS, "labels", LOGITS])
    batches = [
        collate(rows.__getitems__(list(range(i, i + batch_size)))) for i in range(0, batch_size * 4, batch_size)
    ]
    batches = [(batch["pixel_values"], batch["labels"], batch["teacher_logits"]) for batch in batches]
    shape = batches[0][0].shape[1:]
    model = build_student(None, manifest["label_names"], shape, seed=42).train().to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    defaults = TrainingOptions().resolved()  # train-student's loss settings: kd at its declared temperature
    times = []
    for step in range(warmup + steps):
        pixel_values, labels, logits = batches[step % len(batches)]
        loss = distillation_loss(
            model(pixel_values=pixel_values).logits, labels, logits, defaults.temperature, defaults.alpha
        )
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter())
    return (times[-1] - times[warmup - 1]) / steps


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--cache", default=None, help="an existing cache of the train split (else one is made)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--views-cache", default=None, help="a cache written with --views K, timed as (d)")
    parser.add_argument("--student-size", type=int, default=None, help="train (and measure the floor) at S x S pixels")
    args = parser.parse_args()
    tune_malloc()
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    cache = args.cache or teacher_logits(
        args.dataset, args.teacher, output=work / "cache", splits=["train"], progress=False
    )
    cached, manifest = load_cache(cache)
    steps_per_epoch = math.ceil(len(cached["train"]) / args.batch_size)
    print(
        f"teacher {manifest['teacher']['name_or_path']}, train split {len(cached['train'])} rows = "
        f"{steps_per_epoch} steps of {args.batch_size}; {args.steps} timed steps after {args.warmup}, "
        f"{args.rounds} rounds; torch threads {torch.get_num_threads()}; student input "
        f"{args.student_size or manifest['columns']['pixel_values']['shape'][-1]} px"
    )
    size = {"student_size": args.student_size}

    figures = (
        {"a": [], "b": []}
        | ({} if args.student_size else {"c": []})
        | {"floor": []}
        | ({"d": []} if args.views_cache else {})
    )
    for round_index in range(args.rounds):
        figures["a"].append(
            trainer_seconds_per_step(cache, work / "a", args.warmup, args.steps, args.batch_size, alpha=0.0, **size)
        )
        figures["b"].append(
            trainer_seconds_per_step(cache, work / "b", args.warmup, args.steps, args.batch_size, **size)
        )
        if not args.student_size:  # the online teacher needs its own input size
            figures["c"].append(
                trainer_seconds_per_step(
                    cache, work / "c", args.warmup, args.steps, args.batch_size, online=True, teacher=args.teacher
                )
            )
        if args.views_cache:
            figures["d"].append(
                trainer_seconds_per_step(
                    args.views_cache, work / "d", args.warmup, args.steps, args.batch_size, **size
                )
            )
        figures["floor"].append(
            floor_seconds_per_step(cache, manifest, args.warmup, args.steps, args.batch_size, args.student_size)
        )
        print(
            f"round {round_index + 1}: s/epoch "
            + "  ".join(f"({key}) {values[-1] * steps_per_epoch:.1f}" for key, values in figures.items())
        )

    def median_ratio(x, y):
        return statistics.median(a / b for a, b in zip(figures[x], figures[y]))

    medians = {key: statistics.median(values) * steps_per_epoch for key, values in figures.items()}
    print("median s/epoch: " + "  ".join(f"({key}) {value:.1f}" for key, value in medians.items()))
    print(
        f"ratios: (b)/floor {median_ratio('b', 'floor'):.3f}  (b)/(a) {median_ratio('b', 'a'):.3f}"
        + (f"  (c)/(b) {median_ratio('c', 'b'):.2f}" if "c" in figures else "")
        + (
            f"  (d)/floor {median_ratio('d', 'floor'):.3f}  (d)/(b) {median_ratio('d', 'b'):.3f}"
            if args.views_cache
            else ""
        )
    )


if __name__ == "__main__":
    main()
