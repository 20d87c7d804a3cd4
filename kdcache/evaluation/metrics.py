"""Classification metrics as `evaluate` modules defined here, so they never touch the hub.

`evaluate.load("accuracy")` downloads its script from the hub, which fails offline. These classes are the same
kind of module (the hub's accuracy, precision/recall/f1 and confusion_matrix scripts are thin wrappers over
sklearn.metrics too), instantiated directly and combined with `evaluate.combine`: no download, no copy of a
script into the modules cache.
"""

import datasets
import evaluate
import numpy as np
from sklearn import metrics as skm

# A class the model never predicts has no defined precision (0/0), one absent from the split no defined recall;
# both count as 0, sklearn's value, so that macro-F1 penalises a model that ignores a class instead of skipping it.
ZERO_DIVISION = 0.0
_FEATURES = datasets.Features({"predictions": datasets.Value("int64"), "references": datasets.Value("int64")})


def _info(description: str) -> evaluate.MetricInfo:
    return evaluate.MetricInfo(description=description, citation="", inputs_description="", features=_FEATURES)


class Accuracy(evaluate.Metric):
    def _info(self):
        return _info("Fraction of predictions equal to their reference.")

    def _compute(self, predictions, references, num_labels):
        return {"accuracy": float(skm.accuracy_score(references, predictions))}


class PerClass(evaluate.Metric):
    def _info(self):
        return _info("Precision, recall, F1 and support of each class, and the macro (unweighted) mean F1.")

    def _compute(self, predictions, references, num_labels):
        precision, recall, f1, support = skm.precision_recall_fscore_support(
            references, predictions, labels=list(range(num_labels)), zero_division=ZERO_DIVISION
        )
        return {
            "macro_f1": float(np.mean(f1)),
            "precision": precision.tolist(),
            "recall": recall.tolist(),
            "f1": f1.tolist(),
            "support": support.tolist(),
        }


class ConfusionMatrix(evaluate.Metric):
    def _info(self):
        return _info("Counts of (true label, predicted label) pairs: rows are true labels, columns predictions.")

    def _compute(self, predictions, references, num_labels):
        return {
            "confusion_matrix": skm.confusion_matrix(references, predictions, labels=list(range(num_labels))).tolist()
        }


def compute_classification(predictions, references, num_labels: int) -> dict:
    """accuracy, macro_f1, per-class precision/recall/f1/support lists and the confusion matrix, by class index."""
    combined = evaluate.combine(
        [Accuracy(keep_in_memory=True), PerClass(keep_in_memory=True), ConfusionMatrix(keep_in_memory=True)]
    )
    return combined.compute(
        predictions=[int(p) for p in predictions], references=[int(r) for r in references], num_labels=num_labels
    )
