"""Stage two on hosts with several GPUs: one process trains on one device, the one --device names.

No GPU is needed for the mocked tests: transformers decides n_gpu and the device from torch.cuda's answers, so
faking those (2 GPUs visible) shows what the Trainer kdcache builds would do on such a host. The tests marked
`cuda` run only where there is a GPU.
"""

import contextlib
import json
from functools import cached_property
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForImageClassification, Trainer, TrainingArguments

from kdcache import KdcacheError, devices
from kdcache.outputs import TRAINING_RECORD
from kdcache.runtime import pick_device
from kdcache.student.train import train_student
from kdcache.student.trainer import DistillationTrainer

FAST = dict(batch_size=8, progress=False, logging_steps=1)
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


class RefusedDataParallel(torch.nn.DataParallel):  # a class still: accelerate tests models with isinstance
    def __init__(self, *args, **kwargs):
        raise AssertionError("the Trainer wrapped the student in DataParallel")


@pytest.fixture
def two_gpus(monkeypatch):
    """torch.cuda as on a host with 2 GPUs; returns the devices made current with torch.cuda.set_device."""
    current = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: current.append(torch.device(device)))
    monkeypatch.setattr(torch.nn, "DataParallel", RefusedDataParallel)
    return current


def test_the_trainer_kdcache_builds_uses_cuda_1_alone_on_a_two_gpu_host(tmp_path, tiny_cache, two_gpus, monkeypatch):
    """--device cuda:1: the Trainer's device, accelerate's (where batches go) and the current device are cuda:1,
    n_gpu is 1 (no DataParallel), and the summary records the batch and processes that ran."""
    seen = {}

    def no_training(self, *args, **kwargs):  # nothing can run on a fake GPU; what matters is how it is set up
        seen.update(
            device=self.args.device,
            n_gpu=self.args.n_gpu,
            batch=self.args.train_batch_size,
            accelerator=self.accelerator.device,
            wrapped=self._wrap_model(self.model),
        )
        self.state.epoch = 0.0

    monkeypatch.setattr(Trainer, "_move_model_to_device", lambda self, model, device: None)
    monkeypatch.setattr(DistillationTrainer, "train", no_training)
    summary = train_student(tiny_cache, output=tmp_path / "s", device="cuda:1", precision="fp32", max_steps=1, **FAST)
    assert seen["device"] == torch.device("cuda", 1) and seen["accelerator"] == torch.device("cuda", 1)
    assert seen["n_gpu"] == 1 and seen["batch"] == 8
    assert not isinstance(seen["wrapped"], torch.nn.DataParallel)
    assert two_gpus[-1] == torch.device("cuda", 1), "the current device is the chosen one"
    recipe = json.loads((tmp_path / "s" / TRAINING_RECORD).read_text())["recipe"]
    # the record names local inputs by folder name (nothing private is pushed); the summary keeps the paths
    local = ("teacher", "cache")
    assert {key: value for key, value in summary["recipe"].items() if key not in local} == {
        key: value for key, value in recipe.items() if key not in local
    }
    assert [recipe[key] for key in local] == [Path(summary["recipe"][key]).name for key in local]
    assert (recipe["device"], recipe["batch_size"], recipe["processes"]) == ("cuda:1", 8, 1)


def test_a_host_with_two_gpus_trains_at_the_given_batch(tmp_path, tiny_cache, monkeypatch):
    """Training for real (on the CPU) with transformers told that 2 GPUs are visible, as it is on such a host: the
    steps are of --batch-size images, not batch x GPUs, and no DataParallel comes in."""
    real = TrainingArguments._setup_devices.func

    def as_on_two_gpus(self):
        device = real(self)
        self._n_gpu = 2  # what transformers sets on a plain run with 2 GPUs visible
        return device

    fake = cached_property(as_on_two_gpus)
    fake.__set_name__(TrainingArguments, "_setup_devices")
    monkeypatch.setattr(TrainingArguments, "_setup_devices", fake)
    monkeypatch.setattr(torch.nn, "DataParallel", RefusedDataParallel)
    summary = train_student(tiny_cache, output=tmp_path / "s", epochs=1, eval_split=None, **FAST)
    assert summary["steps"] == 3, "24 training rows in steps of 8"
    assert (summary["recipe"]["batch_size"], summary["recipe"]["processes"]) == (8, 1)


def test_a_gpu_index_the_machine_lacks_is_refused(two_gpus):
    assert pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(KdcacheError, match=r"--device 'cuda:2'.* has 2 CUDA GPUs .*cuda:0 to cuda:1"):
        pick_device("cuda:2")


@pytest.mark.parametrize("native,expected", [(True, "bf16"), (False, "fp32")])
def test_auto_precision_takes_bf16_only_where_the_gpu_has_it(monkeypatch, native, expected):
    asked = []

    def is_bf16_supported(including_emulation=True):
        asked.append(including_emulation)
        return native or including_emulation  # a pre-Ampere GPU: emulated bf16 only

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", is_bf16_supported)
    monkeypatch.setattr(torch.cuda, "device", lambda device: contextlib.nullcontext())
    assert devices.training_precision("auto", torch.device("cuda", 1)) == expected
    assert asked == [False]
    assert devices.training_precision("auto", torch.device("cpu")) == "fp32"
    assert devices.training_precision("fp16", torch.device("cuda", 0)) == "fp16"
    with pytest.raises(KdcacheError, match="--precision bf16 needs a CUDA device"):
        devices.training_precision("bf16", torch.device("cpu"))
    with pytest.raises(KdcacheError, match="--precision 'fp8' is not one of auto, fp32, bf16, fp16"):
        devices.training_precision("fp8", torch.device("cuda", 0))


@cuda
def test_cached_and_online_training_on_a_gpu(tmp_path, tiny_cache):
    cached = train_student(tiny_cache, output=tmp_path / "cached", device="cuda", max_steps=4, **FAST)
    online = train_student(tiny_cache, output=tmp_path / "online", device="cuda", max_steps=4, online=True, **FAST)
    for summary in (cached, online):
        recipe = summary["recipe"]
        assert recipe["device"] == f"cuda:{torch.cuda.current_device()}"
        assert (recipe["batch_size"], recipe["processes"], summary["steps"]) == (8, 1, 4)
        assert recipe["precision"] == ("bf16" if devices.native_bf16(torch.device("cuda")) else "fp32")
    # bf16 rounds differently batch by batch; in fp32 the two runs are the same computation
    tolerance = 1e-4 if cached["recipe"]["precision"] == "fp32" else 5e-2
    assert max(abs(a - b) for a, b in zip(cached["train_losses"], online["train_losses"])) <= tolerance
    AutoModelForImageClassification.from_pretrained(str(tmp_path / "online"))


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_both_stages_on_the_second_gpu(tmp_path, make_cache):
    from kdcache.format.manifest import MANIFEST

    cache = make_cache(tmp_path / "cache", device="cuda:1")
    assert json.loads((cache / MANIFEST).read_text())["device"] == "cuda:1"
    summary = train_student(cache, output=tmp_path / "s", device="cuda:1", online=True, max_steps=3, **FAST)
    assert (summary["recipe"]["device"], summary["recipe"]["processes"], summary["steps"]) == ("cuda:1", 1, 3)
