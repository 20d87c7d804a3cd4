"""The options of `kdcache evaluate` (and `evaluate_models`), each field declared once with its default and help."""

from dataclasses import dataclass
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.options.fields import (
    DEVICE_HELP,
    TEACHER_WEIGHTS_HELP,
    check_teacher_weights,
    option,
    parse_teacher_weights,
)


@dataclass
class EvaluationOptions:
    """Every option of `kdcache evaluate` besides its models and output, with its default: the command and
    `evaluate_models(models, output=..., **options)` both build one, and `check` refuses a bad one."""

    dataset: str | None = option(
        None, "Hub dataset id or local folder.", show_default="the one --cache was made from, else beans"
    )
    split: str = option("test", "Split to evaluate on.")
    cache: str | Path | list | None = option(
        None,  # several: a teacher ensemble
        "A teacher-logits cache of the same data (a folder, or its address: hf://datasets/OWNER/NAME, s3://...): "
        "adds agreement with the teacher (top-1, KL at T=1, teacher accuracy) without running the teacher. Repeat it "
        "for a teacher ensemble: agreement with each teacher and with the ensemble (probabilities averaged at T=1).",
        type=list[str],
        parse=lambda caches: list(caches or []),
    )
    teacher_weights: list[float] | None = option(
        None,  # an ensemble's, one per cache; None: equal
        TEACHER_WEIGHTS_HELP,
        show_default="equal",
        type=str,
        parse=parse_teacher_weights,
    )
    batch_size: int = option(32, "Images per forward pass (the throughput is measured at this size).")
    device: str = option("auto", DEVICE_HELP)
    image_column: str | None = option(None, "Image column.", show_default="the cache's, else image or img")
    label_column: str | None = option(
        None, "Label column: a ClassLabel, or class names as text.", show_default="the cache's, else labels or label"
    )
    match_labels_by_index: bool = option(
        False, "Trust that a model's outputs follow the dataset's label order even though the names differ."
    )
    speed: bool = option(
        False,
        "Also time every model the same way, on the CPU: batch-1 latency (median and p90 of 100 runs after "
        "warm-up) and throughput at batch 32, at --speed-threads threads.",
    )
    speed_threads: int = option(1, "Threads each model runs on for --speed (PyTorch's, or ONNX Runtime's).")

    @property
    def caches(self) -> list:
        """The caches given, as a list (none, one, or an ensemble's)."""
        return [self.cache] if isinstance(self.cache, (str, Path)) else list(self.cache or [])

    def check(self) -> None:
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size {self.batch_size} must be at least 1")
        if self.speed_threads < 1:
            raise KdcacheError(f"--speed-threads {self.speed_threads} must be at least 1")
        check_teacher_weights(self.teacher_weights, len(self.caches))
