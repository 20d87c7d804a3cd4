"""Each distillation loss declared once: its name, its default temperature, what it needs of the cache and the
labels, its formula as a model card states it, and its line in `--loss`'s help. Free of torch: the options' checks
and the command line read it; kdcache.student.loss holds the functions and maps these names to them."""

from dataclasses import dataclass

from kdcache.errors import KdcacheError


@dataclass(frozen=True)
class Loss:
    name: str
    temperature: float  # the default T: dkd's and dist's papers', and kd's 5 of the Hugging Face tutorial
    summary: str  # what it does, as `--loss`'s help says it
    formula: str  # its distillation part as the model card states it; {z} is "z-scored " with standardised logits
    # it splits the teacher's outputs around each image's one labelled class: more than 2 classes, one unmixed
    # label per image, no rows without a label
    needs_target_class: bool = False
    standardizable: bool = (
        True  # --standardize-logits: an option of the KL-based losses, which its paper defines it for
    )


DECLARED = (
    Loss("kd", 5.0, "KL to the teacher's softened outputs (Hinton)", "T^2 KL({z}teacher/T, {z}student/T)"),
    Loss(
        "dkd",
        4.0,
        "decoupled KD, the target class and the other classes weighted apart (1:8), for 3+ classes and unmixed caches",
        "T^2 (TCKD + 8 NCKD) of the {z}logits/T (decoupled KD, Zhao et al. 2022)",
        needs_target_class=True,
    ),
    Loss(
        "dist",
        1.0,
        "matches the correlations of student and teacher probabilities, not their values, for a much stronger teacher",
        "T^2 (inter + intra), one minus the Pearson correlations of softmax(logits/T) per image and per class "
        "(DIST, Huang et al. 2022)",
        standardizable=False,
    ),
)
LOSS_SPECS = {loss.name: loss for loss in DECLARED}
DEFAULT_TEMPERATURES = {loss.name: loss.temperature for loss in DECLARED}


def others(name: str) -> str:
    """'--loss kd or --loss dist': the losses besides `name`, as an error's fix names them."""
    return " or ".join(f"--loss {loss.name}" for loss in DECLARED if loss.name != name)


def check_loss_settings(temperature: float, alpha: float) -> None:
    if not temperature > 0:
        raise KdcacheError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KdcacheError(f"alpha (lambda) must be in [0, 1], got {alpha}")
