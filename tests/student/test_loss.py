"""The distillation losses (kdcache.student.loss): kd, dkd and dist against the tutorial's and the papers' formulas,
and against a teacher ensemble's averaged probabilities (kdcache.format.ensemble); each declared loss (kdcache.losses)
with its one function."""

import inspect

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache import KdcacheError
from kdcache.format.ensemble import ensemble_teacher_logits
from kdcache.losses import LOSS_SPECS, Loss, others
from kdcache.student.loss import LOSSES, dist_loss, distillation_loss, dkd_loss, implements


def tutorial_loss(student_logits, labels, teacher_logits, temperature, alpha):
    """Written the Hugging Face tutorial's way, independently of kdcache.student.loss."""
    soft_teacher = F.softmax(teacher_logits / temperature, dim=-1)
    soft_student = F.log_softmax(student_logits / temperature, dim=-1)
    distillation = nn.KLDivLoss(reduction="batchmean")(soft_student, soft_teacher) * temperature**2
    return (1.0 - alpha) * F.cross_entropy(student_logits, labels) + alpha * distillation


@pytest.mark.parametrize("temperature,alpha", [(5.0, 0.5), (1.0, 0.5), (2.0, 0.9), (5.0, 0.0), (5.0, 1.0), (0.5, 0.3)])
def test_loss_and_gradient_equal_the_tutorial_formula(temperature, alpha):
    generator = torch.Generator().manual_seed(0)
    for _ in range(5):
        student = (torch.randn(16, 7, generator=generator) * 3).requires_grad_(True)
        teacher = torch.randn(16, 7, generator=generator) * 4
        labels = torch.randint(0, 7, (16,), generator=generator)
        ours = distillation_loss(student, labels, teacher, temperature, alpha)
        (ours_grad,) = torch.autograd.grad(ours, student)
        reference = tutorial_loss(student, labels, teacher, temperature, alpha)
        (reference_grad,) = torch.autograd.grad(reference, student)
        assert torch.allclose(ours, reference, atol=1e-6, rtol=1e-6)
        assert torch.allclose(ours_grad, reference_grad, atol=1e-7, rtol=1e-5)


def test_alpha_zero_is_cross_entropy_and_needs_no_teacher():
    student, labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert torch.equal(distillation_loss(student, labels, None, 5.0, 0.0), F.cross_entropy(student, labels))
    with pytest.raises(KdcacheError, match="needs teacher_logits"):
        distillation_loss(student, labels, None, 5.0, 0.5)


def test_alpha_one_is_pure_distillation_and_zero_when_student_equals_teacher():
    logits, wrong_labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert distillation_loss(logits, wrong_labels, logits.clone(), 5.0, 1.0).abs() < 1e-6


def test_half_precision_logits_are_upcast():
    student, teacher, labels = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    full = distillation_loss(student, labels, teacher, 5.0, 0.5)
    half = distillation_loss(student.bfloat16(), labels, teacher.bfloat16(), 5.0, 0.5)
    assert half.dtype == torch.float32 and torch.allclose(full, half, atol=0.05)


def test_terms_are_the_unweighted_parts_of_the_loss():
    generator = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss, terms = distillation_loss(student, labels, teacher, 4.0, 0.3, return_terms=True)
    kl = nn.KLDivLoss(reduction="batchmean")(F.log_softmax(student / 4.0, -1), F.softmax(teacher / 4.0, -1))
    assert torch.allclose(terms["ce"], F.cross_entropy(student, labels))
    assert torch.allclose(terms["kl"], kl, atol=1e-7)
    assert torch.allclose(loss, 0.7 * terms["ce"] + 0.3 * 16.0 * terms["kl"])
    assert set(distillation_loss(student, labels, teacher, 4.0, 1.0, return_terms=True)[1]) == {"kl"}
    assert set(distillation_loss(student, labels, None, 4.0, 0.0, return_terms=True)[1]) == {"ce"}


