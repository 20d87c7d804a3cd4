"""Stage three: how good is each model on a split, how close to its teacher, and at what cost.

Each model sees what `pipeline("image-classification", model)` would give it: decoded RGB images through its own
image processor. Its logits are put in the dataset's label order (by label name), so that models with differently
ordered heads, and the cached teacher logits, compare row for row. Metrics come from kdcache.evaluation.metrics (`evaluate`
modules that work offline). The teacher is never run: agreement with it comes from a logit cache of the same rows."""

import time
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from kdcache.data import (
    decode_images,
    find_image_column,
    find_label_column,
    label_names,
    load_extra_images,
    load_image_dataset,
    load_image_processor,
    undecoded,
)
from kdcache.errors import KdcacheError, hub_error
from kdcache.evaluation.quality import (
    calibration,
    classification_metrics,
    ensemble_agreement,
    metrics_library_name,
    teacher_agreement,
)
from kdcache.evaluation.report import (
    COMPARISON_PNG,
    CONFUSION_PNG,
    METRICS,
    RELIABILITY_PNG,
    plot_comparison,
    plot_confusion,
    plot_reliability,
)
from kdcache.format.manifest import LABELS
from kdcache.format.reader import load_cache, rebuilt_logits
from kdcache.format.remote import local_caches
from kdcache.labels import NO_LABEL
from kdcache.models import align_labels, count_parameters, load_classifier
from kdcache.onnx_runtime import (
    OnnxClassifier,
    describe_onnx_model,
    is_onnx_model,
    onnx_model_file,
    onnx_model_folder,
    onnx_runtime,
    stored_parameters,
)
from kdcache.options import DEFAULT_DATASET, EvaluationOptions
from kdcache.outputs import (
    OutputFolder,
    OutputKind,
    check_free_space,
    safe_output,
    write_json,
)
from kdcache.runtime import output_path, pick_device, slug, tune_malloc
from kdcache.speed import measure_speed, torch_threads
from kdcache.version import __version__

WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")  # not training_args.bin, which Trainer saves beside them


TIMED = (
    "forward: model(pixel_values) under torch.inference_mode, after one untimed warm-up batch; "
    "end_to_end: decoding, the model's image processor and the forward"
)


EVALUATION_OUTPUT = OutputKind("a kdcache evaluation", "kdcache evaluate", METRICS)


def report_bytes(models: int, classes: int) -> int:
    """The disk an evaluation report needs, generously: per model its metrics.json (the confusion matrix and the
    per-class figures, under 16 bytes a cell) and its two plots (at most about 1 MB each: the confusion plot's side
    is capped at 16 inches at 120 dpi), and with several models the comparison plot and the combined metrics.json."""
    metrics = 16 * classes * (classes + 8)
    return models * (metrics + 2 * 1024**2) + (models * metrics + 1024**2 if models > 1 else 0)


