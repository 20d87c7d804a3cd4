"""Quantization-aware distillation (kdcache.student.quantization, `train-student --student FOLDER
--quantization-aware`): a trained student continued under int8 rounding done as ONNX Runtime will do it, saved as a
plain float student with the scheme in its record; the rounding checked by hand and against ONNX Runtime itself."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import FAST, crash_after_first_save, make_images, save_mobilenet_student, weights
from torch.nn.utils import parametrize

from kdcache import KdcacheError
from kdcache.options import TrainingOptions
from kdcache.outputs import TRAINING_RECORD
from kdcache.student.quantization import ActivationRange, FakeQuantization
from kdcache.student.train import train_student

# tests/helpers.py's tiny MobileNetV2 (depth 0.35, 32 px): ONNX Runtime's QDQ puts 65 QuantizeLinear nodes in its
# graph (the image, 52 conv outputs, 10 residual sums, the pooled features, the logits) and rounds 53 weights, 52 of
# them with a BatchNorm folded in
LAYERS, FOLDED, RANGES = 53, 52, 65


@pytest.fixture(scope="module")
def trained_student(tmp_path_factory, tiny_cache):
    """A student trained as any: what a quantization-aware run continues."""
    folder = tmp_path_factory.mktemp("students")
    start = save_mobilenet_student(folder / "start")
    train_student(tiny_cache, output=folder / "trained", student=str(start), epochs=1, **FAST)
    return folder / "trained"


@pytest.fixture(scope="module")
def qat_student(tmp_path_factory, tiny_cache, trained_student):
    """That student continued quantization-aware for 2 epochs (the rest of the recipe its defaults): its summary."""
    output = tmp_path_factory.mktemp("students") / "qat"
    return train_student(tiny_cache, output=output, **QAT_RUN(trained_student))


def QAT_RUN(trained_student):  # noqa: N802 (the run's options, as FAST is)
    return dict(student=str(trained_student), quantization_aware=True, epochs=2, **FAST)


def tiny_mobilenet(seed=0):
    """The tiny MobileNetV2 in eval mode, as if trained: weights that carry a signal (He's initialisation), BatchNorm
    statistics of its activations on random images, and BatchNorm affine weights far from the identity, so that
    folding them into the convs matters."""
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    torch.manual_seed(seed)
    model = MobileNetV2ForImageClassification(MobileNetV2Config(image_size=32, depth_multiplier=0.35, num_labels=3))
    for module in model.modules():
        if isinstance(module, (torch.nn.Conv2d, torch.nn.Linear)):
            torch.nn.init.kaiming_normal_(module.weight)
        if isinstance(module, torch.nn.BatchNorm2d):
            module.momentum = None  # the statistics of the batch below, exactly
            module.weight.data.uniform_(0.5, 1.0)
            module.bias.data.uniform_(-0.2, 0.2)
    with torch.no_grad():
        model.train()(pixel_values=torch.randn(32, 3, 32, 32))
    return model.eval()


def observe(model, fake: FakeQuantization, images: torch.Tensor) -> None:
    """Calibrate the ranges on `images` as a training step after the BatchNorms are frozen sees them."""
    fake.batchnorm_frozen = True
    model.train()
    with torch.no_grad():
        for start in range(0, len(images), 4):
            model(pixel_values=images[start : start + 4])
    model.eval()


def test_a_quantization_aware_run_continues_a_student_and_saves_a_plain_one(qat_student, trained_student):
    from transformers import pipeline

    output = Path(qat_student["output"])
    record = json.loads((output / TRAINING_RECORD).read_text())
    scheme = record["quantization_aware"]
    assert scheme == qat_student["quantization_aware"]
    assert (scheme["weights"], scheme["activations"], scheme["format"]) == (
        "int8 symmetric per-channel",
        "int8 per-tensor",
        "onnx qdq",
    )
    assert "BatchNorm folded" in scheme["method"] and "QuantFormat.QDQ, per_channel=True" in scheme["simulates"]
    assert (scheme["layers"], scheme["batchnorms_folded"], scheme["activation_ranges"]) == (LAYERS, FOLDED, RANGES)
    # 24 training rows in batches of 8, 2 epochs: ranges observed for the first 2 of 6 steps, BatchNorm until step 4
    assert (scheme["ranges_frozen_at_step"], scheme["batchnorm_frozen_at_step"], record["steps"]) == (2, 4, 6)
    recipe = record["recipe"]
    assert recipe["quantization_aware"] is True and Path(recipe["student"]).name == trained_student.name
    assert (recipe["epochs"], recipe["learning_rate"]) == (2, 1e-4)  # the learning rate: the continuation's default
    assert "quantization_aware" not in json.loads((trained_student / TRAINING_RECORD).read_text())
    # a plain student: the same weights by name as the one it continued (no rounding, no ranges), trained on
    before, after = weights(trained_student), weights(output)
    assert list(after) == list(before)
    assert not any("parametrizations" in name or "kdcache" in name for name in after)
    assert any(not torch.equal(before[name], after[name]) for name in after)
    image = make_images(1, seed=5)[0][0]
    assert len(pipeline("image-classification", model=str(output), top_k=None)(image)) == 3
    assert not output.with_name("qat.partial").exists()
    card = (output / "README.md").read_text()
    assert "| quantization-aware | trained under fake int8 quantization as ONNX Runtime's static int8" in card


def test_a_quantization_aware_run_has_its_own_defaults_and_given_values_win():
    plain = TrainingOptions().resolved()
    continued = TrainingOptions(student="s", quantization_aware=True).resolved()
    given = TrainingOptions(student="s", quantization_aware=True, epochs=5, learning_rate=3e-4).resolved()
    assert (plain.epochs, plain.learning_rate) == (20, 1e-3)
    assert (continued.epochs, continued.learning_rate) == (3, 1e-4)
    assert (given.epochs, given.learning_rate) == (5, 3e-4)


def test_the_fake_quantization_rounds_as_int8_does_by_hand():
    model = tiny_mobilenet()
    fake = FakeQuantization(model, (3, 32, 32))
    assert (len(fake.layers), fake.folded, len(fake.ranges)) == (LAYERS, FOLDED, RANGES)
    observe(model, fake, torch.randn(8, 3, 32, 32))
    # a depthwise conv's weight: its BatchNorm folded in, then int8 per output channel over max|w| / 127
    layer = model.get_submodule("mobilenet_v2.layer.3.conv_3x3")
    conv, batchnorm = layer.convolution, layer.normalization
    factor = (batchnorm.weight / torch.sqrt(batchnorm.running_var + batchnorm.eps)).detach().reshape(-1, 1, 1, 1)
    folded = conv.parametrizations.weight.original.detach() * factor
    scale = folded.abs().amax(dim=(1, 2, 3), keepdim=True) / 127
    by_hand = torch.clamp(torch.round(folded / scale), -127, 127) * scale
    with torch.no_grad():
        rounded = conv.weight * factor  # the parametrized weight, folded as the export folds it
    assert torch.allclose(rounded, by_hand, rtol=1e-5, atol=1e-7)
    assert (by_hand - folded).abs().max() > 1e-3 * folded.abs().max(), "the rounding shows"
    # the activations after it (ReLU6's output): int8 over [min(0, lowest), max(0, highest)] of what was observed
    observer = layer.activation.kdcache_range_output
    seen = []
    hook = layer.activation.register_forward_hook(lambda module, given, output: seen.append((given[0], output)))
    with torch.no_grad():
        model(pixel_values=torch.randn(2, 3, 32, 32))
    hook.remove()
    (relu6_input, rounded_output) = seen[0]
    low, high = float(observer.low), float(observer.high)
    assert low == 0 and 0 < high <= 6  # ReLU6's outputs, the range including 0
    step = (high - low) / 255
    zero_point = np.round(-128 - low / step)
    values = torch.clamp(relu6_input, 0, 6).double()
    by_hand = (torch.clamp(torch.round(values / step) + zero_point, -128, 127) - zero_point) * step
    assert torch.allclose(rounded_output.double(), by_hand, atol=1e-6)
    assert len(torch.unique(rounded_output)) <= 256


def test_the_fake_quantization_changes_the_forward_and_comes_off_without_a_trace():
    model = tiny_mobilenet()
    images = torch.randn(8, 3, 32, 32)
    keys = list(model.state_dict())
    with torch.no_grad():
        before = model(pixel_values=images).logits
    fake = FakeQuantization(model, (3, 32, 32))
    with torch.no_grad():
        unobserved = model(pixel_values=images).logits
    observe(model, fake, images)
    with torch.no_grad():
        rounded = model(pixel_values=images).logits
    assert (rounded - before).abs().max() > 1e-3 * before.abs().max()
    assert (unobserved - before).abs().max() > 0, "weights are rounded before any range is observed"
    fake.remove()
    with torch.no_grad():
        after = model(pixel_values=images).logits
    assert torch.equal(after, before)
    assert list(model.state_dict()) == keys
    for module in model.modules():
        assert not parametrize.is_parametrized(module)
        assert not module._forward_hooks and not module._forward_pre_hooks
        assert not isinstance(module, ActivationRange)
    model.train()  # and every BatchNorm and dropout follows the model's mode again
    with torch.no_grad():
        model(pixel_values=images)
    assert all(module.training for module in model.modules())


@pytest.mark.parametrize(
    "options,message",
    [
        (dict(), r"--quantization-aware continues a trained student; name it with --student FOLDER"),
        (dict(student="mobilenet_v2"), r"--student 'mobilenet_v2' is a model type, which starts from scratch"),
        (dict(student="CONFIG_ONLY"), r"--student '.*config-only' holds a config without weights"),
        (dict(student="FOUR_CLASSES"), r"--student '.*four' classifies 4 classes, not the cache's 3"),
        (dict(student="TRAINED", student_size="16:0.5,32"), r"give --student-size one size, not the schedule"),
        (dict(student="TRAINED", ema_decay=0.99), r"leave out --ema-decay"),
    ],
)
def test_what_quantization_aware_runs_need_is_refused_in_one_line(
    tmp_path, tiny_cache, trained_student, options, message
):
    from transformers import AutoConfig

    students = tmp_path / "students"
    config_only = students / "config-only"
    AutoConfig.from_pretrained(str(trained_student)).save_pretrained(str(config_only))
    folders = {
        "CONFIG_ONLY": config_only,
        "FOUR_CLASSES": save_mobilenet_student(students / "four", num_labels=4),
        "TRAINED": trained_student,
    }
    if "student" in options:
        options["student"] = str(folders.get(options["student"], options["student"]))
    output = tmp_path / "out"
    with pytest.raises(KdcacheError, match=message) as refused:
        train_student(tiny_cache, output=output, quantization_aware=True, max_steps=1, **{**FAST, **options})
    assert "\n" not in str(refused.value)
    assert sorted(path.name for path in tmp_path.iterdir()) == ["students"], "a refused run writes nothing"


def test_the_command_line_refuses_quantization_aware_without_a_student_in_one_line(tmp_path, tiny_cache):
    from typer.testing import CliRunner

    from kdcache.cli import app

    arguments = ["train-student", str(tiny_cache), "--output", str(tmp_path / "s"), "--quantization-aware"]
    result = CliRunner().invoke(app, arguments)
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "kdcache: error: --quantization-aware continues a trained student; name it with --student FOLDER (a "
        "kdcache train-student output, or a hub id of a classifier of the cache's classes)"
    ]
    assert list(tmp_path.iterdir()) == []


def test_resume_continues_a_quantization_aware_run_with_its_ranges(tmp_path, tiny_cache, trained_student, monkeypatch):
    whole = train_student(tiny_cache, output=tmp_path / "whole", **QAT_RUN(trained_student))
    with crash_after_first_save(monkeypatch), pytest.raises(KeyboardInterrupt):
        train_student(tiny_cache, output=tmp_path / "resumed", **QAT_RUN(trained_student))
    without = {**QAT_RUN(trained_student), "quantization_aware": False}
    with pytest.raises(KdcacheError, match=r"--quantization-aware true \(now false\)"):
        train_student(tiny_cache, output=tmp_path / "resumed", resume=True, **without)
    resumed = train_student(tiny_cache, output=tmp_path / "resumed", resume=True, **QAT_RUN(trained_student))
    assert resumed["train_losses"][-3:] == whole["train_losses"][-3:]
    assert resumed["quantization_aware"] == whole["quantization_aware"]
    a, b = weights(tmp_path / "whole"), weights(tmp_path / "resumed")
    assert all(torch.allclose(a[name].float(), b[name].float(), atol=1e-6) for name in a)


def export_onnx(model, path, size=32):
    """The float model as `kdcache export` writes it: torch.onnx.export's default (dynamo) exporter, which folds
    every BatchNorm into its conv."""
    import contextlib
    import io

    with contextlib.redirect_stdout(io.StringIO()):  # the exporter's progress lines
        torch.onnx.export(
            model.eval(),
            (torch.zeros(1, 3, size, size),),
            str(path),
            dynamo=True,
            input_names=["pixel_values"],
            output_names=["logits"],
            dynamic_shapes={"pixel_values": {0: torch.export.Dim("batch")}},
        )


def quantize_qdq(source, target, images: torch.Tensor):
    """ONNX Runtime's static int8 as `kdcache export` runs it (QDQ, per-channel weights, MinMax on `images`)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, quantize_static

    class Images(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"pixel_values": images[i : i + 4].numpy()} for i in range(0, len(images), 4)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(source), str(target), Images(), quant_format=QuantFormat.QDQ, per_channel=True)


