"""Which training rows keep a label: rows without one (the `datasets` convention, -1 in a ClassLabel column), cached
splits of unlabeled images, and label budgets (`--labeled-fraction`), so that stage two can learn from images that
nobody labelled: those rows are taught by the teacher alone (kdcache.student.loss: the cross-entropy skips them).

Kept free of heavy imports: the options' checks read it.
"""

import numpy as np

from kdcache.errors import KdcacheError
from kdcache.losses import LOSS_SPECS, others

# A row without a label, as `datasets` writes it in a ClassLabel column.
NO_LABEL = -1


def labeled_subset(labels: np.ndarray, fraction: float, seed: int, names: list[str] | None = None) -> np.ndarray:
    """A boolean mask over `labels` keeping the labels of a seeded, class-stratified share `fraction` of the labelled
    rows: round(fraction * n_c) rows of each class c, drawn by a generator keyed on (seed, c), so the choice depends
    on the labels, the fraction and the seed alone (the same in every process of a launch, on every machine). Rows
    already without a label stay so. A fraction that leaves a class with no labelled row is refused: the student
    could not learn that class's name from its labels, and a budget curve would measure something else."""
    labels = np.asarray(labels, dtype=np.int64)
    keep = np.zeros(len(labels), dtype=bool)
    if fraction >= 1:
        return labels != NO_LABEL
    for label in np.unique(labels[labels != NO_LABEL]):
        rows = np.flatnonzero(labels == label)
        count = int(np.floor(fraction * len(rows) + 0.5))
        if count == 0:
            name = names[label] if names is not None else str(label)
            raise KdcacheError(
                f"--labeled-fraction {fraction:g} keeps no labelled row of class '{name}' ({len(rows)} rows in the "
                f"training split); give a fraction of at least {0.5 / len(rows):.3g}"
            )
        chosen = np.random.default_rng([seed, int(label)]).permutation(rows)[:count]
        keep[chosen] = True
    return keep


def masked_labels(labels: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    """The labels with those outside `keep` (None: every row) set to NO_LABEL."""
    labels = np.asarray(labels, dtype=np.int64).copy()
    if keep is not None:
        labels[~keep] = NO_LABEL
    return labels


def check_label_options(*, labeled_fraction, unlabeled_splits, alpha, online, student_only_augment, loss) -> None:
    """The label-budget options on their own (what needs the cache is checked where the cache is read)."""
    if labeled_fraction is not None and not (isinstance(labeled_fraction, (int, float)) and 0 < labeled_fraction <= 1):
        raise KdcacheError(
            f"--labeled-fraction {labeled_fraction} must be > 0 and <= 1 (the share of the training split's rows "
            "whose labels are kept)"
        )
    if unlabeled_splits:
        if alpha == 0:
            raise KdcacheError(
                "--alpha 0 learns from labels alone, and --unlabeled-splits names splits without labels: nothing "
                "to learn from them; leave out --unlabeled-splits, or give --alpha above 0"
            )
        if online or student_only_augment:
            flag = "--online" if online else "--student-only-augment"
            raise KdcacheError(
                f"{flag} reads the training split's images from the dataset the cache was made from; it cannot "
                "add --unlabeled-splits: leave them out"
            )
    if LOSS_SPECS[loss].needs_target_class and (
        unlabeled_splits or (labeled_fraction is not None and labeled_fraction < 1)
    ):
        raise KdcacheError(
            f"--loss {loss} splits the teacher's outputs around each image's labelled class, which rows without a "
            f"label do not have; use {others(loss)} with unlabeled rows"
        )
