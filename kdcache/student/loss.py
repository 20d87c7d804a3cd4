"""The distillation losses, as pure functions of logits and labels: the function of each loss declared in
kdcache.losses (its name, default temperature, needs, formula and help), registered for its name by `@implements`.

Each takes (student_logits, labels, teacher_logits, temperature, alpha) and returns the loss, or with return_terms
(loss, terms): the unweighted terms, detached, for logging. alpha means the same in all of them: the loss is
(1-alpha) * CE(student, labels) + alpha * (the loss's distillation part), so alpha=0 is plain cross-entropy
(teacher_logits may then be None) and alpha=1 is the teacher alone. temperature and alpha have no defaults here: a
run gives the options' (the temperature resolved from the loss's declaration), checked once by
kdcache.losses.check_loss_settings before training, not on every batch. A loss declared standardizable also takes
`standardize`."""

import torch
import torch.nn.functional as F

from kdcache.errors import KdcacheError
from kdcache.losses import LOSS_SPECS
from kdcache.losses import others as other_losses  # dkd_loss's `others` are its non-target logits

LOSSES = {}  # each loss declared in kdcache.losses -> its function, as `@implements` registers them below


def implements(name: str):
    """Registers the decorated function as that of the loss declared as `name` in kdcache.losses, one function per
    declared name (tests/student/test_loss.py checks that every declared loss has its function)."""

    def register(function):
        # a mistake in kdcache's code, not in a user's input: a plain error, raised as this module is imported
        if name not in LOSS_SPECS:
            raise ValueError(f"@implements('{name}'): kdcache.losses declares no loss '{name}'; declare it there")
        if name in LOSSES:
            raise ValueError(f"@implements('{name}'): loss '{name}' has a function already, {LOSSES[name].__name__}")
        LOSSES[name] = function
        return function

    return register


