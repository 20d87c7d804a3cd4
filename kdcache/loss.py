"""The distillation loss, as a pure function of logits and labels."""

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError


def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float = 5.0,
    alpha: float = 0.5,
    return_terms: bool = False,
):
    """(1-alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The KL term is averaged over the batch ("batchmean"), as in the Hugging Face distillation tutorial;
    the T^2 factor keeps its gradient on the same scale as the cross-entropy's when T changes (Hinton et al.).
    alpha=0 is plain cross-entropy (teacher_logits may then be None); alpha=1 is pure distillation.
    `labels` are class indices, or (batch, classes) probabilities for mixed images (mixup's two labels, weighted).

    With return_terms, returns (loss, {"ce": ..., "kl": ...}): the unweighted terms, detached, for logging; a term
    that alpha switches off is not computed and not returned.
    """
    check_loss_settings(temperature, alpha)
    # Upcast: under bf16/fp16 autocast the softmax of logits/T loses most of its precision.
    student_logits = student_logits.float()
    loss = student_logits.new_zeros(())
    terms = {}
    if alpha < 1.0:
        cross_entropy = F.cross_entropy(student_logits, labels.float() if labels.is_floating_point() else labels)
        loss = loss + (1.0 - alpha) * cross_entropy
        terms["ce"] = cross_entropy.detach()
    if alpha > 0.0:
        if teacher_logits is None:
            raise ValueError("alpha > 0 needs teacher_logits")
        teacher_log_probs = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        student_log_probs = F.log_softmax(student_logits / temperature, dim=-1)
        # KL(p_t || p_s) = sum p_t (log p_t - log p_s); log_target avoids 0*log(0) issues for tiny p_t.
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * kl
        terms["kl"] = kl.detach()
    return (loss, terms) if return_terms else loss


def check_loss_settings(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise KdcacheError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KdcacheError(f"alpha (lambda) must be in [0, 1], got {alpha}")
