"""What kdcache's allocator tuning (runtime.tune_malloc) buys on CPU, and what it costs in memory.

    python benchmarks/allocator.py --teacher ../shared/teachers/effl0-beans

Each measurement runs in a fresh process (glibc's settings are per process), alternating tuned and untuned:
  teacher: the teacher's batched forward (batch 32, 224 px, channels_last, inference mode), images/s;
  student: MobileNetV2Config() training steps (forward, backward, AdamW), images/s;
with the peak resident memory of each process. KDCACHE_MALLOC_TUNING=0 turns the tuning off.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys

CHILD = r"""
import json, resource, sys, time, torch
from kdcache.runtime import tune_malloc
tuned = tune_malloc()
kind, teacher, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
x = torch.randn(32, 3, 224, 224)
if kind == "teacher":
    from transformers import AutoModelForImageClassification
    model = AutoModelForImageClassification.from_pretrained(teacher).eval().to(memory_format=torch.channels_last)
    x = x.contiguous(memory_format=torch.channels_last)
    def step():
        with torch.inference_mode():
            model(pixel_values=x)
else:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification
    torch.manual_seed(0)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(num_labels=3))
    optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
    y = torch.randint(0, 3, (32,))
    def step():
        model(pixel_values=x, labels=y).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
step(); step()
started = time.perf_counter()
for _ in range(steps):
    step()
rate = 32 * steps / (time.perf_counter() - started)
print(json.dumps({"tuned": tuned, "images_per_second": rate, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def measure(kind, teacher, steps, tuned):
    env = dict(os.environ, KDCACHE_MALLOC_TUNING="1" if tuned else "0")
    output = subprocess.run(
        [sys.executable, "-c", CHILD, kind, teacher, str(steps)], env=env, check=True, capture_output=True, text=True
    ).stdout
    return json.loads(output.strip().splitlines()[-1])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", required=True)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    for kind in ("teacher", "student"):
        rates = {True: [], False: []}
        memory = {True: [], False: []}
        for _ in range(args.rounds):
            for tuned in (False, True):
                result = measure(kind, args.teacher, args.steps, tuned)
                assert result["tuned"] == tuned or not tuned, "tuning was asked for but not applied (not glibc?)"
                rates[tuned].append(result["images_per_second"])
                memory[tuned].append(result["peak_rss_mb"])
        ratio = statistics.median(t / u for t, u in zip(rates[True], rates[False]))
        print(
            f"{kind}: untuned {statistics.median(rates[False]):.1f} img/s, peak {statistics.median(memory[False]):.0f} MB | "
            f"tuned {statistics.median(rates[True]):.1f} img/s, peak {statistics.median(memory[True]):.0f} MB | "
            f"speed-up {ratio:.2f}x (median of {args.rounds} paired rounds)"
        )


if __name__ == "__main__":
    main()
