"""Stage three: how good is each model on a split, how close to its teacher, and at what cost.

Each model sees what `pipeline("image-classification", model)` would give it: decoded RGB images through its own
image processor. Its logits are put in the dataset's label order (by label name), so that models with differently
ordered heads, and the cached teacher logits, compare row for row. Metrics come from kdcache.metrics (`evaluate`
modules that work offline). The teacher is never run: agreement with it comes from a logit cache of the same rows.
"""

import json
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch

import kdcache
from kdcache.cache import LABELS, load_cache, rebuilt_logits
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
from kdcache.labels import NO_LABEL
from kdcache.models import align_labels, count_parameters, load_classifier
from kdcache.options import EvaluationOptions
from kdcache.outputs import OutputFolder, OutputKind, guards_output, safe_output
from kdcache.runtime import output_path, pick_device, slug, tune_malloc

METRICS, CONFUSION_PNG, COMPARISON_PNG = "metrics.json", "confusion_matrix.png", "comparison.png"
RELIABILITY_PNG = "reliability_diagram.png"
CALIBRATION_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks": the usual 15
WEIGHT_FILES = ("model*.safetensors", "pytorch_model*.bin")  # not training_args.bin, which Trainer saves beside them
TIMED = (
    "forward: model(pixel_values) under torch.inference_mode, after one untimed warm-up batch; "
    "end_to_end: decoding, the model's image processor and the forward"
)


