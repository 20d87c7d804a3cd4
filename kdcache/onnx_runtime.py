"""An exported student run in ONNX Runtime, as the export stage checks it and `kdcache evaluate` measures it: what an
export folder holds, which of its models a folder stands for, and the model run on a batch of pixel values.

ONNX Runtime (and onnx, to read a model's weights) are an optional extra: `pip install 'kdcache[export]'`."""

import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from kdcache.errors import KdcacheError, first_line

EXPORT_RECORD = "export.json"  # what kdcache export writes into every export folder (and what marks one)
FP32_MODEL, INT8_MODEL = "model.onnx", "model_int8.onnx"
INSTALL = "pip install 'kdcache[export]' (in a checkout: pip install -e '.[export]')"


def onnx_runtime(what: str):
    """The onnxruntime module, or one line saying that `what` needs the optional extra and how to install it."""
    try:
        import onnx  # noqa: F401 (the weights' count reads the model with it)
        import onnxruntime
    except ImportError:
        raise KdcacheError(f"{what} needs ONNX Runtime, an optional extra; install it with {INSTALL}") from None
    return onnxruntime


def is_onnx_model(name: str | Path) -> bool:
    """An .onnx file, or a folder written by kdcache export."""
    path = Path(name).expanduser()
    return (path.is_file() and path.suffix == ".onnx") or (path / EXPORT_RECORD).is_file()


def export_record(folder: Path) -> dict:
    try:
        return json.loads((folder / EXPORT_RECORD).read_text())
    except (OSError, ValueError):
        return {}


def onnx_model_file(name: str | Path) -> Path:
    """The ONNX file a MODEL argument stands for: the file itself, or the model its export folder recommends (the
    int8 one when the export quantized, else model.onnx), as its export.json names it."""
    path = Path(name).expanduser()
    if path.is_file():
        return path
    return path / export_record(path).get("model", FP32_MODEL)


def onnx_model_folder(name: str | Path) -> Path:
    """The folder holding the ONNX model's config.json and preprocessor_config.json."""
    path = Path(name).expanduser()
    return path.parent if path.is_file() else path


def describe_onnx_model(file: Path) -> str:
    """'int8 static' or 'fp32', as its export folder records it; 'onnx' for a file no export describes."""
    for entry in export_record(file.parent).get("models", {}).values():
        if entry.get("file") == file.name:
            return entry["precision"]
    return "onnx"


class OnnxClassifier:
    """An ONNX image classifier in an ONNX Runtime session on the CPU, called as a transformers model is
    (`model(pixel_values=...).logits`, a torch tensor), so that the same loops run a PyTorch student and its
    export. `threads`: ONNX Runtime's intra-op threads (None: its default, one per physical core)."""

    def __init__(self, file: str | Path, threads: int | None = None):
        onnxruntime = onnx_runtime("running an ONNX model")
        self.file, self.name_or_path = Path(file), str(file)
        settings = onnxruntime.SessionOptions()
        settings.log_severity_level = 3  # errors only: its warnings about unused initializers are noise here
        if threads is not None:
            settings.intra_op_num_threads = threads
            settings.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(
                str(file), sess_options=settings, providers=["CPUExecutionProvider"]
            )
        except Exception as error:
            raise KdcacheError(
                f"ONNX Runtime cannot load '{file}' ({type(error).__name__}: {first_line(error)}); pass a model "
                "written by kdcache export"
            ) from None
        self.input_name = self.session.get_inputs()[0].name

    def logits(self, pixel_values) -> np.ndarray:
        pixels = np.ascontiguousarray(torch.as_tensor(pixel_values).detach().cpu().numpy(), dtype=np.float32)
        return self.session.run(None, {self.input_name: pixels})[0]

    def __call__(self, pixel_values):
        return SimpleNamespace(logits=torch.from_numpy(self.logits(pixel_values)))


def stored_parameters(file: str | Path) -> int:
    """The numbers an ONNX model's weights hold (its initializers), less quantization's scales and zero points: the
    student's parameter count, give or take the BatchNorms folded into convolutions."""
    import onnx

    model = onnx.load(str(file), load_external_data=False)
    return sum(
        int(np.prod(tensor.dims))
        for tensor in model.graph.initializer
        if not tensor.name.endswith(("_scale", "_zero_point"))
    )
