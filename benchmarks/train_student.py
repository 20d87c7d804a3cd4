"""Stage two's cost, side by side in one run: seconds per epoch of

  (a) the student trained with cross-entropy only (alpha=0),
  (b) the student distilled from the cache,
  (c) the student distilled online, the teacher run on every batch (the tutorial's way),
  (d) with --views-cache: the student distilled from a cache of K augmented views (each step rebuilds its views
      from the stored JPEG bytes and crop boxes, in DataLoader workers),
  floor: the student's pure compute, forward + backward + AdamW step on in-memory tensors, no Trainer, no data.

    python benchmarks/train_student.py --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans

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

from kdcache.cache import LOGITS, PIXELS, load_cache, teacher_logits
from kdcache.data import ImagePipeline
from kdcache.loss import distillation_loss
from kdcache.runtime import tune_malloc
from kdcache.train import build_student, train_student


class StepTimer(TrainerCallback):
    def __init__(self):
        self.times = []

    def on_step_end(self, args, state, control, **kwargs):
        self.times.append(time.perf_counter())


def trainer_seconds_per_step(cache, work, warmup, steps, batch_size, **options):
    timer = StepTimer()
    train_student(cache, output=work, max_steps=warmup + steps, batch_size=batch_size, eval_split=None,
                  save_checkpoints=False, callbacks=[timer], progress=False, overwrite=True, **options)
    return (timer.times[-1] - timer.times[warmup - 1]) / steps


def floor_seconds_per_step(cache, manifest, warmup, steps, batch_size):
    """forward + backward + AdamW step of the same student on batches already in memory, as float tensors."""
    cached, _ = load_cache(cache, verify=False)
    pipeline = ImagePipeline(AutoImageProcessor.from_pretrained(str(cache), backend="pil"))
    rows = cached["train"].with_format("torch")[: batch_size * 4]
    batches = [
        (pipeline.normalize(rows[PIXELS][i : i + batch_size]), rows["labels"][i : i + batch_size], rows[LOGITS][i : i + batch_size])
        for i in range(0, batch_size * 4, batch_size)
    ]
    model = build_student(None, manifest["label_names"], manifest["columns"]["pixel_values"]["shape"], seed=42).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    times = []
    for step in range(warmup + steps):
        pixel_values, labels, logits = batches[step % len(batches)]
        loss = distillation_loss(model(pixel_values=pixel_values).logits, labels, logits)
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
    args = parser.parse_args()
    tune_malloc()
    work = Path(tempfile.mkdtemp(prefix="kdcache-bench-"))
    cache = args.cache or teacher_logits(args.dataset, args.teacher, output=work / "cache", splits=["train"], progress=False)
    cached, manifest = load_cache(cache)
    steps_per_epoch = math.ceil(len(cached["train"]) / args.batch_size)
    print(f"teacher {manifest['teacher']['name_or_path']}, train split {len(cached['train'])} rows = "
          f"{steps_per_epoch} steps of {args.batch_size}; {args.steps} timed steps after {args.warmup}, "
          f"{args.rounds} rounds; torch threads {torch.get_num_threads()}")

    figures = {"a": [], "b": [], "c": [], "floor": []} | ({"d": []} if args.views_cache else {})
    for round_index in range(args.rounds):
        figures["a"].append(trainer_seconds_per_step(cache, work / "a", args.warmup, args.steps, args.batch_size, alpha=0.0))
        figures["b"].append(trainer_seconds_per_step(cache, work / "b", args.warmup, args.steps, args.batch_size))
        figures["c"].append(trainer_seconds_per_step(cache, work / "c", args.warmup, args.steps, args.batch_size,
                                                     online=True, teacher=args.teacher))
        if args.views_cache:
            figures["d"].append(trainer_seconds_per_step(args.views_cache, work / "d", args.warmup, args.steps, args.batch_size))
        figures["floor"].append(floor_seconds_per_step(cache, manifest, args.warmup, args.steps, args.batch_size))
        print(f"round {round_index + 1}: s/epoch " + "  ".join(f"({key}) {values[-1] * steps_per_epoch:.1f}" for key, values in figures.items()))

    def median_ratio(x, y):
        return statistics.median(a / b for a, b in zip(figures[x], figures[y]))

    medians = {key: statistics.median(values) * steps_per_epoch for key, values in figures.items()}
    print("median s/epoch: " + "  ".join(f"({key}) {value:.1f}" for key, value in medians.items()))
    print(f"ratios: (b)/floor {median_ratio('b', 'floor'):.3f}  (b)/(a) {median_ratio('b', 'a'):.3f}  "
          f"(c)/(b) {median_ratio('c', 'b'):.2f}"
          + (f"  (d)/floor {median_ratio('d', 'floor'):.3f}  (d)/(b) {median_ratio('d', 'b'):.3f}" if args.views_cache else ""))


if __name__ == "__main__":
    main()
