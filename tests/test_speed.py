"""kdcache.speed: every model timed the same way: the runs it counts, the figures it derives from them."""

import time

import torch

from kdcache.speed import LATENCY_RUNS, THROUGHPUT_BATCH, THROUGHPUT_RUNS, WARMUP_RUNS, measure_speed, torch_threads


def test_latency_and_throughput_come_from_the_runs_they_say():
    calls = []

    def forward(pixels):  # a model that takes at least 1 ms a call
        calls.append(pixels.shape[0])
        time.sleep(0.001)

    figures = measure_speed(forward, torch.zeros(5, 3, 8, 8), threads=1)
    assert calls == [1] * (WARMUP_RUNS + LATENCY_RUNS) + [THROUGHPUT_BATCH] * (2 + THROUGHPUT_RUNS)
    assert 1 <= figures["batch_1_latency_ms_median"] <= figures["batch_1_latency_ms_p90"]
    assert 0 < figures["throughput_images_per_second"] <= THROUGHPUT_BATCH * 1000 and figures["threads"] == 1


def test_torch_threads_are_restored():
    before = torch.get_num_threads()
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before
