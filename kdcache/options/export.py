"""The options of `kdcache export` (and `kdcache.export`), each field declared once with its default and help."""

from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options.fields import either, option

# none: the fp32 ONNX model alone; dynamic: weights int8, activations quantized at run time (no calibration);
# static: weights and activations int8 (QDQ), the activations' ranges calibrated on images of a cache
INT8_MODES = ("none", "dynamic", "static")


@dataclass
class ExportOptions:
    """Every option of `kdcache export` besides the student and the output: the command and `kdcache.export(student,
    output, **options)` both build one, and `check` refuses a bad one before any work."""

    int8: str | None = option(
        None,  # None: static for a quantization-aware student (the scheme it trained for), else none
        f"Also write model_int8.onnx: {either(INT8_MODES)}. static: QDQ, int8 weights per channel and int8 "
        "activations, calibrated on a cache's images (--calibration); dynamic: int8 weights, activations quantized "
        "at run time.",
        show_default="static for a quantization-aware student, else none",
        metavar="MODE",
    )
    calibration: Path | None = option(
        None,
        "A cache of the student's data (kdcache teacher-logits) whose images, its stored views replayed as "
        "train-student saw them, calibrate --int8 static; also the check's cache unless --check-cache.",
        show_default="the cache the student was trained from, if it is still there",
        metavar="CACHE",
    )
    calibration_split: str = option("train", "The calibration cache's split to draw the images from.")
    calibration_rows: int = option(128, "Images drawn (seeded) from that split to calibrate on.")
    check_cache: Path | None = option(
        None,
        "A cache of the student's data to check the export on: ONNX against PyTorch, int8 against the student, "
        "the cached teacher and the labels. Without any cache, the fp32 check runs on random images.",
        show_default="--calibration's, else the cache the student was trained from, if it is still there",
        metavar="CACHE",
    )
    check_split: str = option("validation", "The check cache's split to check on (one clean view per image).")
    check_rows: int = option(256, "Rows of that split checked (drawn seeded; all of a smaller split).")
    overwrite: bool = option(False, "Replace an existing export in --output.")

    def check(self) -> None:
        if self.int8 is not None and self.int8 not in INT8_MODES:
            raise KdcacheError(f"--int8 '{self.int8}' is not one of {', '.join(INT8_MODES)}")
        for flag, rows in (("--calibration-rows", self.calibration_rows), ("--check-rows", self.check_rows)):
            if rows < 1:
                raise KdcacheError(f"{flag} {rows} must be at least 1")