def evaluate_models(
    models: list[str] | str,
    *,
    output: str | Path | None = None,
    options: EvaluationOptions | None = None,
    progress: bool = True,
    **overrides,
) -> dict:
    """Evaluate each model (hub id or local folder) on `split` of `dataset` and write metrics.json and plots.

    The options are an EvaluationOptions (kdcache.options), given whole as `options`, one by one as keywords
    (`evaluate_models(models, dataset=..., split="test")`), or both (the keywords win). `dataset` defaults to the
    one the cache was made from, else "beans". With `cache`, each model is also compared with the cached teacher
    logits of the same rows. `cache` may be a list of caches of the same rows, a teacher ensemble: each model is
    then compared with each teacher ("teacher_agreements") and with the ensemble ("teacher_agreement": its
    probabilities at T=1, averaged with `teacher_weights`, normalised; equal by default). Returns {"output",
    "dataset", "split", "rows", "models": [one dict per model, as in its metrics.json]}.
    """
    options = replace(options or EvaluationOptions(), **overrides)
    models = [models] if isinstance(models, str) else list(models)
    if not models:
        raise KdcacheError("name at least one model to evaluate (a hub id or a folder written by save_pretrained)")
    options.check()
    if options.caches:  # an address: its verified local copy (kdcache.format.remote.local_cache)
        options = replace(options, cache=local_caches(options.caches, progress=progress))
    output = output_path(output) if output is not None else default_output(models, options.split)
    # the output is locked before anything is read: a second run on it stops at once
    with safe_output(output, EVALUATION_OUTPUT) as folder:
        tune_malloc()
        device = pick_device(options.device)
        data = _evaluation_rows(options)
        # Every model's labels and image processor are checked before any is run: a mistake in the third model
        # should not cost the time of the first two.
        prepared = [_prepare(name, data.names, options.match_labels_by_index) for name in models]
        space = report_bytes(len(models), len(data.names))
        check_free_space(output, space, "the evaluation report", folder.work)
        folder.on_disk_full(space, then="run the same command again", kept=False)
        short_names = _unique([short_name(name) for name in models])
        folders = short_names if len(models) > 1 else [""]  # several models: one subfolder each
        results = [
            _evaluate_model(name, processor, mapping, short_name, output / subfolder, data, options, device, progress)
            for (name, processor, mapping), short_name, subfolder in zip(prepared, short_names, folders)
        ]
        return _write_report(folder, results, folders, data)


@dataclass
class _Rows:
    """The rows every model is evaluated on: a split, its labels, and the cached teacher's logits of it (if any)."""

    dataset: str
    split: str
    rows: object  # a datasets.Dataset
    image_column: str
    names: list[str]
    references: np.ndarray
    members: list  # (cache, manifest, teacher logits) per cached teacher: none, one, or an ensemble's


def _evaluation_rows(options: EvaluationOptions) -> _Rows:
    """The split to evaluate on, from the dataset asked for or the one the cache was made from, refused in one line
    when it is missing or empty, or when the cache's logits are not of these very rows."""
    dataset, split = options.dataset, options.split
    cache = options.caches[0] if options.caches else None  # the first says which dataset and columns
    image_column, label_column = options.image_column, options.label_column
    cached = manifest = None
    dataset_revision = None
    if cache is not None:
        cached, manifest = load_cache(cache)
        made_from = manifest.dataset
        if split not in made_from["splits"]:
            raise KdcacheError(
                f"cache '{cache}' has no split '{split}' (splits: {', '.join(made_from['splits'])}); "
                f"pick one with --split, or cache it with kdcache teacher-logits --splits {split}"
            )
        if dataset is None or dataset == made_from["name_or_path"]:
            dataset, dataset_revision = made_from["name_or_path"], made_from.get("revision")
        image_column = image_column or made_from["image_column"]
        label_column = label_column or made_from["label_column"]
    dataset = dataset or DEFAULT_DATASET

    extra = manifest.dataset.get("extra_images") if manifest is not None else None
    if extra and split == extra["cached_as"] and options.dataset in (None, made_from["name_or_path"]):
        # the images cached by --extra-images: read from where the cache read them, without labels
        rows = load_extra_images(extra["name_or_path"], extra["split"], image_column)
        dataset = extra["name_or_path"]
    else:
        dataset_dict = load_image_dataset(dataset, revision=dataset_revision, label_column=label_column)
        if split not in dataset_dict:
            raise KdcacheError(
                f"split '{split}' is not in dataset '{dataset}' (splits: {', '.join(dataset_dict)}); "
                "pass one of them with --split"
            )
        rows = dataset_dict[split]
    if len(rows) == 0:
        raise KdcacheError(f"split '{split}' of dataset '{dataset}' is empty; evaluate on another --split")
    image_column = find_image_column(rows, image_column)
    label_column = find_label_column({split: rows}, label_column if label_column in rows.features else None)
    if label_column is None and manifest is None:
        raise KdcacheError(
            f"split '{split}' of dataset '{dataset}' has no labels, so there is no accuracy to measure; pass the "
            "cache made from it with --cache to measure agreement with the teacher, or evaluate on a labelled --split"
        )
    names = label_names(rows, label_column) if label_column else list(manifest.label_names)
    references = np.asarray(rows[label_column][:], dtype=np.int64) if label_column else np.full(len(rows), NO_LABEL)
    teacher = None
    if manifest is not None:
        teacher = _cached_teacher(cached, manifest, cache, rows, dataset, split, names, references)
    members = [(cache, manifest, teacher)] if manifest is not None else []  # an ensemble's caches, in order
    for other in options.caches[1:]:
        members.append(_other_teacher(other, rows, dataset, split, names, references))
    return _Rows(dataset, split, rows, image_column, names, references, members)


