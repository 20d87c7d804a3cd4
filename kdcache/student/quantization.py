"""Quantization-aware distillation (`--quantization-aware`): a trained student continued under the rounding that ONNX
Runtime's static int8 quantization will apply to it once exported, so that its weights learn to survive it.

What is simulated is `onnxruntime.quantization.quantize_static` as `kdcache export` runs it: QDQ format, weights
QInt8 per channel, activations per tensor with MinMax calibration (ORT 1.32, read in its quant_utils.py and
qdq_quantizer.py, and checked against its output in tests/student/test_quantization_aware.py):

- a weight is rounded per output channel (axis 0 of a Conv2d's and of a Linear's weight: ORT's Conv and Gemm),
  symmetric: scale max|w| / 127, zero point 0, integers -127..127 (ORT's WeightSymmetric default for int8);
- a conv followed by a BatchNorm is exported with the BatchNorm folded into it (weight times gamma /
  sqrt(running_var + eps) per output channel), so the folded weight is what ORT rounds, and what is rounded here;
- an activation is rounded per tensor, asymmetric: over the range [min(0, lowest), max(0, highest)] seen in
  calibration, scale (high - low) / 255, zero point round(-128 - low / scale) (QInt8; QUInt8's 0..255 is the same
  grid shifted by 128, so both are simulated at once);
- ORT puts one such rounding on every tensor that a quantized op reads or writes. In a CNN built of Conv2d,
  BatchNorm, ReLU/ReLU6 and Linear modules these are: the image (the first layer's input), each conv or linear
  unit's output after its BatchNorm and activation (ORT removes a Relu or Clip that follows a quantized op and
  quantizes over its output's range), the output of any other ReLU/ReLU6, any tensor a block makes itself from its
  parts (MobileNetV2's residual sums) and a Linear's input (the pooled features). On transformers' MobileNetV2 that is
  exactly the 65 QuantizeLinear nodes that quantize_static writes into the tiny test student's graph.

The machinery is plain PyTorch: a parametrization on each Conv2d/Linear weight, forward hooks with a range observer
for each activation, all found by tracing one forward pass (torch.ao's eager QAT would need the model rewritten
with fused modules and QuantStubs; PT2E moved to torchao). Gradients pass straight through the rounding
(torch.fake_quantize_*: the straight-through estimator). `FakeQuantization.remove` takes it all off before the
student is saved, so that the folder holds plain float weights, loaded as any student's.

The run's schedule (QuantizationSchedule), as the QAT literature advises (Krishnamoorthi 2018, "Quantizing deep
convolutional networks for efficient inference", section 3.2; PyTorch's QAT tutorial freezes both late): activation
ranges are observed (min and max over every training batch, ORT's MinMax) during the first third of the steps, then
frozen; BatchNorm statistics go on updating until two thirds of the steps, then are frozen, so that the last third
trains the very arithmetic that ONNX Runtime will run. Dropout is off throughout (FakeQuantization._as_deployed).
Evaluation is always that arithmetic, with the ranges so far. docs/training.md, "Quantization-aware distillation".
"""

import torch
from torch.nn.utils import parametrize
from transformers import TrainerCallback

WEIGHT_INTEGERS = (-127, 127)  # ORT's symmetric int8 weights (quant_utils.ONNX_INT_TYPE_SYMMETRIC_RANGE)
ACTIVATION_INTEGERS = (-128, 127)  # ORT's asymmetric int8 activations (quant_utils.ONNX_INT_TYPE_RANGE)
RANGES_FROZEN_AT = 1 / 3  # of the run's steps: the activation ranges stop being observed
BATCHNORM_FROZEN_AT = 2 / 3  # of the run's steps: the BatchNorm statistics stop updating
LAYERS = (torch.nn.Conv2d, torch.nn.Linear)
ACTIVATIONS = (torch.nn.ReLU, torch.nn.Hardtanh)  # ReLU6 is a Hardtanh; ORT absorbs the Relu and Clip they export as