def run_onnx(path, images: torch.Tensor) -> torch.Tensor:
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"pixel_values": images.numpy()})[0])


def onnx_runtime_rounding(path, images: torch.Tensor) -> list:
    """Every tensor that the QDQ model at `path` rounds, in graph order: (scale, zero point, its rounded values on
    `images`), the values read as the model's DequantizeLinear nodes give them."""
    import onnx
    import onnxruntime
    from onnx import numpy_helper

    model = onnx.load(str(path))
    constants = {tensor.name: numpy_helper.to_array(tensor) for tensor in model.graph.initializer}
    dequantized = {node.input[0]: node.output[0] for node in model.graph.node if node.op_type == "DequantizeLinear"}
    rounded = [
        (float(constants[node.input[1]]), int(constants[node.input[2]]), dequantized[node.output[0]])
        for node in model.graph.node
        if node.op_type == "QuantizeLinear"
    ]
    for *_, name in rounded:
        model.graph.output.append(onnx.helper.make_empty_tensor_value_info(name))
    session = onnxruntime.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    values = session.run([name for *_, name in rounded], {"pixel_values": images.numpy()})
    return [(scale, zero_point, torch.from_numpy(value)) for (scale, zero_point, _), value in zip(rounded, values)]


def test_given_onnx_runtimes_ranges_the_fake_quantization_rounds_every_tensor_as_onnx_runtime_does(tmp_path):
    pytest.importorskip("onnxruntime")
    model = tiny_mobilenet()
    export_onnx(model, tmp_path / "model.onnx")
    quantize_qdq(tmp_path / "model.onnx", tmp_path / "int8.onnx", torch.randn(16, 3, 32, 32))
    images = torch.randn(4, 3, 32, 32)
    theirs = onnx_runtime_rounding(tmp_path / "int8.onnx", images)
    FakeQuantization(model, (3, 32, 32))
    called = []
    hooks = [module.register_forward_pre_hook(lambda module, _: called.append(module)) for module in model.modules()]
    with torch.no_grad():
        model(pixel_values=images[:1])
    for hook in hooks:
        hook.remove()
    ranges = [module for module in called if isinstance(module, ActivationRange)]
    assert len(ranges) == len(theirs) == RANGES  # one range per tensor ORT rounds, in the same order
    # Each range gets ORT's scale and zero point, and hands on ORT's rounded tensor after computing its own from
    # the ORT tensors before it: so every tensor is compared alone, and float differences in the convs (ORT adds
    # up in another order) cannot grow through the layers, as a rounding turned by one step would.
    mine = []

    def hand_on(theirs):
        def hook(_, __, rounded):
            mine.append(rounded)
            return theirs if theirs.shape == rounded.shape else None

        return hook

    for observer, (scale, zero_point, values) in zip(ranges, theirs):
        observer.low.fill_(scale * (-128 - zero_point))  # ORT's activations: int8, -128..127
        observer.high.fill_(scale * (127 - zero_point))
        observer.register_forward_hook(hand_on(values))
    with torch.no_grad():
        model(pixel_values=images)
    # transformers' MobileNetV2 pads the image itself (TensorFlow's "same" padding, at the bottom and right): the
    # export folds that padding into the first conv, and ORT rounds the image unpadded
    mine[0] = mine[0][..., :32, :32]
    for (scale, _, values), rounded in zip(theirs, mine):
        assert rounded.shape == values.shape
        steps = (rounded - values).abs() / scale
        assert steps.max() < 1.01, "at most one step apart, where float error turned a rounding"
        assert (steps > 0.5).float().mean() < 0.02  # about 0.1% here


