"""Each distillation loss declared once: its name, its default temperature, what it needs of the cache and the
labels, its formula as a model card states it, and its line in `--loss`'s help. Everything else reads these: the
options (their help, their defaults, their checks), the refusals, the model card, and the student stage, which gives
each declared name its function (kdcache.student.loss, `@implements("kd")`). Free of torch and of the stages: the
options and the command line read it without importing either.

A new loss: one `Loss` below, one function in kdcache.student.loss registered for its name, and its test
(docs/recipes.md, "Adding a loss")."""

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
    # --standardize-logits: an option of the KL-based losses, which its paper defines it for; the function of a loss
    # that is takes `standardize`, and that of one that is not has no such argument
    standardizable: bool = True


# name -> declaration, in the order `--loss`'s help lists them
LOSS_SPECS = {
    loss.name: loss
    for loss in (
        Loss("kd", 5.0, "KL to the teacher's softened outputs (Hinton)", "T^2 KL({z}teacher/T, {z}student/T)"),
        Loss(
            "dkd",
            4.0,
            "decoupled KD, the target class and the other classes weighted apart (1:8), for 3+ classes and unmixed "
            "caches",
            "T^2 (TCKD + 8 NCKD) of the {z}logits/T (decoupled KD, Zhao et al. 2022)",
            needs_target_class=True,
        ),
        Loss(
            "dist",
            1.0,
            "matches the correlations of student and teacher probabilities, not their values, for a much stronger "
            "teacher",
            "T^2 (inter + intra), one minus the Pearson correlations of softmax(logits/T) per image and per class "
            "(DIST, Huang et al. 2022)",
            standardizable=False,
        ),
    )
}


def others(name: str) -> str:
    """'--loss kd or --loss dist': the losses besides `name`, as an error's fix names them."""
    return " or ".join(f"--loss {loss}" for loss in LOSS_SPECS if loss != name)


def check_loss_settings(name: str, temperature: float | None, alpha: float, standardize: bool) -> None:
    """The settings of a run's loss, checked once, before training (TrainingOptions.check): its name, a temperature
    given (None: the declared one), alpha, and logit standardisation for a loss declared to take it. The loss
    functions check none of them: they run on every batch, and they are given settings checked here."""
    if name not in LOSS_SPECS:
        raise KdcacheError(f"--loss '{name}' is not one of {', '.join(LOSS_SPECS)}")
    if standardize and not LOSS_SPECS[name].standardizable:
        kl_based = [loss.name for loss in LOSS_SPECS.values() if loss.standardizable]
        raise KdcacheError(
            f"--standardize-logits is an option of the KL-based losses ({', '.join(kl_based)}), which its paper "
            f"defines it for, not of --loss {name}; leave it out or use --loss {' or '.join(kl_based)}"
        )
    if temperature is not None and not temperature > 0:
        raise KdcacheError(f"temperature must be > 0, got {temperature}")
    if not 0.0 <= alpha <= 1.0:
        raise KdcacheError(f"alpha (lambda) must be in [0, 1], got {alpha}")