def _evaluate_model(name, processor, mapping, short_name, output, data: _Rows, options, device, progress) -> dict:
    """One model's metrics.json: its quality on the rows, its calibration, size and speed, and its agreement with
    the cached teacher (or with each teacher of an ensemble, and with the ensemble). An exported model (kdcache
    export) runs in ONNX Runtime, on the CPU."""
    if is_onnx_model(name):
        file = onnx_model_file(name)
        model, device = OnnxClassifier(file), torch.device("cpu")
        model_class, parameters, size = (
            f"ONNX {describe_onnx_model(file)}",
            stored_parameters(file),
            file.stat().st_size,
        )
    else:
        model = load_classifier(name, what="model", flag="MODELS").to(device)
        model_class, parameters, size = type(model).__name__, count_parameters(model), weights_bytes(name)
    logits, speed = predict(
        model, processor, data.rows, data.image_column, mapping, options.batch_size, device, data.split, progress
    )
    result = {
        "model": name,
        "name": short_name,
        "model_class": model_class,
        "dataset": data.dataset,
        "split": data.split,
        "rows": len(data.rows),
        "label_names": data.names,
        **_quality(logits, data),
        "parameters": parameters,
        "weights_bytes": size,
        "speed": {"device": str(device), "batch_size": options.batch_size, **speed, "timed": TIMED},
        "metrics_library": metrics_library_name(),
        "kdcache_version": __version__,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "output": str(output),
    }
    if options.speed:
        result["latency"] = _latency(name, model, processor, data, options.speed_threads)
    if len(data.members) == 1:
        cache, manifest, teacher = data.members[0]
        result["teacher_agreement"] = {
            "cache": str(cache),
            "cache_fingerprint": manifest.fingerprint,
            "teacher": manifest.teacher["name_or_path"],
            **teacher_agreement(logits, teacher, data.references),
        }
    elif data.members:
        result.update(ensemble_agreement(logits, data.members, data.references, options.teacher_weights))
    return result


def _latency(name, model, processor, data: _Rows, threads: int) -> dict:
    """--speed: the model timed on the CPU at `threads` threads (kdcache.speed), on the split's first images."""
    images = decode_images(
        undecoded(data.rows, data.image_column), data.image_column, list(range(min(32, len(data.rows)))), data.split
    )
    sample = processor(images, return_tensors="pt")["pixel_values"]
    if isinstance(model, OnnxClassifier):
        timed = OnnxClassifier(model.file, threads=threads)  # a session's threads are set when it is made
        return measure_speed(lambda pixels: timed(pixel_values=pixels), sample, threads)
    model = model.to("cpu")
    with torch_threads(threads):
        return measure_speed(lambda pixels: model(pixel_values=pixels), sample, threads)