def test_mixed_labels_are_a_weighted_cross_entropy():
    generator = torch.Generator().manual_seed(2)
    student = torch.randn(6, 4, generator=generator)
    first, second = torch.randint(0, 4, (6,), generator=generator), torch.randint(0, 4, (6,), generator=generator)
    weight = torch.rand(6, 1, generator=generator)
    soft = weight * F.one_hot(first, 4) + (1 - weight) * F.one_hot(second, 4)
    expected = (
        weight[:, 0] * F.cross_entropy(student, first, reduction="none")
        + (1 - weight[:, 0]) * F.cross_entropy(student, second, reduction="none")
    ).mean()
    assert torch.allclose(distillation_loss(student, soft, None, 5.0, 0.0), expected, atol=1e-6)


# DKD, DIST and logit standardisation, each against its paper's formula written out with plain probability math.


def softmax_rows(logits, temperature):
    """softmax(z/T) of each row, as exp / sum of exp, in float64."""
    scaled = logits.double() / temperature
    scaled = scaled - scaled.max(dim=-1, keepdim=True).values
    return scaled.exp() / scaled.exp().sum(dim=-1, keepdim=True)


def kl(p, q):
    return sum(p[j] * torch.log(p[j] / q[j]) for j in range(len(p)))


def paper_dkd(student, labels, teacher, temperature, alpha, tckd_weight=1.0, nckd_weight=8.0, teacher_probs=None):
    """Zhao et al. 2022, eq. (1)-(5): binary target/non-target probabilities and the renormalised non-target ones.
    teacher_probs: the teacher's probabilities at T given directly (an ensemble's), instead of softmax(teacher/T)."""
    p_student = softmax_rows(student, temperature)
    p_teacher = softmax_rows(teacher, temperature) if teacher_probs is None else teacher_probs
    tckd = nckd = 0.0
    for i, target in enumerate(labels.tolist()):
        binary = [torch.stack([p[i, target], 1 - p[i, target]]) for p in (p_teacher, p_student)]
        others = [j for j in range(student.shape[1]) if j != target]
        renormalised = [p[i, others] / (1 - p[i, target]) for p in (p_teacher, p_student)]
        tckd = tckd + kl(*binary)
        nckd = nckd + kl(*renormalised)
    count = len(labels)
    distillation = temperature**2 * (tckd_weight * tckd / count + nckd_weight * nckd / count)
    return (1 - alpha) * F.cross_entropy(student.double(), labels) + alpha * distillation


def pearson(x, y):
    x_mean, y_mean = sum(x) / len(x), sum(y) / len(y)
    covariance = sum((a - x_mean) * (b - y_mean) for a, b in zip(x, y))
    spread = torch.sqrt(sum((a - x_mean) ** 2 for a in x) * sum((b - y_mean) ** 2 for b in y))
    return covariance / spread


def paper_dist(student, labels, teacher, temperature, alpha, beta=1.0, gamma=1.0, teacher_probs=None):
    """Huang et al. 2022, eq. (6)-(8): 1 - Pearson per image (inter) and per class (intra), averaged.
    teacher_probs: the teacher's probabilities at T given directly (an ensemble's), instead of softmax(teacher/T)."""
    y_student = softmax_rows(student, temperature)
    y_teacher = softmax_rows(teacher, temperature) if teacher_probs is None else teacher_probs
    rows, classes = y_student.shape
    inter = 1 - sum(pearson(y_student[i], y_teacher[i]) for i in range(rows)) / rows
    intra = 1 - sum(pearson(y_student[:, c], y_teacher[:, c]) for c in range(classes)) / classes
    distillation = temperature**2 * (beta * inter + gamma * intra)
    return (1 - alpha) * F.cross_entropy(student.double(), labels) + alpha * distillation


def paper_standardized(logits):
    """Sun et al. 2024, Algorithm 1's Z-score, with the authors' unbiased deviation."""
    rows = []
    for row in logits.double():
        mean = sum(row) / len(row)
        deviation = torch.sqrt(sum((value - mean) ** 2 for value in row) / (len(row) - 1))
        rows.append((row - mean) / (deviation + 1e-7))
    return torch.stack(rows)