def classification_metrics(predictions, references, names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true label,
    columns: predicted label, both in `names` order) of class-index predictions against references."""
    from kdcache.metrics import compute_classification

    predictions, references = np.asarray(predictions).reshape(-1), np.asarray(references).reshape(-1)
    if len(predictions) != len(references) or len(references) == 0:
        raise KdcacheError(
            f"{len(predictions)} predictions for {len(references)} references; need as many, at least one"
        )
    raw = compute_classification(predictions, references, len(names))
    per_class = {
        name: {
            "precision": raw["precision"][i],
            "recall": raw["recall"][i],
            "f1": raw["f1"][i],
            "support": int(raw["support"][i]),
        }
        for i, name in enumerate(names)
    }
    return {
        "accuracy": raw["accuracy"],
        "macro_f1": raw["macro_f1"],
        "per_class": per_class,
        "confusion_matrix": raw["confusion_matrix"],
    }


def calibration(logits, references, bins: int = CALIBRATION_BINS) -> dict:
    """Expected calibration error (Guo et al. 2017): the top-1 confidences (max softmax) fall into `bins` equal-width
    bins (lower, upper] of [0, 1]; ECE = sum over bins of (rows in the bin / rows) * |accuracy - mean confidence|
    in the bin. Also each bin's count, accuracy and mean confidence (None when empty), for the reliability diagram."""
    probabilities = torch.as_tensor(np.asarray(logits), dtype=torch.float64).softmax(-1).numpy()
    confidence, predicted = probabilities.max(-1), probabilities.argmax(-1)
    correct = predicted == np.asarray(references).reshape(-1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    index = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table, error = [], 0.0
    for b in range(bins):
        members = index == b
        count = int(members.sum())
        accuracy = float(correct[members].mean()) if count else None
        mean_confidence = float(confidence[members].mean()) if count else None
        if count:
            error += count / len(confidence) * abs(accuracy - mean_confidence)
        table.append(
            {
                "lower": float(edges[b]),
                "upper": float(edges[b + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return {"expected_calibration_error": error, "calibration_bins": table}


def teacher_agreement(student_logits, teacher_logits, labels) -> dict:
    """How close a model is to its teacher on the same rows, both logits in the same label order: the share of rows
    where their top-1 classes agree, the mean KL(teacher || student) of their softmaxes at T=1 (nats), and the
    teacher's own accuracy on those rows."""
    student = torch.as_tensor(np.asarray(student_logits), dtype=torch.float64)
    teacher = torch.as_tensor(np.asarray(teacher_logits), dtype=torch.float64)
    labels = torch.as_tensor(np.asarray(labels))
    if student.shape != teacher.shape or student.ndim != 2 or len(labels) != len(teacher):
        raise KdcacheError(
            f"model logits {tuple(student.shape)}, teacher logits {tuple(teacher.shape)} and "
            f"{len(labels)} labels do not line up"
        )
    log_teacher, log_student = teacher.log_softmax(-1), student.log_softmax(-1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(-1)
    labelled = labels != NO_LABEL  # the teacher's accuracy on the rows with a label; None without any
    return {
        "top1_agreement": float((student.argmax(-1) == teacher.argmax(-1)).double().mean()),
        "kl_teacher_student": float(kl.mean()),
        "teacher_accuracy": (
            float((teacher.argmax(-1) == labels)[labelled].double().mean()) if bool(labelled.any()) else None
        ),
    }


EVALUATION_OUTPUT = OutputKind("a kdcache evaluation", "kdcache evaluate", METRICS)


@guards_output
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
    tune_malloc()
    device = pick_device(options.device)
    data = _evaluation_rows(options)
    # Every model's labels and image processor are checked before any is run: a mistake in the third model
    # should not cost the time of the first two.
    prepared = [_prepare(name, data.names, options.match_labels_by_index) for name in models]
    output = output_path(output) if output is not None else default_output(models, options.split)
    with safe_output(output, EVALUATION_OUTPUT) as folder:
        short_names = _unique([slug(name) for name in models])
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
    dataset = dataset or "beans"

    extra = manifest.dataset.get("extra_images") if manifest is not None else None
    if extra and split == extra["cached_as"] and options.dataset in (None, made_from["name_or_path"]):
        # the images cached by --extra-images: read from where the cache read them, without labels
        rows = load_extra_images(extra["name_or_path"], extra["split"], image_column)
        dataset = extra["name_or_path"]
    else:
        dataset_dict = load_image_dataset(dataset, revision=dataset_revision)
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
    the cached teacher (or with each teacher of an ensemble, and with the ensemble)."""
    model = load_classifier(name, what="model", flag="MODELS").to(device)
    logits, speed = predict(
        model, processor, data.rows, data.image_column, mapping, options.batch_size, device, data.split, progress
    )
    result = {
        "model": name,
        "name": short_name,
        "model_class": type(model).__name__,
        "dataset": data.dataset,
        "split": data.split,
        "rows": len(data.rows),
        "label_names": data.names,
        **_quality(logits, data),
        "parameters": count_parameters(model),
        "weights_bytes": weights_bytes(name),
        "speed": {"device": str(device), "batch_size": options.batch_size, **speed, "timed": TIMED},
        "metrics_library": _metrics_library(),
        "kdcache_version": kdcache.__version__,
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "output": str(output),
    }
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
            _write_json(work / subfolder / METRICS, result)
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
            _write_json(work / METRICS, report)
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


def ensemble_agreement(logits, members, references, weights=None) -> dict:
    """A model against several cached teachers of the same rows (`members`: (cache, manifest, teacher logits)):
    "teacher_agreements", one dict per teacher as a lone cache gives, and "teacher_agreement", the same figures
    against the ensemble, whose probabilities are the teachers' softmax at T=1 averaged with the normalised
    `weights` (kdcache.loss.ensemble_teacher_logits, as train-student averages them at its T)."""
    from kdcache.ensemble import normalised_weights
    from kdcache.loss import ensemble_teacher_logits

    weights = normalised_weights(weights, len(members))
    ensemble = ensemble_teacher_logits([teacher for _, _, teacher in members], weights, 1.0).numpy()
    each = [
        {
            "cache": str(cache),
            "cache_fingerprint": manifest.fingerprint,
            "teacher": manifest.teacher["name_or_path"],
            **teacher_agreement(logits, teacher, references),
        }
        for cache, manifest, teacher in members
    ]
    return {
        "teacher_agreement": {
            "cache": [entry["cache"] for entry in each],
            "cache_fingerprint": [entry["cache_fingerprint"] for entry in each],
            "teacher": [entry["teacher"] for entry in each],
            "teacher_weights": weights,
            "ensemble": "the teachers' probabilities at T=1, averaged with teacher_weights",
            **teacher_agreement(logits, ensemble, references),
        },
        "teacher_agreements": each,
    }


def _prepare(name: str, names: list[str], by_index: bool):
    """A model's image processor and the index of its output for each dataset label, without loading its weights."""
    from transformers import AutoConfig

    folder = Path(name).expanduser()
    if folder.is_dir() and (folder / "config.json").exists() and not (folder / "preprocessor_config.json").exists():
        raise KdcacheError(
            f"model folder '{name}' has no preprocessor_config.json; save its image processor beside it "
            "(processor.save_pretrained(folder)), as kdcache train-student does"
        )
    try:
        config = AutoConfig.from_pretrained(name)
    except Exception as error:
        raise hub_error("model", name, "MODELS", error) from None
    if not getattr(config, "id2label", None):
        raise KdcacheError(f"model '{name}' is not a classifier (its config has no id2label)")
    mapping = align_labels(config.id2label, names, f"model {name}", by_index=by_index)
    return name, load_image_processor(name, flag="MODELS"), mapping


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


def _unique(labels: list[str]) -> list[str]:
    seen, unique = {}, []
    for label in labels:
        seen[label] = seen.get(label, 0) + 1
        unique.append(label if seen[label] == 1 else f"{label}-{seen[label]}")
    return unique


def _metrics_library() -> str:
    import evaluate
    import sklearn

    return f"evaluate {evaluate.__version__} (kdcache.metrics, offline) over scikit-learn {sklearn.__version__}"


def _write_json(path: Path, content: dict) -> None:
    path.write_text(json.dumps(content, indent=2) + "\n")


def _megabytes(result: dict) -> str:
    return f"{result['weights_bytes'] / 1e6:.1f}" if result["weights_bytes"] else "?"


def describe(report: dict) -> str:
    """The human summary: per-class figures for one model, a side-by-side table for several."""
    results = report["models"]
    lines = [f"{slug(report['dataset'])} / {report['split']} ({report['rows']} rows)"]
    if len(results) == 1:
        result = results[0]
        speed = result["speed"]
        lines += [
            f"  model       {result['model']} ({result['model_class']}, {result['parameters']:,} parameters, "
            f"{_megabytes(result)} MB on disk)",
            (
                f"  accuracy    {result['accuracy']:.4f}    macro-F1 {result['macro_f1']:.4f}    "
                f"ECE {result['expected_calibration_error']:.4f} ({len(result['calibration_bins'])} bins)"
                + (f", on the {result['labeled_rows']} rows with a label" if "labeled_rows" in result else "")
                if result["accuracy"] is not None
                else f"  accuracy    none: {result['no_accuracy']}"
            ),
            f"  speed       {speed['forward_images_per_second']:.1f} img/s forward, "
            f"{speed['end_to_end_images_per_second']:.1f} img/s with decoding and preprocessing "
            f"(batch {speed['batch_size']}, {speed['device']})",
        ]
        if "teacher_agreement" in result:
            agreement = result["teacher_agreement"]
            lines += _ensemble_lines(result) or [
                f"  teacher     top-1 agreement {agreement['top1_agreement']:.4f}, KL(teacher||model) "
                f"{agreement['kl_teacher_student']:.4f} nats at T=1, teacher accuracy "
                f"{_figure(agreement['teacher_accuracy'])} (cache {agreement['cache']})"
            ]
        if result["accuracy"] is None:
            lines.append(f"  written to {report['output']}/ ({METRICS})")
            return "\n".join(lines)
        width = max(len(name) for name in result["per_class"])
        lines.append(f"  {'class':<{width}}  precision  recall      f1  support")
        for name, figures in result["per_class"].items():
            lines.append(
                f"  {name:<{width}}  {figures['precision']:9.4f}  {figures['recall']:6.4f}  "
                f"{figures['f1']:6.4f}  {figures['support']:7d}"
            )
        lines.append(f"  written to {report['output']}/ ({METRICS}, {CONFUSION_PNG}, {RELIABILITY_PNG})")
        return "\n".join(lines)
    agreement = all("teacher_agreement" in result for result in results)
    header = ["model", "params", "MB", "accuracy", "macro-F1", "ECE", "img/s fwd", "img/s e2e"] + (
        ["agree", "KL"] if agreement else []
    )
    table = [header]
    for result in results:
        row = [
            result["name"],
            f"{result['parameters'] / 1e6:.2f}M",
            _megabytes(result),
            _figure(result["accuracy"]),
            _figure(result.get("macro_f1")),
            _figure(result.get("expected_calibration_error")),
            f"{result['speed']['forward_images_per_second']:.1f}",
            f"{result['speed']['end_to_end_images_per_second']:.1f}",
        ]
        if agreement:
            row += [
                f"{result['teacher_agreement']['top1_agreement']:.4f}",
                f"{result['teacher_agreement']['kl_teacher_student']:.4f}",
            ]
        table.append(row)
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        lines.append(
            "  "
            + "  ".join(cell.ljust(w) if i == 0 else cell.rjust(w) for i, (cell, w) in enumerate(zip(row, widths)))
        )
    if results[0]["accuracy"] is None:
        lines.append(f"  accuracy: none: {results[0]['no_accuracy']}")
    if agreement:
        lines.append("  agree: top-1 agreement with the cached teacher, KL: KL(teacher||model) at T=1 in nats")
        if all("teacher_agreements" in result for result in results):
            lines.append("  (the teacher is the ensemble of the caches; with each teacher alone:)")
            lines += [line for result in results for line in _ensemble_lines(result, result["name"] + ": ")]
    lines.append(f"  written to {report['output']}/ ({METRICS}, {COMPARISON_PNG}, one folder per model)")
    return "\n".join(lines)


def _figure(value) -> str:
    """A figure of the report, or a dash where a split without labels has none."""
    return "-" if value is None else f"{value:.4f}"


def _ensemble_lines(result: dict, prefix: str = "") -> list[str]:
    """One line per teacher of an ensemble, then the ensemble's; none for a lone cache."""
    if "teacher_agreements" not in result:
        return []
    ensemble = result["teacher_agreement"]
    entries = [(f"teacher {i + 1}", entry, entry["cache"]) for i, entry in enumerate(result["teacher_agreements"])]
    weights = ", ".join(f"{weight:.3g}" for weight in ensemble["teacher_weights"])
    entries.append(("ensemble", ensemble, f"probabilities averaged at T=1, weights {weights}"))
    return [
        f"  {prefix}{label:<10}  top-1 agreement {entry['top1_agreement']:.4f}, KL(teacher||model) "
        f"{entry['kl_teacher_student']:.4f} nats at T=1, teacher accuracy {_figure(entry['teacher_accuracy'])} ({where})"
        for label, entry, where in entries
    ]


def plot_confusion(result: dict, path: Path) -> None:
    """Counts in each cell, colour by the share of the true label's rows, so that small classes stay readable."""
    from matplotlib.figure import Figure

    names, counts = result["label_names"], np.asarray(result["confusion_matrix"])
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    side = min(16.0, max(4.5, 0.55 * len(names) + 3))
    figure = Figure(figsize=(side + 1.2, side), dpi=120, layout="constrained")
    axes = figure.subplots()
    image = axes.imshow(share, cmap="Blues", vmin=0, vmax=1)
    if len(names) <= 60:
        axes.set_xticks(range(len(names)), names, rotation=35, ha="right", rotation_mode="anchor")
        axes.set_yticks(range(len(names)), [f"{name} ({total})" for name, total in zip(names, counts.sum(axis=1))])
    if len(names) <= 30:
        for (row, column), count in np.ndenumerate(counts):
            axes.text(
                column,
                row,
                f"{count}",
                ha="center",
                va="center",
                color="white" if share[row, column] > 0.6 else "black",
            )
    axes.set_xlabel("predicted label")
    axes.set_ylabel("true label (rows)")
    axes.set_title(
        f"{result['name']} on {slug(result['dataset'])} {result['split']}\n"
        f"accuracy {result['accuracy']:.4f}, macro-F1 {result['macro_f1']:.4f}",
        fontsize=10,
    )
    figure.colorbar(image, ax=axes, shrink=0.8, label="share of the true label's rows")
    figure.savefig(path)


def plot_reliability(result: dict, path: Path) -> None:
    """Accuracy against mean confidence in each confidence bin, beside the diagonal of a calibrated model; a bar
    below the diagonal is overconfidence. The bins' share of the rows underneath, as ECE weighs them."""
    from matplotlib.figure import Figure

    table = result["calibration_bins"]
    lower, width = np.array([b["lower"] for b in table]), np.array([b["upper"] - b["lower"] for b in table])
    accuracy = np.array([b["accuracy"] if b["count"] else 0.0 for b in table])
    confidence = np.array([b["confidence"] if b["count"] else np.nan for b in table])
    share = np.array([b["count"] for b in table]) / max(1, sum(b["count"] for b in table))
    figure = Figure(figsize=(5.2, 6.2), dpi=120, layout="constrained")
    top, bottom = figure.subplots(2, 1, height_ratios=[3, 1], sharex=True)
    top.bar(lower, accuracy, width, align="edge", edgecolor="black", linewidth=0.5, label="accuracy")
    top.plot(confidence, accuracy, "o", color="tab:red", markersize=3, label="mean confidence of the bin")
    top.plot([0, 1], [0, 1], "--", color="gray", label="calibrated")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.legend(fontsize=8, loc="upper left", frameon=False)
    top.set_title(
        f"{result['name']} on {slug(result['dataset'])} {result['split']}\n"
        f"ECE {result['expected_calibration_error']:.4f} ({len(table)} bins)",
        fontsize=10,
    )
    bottom.bar(lower, share, width, align="edge", color="tab:gray")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (max softmax)")
    bottom.set_ylabel("share of rows")
    figure.savefig(path)


def plot_comparison(results: list[dict], path: Path, title: str) -> None:
    """Quality (accuracy, macro-F1, agreement with the teacher), size and speed of each model, side by side."""
    from matplotlib.figure import Figure

    names = [result["name"] for result in results]
    quality = {}
    if results[0]["accuracy"] is not None:  # a split without labels: agreement with the teacher alone
        quality = {"accuracy": [r["accuracy"] for r in results], "macro-F1": [r["macro_f1"] for r in results]}
    if all("teacher_agreement" in r for r in results):
        quality["top-1 agreement with teacher"] = [r["teacher_agreement"]["top1_agreement"] for r in results]
    figure = Figure(figsize=(max(10.0, 3.0 * len(results) + 4), 4.6), dpi=120, layout="constrained")
    left, middle, right = figure.subplots(1, 3, width_ratios=[2.2, 1, 1])
    positions, width = np.arange(len(results)), 0.8 / len(quality)
    for k, (label, values) in enumerate(quality.items()):
        bars = left.bar(positions + (k - (len(quality) - 1) / 2) * width, values, width, label=label)
        left.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    left.set_ylim(0, 1.22)  # room for the legend above the bars of a perfect model
    left.set_yticks(np.linspace(0, 1, 6))
    left.set_title("quality (higher is better)", fontsize=10)
    left.legend(fontsize=8, loc="upper center", ncols=len(quality), frameon=False)
    panels = [
        (middle, [r["parameters"] / 1e6 for r in results], "parameters (millions)", "{:.2f}".format),
        (
            right,
            [r["speed"]["forward_images_per_second"] for r in results],
            f"images/s, forward (batch {results[0]['speed']['batch_size']}, {results[0]['speed']['device']})",
            lambda value: f"{value:.0f}" if value >= 100 else f"{value:.1f}",
        ),
    ]
    for axes, values, label, fmt in panels:
        bars = axes.bar(positions, values, 0.6, color="tab:gray")
        axes.bar_label(bars, fmt=fmt, fontsize=8, padding=1)
        axes.set_title(label, fontsize=10)
        axes.margins(y=0.15)
    for axes in (left, middle, right):
        axes.set_xticks(positions, names, rotation=20, ha="right", rotation_mode="anchor", fontsize=8)
        axes.spines[["top", "right"]].set_visible(False)
    figure.suptitle(title)
    figure.savefig(path)