@implements("kd")
def distillation_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    alpha: float,
    return_terms: bool = False,
    standardize: bool = False,
):
    """(1-alpha) * CE(student, labels) + alpha * T^2 * KL(softmax(teacher/T) || softmax(student/T)).

    The KL term is averaged over the batch ("batchmean"), as in the Hugging Face distillation tutorial;
    the T^2 factor keeps its gradient on the same scale as the cross-entropy's when T changes (Hinton et al.).
    alpha=0 is plain cross-entropy (teacher_logits may then be None); alpha=1 is pure distillation.
    `labels` are class indices, or (batch, classes) probabilities for mixed images (mixup's two labels, weighted).
    standardize=True z-scores both logits first (`standardized`), so T is a base temperature (Sun et al. 2024).

    With return_terms, returns (loss, {"ce": ..., "kl": ...}): the unweighted terms, detached, for logging; a term
    that alpha switches off is not computed and not returned.
    """
    # Upcast: under bf16/fp16 autocast the softmax of logits/T loses most of its precision.
    student_logits = student_logits.float()
    loss, terms = _cross_entropy_part(student_logits, labels, alpha)
    if alpha > 0.0:
        student, teacher = _distilled_logits(student_logits, teacher_logits, standardize)
        teacher_log_probs = F.log_softmax(teacher / temperature, dim=-1)
        student_log_probs = F.log_softmax(student / temperature, dim=-1)
        # KL(p_t || p_s) = sum p_t (log p_t - log p_s); log_target avoids 0*log(0) issues for tiny p_t.
        kl = F.kl_div(student_log_probs, teacher_log_probs, reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * kl
        terms["kl"] = kl.detach()
    return (loss, terms) if return_terms else loss


@implements("dkd")
def dkd_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    alpha: float,
    return_terms: bool = False,
    standardize: bool = False,
    tckd_weight: float = 1.0,
    nckd_weight: float = 8.0,
):
    """Decoupled knowledge distillation (Zhao et al., CVPR 2022):
    (1-alpha) * CE(student, labels) + alpha * T^2 * (tckd_weight * TCKD + nckd_weight * NCKD), where, with
    p = softmax(z/T) and t the label's class,

        TCKD = KL(b_teacher || b_student),  b = (p_t, 1 - p_t): the binary target / non-target distribution
        NCKD = KL(q_teacher || q_student),  q_j = p_j / (1 - p_t) for j != t: softmax(z/T) over the other classes

    each averaged over the batch. Classic KD is TCKD + (1 - p_t^teacher) * NCKD; DKD frees NCKD's weight.
    Defaults are mdistiller's (the authors' code, megvii-research/mdistiller, mdistiller/engine/cfg.py: CE weight 1,
    ALPHA (TCKD) 1, BETA (NCKD) 8, T 4, on CIFAR-100; its ImageNet configs use T 1 and BETA 0.5). alpha=0.5 is
    that recipe's CE : DKD = 1 : 1, halved, which AdamW's update does not see.
    mdistiller also ramps the DKD part up linearly over its first 20 of 240 epochs; kdcache does not: a pure
    function of one batch has no epoch, and train-student's learning-rate warm-up already spares the first steps.

    Needs a single target class: labels are class indices, never mixup's (batch, classes) probabilities, and there
    must be more than 2 classes (with 2, NCKD is over one class and always 0: DKD is then a reweighted KD).
    standardize=True z-scores both logits first, as Sun et al. (2024) do for DKD. Terms: ce, tckd, nckd.
    """
    student_logits = student_logits.float()
    classes = student_logits.shape[-1]
    if classes <= 2:
        raise KdcacheError(
            f"DKD needs more than 2 classes (its non-target part is over the classes other than the "
            f"label's), and these logits have {classes}; use {other_losses('dkd')}"
        )
    if not labels.is_floating_point() and bool((labels < 0).any()):
        raise KdcacheError(
            "DKD splits the teacher's outputs around each image's labelled class, and some rows of this batch have "
            f"no label; use {other_losses('dkd')} with unlabeled rows"
        )
    if labels.is_floating_point():
        raise KdcacheError(
            "DKD needs one target class per image, and these labels are mixed (mixup's two classes, "
            f"weighted); use {other_losses('dkd')} with a cache of mixed views"
        )
    loss, terms = _cross_entropy_part(student_logits, labels, alpha)
    if alpha > 0.0:
        student, teacher = _distilled_logits(student_logits, teacher_logits, standardize)
        target = F.one_hot(labels, classes).bool()
        tckd, nckd = [], []
        for logits in (teacher / temperature, student / temperature):
            log_all = torch.logsumexp(logits, dim=-1)
            others = logits[~target].reshape(-1, classes - 1)  # the target column dropped, not masked: no 0*log 0
            log_others = torch.logsumexp(others, dim=-1)
            # log p_t and log(1 - p_t), the latter as log(sum of the others' exp) - log(sum of all): no 1 - p cancellation
            tckd.append(torch.stack([logits[target] - log_all, log_others - log_all], dim=-1))
            nckd.append(others - log_others[:, None])
        tckd_kl = F.kl_div(tckd[1], tckd[0], reduction="batchmean", log_target=True)
        nckd_kl = F.kl_div(nckd[1], nckd[0], reduction="batchmean", log_target=True)
        loss = loss + alpha * temperature**2 * (tckd_weight * tckd_kl + nckd_weight * nckd_kl)
        terms["tckd"], terms["nckd"] = tckd_kl.detach(), nckd_kl.detach()
    return (loss, terms) if return_terms else loss


@implements("dist")
def dist_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    temperature: float,
    alpha: float,
    return_terms: bool = False,
    inter_weight: float = 1.0,
    intra_weight: float = 1.0,
):
    """DIST, distillation from a stronger teacher (Huang et al., NeurIPS 2022):
    (1-alpha) * CE(student, labels) + alpha * T^2 * (inter_weight * inter + intra_weight * intra), where, with
    Y = softmax(Z/T) as (batch, classes) matrices of student and teacher and rho the Pearson correlation,

        inter = 1 - mean over images i of rho(Y_student[i, :], Y_teacher[i, :])   (the classes' ranking per image)
        intra = 1 - mean over classes c of rho(Y_student[:, c], Y_teacher[:, c])  (the images' ranking per class)

    Matching correlations instead of the probabilities themselves leaves a student free to be less sure than a
    much stronger teacher. Defaults are the authors' ImageNet recipe (hunto/image_classification_sota,
    lib/models/losses/kd_loss.py: DIST(beta=1, gamma=1) on softmax(z), T=1, CE and DIST weights 1 and 1, which is
    alpha=0.5 up to a factor AdamW does not see); their CIFAR-100 code (hunto/DIST_KD) uses T=4 with the T^2 factor.
    intra correlates over the batch: it needs batches of more than one image. Labels may be mixed (only the
    cross-entropy reads them). Logit standardisation is an option of the KL-based losses, not of this one (declared
    not standardizable: it takes no `standardize`). Terms: ce, inter, intra.
    """
    student_logits = student_logits.float()
    loss, terms = _cross_entropy_part(student_logits, labels, alpha)
    if alpha > 0.0:
        student, teacher = _distilled_logits(student_logits, teacher_logits, False)
        student_probs, teacher_probs = (
            F.softmax(student / temperature, dim=-1),
            F.softmax(teacher / temperature, dim=-1),
        )
        inter = 1.0 - _pearson(student_probs, teacher_probs).mean()
        intra = 1.0 - _pearson(student_probs.T, teacher_probs.T).mean()
        loss = loss + alpha * temperature**2 * (inter_weight * inter + intra_weight * intra)
        terms["inter"], terms["intra"] = inter.detach(), intra.detach()
    return (loss, terms) if return_terms else loss