# What kdcache_training.json records of a quantization-aware student, for `kdcache export` and its readers.
SCHEME = {
    "weights": "int8 symmetric per-channel",
    "activations": "int8 per-tensor",
    "format": "onnx qdq",
    "method": (
        "fake quantization (straight-through gradients) of every Conv2d and Linear weight per output channel, "
        "symmetric over max|w| / 127, a conv's with its BatchNorm folded in as the ONNX export folds it; and of every "
        "activation ONNX Runtime's QDQ quantizes (the image, each layer's output after its BatchNorm and ReLU/ReLU6, "
        "residual sums, a Linear's input) per tensor, asymmetric over MinMax ranges observed on the training batches "
        f"for the first {RANGES_FROZEN_AT:.0%} of the steps; BatchNorm statistics frozen after {BATCHNORM_FROZEN_AT:.0%}"
    ),
    "simulates": (
        "onnxruntime.quantization.quantize_static(quant_format=QuantFormat.QDQ, per_channel=True, "
        "weight_type=QuantType.QInt8, activation_type=QuantType.QInt8 or QUInt8, calibrate_method=MinMax)"
    ),
}


def fake_quantize_weight(weight: torch.Tensor) -> torch.Tensor:
    """`weight` rounded as ORT rounds it: per output channel (axis 0), symmetric, scale max|w| / 127."""
    scale = weight.detach().abs().flatten(1).amax(dim=1).float() / WEIGHT_INTEGERS[1]
    scale = torch.where(scale > torch.finfo(torch.float32).tiny, scale, 1.0)  # ORT's scale for an all-zero channel
    zero_point = torch.zeros(scale.shape, dtype=torch.int32, device=weight.device)
    return torch.fake_quantize_per_channel_affine(weight, scale, zero_point, 0, *WEIGHT_INTEGERS)


def batchnorm_factor(batchnorm: torch.nn.modules.batchnorm._BatchNorm) -> torch.Tensor:
    """What folding `batchnorm` into the conv before it multiplies each output channel's weight by: gamma /
    sqrt(running_var + eps). A channel whose gamma is 0 outputs beta whatever its weight: it keeps factor 1."""
    factor = torch.rsqrt(batchnorm.running_var + batchnorm.eps)
    if batchnorm.weight is not None:
        factor = batchnorm.weight * factor
    return torch.where(factor == 0, 1.0, factor)


class FakeQuantizedWeight(torch.nn.Module):
    """The parametrization of a Conv2d's or Linear's weight: the weight as ORT will round it. A conv whose output
    goes into a BatchNorm is exported with the BatchNorm folded in: the folded weight (weight times
    batchnorm_factor) is rounded, then divided by the factor again, so that the BatchNorm after it, once its
    statistics are frozen, gives exactly the output of the folded, rounded conv (PyTorch's ConvBn QAT modules do the
    same). While they still update, the batch statistics normalise as in any training step."""

    def __init__(self, batchnorm=None):
        super().__init__()
        # a function, not a submodule: the BatchNorm stays where it is in the model (and in its state dict)
        self.folded = None if batchnorm is None else (lambda: batchnorm_factor(batchnorm))

    def forward(self, weight):
        if self.folded is None:
            return fake_quantize_weight(weight)
        factor = self.folded().reshape(-1, *[1] * (weight.dim() - 1))
        return fake_quantize_weight(weight * factor) / factor


