"""How fast a classifier runs, measured the same way for a PyTorch model and an ONNX Runtime one: batch-1 latency
(median and 90th percentile over LATENCY_RUNS runs after warm-up) and throughput at batch THROUGHPUT_BATCH, on a
stated number of threads. `kdcache evaluate --speed` and benchmarks/export.py report it."""

import contextlib
import time

import numpy as np
import torch

LATENCY_RUNS, WARMUP_RUNS = 100, 10
THROUGHPUT_BATCH, THROUGHPUT_RUNS = 32, 10

MEASURED = (
    f"batch-1 latency: median and p90 of {LATENCY_RUNS} single-image forward passes after {WARMUP_RUNS} untimed "
    f"ones; throughput: {THROUGHPUT_RUNS} forward passes of a batch of {THROUGHPUT_BATCH} after 2 untimed ones; "
    "the model alone (no decoding or preprocessing), on the CPU, at the stated threads"
)


@contextlib.contextmanager
def torch_threads(threads: int):
    """PyTorch's intra-op threads set to `threads` for the block, restored after."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def measure_speed(forward, sample, threads: int) -> dict:
    """Latency and throughput of `forward` (a callable taking a float32 (batch, 3, H, W) tensor) on rows of
    `sample` (repeated up to THROUGHPUT_BATCH rows when it has fewer). The caller runs `forward` on `threads`
    threads (torch_threads, or an ONNX Runtime session made with them); the figure records them."""
    sample = torch.as_tensor(sample, dtype=torch.float32)
    batch = sample[torch.arange(THROUGHPUT_BATCH) % len(sample)].contiguous()
    one = batch[:1].contiguous()
    with torch.inference_mode():
        for _ in range(WARMUP_RUNS):
            forward(one)
        latencies = []
        for _ in range(LATENCY_RUNS):
            started = time.perf_counter()
            forward(one)
            latencies.append(time.perf_counter() - started)
        for _ in range(2):
            forward(batch)
        started = time.perf_counter()
        for _ in range(THROUGHPUT_RUNS):
            forward(batch)
        seconds = time.perf_counter() - started
    milliseconds = 1000 * np.asarray(latencies)
    return {
        "threads": threads,
        "batch_1_latency_ms_median": round(float(np.median(milliseconds)), 3),
        "batch_1_latency_ms_p90": round(float(np.percentile(milliseconds, 90)), 3),
        "throughput_batch": THROUGHPUT_BATCH,
        "throughput_images_per_second": round(THROUGHPUT_BATCH * THROUGHPUT_RUNS / seconds, 1),
        "measured": MEASURED,
    }
