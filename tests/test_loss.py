import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdcache import KdcacheError
from kdcache.loss import distillation_loss


def tutorial_loss(student_logits, labels, teacher_logits, temperature, alpha):
    """Written the Hugging Face tutorial's way, independently of kdcache.loss."""
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
    with pytest.raises(ValueError, match="needs teacher_logits"):
        distillation_loss(student, labels, None, 5.0, 0.5)


def test_alpha_one_is_pure_distillation_and_zero_when_student_equals_teacher():
    logits, wrong_labels = torch.randn(8, 3), torch.randint(0, 3, (8,))
    assert distillation_loss(logits, wrong_labels, logits.clone(), 5.0, 1.0).abs() < 1e-6


def test_half_precision_logits_are_upcast():
    student, teacher, labels = torch.randn(8, 3), torch.randn(8, 3), torch.randint(0, 3, (8,))
    full = distillation_loss(student, labels, teacher)
    half = distillation_loss(student.bfloat16(), labels, teacher.bfloat16())
    assert half.dtype == torch.float32 and torch.allclose(full, half, atol=0.05)


@pytest.mark.parametrize("temperature,alpha", [(0.0, 0.5), (-1.0, 0.5), (5.0, -0.1), (5.0, 1.5), (float("nan"), 0.5)])
def test_invalid_settings_are_refused(temperature, alpha):
    with pytest.raises(KdcacheError):
        distillation_loss(torch.randn(2, 3), torch.tensor([0, 1]), torch.randn(2, 3), temperature, alpha)


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
    expected = (weight[:, 0] * F.cross_entropy(student, first, reduction="none")
                + (1 - weight[:, 0]) * F.cross_entropy(student, second, reduction="none")).mean()
    assert torch.allclose(distillation_loss(student, soft, None, alpha=0.0), expected, atol=1e-6)