def soft_target_kl(teacher_logits: torch.Tensor, rebuilt_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(softmax(teacher/T) || softmax(rebuilt/T)) per row: what compressing the teacher's logits costs the targets."""
    target = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    rebuilt = F.log_softmax(rebuilt_logits.float() / temperature, dim=-1)
    return (target.exp() * (target - rebuilt)).sum(dim=-1)


def standardized(logits: torch.Tensor) -> torch.Tensor:
    """Each row's logits minus their mean, over their standard deviation (Sun et al., "Logit Standardization in
    Knowledge Distillation", CVPR 2024): the softmax of z-scores at a base temperature T matches the teacher's
    ranking of the classes, not the range of its logits, which a small student may not be able to reach.
    As the authors' code (sunshangquan/logit-standardization-KD, mdistiller/distillers/KD.py `normalize`): the
    unbiased (n-1) deviation, plus 1e-7 against constant rows. Their KD recipe pairs it with T=2 and a KD weight
    9 times the CE's on CIFAR-100 (alpha=0.9 here)."""
    mean = logits.mean(dim=-1, keepdim=True)
    return (logits - mean) / (logits.std(dim=-1, keepdim=True) + 1e-7)


def _cross_entropy_part(student_logits, labels, alpha):
    """(1-alpha) * CE and its term, or nothing when alpha switches it off.

    Rows without a label (class index -1, as `datasets` marks them; or an all-zero row of mixed labels) are left out,
    and the cross-entropy is the mean over the labelled rows of the batch, while every distillation term stays a mean
    over all rows. Averaged over the labelled rows, the labels' pull on the student keeps its scale whatever share of
    a batch is labelled: averaged over all rows instead, a batch 10% labelled would weigh its labels 10 times less,
    which is another alpha, drawn anew by every batch's luck (FixMatch and Noisy Student keep their supervised term a
    mean over the labelled examples alike). A batch with no labelled row contributes the distillation terms alone
    (its CE term is 0, and logged as 0)."""
    if alpha >= 1.0:
        return student_logits.new_zeros(()), {}
    target = labels.float() if labels.is_floating_point() else labels
    labelled = labels.sum(dim=-1) > 0 if labels.is_floating_point() else labels >= 0
    if bool(labelled.all()):  # every row labelled: the plain mean, computed as before unlabeled rows existed
        cross_entropy = F.cross_entropy(student_logits, target)
    else:
        per_row = F.cross_entropy(student_logits, target.clamp(min=0), reduction="none")
        cross_entropy = (per_row * labelled).sum() / labelled.sum().clamp(min=1)
    return (1.0 - alpha) * cross_entropy, {"ce": cross_entropy.detach()}


def _distilled_logits(student_logits, teacher_logits, standardize):
    if teacher_logits is None:
        raise KdcacheError(
            "alpha > 0 needs teacher_logits: pass the teacher's logits, or alpha 0 for the labels alone"
        )
    teacher_logits = teacher_logits.float()
    if standardize:
        return standardized(student_logits), standardized(teacher_logits)
    return student_logits, teacher_logits


def _pearson(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Pearson correlation of each row of a with the same row of b (the DIST code's eps, against constant rows)."""
    a, b = a - a.mean(dim=-1, keepdim=True), b - b.mean(dim=-1, keepdim=True)
    return (a * b).sum(dim=-1) / (a.norm(dim=-1) * b.norm(dim=-1) + eps)


__all__ = [
    "LOSSES",
    "implements",
    "distillation_loss",
    "dkd_loss",
    "dist_loss",
    "soft_target_kl",
    "standardized",
]