def _quality(logits, data: _Rows) -> dict:
    """Accuracy, per-class figures and calibration on the rows that have a label; on a split without any, the one
    line that says why they are missing (the agreement with the teacher is measured on every row all the same)."""
    labelled = data.references != NO_LABEL
    if not labelled.any():
        return {
            "accuracy": None,
            "labeled_rows": 0,
            "no_accuracy": f"split '{data.split}' has no labels: accuracy, F1 and calibration need them; the "
            "agreement with the teacher is measured on every row",
        }
    if labelled.all():
        logits, references, extra = logits, data.references, {}
    else:
        logits, references = logits[labelled], data.references[labelled]
        extra = {"labeled_rows": int(labelled.sum()), "quality_rows": "the rows with a label"}
    return {
        **classification_metrics(logits.argmax(-1), references, data.names),
        **calibration(logits, references),
        "confusion_matrix_axes": "rows: true label, columns: predicted label, in label_names order",
        **extra,
    }


def _write_report(folder: OutputFolder, results: list[dict], folders: list[str], data: _Rows) -> dict:
    """Each model's metrics.json and plots (in a folder of its own when there are several, with the comparison)."""
    work = folder.work
    try:
        for result, subfolder in zip(results, folders):
            (work / subfolder).mkdir(exist_ok=True)
            write_json(work / subfolder / METRICS, result)
            if result["accuracy"] is not None:  # a split without labels has neither
                plot_confusion(result, work / subfolder / CONFUSION_PNG)
                plot_reliability(result, work / subfolder / RELIABILITY_PNG)
        report = {
            "output": str(folder.path),
            "dataset": data.dataset,
            "split": data.split,
            "rows": len(data.rows),
            "models": results,
        }
        if len(results) > 1:
            write_json(work / METRICS, report)
            plot_comparison(
                results, work / COMPARISON_PNG, f"{slug(data.dataset)} {data.split} ({len(data.rows)} rows)"
            )
    except OSError as error:
        raise KdcacheError(f"cannot write under '{work.parent}' ({error.strerror}); choose another --output") from None
    return report


def default_output(models: list[str], split: str) -> Path:
    """Beside a local model (MODEL/eval-SPLIT), else data/eval/NAME-SPLIT; several models: data/eval/compare-SPLIT."""
    if len(models) > 1:
        return Path("data") / "eval" / f"compare-{split}"
    folder = Path(models[0]).expanduser()
    return folder / f"eval-{split}" if folder.is_dir() else Path("data") / "eval" / f"{slug(models[0])}-{split}"


def _cached_teacher(cached, manifest, cache, rows, dataset, split, names, references) -> np.ndarray:
    """The cached teacher logits of `split`, once it is certain they belong to these very rows."""
    expected = manifest.split(split)
    if rows._fingerprint != expected["fingerprint"] or len(rows) != expected["num_rows"]:
        raise KdcacheError(
            f"cache '{cache}' was made from other data than split '{split}' of '{dataset}' (fingerprint "
            f"{expected['fingerprint']}, {expected['num_rows']} rows; the split has {rows._fingerprint}, {len(rows)} "
            f"rows); pass the dataset it was made from ({manifest.dataset['name_or_path']}) or rebuild the cache"
        )
    if manifest.label_names != names:
        raise KdcacheError(
            f"cache '{cache}' has labels {', '.join(manifest.label_names)} but dataset '{dataset}' "
            f"has {', '.join(names)}; rebuild the cache from this dataset"
        )
    part = cached[split].with_format("numpy")[:]
    if not np.array_equal(np.asarray(part[LABELS], dtype=np.int64), references):
        raise KdcacheError(f"cache '{cache}' split '{split}' holds other labels than the dataset's; rebuild the cache")
    return rebuilt_logits(part, len(names)).numpy()


def _other_teacher(cache, rows, dataset, split, names, references):
    """(cache, manifest, teacher logits) of an ensemble's second or later cache, checked as the first one is."""
    cached, manifest = load_cache(cache)
    if split not in manifest.splits:
        raise KdcacheError(
            f"cache '{cache}' has no split '{split}' (splits: {', '.join(manifest.splits)}); pick one that every "
            f"cache has with --split, or cache it with kdcache teacher-logits --splits {split}"
        )
    return cache, manifest, _cached_teacher(cached, manifest, cache, rows, dataset, split, names, references)


