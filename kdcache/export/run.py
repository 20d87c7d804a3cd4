"""Stage three: ship the student. Its folder becomes an ONNX folder that ONNX Runtime runs (model.onnx, and
model_int8.onnx when quantized), checked before it is written: the fp32 model against the PyTorch student on every
row, the int8 model against the student, the cached teacher and the labels. Calibration and checks read the cache's
own rows, its stored views replayed as stage two served them (kdcache.format.replay). The student folder is only
read; the output is written as OUTPUT.partial and renamed into place when complete (kdcache.outputs)."""

import json
import logging
import shutil
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from kdcache.data import ImagePipeline, load_image_processor
from kdcache.errors import KdcacheError, first_line
from kdcache.export.onnx import export_fp32, exporter_modules, quantize
from kdcache.export.report import model_card
from kdcache.format.manifest import MANIFEST, Manifest
from kdcache.format.reader import load_cache
from kdcache.format.replay import replayed_batch
from kdcache.labels import NO_LABEL
from kdcache.models import NO_HUB_KERNELS, align_labels, count_parameters
from kdcache.onnx_runtime import EXPORT_RECORD, FP32_MODEL, INT8_MODEL, OnnxClassifier
from kdcache.options import ExportOptions
from kdcache.outputs import TRAINING_RECORD, OutputKind, check_free_space, safe_output, write_json
from kdcache.runtime import output_path
from kdcache.version import __version__

log = logging.getLogger("kdcache")

EXPORT_OUTPUT = OutputKind("a kdcache export", "kdcache export", EXPORT_RECORD)
COPIED = ("config.json", "preprocessor_config.json")  # what the export folder takes from the student's, as it is
# The fp32 check's tolerance, numpy.allclose's: |onnx - pytorch| <= ATOL + RTOL * |pytorch| for every logit.
ATOL, RTOL = 1e-4, 1e-4
TOLERANCE = (
    f"|ONNX logit - PyTorch logit| <= {ATOL:g} + {RTOL:g} * |PyTorch logit| for every logit of every row, and the "
    "same top-1 on every row (a row whose two highest PyTorch logits lie within that of each other is a tie)"
)
SEED = 0  # draws the rows checked and calibrated on, and the view of each row (stage two's first epoch with it)
BATCH = 32


def export(
    student: str | Path,
    output: str | Path,
    options: ExportOptions | None = None,
    *,
    progress: bool = True,
    **overrides,
) -> dict:
    """Export the student folder `student` (a kdcache train-student output, or any image classifier saved with
    save_pretrained beside its image processor) to the ONNX folder `output`, check it, and return its record (as
    written to OUTPUT/export.json).

    The options are an ExportOptions (kdcache.options), given whole as `options`, one by one as keywords
    (`export(student, output, int8="static", calibration=cache)`), or both (the keywords win). A quantization-aware
    student (its kdcache_training.json has a `quantization_aware` entry) is quantized static by default, the scheme
    it trained for. The check refuses the export, leaving nothing, when the fp32 ONNX model and the PyTorch student
    differ beyond TOLERANCE."""
    options = replace(options or ExportOptions(), **overrides)
    options.check()
    tools = exporter_modules()  # without the extra: one line saying how to install it, before anything else
    output = output_path(output)
    source = read_student(Path(student).expanduser())
    _check_output_is_not_the_students(output, source.path)
    mode, chosen_by = _int8_mode(options, source)
    calibration, checked = _caches(options, source, mode)
    with safe_output(output, EXPORT_OUTPUT) as folder:
        if output.exists() and not options.overwrite:
            raise KdcacheError(
                f"--output '{output}' exists; pass --overwrite to replace it, or choose another --output"
            )
        work = folder.work
        space = 3 * _weights_bytes(source.model) + 1024**2  # model.onnx, model_int8.onnx and quantization's scratch
        check_free_space(output, space, "the exported models", work)
        folder.on_disk_full(space, then="run the same command again", kept=False)
        if checked is not None:
            rows = _cache_rows(checked, options.check_split, options.check_rows, source)
        else:
            rows = _random_rows(options.check_rows, source)
        if progress:
            log.info(f"exporting {source.path} to ONNX ({source.size[0]}x{source.size[1]} px)")
        export_fp32(
            source.model,
            torch.randn(2, 3, *source.size, generator=torch.Generator().manual_seed(SEED)),
            work / FP32_MODEL,
            str(source.path),
        )
        student_logits = _pytorch_logits(source.model, rows.pixel_values)
        fp32_logits = OnnxClassifier(work / FP32_MODEL).logits(rows.pixel_values)
        checks = {
            "pytorch": _figures(student_logits, student_logits, rows, compared=False),
            "fp32": _fp32_check(student_logits, fp32_logits, rows, source.path),
        }
        models = {"fp32": {"file": FP32_MODEL, "precision": "fp32", "bytes": (work / FP32_MODEL).stat().st_size}}
        calibrated = None
        if mode == "static":
            calibrated = _cache_rows(
                calibration, options.calibration_split, options.calibration_rows, source, labelled=False
            )
        if mode != "none":
            if progress:
                images = f", calibrated on {calibrated.source['rows']} images" if calibrated else ""
                log.info(f"quantizing to int8 ({mode}{images})")
            models["int8"], checks["int8"] = _int8_model(work, mode, calibrated, rows, student_logits, source)
        for name in COPIED:
            shutil.copy2(source.path / name, work / name)
        record = {
            "student": str(source.path),
            "student_class": type(source.model).__name__,
            "student_parameters": count_parameters(source.model),
            "label_names": source.names,
            "input": {"name": "pixel_values", "shape": ["batch", 3, *source.size], "dtype": "float32"},
            "quantization_aware": source.quantization_aware,
            "int8": mode,
            "int8_chosen_by": chosen_by,
            "model": INT8_MODEL if mode != "none" else FP32_MODEL,  # the one `kdcache evaluate FOLDER` runs
            "models": models,
            "calibration": calibrated.source if calibrated else None,
            "check": {"rows": rows.source, "tolerance": TOLERANCE, **checks},
            "exporter": {"torch.onnx.export": "dynamo=True", **tools},
            "kdcache_version": __version__,
            "created": datetime.now(UTC).isoformat(timespec="seconds"),
            "output": str(output),
        }
        (work / "README.md").write_text(model_card(record))
        write_json(work / EXPORT_RECORD, record)  # last: the marker of a complete export folder
    return record