def test_a_quantization_aware_student_exports_to_static_int8_that_onnx_runtime_runs(tmp_path, qat_student, tiny_cache):
    pytest.importorskip("onnxruntime")
    import onnx
    from transformers import AutoImageProcessor, AutoModelForImageClassification

    from kdcache.data import ImagePipeline
    from kdcache.format.reader import load_cache

    cache, _ = load_cache(tiny_cache)
    pipeline = ImagePipeline(AutoImageProcessor.from_pretrained(str(tiny_cache), backend="pil"))

    def images(split):  # the student's input: the cache's 8-bit pixels, normalised as training normalises them
        return pipeline.inputs(cache[split].with_format("torch", columns=["pixel_values"])[:]["pixel_values"])

    calibration, validation = images("train"), images("validation")
    student = AutoModelForImageClassification.from_pretrained(qat_student["output"]).eval()
    export_onnx(student, tmp_path / "model.onnx")
    quantize_qdq(tmp_path / "model.onnx", tmp_path / "int8.onnx", calibration)
    graph = onnx.load(str(tmp_path / "int8.onnx")).graph
    # ORT quantized as many tensors as the run rounded
    assert sum(node.op_type == "QuantizeLinear" for node in graph.node) == RANGES
    assert not any(node.op_type == "BatchNormalization" for node in graph.node)  # folded, as the run folded them
    int8_logits = run_onnx(tmp_path / "int8.onnx", validation)
    with torch.no_grad():
        float_logits = student(pixel_values=validation).logits
    assert int8_logits.shape == float_logits.shape and torch.isfinite(int8_logits).all()