def assert_value_and_gradient_match(ours_fn, reference_fn, classes=7, rows=12):
    generator = torch.Generator().manual_seed(classes)
    for _ in range(3):
        student = (torch.randn(rows, classes, generator=generator) * 3).requires_grad_(True)
        teacher = torch.randn(rows, classes, generator=generator) * 4
        labels = torch.randint(0, classes, (rows,), generator=generator)
        ours = ours_fn(student, labels, teacher)
        (ours_grad,) = torch.autograd.grad(ours, student)
        reference = reference_fn(student, labels, teacher)
        (reference_grad,) = torch.autograd.grad(reference, student)
        assert ours.dtype == torch.float32
        assert torch.allclose(ours.double(), reference, atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours_grad.double(), reference_grad.double(), atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (1.0, 0.5), (2.0, 1.0), (0.5, 0.3), (8.0, 0.9)])
def test_dkd_loss_and_gradient_equal_the_papers_formula(temperature, alpha):
    assert_value_and_gradient_match(
        lambda s, y, t: dkd_loss(s, y, t, temperature, alpha), lambda s, y, t: paper_dkd(s, y, t, temperature, alpha)
    )
    assert_value_and_gradient_match(
        lambda s, y, t: dkd_loss(s, y, t, temperature, alpha, tckd_weight=0.5, nckd_weight=2.0),
        lambda s, y, t: paper_dkd(s, y, t, temperature, alpha, 0.5, 2.0),
        classes=3,
    )


@pytest.mark.parametrize("temperature,alpha", [(1.0, 0.5), (4.0, 0.5), (2.0, 1.0), (0.5, 0.3)])
def test_dist_loss_and_gradient_equal_the_papers_formula(temperature, alpha):
    assert_value_and_gradient_match(
        lambda s, y, t: dist_loss(s, y, t, temperature, alpha), lambda s, y, t: paper_dist(s, y, t, temperature, alpha)
    )
    assert_value_and_gradient_match(
        lambda s, y, t: dist_loss(s, y, t, temperature, alpha, inter_weight=2.0, intra_weight=0.5),
        lambda s, y, t: paper_dist(s, y, t, temperature, alpha, 2.0, 0.5),
        classes=4,
    )