def _int8_model(work: Path, mode: str, calibrated, rows, student_logits: np.ndarray, source) -> tuple[dict, dict]:
    """model_int8.onnx written beside model.onnx (calibrated on `calibrated`'s images for static), and its figures."""
    pixels = calibrated.pixel_values.numpy() if calibrated else None
    scheme = quantize(work / FP32_MODEL, work / INT8_MODEL, mode, pixels, str(source.path))
    figures = _figures(OnnxClassifier(work / INT8_MODEL).logits(rows.pixel_values), student_logits, rows)
    size = (work / INT8_MODEL).stat().st_size
    return {"file": INT8_MODEL, "precision": f"int8 {mode}", "bytes": size, "scheme": scheme}, figures


@dataclass
class Student:
    """The student folder as the export reads it: the model, its image processor and input size, its labels, and
    what its training record says (a quantization-aware student's scheme)."""

    path: Path
    model: torch.nn.Module
    pipeline: ImagePipeline  # the student's image processor's normalisation, which its input is fed through
    size: tuple[int, int]
    names: list[str]  # label names in the order of the model's outputs
    record: dict  # kdcache_training.json, {} for a folder without one
    quantization_aware: dict | None


def read_student(path: Path) -> Student:
    """The student at `path`, refused in one line when it is no image classifier folder with its image processor."""
    from PIL import Image
    from transformers import AutoModelForImageClassification
    from transformers.utils import logging as transformers_logging

    if not (path / "config.json").is_file():
        raise KdcacheError(
            f"STUDENT '{path}' is not a model folder (it has no config.json); pass a folder written by kdcache "
            "train-student (or by save_pretrained)"
        )
    if not (path / "preprocessor_config.json").is_file():
        raise KdcacheError(
            f"STUDENT '{path}' has no preprocessor_config.json, the image processor an export ships beside the "
            "model; save it there (processor.save_pretrained), as kdcache train-student does"
        )
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()  # its bar of the weights loaded: a few lines of noise per export
    try:
        model = AutoModelForImageClassification.from_pretrained(str(path), **NO_HUB_KERNELS).eval()
    except Exception as error:
        raise KdcacheError(
            f"STUDENT '{path}' is no image classifier that transformers loads ({type(error).__name__}: "
            f"{first_line(error)}); pass a folder written by kdcache train-student"
        ) from None
    finally:
        if bars:
            transformers_logging.enable_progress_bar()
    pipeline = ImagePipeline(load_image_processor(str(path), flag="STUDENT"))
    size = tuple(int(side) for side in pipeline.pixels([Image.new("RGB", (256, 256))]).shape[-2:])
    record = _training_record(path)
    names = [model.config.id2label[index] for index in range(model.config.num_labels)]
    return Student(path, model, pipeline, size, names, record, quantization_aware(record))


