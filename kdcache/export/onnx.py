"""Writing the ONNX models: the student as it is (torch.onnx.export's dynamo exporter) and its int8 versions (ONNX
Runtime's quantization tools), each refused in one line when the tools cannot write it."""

import contextlib
import io
import logging
import warnings
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import KdcacheError, first_line
from kdcache.onnx_runtime import INSTALL

INPUT, OUTPUT = "pixel_values", "logits"  # the names transformers' classifiers and optimum's exports use
# The opset torch 2.13's dynamo exporter writes by default; per-channel QDQ needs 13 or later.
OPSET = 18

# What --int8 static writes, as ONNX Runtime's quantize_static is told (and what a quantization-aware student trains
# for: docs/export.md). Signed int8 for both (S8S8), ONNX Runtime's recommended first choice on x86 CPUs.
STATIC_SCHEME = {
    "format": "QDQ (QuantizeLinear/DequantizeLinear pairs around each quantized operator)",
    "weights": "int8, symmetric, per output channel",
    "activations": "int8, asymmetric (a zero point), per tensor",
    "calibration": "MinMax: each activation's range over the calibration images",
    "tool": "onnxruntime.quantization.quantize_static after quant_pre_process (BatchNorm folded, shapes inferred)",
}
DYNAMIC_SCHEME = {
    "format": "QOperator (ConvInteger, MatMulInteger)",
    "weights": "int8, symmetric, per tensor",
    "activations": "uint8, their range computed on each input at run time",
    "tool": "onnxruntime.quantization.quantize_dynamic after quant_pre_process",
}


def exporter_modules() -> dict:
    """The versions of the export's tools, or one line saying how to install them (the optional extra)."""
    try:
        import onnx
        import onnxruntime
        import onnxscript
    except ImportError as error:
        raise KdcacheError(
            f"kdcache export needs onnx, onnxruntime and onnxscript (missing: {error.name}), an optional extra; "
            f"install it with {INSTALL}"
        ) from None
    return {
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "onnxscript": onnxscript.__version__,
    }


class _Logits(torch.nn.Module):
    """The classifier as a function of pixel_values alone, returning the logits tensor (not a ModelOutput)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits


@contextlib.contextmanager
def _quiet():
    """The exporter's progress lines and warnings (torchvision ops skipped, deprecations) left out of kdcache's."""
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    exporter_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
            warnings.simplefilter("ignore")
            yield
    finally:
        exporter_log.setLevel(level)


def export_fp32(model, sample: torch.Tensor, path: Path, student: str) -> None:
    """The student as an fp32 ONNX model at `path`, its batch dimension dynamic, its weights inside the one file.

    torch.onnx.export(dynamo=True): torch.export traces the model and onnxscript translates and optimises the graph;
    the TorchScript exporter (dynamo=False) is deprecated in torch 2.9 and later. A model it cannot trace or translate
    is refused, and nothing is written."""
    try:
        with _quiet():
            torch.onnx.export(
                _Logits(model.eval()),
                (sample,),
                str(path),
                dynamo=True,
                external_data=False,  # one self-contained file (a student of a few MB)
                input_names=[INPUT],
                output_names=[OUTPUT],
                dynamic_shapes={INPUT: {0: torch.export.Dim("batch")}},
                opset_version=OPSET,
                verbose=False,
            )
    except Exception as error:
        raise KdcacheError(
            f"student '{student}' ({type(model).__name__}) cannot be exported to ONNX by torch.onnx.export "
            f"(dynamo=True): {type(error).__name__}: {first_line(error)}; export another architecture, or report it"
        ) from None


class _Batches:
    """The calibration images as ONNX Runtime's CalibrationDataReader reads them: one batch after another."""

    def __init__(self, pixel_values: np.ndarray, batch_size: int = 16):
        self.batches = iter(
            {INPUT: np.ascontiguousarray(pixel_values[start : start + batch_size], dtype=np.float32)}
            for start in range(0, len(pixel_values), batch_size)
        )

    def get_next(self):
        return next(self.batches, None)


def quantize(fp32: Path, int8: Path, mode: str, calibration: np.ndarray | None, student: str) -> dict:
    """`fp32` quantized into `int8` (mode static, calibrated on `calibration` pixel values, or dynamic); returns the
    scheme written. The graph is first prepared as ONNX Runtime advises (quant_pre_process: BatchNorm folded into the
    convolutions, shapes inferred), into a scratch file beside it that is removed after."""
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_dynamic, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = int8.with_name(int8.stem + ".prepared.onnx")
    try:
        with _quiet():
            quant_pre_process(str(fp32), str(prepared))
            if mode == "static":
                quantize_static(
                    str(prepared),
                    str(int8),
                    _Batches(calibration),
                    quant_format=QuantFormat.QDQ,
                    per_channel=True,
                    activation_type=QuantType.QInt8,
                    weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax,
                )
            else:
                quantize_dynamic(str(prepared), str(int8), weight_type=QuantType.QInt8)
    except Exception as error:
        raise KdcacheError(
            f"ONNX Runtime cannot quantize student '{student}' (--int8 {mode}): {type(error).__name__}: "
            f"{first_line(error)}; export it with --int8 none, or try the other int8 mode"
        ) from None
    finally:
        prepared.unlink(missing_ok=True)
    return STATIC_SCHEME if mode == "static" else DYNAMIC_SCHEME