@pytest.mark.parametrize("name", ["kd", "dkd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_standardized_losses_equal_the_papers_formula(name, temperature):
    reference = {
        "kd": lambda s, y, t: tutorial_loss(paper_standardized(s), y, paper_standardized(t), temperature, 1.0),
        "dkd": lambda s, y, t: paper_dkd(paper_standardized(s), y, paper_standardized(t), temperature, 1.0),
    }[name]
    assert_value_and_gradient_match(
        lambda s, y, t: LOSSES[name](s, y, t, temperature, 1.0, standardize=True), reference
    )


@pytest.mark.parametrize("name", ["kd", "dkd"])
def test_standardisation_ignores_each_images_shift_and_scale(name):
    generator = torch.Generator().manual_seed(3)
    student, teacher = torch.randn(10, 6, generator=generator) * 2, torch.randn(10, 6, generator=generator) * 5
    labels = torch.randint(0, 6, (10,), generator=generator)
    scale, shift = torch.rand(10, 1, generator=generator) * 4 + 0.25, torch.randn(10, 1, generator=generator) * 10
    loss = LOSSES[name]
    plain = loss(student, labels, teacher, 2.0, 1.0, standardize=True)
    moved = loss(student * scale + shift, labels, teacher * scale.flip(0) - shift, 2.0, 1.0, standardize=True)
    assert torch.allclose(plain, moved, atol=1e-5, rtol=1e-5)
    # and without it the same change does matter, so the comparison above can fail
    assert not torch.allclose(
        loss(student, labels, teacher, 2.0, 1.0),
        loss(student * scale + shift, labels, teacher * scale.flip(0) - shift, 2.0, 1.0),
        rtol=1e-3,
    )


def test_dkd_needs_more_than_two_classes_and_one_target_class():
    with pytest.raises(KdcacheError, match="DKD needs more than 2 classes") as refused:
        dkd_loss(torch.randn(4, 2), torch.tensor([0, 1, 1, 0]), torch.randn(4, 2), 4.0, 0.5)
    assert "\n" not in str(refused.value)
    assert str(refused.value).endswith(f"use {others('dkd')}") and others("dkd") == "--loss kd or --loss dist"
    mixed = F.one_hot(torch.tensor([0, 1, 2, 0]), 3) * 0.6 + F.one_hot(torch.tensor([1, 2, 0, 2]), 3) * 0.4
    with pytest.raises(KdcacheError, match="DKD needs one target class"):
        dkd_loss(torch.randn(4, 3), mixed, torch.randn(4, 3), 4.0, 0.5)
    assert torch.isfinite(dkd_loss(torch.randn(4, 3), torch.tensor([0, 1, 2, 0]), torch.randn(4, 3), 4.0, 0.5))


def test_dist_takes_mixed_labels():
    generator = torch.Generator().manual_seed(4)
    student, teacher = torch.randn(4, 3, generator=generator), torch.randn(4, 3, generator=generator)
    mixed = F.one_hot(torch.tensor([0, 1, 2, 0]), 3) * 0.7 + F.one_hot(torch.tensor([1, 2, 0, 2]), 3) * 0.3
    loss, terms = dist_loss(student, mixed, teacher, 1.0, 0.5, return_terms=True)
    assert torch.allclose(terms["ce"], -(mixed * F.log_softmax(student, -1)).sum(-1).mean())


@pytest.mark.parametrize(
    "name,distillation_terms", [("kd", {"kl"}), ("dkd", {"tckd", "nckd"}), ("dist", {"inter", "intra"})]
)
def test_every_loss_names_its_terms_and_is_cross_entropy_at_alpha_zero(name, distillation_terms):
    generator = torch.Generator().manual_seed(5)
    student, teacher = torch.randn(8, 5, generator=generator), torch.randn(8, 5, generator=generator)
    labels = torch.randint(0, 5, (8,), generator=generator)
    loss = LOSSES[name]
    temperature = LOSS_SPECS[name].temperature
    assert set(loss(student, labels, teacher, temperature, 0.5, return_terms=True)[1]) == {"ce"} | distillation_terms
    assert set(loss(student, labels, teacher, temperature, 1.0, return_terms=True)[1]) == distillation_terms
    assert torch.equal(loss(student, labels, None, temperature, 0.0), F.cross_entropy(student, labels))
    assert loss(student, labels, student.clone(), temperature, 1.0).abs() < 1e-5  # a student that is its teacher


@pytest.mark.parametrize("name", ["dkd", "dist"])
def test_half_precision_logits_are_upcast_in_every_loss(name):
    generator = torch.Generator().manual_seed(6)
    student, teacher = torch.randn(8, 4, generator=generator), torch.randn(8, 4, generator=generator)
    labels = torch.randint(0, 4, (8,), generator=generator)
    temperature = LOSS_SPECS[name].temperature
    full = LOSSES[name](student, labels, teacher, temperature, 0.5)
    half = LOSSES[name](student.bfloat16(), labels, teacher.bfloat16(), temperature, 0.5)
    assert half.dtype == torch.float32 and torch.allclose(full, half, atol=0.05)


# Teacher ensembles: the teachers' probabilities at T, averaged by hand, against what the losses are given.


def hand_kd(student, labels, teacher_probs, temperature, alpha):
    """Hinton's KD against given teacher probabilities: (1-alpha) CE + alpha T^2 mean_i sum_j p log(p / q)."""
    q = softmax_rows(student, temperature)
    kl_rows = (teacher_probs * (teacher_probs.log() - q.log())).sum(-1)
    return (1 - alpha) * F.cross_entropy(student.double(), labels) + alpha * temperature**2 * kl_rows.mean()


def hand_averaged_probabilities(weights, members, temperature):
    """sum_i w_i softmax(z_i / T), the weights normalised, in float64."""
    total = sum(weights)
    return sum(weight / total * softmax_rows(logits, temperature) for weight, logits in zip(weights, members))


@pytest.mark.parametrize("temperature", [1.0, 4.0, 5.0, 0.5])
@pytest.mark.parametrize("weights", [None, [1.0, 3.0], [0.2, 0.3, 0.5]])
def test_an_ensembles_targets_are_its_teachers_probabilities_averaged_at_t(temperature, weights):
    generator = torch.Generator().manual_seed(7)
    members = [torch.randn(12, 5, generator=generator) * scale for scale in (3.0, 6.0, 1.0)][: len(weights or [0, 0])]
    by_hand = hand_averaged_probabilities(weights or [1.0] * len(members), members, temperature)
    logits = ensemble_teacher_logits(members, weights, temperature)
    assert torch.allclose(softmax_rows(logits, temperature), by_hand, rtol=0, atol=1e-12)
    # and not the probabilities of the averaged logits, which this average is not
    averaged_logits = sum(members) / len(members)
    assert not torch.allclose(softmax_rows(averaged_logits, temperature), by_hand, atol=1e-3)


def test_an_ensemble_of_identical_teachers_gives_back_their_logits_bit_for_bit():
    logits = torch.randn(64, 4, 10, generator=torch.Generator().manual_seed(8)) * 7  # rows, views, classes
    for temperature in (1.0, 2.0, 4.0, 5.0, 0.3):
        for count in (2, 3):
            assert torch.equal(ensemble_teacher_logits([logits] * count, None, temperature).float(), logits)


@pytest.mark.parametrize(
    "name,reference",
    [
        ("kd", hand_kd),
        ("dkd", lambda s, y, p, t, a: paper_dkd(s, y, None, t, a, teacher_probs=p)),
        ("dist", lambda s, y, p, t, a: paper_dist(s, y, None, t, a, teacher_probs=p)),
    ],
)
@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (1.0, 0.9), (2.0, 1.0)])
def test_every_loss_distils_from_the_averaged_probabilities(name, reference, temperature, alpha):
    """Each loss, given the ensemble's logits, equals its formula (value and gradient) with the teacher's
    probabilities replaced by the teachers' average at T, computed by hand."""
    generator = torch.Generator().manual_seed(9)
    for _ in range(3):
        student = (torch.randn(12, 6, generator=generator) * 3).requires_grad_(True)
        members = [torch.randn(12, 6, generator=generator) * 4 for _ in range(2)]
        labels = torch.randint(0, 6, (12,), generator=generator)
        teacher = ensemble_teacher_logits(members, [0.3, 0.7], temperature).float()  # float32, as a cache holds it
        ours = LOSSES[name](student, labels, teacher, temperature, alpha)
        (ours_grad,) = torch.autograd.grad(ours, student)
        by_hand = hand_averaged_probabilities([0.3, 0.7], members, temperature)
        expected = reference(student, labels, by_hand, temperature, alpha)
        (expected_grad,) = torch.autograd.grad(expected, student)
        assert torch.allclose(ours.double(), expected, atol=1e-5, rtol=1e-5)
        assert torch.allclose(ours_grad.double(), expected_grad.double(), atol=1e-6, rtol=1e-4)


# The registry: each loss declared once in kdcache.losses, and given its one function here by @implements.


def test_every_declared_loss_has_one_function_that_takes_the_settings_its_declaration_says():
    assert set(LOSSES) == set(LOSS_SPECS) == {"kd", "dkd", "dist"}
    assert len(set(LOSSES.values())) == len(LOSSES), "one function per loss"
    for name, spec in LOSS_SPECS.items():
        parameters = inspect.signature(LOSSES[name]).parameters
        assert list(parameters)[:5] == ["student_logits", "labels", "teacher_logits", "temperature", "alpha"], name
        # the run's resolved temperature and alpha, always given: no default of the function's own to drift
        assert parameters["temperature"].default is parameters["alpha"].default is inspect.Parameter.empty, name
        assert ("standardize" in parameters) == spec.standardizable, name
        assert spec.temperature > 0, "the options check a temperature given, not the declared one"


def test_a_function_is_registered_for_a_declared_loss_only_and_only_once(add_loss):
    def halved(student_logits, labels, teacher_logits, temperature, alpha, return_terms=False):
        return distillation_loss(student_logits, labels, teacher_logits, temperature, alpha, return_terms) / 2

    with pytest.raises(ValueError, match="kdcache.losses declares no loss 'halved'; declare it there"):
        implements("halved")(halved)
    with pytest.raises(ValueError, match="loss 'kd' has a function already, distillation_loss"):
        implements("kd")(halved)
    assert "halved" not in LOSSES and LOSSES["kd"] is distillation_loss
    assert add_loss(Loss("halved", 2.0, "half of kd", "T^2 KL / 2"), halved) is halved and LOSSES["halved"] is halved
    with pytest.raises(ValueError, match="loss 'halved' has a function already, halved"):
        implements("halved")(distillation_loss)
