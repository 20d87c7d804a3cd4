"""Where and in what precision stage two trains: exactly the device kdcache chose, one per process.

transformers' TrainingArguments ignores the device a caller has in mind: on a plain run (no launcher) it takes
cuda:0 and counts every visible GPU (`n_gpu = torch.cuda.device_count()`), and the Trainer then wraps the model in
`torch.nn.DataParallel` over all of them, multiplying the batch by the number of GPUs. kdcache trains one process on
one device unless it was launched as several processes (DDP, one GPU each), so that --device, --batch-size and the
recorded process count mean what they say.
"""

from dataclasses import dataclass, field
from functools import cached_property

import torch
from transformers import TrainingArguments

from kdcache.errors import KdcacheError
from kdcache.options import PRECISIONS


@dataclass
class OneDeviceArguments(TrainingArguments):
    """TrainingArguments that train on `kdcache_device` (e.g. "cuda:1"), and never on more than one device per
    process. Under a launch of several processes the launcher's placement (one GPU per process) stays as it is."""

    kdcache_device: str | None = field(default=None, metadata={"help": "The device kdcache chose (--device)."})

    @cached_property
    def _setup_devices(self) -> torch.device:
        device = TrainingArguments._setup_devices.func(self)
        state = self.distributed_state
        if state is not None and state.num_processes > 1:
            return device
        # Without this, n_gpu is the count of visible GPUs and the Trainer adds DataParallel over all of them.
        self._n_gpu = min(self._n_gpu, 1)
        chosen = torch.device(self.kdcache_device) if self.kdcache_device else device
        if chosen.type == "cuda":
            # accelerate places the model and batches on its state's device ("cuda": the current device): both must
            # be the chosen one.
            torch.cuda.set_device(chosen)
            if state is not None:
                state.device = chosen
            return chosen
        return device


def resolve_cuda(device: torch.device) -> torch.device:
    """`cuda` as the GPU it means (the current one), so that what is recorded names it."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


def native_bf16(device: torch.device) -> bool:
    """Whether the GPU computes in bf16 itself. torch.cuda.is_bf16_supported() also says yes for GPUs that only
    emulate it (pre-Ampere), several times slower than fp32 there, and it asks about the current GPU, not `device`."""
    with torch.cuda.device(device):
        try:
            return bool(torch.cuda.is_bf16_supported(including_emulation=False))
        except TypeError:  # a torch without the argument: native means compute capability 8 or more
            return bool(torch.version.hip) or torch.cuda.get_device_capability(device)[0] >= 8


def training_precision(precision: str, device: torch.device) -> str:
    """The precision to train in (fp32, bf16 or fp16) for --precision on `device`."""
    if precision not in PRECISIONS:
        raise KdcacheError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if precision == "auto":
        return "bf16" if device.type == "cuda" and native_bf16(device) else "fp32"
    if precision != "fp32" and device.type != "cuda":
        raise KdcacheError(
            f"--precision {precision} needs a CUDA device (bf16 on CPU is several times slower); use fp32"
        )
    return precision