def _prepare(name: str, names: list[str], by_index: bool):
    """A model's image processor and the index of its output for each dataset label, without loading its weights."""
    from transformers import AutoConfig

    where = name  # the folder of its config and image processor: an export's own, for an ONNX model
    if is_onnx_model(name):
        onnx_runtime(f"evaluating the ONNX model '{name}'")
        if not onnx_model_file(name).is_file():
            raise KdcacheError(f"model '{name}' names {onnx_model_file(name)}, which is missing; export it again")
        where = str(onnx_model_folder(name))
    folder = Path(where).expanduser()
    if folder.is_dir() and (folder / "config.json").exists() and not (folder / "preprocessor_config.json").exists():
        raise KdcacheError(
            f"model folder '{where}' has no preprocessor_config.json; save its image processor beside it "
            "(processor.save_pretrained(folder)), as kdcache train-student does"
        )
    try:
        config = AutoConfig.from_pretrained(where)
    except Exception as error:
        raise hub_error("model", where, "MODELS", error) from None
    if not getattr(config, "id2label", None):
        raise KdcacheError(f"model '{name}' is not a classifier (its config has no id2label)")
    mapping = align_labels(config.id2label, names, f"model {name}", by_index=by_index)
    return name, load_image_processor(where, flag="MODELS"), mapping


def predict(model, processor, split, image_column, mapping, batch_size, device, split_name, progress=False):
    """Logits (rows, classes) in dataset label order, and images/s of the forward alone and of the whole path."""
    from tqdm.auto import tqdm

    split = undecoded(split, image_column)
    index = torch.tensor(mapping, device=device)
    outputs, preprocess_seconds, forward_seconds = [], 0.0, 0.0
    bar = tqdm(total=len(split), unit="img", desc=f"evaluate {slug(model.name_or_path)}", disable=not progress)
    for start in range(0, len(split), batch_size):
        started = time.perf_counter()
        images = decode_images(
            split, image_column, list(range(start, min(len(split), start + batch_size))), split_name
        )
        pixel_values = processor(images, return_tensors="pt")["pixel_values"].to(device)
        prepared = time.perf_counter()
        preprocess_seconds += prepared - started
        with torch.inference_mode():
            if start == 0:  # first calls pay for kernel selection and allocation: keep them out of the timing
                model(pixel_values=pixel_values)
                _synchronize(device)
                prepared = time.perf_counter()
            logits = model(pixel_values=pixel_values).logits
            _synchronize(device)
        forward_seconds += time.perf_counter() - prepared
        outputs.append(logits.float()[:, index].cpu())
        bar.update(len(images))
    bar.close()
    rows = len(split)
    return torch.cat(outputs).numpy(), {
        "forward_images_per_second": round(rows / forward_seconds, 2),
        "end_to_end_images_per_second": round(rows / (forward_seconds + preprocess_seconds), 2),
        "forward_seconds": round(forward_seconds, 3),
        "preprocess_seconds": round(preprocess_seconds, 3),
    }


def _synchronize(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def weights_bytes(name_or_path: str) -> int | None:
    """Bytes of the weight files on disk (a local folder, or the hub cache's copy); None when not found."""
    folder = Path(name_or_path).expanduser()
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name_or_path, local_files_only=True, allow_patterns=list(WEIGHT_FILES)))
        except Exception:  # not in the local cache under that name: the size is unknown, not an error
            return None
    files = {file for pattern in WEIGHT_FILES for file in folder.glob(pattern)}
    return sum(file.stat().st_size for file in files) or None


def short_name(name: str) -> str:
    """A model's name in a table and its folder's: an ONNX file's names its export folder too (exports/a-model_int8)."""
    path = Path(name).expanduser()
    return f"{slug(str(path.parent))}-{path.stem}" if path.suffix == ".onnx" else slug(name)


def _unique(labels: list[str]) -> list[str]:
    seen, unique = {}, []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique
