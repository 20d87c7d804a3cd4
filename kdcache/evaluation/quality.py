"""The figures of one model's logits on a split: accuracy and per-class metrics (kdcache.evaluation.metrics, offline),
calibration, and agreement with the teacher or a teacher ensemble."""

import numpy as np
import torch

from kdcache.errors import KdcacheError
from kdcache.labels import NO_LABEL

CALIBRATION_BINS = 15  # Guo et al. (2017), "On Calibration of Modern Neural Networks": the usual 15


def classification_metrics(predictions, references, names: list[str]) -> dict:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix (rows: true label,
    columns: predicted label, both in `names` order) of class-index predictions against references."""
    from kdcache.evaluation.metrics import compute_classification

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


def ensemble_agreement(logits, members, references, weights=None) -> dict:
    """A model against several cached teachers of the same rows (`members`: (cache, manifest, teacher logits)):
    "teacher_agreements", one dict per teacher as a lone cache gives, and "teacher_agreement", the same figures
    against the ensemble, whose probabilities are the teachers' softmax at T=1 averaged with the normalised
    `weights` (kdcache.format.ensemble.ensemble_teacher_logits, as train-student averages them at its T)."""
    from kdcache.format.ensemble import ensemble_teacher_logits, normalised_weights

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


def metrics_library_name() -> str:
    import evaluate
    import sklearn

    return f"evaluate {evaluate.__version__} (kdcache.evaluation.metrics, offline) over scikit-learn {sklearn.__version__}"