class ActivationRange(torch.nn.Module):
    """One tensor rounded as ORT's MinMax calibration and QuantizeLinear will round it: over the lowest and highest
    values seen in training batches while `observing` (the range always includes 0, as ORT's does), scale (high -
    low) / 255, zero point round(-128 - low / scale). Before anything is observed it lets values through. The range
    is two buffers, so checkpoints keep it (--resume, the best epoch's student)."""

    def __init__(self):
        super().__init__()
        self.register_buffer("low", torch.zeros(()))
        self.register_buffer("high", torch.zeros(()))
        self.observing = True

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        if self.training and self.observing:
            seen = values.detach()
            torch.minimum(self.low, seen.min().float(), out=self.low)
            torch.maximum(self.high, seen.max().float(), out=self.high)
        if not self.high > self.low:  # nothing observed yet (or only zeros, which any grid keeps)
            return values
        scale = (self.high - self.low) / (ACTIVATION_INTEGERS[1] - ACTIVATION_INTEGERS[0])
        zero_point = torch.round(ACTIVATION_INTEGERS[0] - self.low / scale).clamp(*ACTIVATION_INTEGERS).int()
        rounded = torch.fake_quantize_per_tensor_affine(values.float(), scale, zero_point, *ACTIVATION_INTEGERS)
        return rounded.to(values.dtype)


RANGE = "kdcache_range"  # the name of a module's ActivationRange submodule while the fake quantization is on


class FakeQuantization:
    """The fake quantization put on a student (by building one: a traced forward pass says where), its schedule
    (`follow`), what it is (`record`), and its removal (`remove`), which leaves the student as it was, with the
    weights it learned."""

    def __init__(self, model: torch.nn.Module, pixel_shape: tuple):
        self.model, self.handles, self.ranges = model, [], []
        self.layers, self.folded = [], 0
        self.batchnorm_frozen, self.frozen_at = False, None
        calls, order = _trace(model, pixel_shape)
        self._attach(calls, order)

    def _attach(self, calls: dict, order: list) -> None:
        """The weights of every Conv2d and Linear; the activations of module_outputs; the image; Linear inputs."""
        made_by = {}  # id(tensor) -> the innermost module that returned it (hooks run as modules return: inner first)
        for module in order:
            if torch.is_tensor(calls[module][1]):
                made_by.setdefault(id(calls[module][1]), module)
        blocks = {module for module in order if list(module.children())}  # before the parametrizations add some
        takes = {}  # id(tensor) -> the leaf modules that took it as input
        for module, (given, _) in calls.items():
            if torch.is_tensor(given) and module not in blocks:
                takes.setdefault(id(given), []).append(module)
        rounded = set()  # the modules whose output gets an ActivationRange
        for layer in [module for module in order if isinstance(module, LAYERS)]:
            end, batchnorm = layer, None
            for follower in takes.get(id(calls[layer][1]), []):
                if isinstance(layer, torch.nn.Conv2d) and isinstance(follower, torch.nn.BatchNorm2d):
                    end = batchnorm = follower
            for follower in takes.get(id(calls[end][1]), []):
                if isinstance(follower, ACTIVATIONS):
                    end = follower
            self.layers.append((layer, list(layer._parameters)))  # their order, which the removal restores
            parametrize.register_parametrization(layer, "weight", FakeQuantizedWeight(batchnorm))
            self.folded += batchnorm is not None
            rounded.add(end)
        rounded |= {module for module in order if isinstance(module, ACTIVATIONS)}
        rounded |= {module for module in blocks if _makes_its_output(module, calls[module], made_by)}
        for module in [module for module in order if module in rounded]:
            self._round(module, output=True)
        first = next(module for module in order if isinstance(module, LAYERS))
        for layer, _ in self.layers:
            given = calls[layer][0]
            if layer is first or (isinstance(layer, torch.nn.Linear) and made_by.get(id(given)) not in rounded):
                self._round(layer, output=False)
        for module in self.model.modules():
            if isinstance(module, (torch.nn.modules.batchnorm._BatchNorm, torch.nn.modules.dropout._DropoutNd)):
                self.handles.append(module.register_forward_pre_hook(self._as_deployed))

    def _round(self, module, output: bool) -> None:
        """An ActivationRange on `module`'s output (or input), kept as its submodule so that it follows the model."""
        name = RANGE + ("_output" if output else "_input")
        observer = ActivationRange().train(module.training)
        module.add_module(name, observer)
        self.ranges.append((module, name))
        if output:
            self.handles.append(module.register_forward_hook(lambda _, __, result: getattr(_, name)(result)))
        else:
            self.handles.append(
                module.register_forward_pre_hook(lambda _, given: (getattr(_, name)(given[0]), *given[1:]))
            )

    def _as_deployed(self, module, _given) -> None:
        """Dropout, always, and a BatchNorm once frozen, run in training steps as they run deployed: the Trainer
        sets the whole model to training mode at every step, so they are set back here, before each call. A frozen
        BatchNorm normalises with its running statistics (and leaves them as they are). Dropout is off because its
        training-time scaling by 1 / (1 - p) would widen the range observed on the features it passes to the
        classifier beyond what ORT calibrates on the deployed model (MobileNetV2's classifier dropout, 0.2)."""
        if self.batchnorm_frozen or not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.training = False  # not .train(False): the ActivationRange on a BatchNorm's output still observes

    def follow(self, step: int, steps: int) -> None:
        """The schedule at `step` of `steps`: ranges observed for the first RANGES_FROZEN_AT of the steps, BatchNorm
        statistics updated for the first BATCHNORM_FROZEN_AT. A function of the step alone: --resume agrees."""
        self.frozen_at = {
            "ranges_frozen_at_step": max(1, round(steps * RANGES_FROZEN_AT)),
            "batchnorm_frozen_at_step": max(1, round(steps * BATCHNORM_FROZEN_AT)),
        }
        observing = step < self.frozen_at["ranges_frozen_at_step"]
        for module, name in self.ranges:
            getattr(module, name).observing = observing
        self.batchnorm_frozen = step >= self.frozen_at["batchnorm_frozen_at_step"]

    def record(self) -> dict:
        """kdcache_training.json's "quantization_aware": the scheme simulated and what it covered."""
        return {
            **SCHEME,
            "layers": len(self.layers),
            "batchnorms_folded": self.folded,
            "activation_ranges": len(self.ranges),
            **(self.frozen_at or {}),
        }

    def remove(self) -> None:
        """Take the fake quantization off: the weights become plain parameters again (as trained, unrounded), the
        hooks and ranges go, and every BatchNorm follows the model's mode again."""
        for layer, order in self.layers:
            parametrize.remove_parametrizations(layer, "weight", leave_parametrized=False)
            for name in order:  # the weight comes back last: put it back before the bias, as saved models have it
                layer._parameters[name] = layer._parameters.pop(name)
        for handle in self.handles:
            handle.remove()
        for module, name in self.ranges:
            delattr(module, name)
        self.layers, self.handles, self.ranges = [], [], []
        self.batchnorm_frozen = False


