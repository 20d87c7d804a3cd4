import pytest

from kdcache import KdcacheError
from kdcache.models import align_labels, weights_sha256


def test_labels_map_by_name_ignoring_case_and_separators():
    teacher = {0: "Healthy", 1: "angular-leaf-spot", 2: "bean rust"}
    assert align_labels(teacher, ["angular_leaf_spot", "bean_rust", "healthy"]) == [1, 2, 0]
    assert align_labels({"0": "a", "1": "b"}, ["b", "a"]) == [1, 0]  # config.json keys are strings


def test_heads_that_do_not_fit_are_refused():
    with pytest.raises(KdcacheError, match="1000 output classes but the dataset has 3"):
        align_labels({i: f"class {i}" for i in range(1000)}, ["a", "b", "c"])
    with pytest.raises(KdcacheError, match="no match for c"):
        align_labels({0: "a", 1: "b", 2: "d"}, ["a", "b", "c"])
    with pytest.raises(KdcacheError, match="no match for a"):
        align_labels({0: "a", 1: "A", 2: "b"}, ["a", "b", "c"])  # two outputs claim one class
    assert align_labels({0: "x", 1: "y"}, ["a", "b"], by_index=True) == [0, 1]


def test_weights_hash_follows_the_weights():
    import torch

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    before = weights_sha256(model)
    assert before == weights_sha256(model) and len(before) == 64
    with torch.no_grad():
        model.weight[0, 0] += 1e-6
    assert weights_sha256(model) != before


def test_models_are_loaded_with_their_own_layers_not_kernels_from_the_hub(tiny_teacher):
    """transformers kernelizes what from_pretrained loads wherever `kernels` is installed (it requires it): on a GPU,
    model.eval() then swaps layers for kernels fetched from the Hub, and offline that is a ValueError (seen on an
    H200, BENCHMARKS.md). kdcache's loaders turn it off: the teacher, a student it starts from, and so export's."""
    from helpers import LABELS
    from transformers import AutoModelForImageClassification
    from transformers.utils import is_kernels_available

    from kdcache.models import load_classifier
    from kdcache.student.model import build_student

    if not is_kernels_available():
        pytest.skip("the kernels package, which turns the Hub's kernels on, is not installed")
    default = AutoModelForImageClassification.from_pretrained(str(tiny_teacher))
    assert default.use_kernels, "transformers' default, which this test is about"
    assert not load_classifier(str(tiny_teacher)).use_kernels
    assert not build_student(str(tiny_teacher), LABELS, (3, 32, 32), seed=0).use_kernels