def _training_record(path: Path) -> dict:
    try:
        record = json.loads((path / TRAINING_RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}


def quantization_aware(record: dict) -> dict | None:
    """The scheme a quantization-aware student trained for (its record's `quantization_aware` entry), or None for an
    ordinary student. Read tolerantly: an entry that is no dict is kept as {"entry": its value}."""
    entry = record.get("quantization_aware")
    if not entry:
        return None
    return entry if isinstance(entry, dict) else {"entry": entry}


def _int8_mode(options: ExportOptions, source: Student) -> tuple[str, str]:
    if options.int8 is not None:
        return options.int8, "--int8"
    if source.quantization_aware is not None:
        return "static", "the student is quantization-aware: the scheme it trained for"
    return "none", "the default"


def _check_output_is_not_the_students(output: Path, student: Path) -> None:
    resolved, folder = output.resolve(), student.resolve()
    if resolved == folder or folder in resolved.parents:
        raise KdcacheError(
            f"--output '{output}' is inside the student's folder '{student}', which kdcache export only reads; "
            "choose an --output outside it"
        )


def _recorded_cache(source: Student) -> Path | None:
    """The cache the student was trained from, as its record names it, if it is still there with the same
    fingerprint (a cache rebuilt at that path is other data)."""
    recipe = source.record.get("recipe") or {}
    path = recipe.get("cache")
    if not path or not (Path(path) / MANIFEST).is_file():
        return None
    try:
        same = Manifest.read(path).fingerprint == recipe.get("cache_fingerprint")
    except KdcacheError:
        return None
    return Path(path) if same else None


def _why_not_recorded(source: Student) -> str:
    path = (source.record.get("recipe") or {}).get("cache")
    if not path:
        return ""
    return f"; the cache the student was trained from, '{path}', is not there (or was made again)"


def _open_cache(path: Path, source: Student, flag: str):
    """(cached splits, manifest) of a cache given to calibrate or check on, refused when its labels are not the
    student's."""
    cached, manifest = load_cache(path)
    try:
        align_labels(dict(enumerate(source.names)), manifest.label_names, "student")
    except KdcacheError:
        raise KdcacheError(
            f"{flag} '{path}' has labels {', '.join(manifest.label_names[:5])}"
            f"{', ...' if len(manifest.label_names) > 5 else ''} and student '{source.path}' "
            f"{', '.join(source.names[:5])}{', ...' if len(source.names) > 5 else ''}; give a cache of the "
            "student's own data"
        ) from None
    return cached, manifest


def _caches(options: ExportOptions, source: "Student", mode: str):
    """The calibration cache (static int8 only) and the check's, each (path, cached splits, manifest) or None, read
    once and refused before any work: other labels than the student's, a missing split, a check split of views. The
    check's is --check-cache, else --calibration, else the student's own (as its record names it)."""
    recorded = _recorded_cache(source)
    calibration = options.calibration or (recorded if mode == "static" else None)
    if mode == "static" and calibration is None:
        raise KdcacheError(
            "--int8 static calibrates on images of the student's data: pass --calibration CACHE (a kdcache "
            f"teacher-logits cache of that data){_why_not_recorded(source)}"
        )
    checked = options.check_cache or options.calibration or recorded
    opened = {}
    for path, flag in ((calibration, "--calibration"), (checked, "--check-cache")):
        if path is not None and Path(path) not in opened:
            opened[Path(path)] = (Path(path), *_open_cache(Path(path), source, flag))
    if mode == "static":
        _check_split(opened[Path(calibration)], options.calibration_split, "--calibration-split")
    if checked is not None:
        _check_split(opened[Path(checked)], options.check_split, "--check-split", clean=True)
    return opened.get(Path(calibration)) if calibration else None, opened.get(Path(checked)) if checked else None


def _check_split(opened, split: str, flag: str, clean: bool = False) -> None:
    path, _, manifest = opened
    if split not in manifest.splits:
        raise KdcacheError(f"{flag} '{split}' is not a split of cache '{path}' (splits: {', '.join(manifest.splits)})")
    if clean and manifest.views_of(split) > 1:
        raise KdcacheError(
            f"{flag} '{split}' of cache '{path}' holds {manifest.views_of(split)} views per image; check on a split "
            "of one clean view per image (e.g. validation)"
        )


@dataclass
class Rows:
    """Images the export is checked or calibrated on, as the student's input, with their labels and the cached
    teacher's logits in the order of the student's outputs (None without a cache), and where they come from."""

    pixel_values: torch.Tensor
    labels: np.ndarray | None
    teacher: np.ndarray | None
    source: dict


def _cache_rows(opened, split: str, count: int, source: Student, labelled: bool = True) -> Rows:
    """`count` rows of `split` (all of a smaller one), drawn with SEED, replayed as stage two served them."""
    path, cached, manifest = opened
    total = len(cached[split])
    chosen = np.sort(np.random.default_rng(SEED).choice(total, min(count, total), replace=False))
    batches = [
        replayed_batch(cached, manifest, split, chosen[start : start + BATCH], source.pipeline, source.size, SEED)
        for start in range(0, len(chosen), BATCH)
    ]
    described = {
        "cache": str(path),
        "cache_fingerprint": manifest.fingerprint,
        "split": split,
        "rows": len(chosen),
        "of_rows": total,
        "views": manifest.views_of(split),
        "seed": SEED,
    }
    pixels = torch.cat([batch["pixel_values"] for batch in batches]).contiguous()
    if not labelled:
        return Rows(pixels, None, None, described)
    # the cache's classes in the student's output order: column j of the cache is output mapping[j]
    mapping = np.asarray(align_labels(dict(enumerate(source.names)), manifest.label_names, "student"))
    labels = torch.cat([batch["labels"] for batch in batches]).numpy()
    labels = np.where(labels == NO_LABEL, NO_LABEL, mapping[np.clip(labels, 0, None)])
    teacher = np.empty((len(chosen), len(source.names)), dtype=np.float32)
    teacher[:, mapping] = torch.cat([batch["teacher_logits"] for batch in batches]).numpy()
    described["teacher"] = manifest.teacher["name_or_path"]
    return Rows(pixels, labels, teacher, described)


def _random_rows(count: int, source: Student) -> Rows:
    """Without a cache: images of uniform random pixels (seeded), through the student's processor; they check the
    ONNX model's arithmetic against PyTorch's, not its accuracy."""
    pixels = np.random.default_rng(SEED).integers(0, 256, (count, 3, *source.size), dtype=np.uint8)
    described = {"random_images": count, "seed": SEED, "why": "no cache given, and none recorded with the student"}
    return Rows(source.pipeline.normalize(torch.from_numpy(pixels)), None, None, described)


def _pytorch_logits(model, pixel_values: torch.Tensor) -> np.ndarray:
    with torch.inference_mode():
        return torch.cat(
            [
                model(pixel_values=pixel_values[start : start + BATCH]).logits.float()
                for start in range(0, len(pixel_values), BATCH)
            ]
        ).numpy()


def _weights_bytes(model) -> int:
    return sum(tensor.numel() * tensor.element_size() for tensor in (*model.parameters(), *model.buffers()))


def _figures(logits: np.ndarray, student: np.ndarray, rows: Rows, compared: bool = True) -> dict:
    """A model's figures on the rows: its logits against the PyTorch student's, its top-1 against the student's and
    the cached teacher's, its accuracy on the rows with a label."""
    top1 = logits.argmax(1)
    figures = {}
    if compared:
        figures["max_abs_logit_difference"] = float(np.abs(logits - student).max())
        figures["top1_agreement_with_student"] = float((top1 == student.argmax(1)).mean())
    if rows.teacher is not None:
        figures["top1_agreement_with_teacher"] = float((top1 == rows.teacher.argmax(1)).mean())
    labelled = rows.labels != NO_LABEL if rows.labels is not None else None
    if labelled is not None and labelled.any():
        figures["accuracy"] = float((top1[labelled] == rows.labels[labelled]).mean())
        figures["labeled_rows"] = int(labelled.sum())
    return figures


def _fp32_check(student: np.ndarray, onnx: np.ndarray, rows: Rows, path: Path) -> dict:
    """The fp32 ONNX model's figures, refused unless it gives the student's logits within TOLERANCE on every row."""
    figures = _figures(onnx, student, rows)
    allowed = ATOL + RTOL * np.abs(student)
    within = np.abs(onnx - student) <= allowed
    student_top, onnx_top = student.argmax(1), onnx.argmax(1)
    rows_at = np.arange(len(student))
    # a row whose top-1 differs agrees within the tolerance when the ONNX model's pick is, in the student's own
    # logits, within twice the tolerance of the student's pick: a tie that rounding may break either way
    tie = student[rows_at, student_top] - student[rows_at, onnx_top] <= 2 * allowed[rows_at, student_top]
    agreeing = (student_top == onnx_top) | tie
    figures["top1_agreement_within_tolerance"] = float(agreeing.mean())
    figures["passed"] = bool(within.all() and agreeing.all())
    if not figures["passed"]:
        raise KdcacheError(
            f"the ONNX model of student '{path}' does not compute what the student does (max |Δlogit| "
            f"{figures['max_abs_logit_difference']:.3g}, allowed {ATOL:g} + {RTOL:g}·|logit|; top-1 agreement "
            f"{int(agreeing.sum())} of {len(agreeing)} rows), so nothing was written; report it with the student's "
            "config.json"
        )
    return figures
