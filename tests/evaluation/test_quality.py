"""The quality metrics (kdcache.evaluation.quality): accuracy and F1, teacher agreement and calibration against direct
computations, without the network."""

import numpy as np
import pytest
from helpers import LABELS, direct_ece
from scipy.special import rel_entr, softmax

from kdcache import KdcacheError
from kdcache.evaluation.quality import calibration, classification_metrics, teacher_agreement


def test_classification_metrics_equal_a_hand_computation():
    references = [0, 0, 0, 1, 1, 1, 2, 2]
    predictions = [0, 0, 1, 1, 1, 0, 1, 0]  # class 2 is never predicted: its precision is 0/0, counted as 0
    got = classification_metrics(predictions, references, LABELS)
    assert got["confusion_matrix"] == [[2, 1, 0], [1, 2, 0], [1, 1, 0]]  # rows: true, columns: predicted
    assert got["accuracy"] == pytest.approx(4 / 8)
    first, second, third = (got["per_class"][name] for name in LABELS)
    for figures in (first, second):  # 2 right of 4 predicted, 2 right of 3 true
        assert figures["precision"] == pytest.approx(2 / 4)
        assert figures["recall"] == pytest.approx(2 / 3)
        assert figures["f1"] == pytest.approx(2 * (1 / 2) * (2 / 3) / (1 / 2 + 2 / 3))
        assert figures["support"] == 3
    assert third == {"precision": 0.0, "recall": 0.0, "f1": 0.0, "support": 2}
    assert got["macro_f1"] == pytest.approx((4 / 7 + 4 / 7 + 0) / 3)
    with pytest.raises(KdcacheError, match="need as many"):
        classification_metrics([0, 1], [0], LABELS)


def test_metrics_need_no_network(monkeypatch):
    import socket

    def refuse(*args, **kwargs):
        raise OSError("no network in this test")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)  # offline by the code path, not by a setting
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    assert classification_metrics([0, 1, 2], [0, 1, 1], LABELS)["accuracy"] == pytest.approx(2 / 3)


def test_teacher_agreement_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    teacher = rng.normal(0, 3, (50, 3)).astype(np.float32)
    student = (teacher + rng.normal(0, 2, (50, 3))).astype(np.float32)
    labels = rng.integers(0, 3, 50)
    got = teacher_agreement(student, teacher, labels)
    p, q = softmax(teacher.astype(np.float64), axis=1), softmax(student.astype(np.float64), axis=1)
    assert got["kl_teacher_student"] == pytest.approx(rel_entr(p, q).sum(axis=1).mean(), rel=1e-9)
    assert got["top1_agreement"] == np.mean([np.argmax(s) == np.argmax(t) for s, t in zip(student, teacher)])
    assert got["teacher_accuracy"] == np.mean([np.argmax(t) == y for t, y in zip(teacher, labels)])
    assert 0 < got["top1_agreement"] < 1 and got["kl_teacher_student"] > 0
    same = teacher_agreement(teacher, teacher, labels)
    assert same["top1_agreement"] == 1.0 and same["kl_teacher_student"] == pytest.approx(0, abs=1e-12)


def test_expected_calibration_error_equals_a_direct_computation():
    rng = np.random.default_rng(0)
    for classes, scale in ((3, 1.0), (10, 4.0), (2, 0.3)):
        logits = rng.normal(0, scale, (500, classes))
        references = rng.integers(0, classes, 500)
        result = calibration(logits, references)
        probabilities = softmax(logits, -1)
        assert result["expected_calibration_error"] == pytest.approx(direct_ece(probabilities, references), abs=1e-12)
        assert result["expected_calibration_error"] > 0.01
        assert sum(b["count"] for b in result["calibration_bins"]) == 500 and len(result["calibration_bins"]) == 15
    # a model that is right exactly as often as it is sure: every row's confidence is 0.9 and 9 rows in 10 are right
    sure = np.log(np.array([[0.9, 0.05, 0.05]] * 100))
    assert calibration(sure, np.array([0] * 90 + [1] * 10))["expected_calibration_error"] == pytest.approx(
        0.0, abs=1e-9
    )
    assert calibration(sure, np.array([0] * 50 + [1] * 50))["expected_calibration_error"] == pytest.approx(
        0.4, abs=1e-9
    )