def _trace(model: torch.nn.Module, pixel_shape: tuple):
    """One forward pass of a random batch in eval mode, recording each module's first input and its output (the
    tensors themselves, so that their identity says which module took which module's output) in call order."""
    calls, order = {}, []

    def record(module, given, output):
        if module not in calls:
            calls[module] = (given[0] if given else None, output)
            order.append(module)

    handles = [module.register_forward_hook(record) for module in model.modules()]
    training = model.training
    model.eval()
    try:
        with torch.no_grad():
            parameter = next(model.parameters())
            model(pixel_values=torch.randn(2, *pixel_shape, device=parameter.device, dtype=parameter.dtype))
    finally:
        for handle in handles:
            handle.remove()
        model.train(training)
    return calls, order


def _makes_its_output(module, call, made_by) -> bool:
    """Whether the block `module` returns a tensor none of its submodules returned nor it was given: one it made
    itself from its parts (a residual sum, a product), which ORT quantizes as an Add's or Mul's output."""
    given, output = call
    return torch.is_tensor(output) and output is not given and made_by.get(id(output)) is module


class QuantizationSchedule(TrainerCallback):
    """Tells the fake quantization where the run is, before every training step (FakeQuantization.follow)."""

    def __init__(self, fake: FakeQuantization):
        self.fake = fake

    def on_train_begin(self, args, state, control, **kwargs):
        self.fake.follow(state.global_step, state.max_steps)

    def on_step_begin(self, args, state, control, **kwargs):
        self.fake.follow(state.global_step, state.max_steps)
