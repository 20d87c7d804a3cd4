"""What stage two trains on: the cache's rows (stored views replayed and batched by kdcache.format.replay), the labels
kept for a label budget, the splits without labels."""

import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.data import ViewRecipe, load_image_dataset, undecoded
from kdcache.errors import KdcacheError
from kdcache.format.columns import IMAGE, LABELS, PIXELS, teacher_outputs
from kdcache.format.manifest import Manifest
from kdcache.format.replay import ViewRows
from kdcache.labels import NO_LABEL, labeled_subset, masked_labels
from kdcache.losses import LOSS_SPECS, others
from kdcache.models import align_labels, load_classifier
from kdcache.options import TrainingOptions, check_loss_for_cache
from kdcache.student.model import OnlineTeacher, check_same_teacher

log = logging.getLogger("kdcache")


class TrainRows(torch.utils.data.Dataset):
    """The training rows a run serves, out of `rows` (a Dataset or ViewRows): those at `served` (None: all), with
    their labels replaced by `labels` (one per row of `rows`, -1 for none; None: as they are), for label budgets and
    unlabeled rows (kdcache.labels). Rows are fetched in batches, as the Dataset (or ViewRows) fetches them."""

    def __init__(self, rows, served=None, labels=None):
        self.rows, self.served, self.labels = rows, served, labels

    def __len__(self):
        return len(self.rows) if self.served is None else len(self.served)

    def __getitems__(self, positions):
        indices = [int(i) for i in (positions if self.served is None else self.served[list(positions)])]
        items = self.rows.__getitems__(indices)
        if self.labels is not None:
            for item, index in zip(items, indices):
                item[LABELS] = self.labels[index]
        return items

    def __getitem__(self, position):
        return self.__getitems__([position])[0]


def _online_rows(split, image_column, label_column, pipeline):
    """The original images, decoded and resized on every access: the tutorial's data path."""
    import datasets

    decoder = datasets.Image()

    def transform(batch):
        images = [decoder.decode_example(value).convert("RGB") for value in batch[image_column]]
        return {PIXELS: list(pipeline.pixels(images)), LABELS: batch[label_column]}

    return undecoded(split, image_column).with_transform(transform)


@dataclass
class TrainingRows:
    """What the student learns from and is evaluated on, and the teacher behind it."""

    mode: str  # cached, views, mixed views, online, student-only
    train: object
    eval: object | None
    teacher_run: str  # the teacher whose outputs the student learns from
    views: int = 1
    online_teacher: torch.nn.Module | None = None
    labels: "TrainingLabels | None" = None


def training_rows(cached, manifest: Manifest, cache_path: Path, options: TrainingOptions, pipeline, size, place):
    """The one place that picks the training rows (a TrainingRows): cached (one clean view), views or mixed views (K
    consistent views per image), online (the teacher run on every batch) or student-only (random views for the
    student, the clean view's logits); contradictory modes are refused."""
    train_split, eval_split = options.train_split, options.eval_split
    views = manifest.views_of(train_split)
    _check_modes(manifest, options, cache_path, views)
    columns = [PIXELS, LABELS] + (teacher_outputs(cached[train_split].column_names) if options.alpha > 0 else [])
    # numpy rows: the torch format would widen the uint8 pixels to int64, 8x the bytes to move per batch
    eval_rows = cached[eval_split].with_format("numpy", columns=columns) if eval_split else None
    labels = training_labels(cached, manifest, options)
    teacher_run = manifest.teacher["name_or_path"]
    if options.online:
        return _online_training_rows(manifest, cache_path, options, pipeline, labels, place)
    rows = labels.concatenated(cached)
    if views > 1:
        train_rows = ViewRows(
            rows, manifest.view_recipe, options.seed, student_size=size, labels=labels.labels, offsets=labels.offsets
        )
        mode = "mixed views" if manifest.mixed_views else "views"
        return TrainingRows(
            mode, labels.serve(train_rows, relabel=False), eval_rows, teacher_run, views, labels=labels
        )
    if options.student_only_augment:
        train_rows = _fresh_view_rows(rows, manifest, options, pipeline, size, labels)
        return TrainingRows(
            "student-only", labels.serve(train_rows, relabel=False), eval_rows, teacher_run, views, labels=labels
        )
    return TrainingRows(
        "cached",
        labels.serve(rows.with_format("numpy", columns=columns)),
        eval_rows,
        teacher_run,
        views,
        labels=labels,
    )


def _check_modes(manifest: Manifest, options: TrainingOptions, cache_path: Path, views: int) -> None:
    """Refuse a mode the cache cannot serve: views with --online or --student-only-augment, an evaluation split
    with unlabelled rows or with views, a loss the cache's labels cannot feed."""
    train_split, eval_split = options.train_split, options.eval_split
    if views > 1 and (options.online or options.student_only_augment):
        raise KdcacheError(
            f"--online and --student-only-augment need a cache without views; '{cache_path}' has "
            f"{views} views per image of split '{train_split}'"
        )
    if eval_split and manifest.labeled_rows(eval_split) < manifest.split(eval_split)["num_rows"]:
        raise KdcacheError(
            f"--eval-split '{eval_split}' has {manifest.split(eval_split)['num_rows'] - manifest.labeled_rows(eval_split)} "
            "rows without a label, and the best epoch is chosen on its accuracy; give a labelled split"
        )
    if eval_split and manifest.views_of(eval_split) > 1:
        raise KdcacheError(
            f"--eval-split '{eval_split}' is cached with views; evaluate on a split with one clean view"
        )
    check_loss_for_cache(options.loss, len(manifest.label_names), views > 1 and manifest.mixed_views, cache_path)


def _source_split(manifest: Manifest, split: str):
    """The original rows the cache was made from, for the modes that need the images themselves."""
    data = manifest.dataset
    rows = load_image_dataset(data["name_or_path"], data.get("revision"), data.get("label_column"))[split]
    if rows._fingerprint != manifest.split(split)["fingerprint"]:
        raise KdcacheError(
            f"split '{split}' of '{data['name_or_path']}' changed since the cache was made; "
            "this mode must see the same rows"
        )
    skipped = {image["row"] for image in manifest.skipped_images(split)}  # unreadable: left out of the cache too
    return rows.select([row for row in range(len(rows)) if row not in skipped]) if skipped else rows


def _online_training_rows(manifest: Manifest, cache_path: Path, options: TrainingOptions, pipeline, labels, place):
    """The online mode's rows: the original images, with the teacher (the cache's, or --teacher with its weights)
    run on every batch."""
    data = manifest.dataset
    teacher_run = options.teacher or manifest.teacher["name_or_path"]
    teacher_model = load_classifier(
        teacher_run,
        revision=None if options.teacher else manifest.teacher.get("revision"),
        trust_remote_code=manifest.teacher.get("trust_remote_code", False),
    )
    check_same_teacher(teacher_model, options.teacher, manifest, cache_path)
    online_teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, manifest.label_names))
    train_rows, eval_rows = (
        _online_rows(_source_split(manifest, split), data["image_column"], data["label_column"], pipeline)
        if split
        else None
        for split in (options.train_split, options.eval_split)
    )
    views = manifest.views_of(options.train_split)
    return TrainingRows(
        "online", labels.serve(train_rows), eval_rows, teacher_run, views, online_teacher.to(place.device), labels
    )


def _fresh_view_rows(rows, manifest: Manifest, options: TrainingOptions, pipeline, size, labels) -> "ViewRows":
    """The student-only baseline's rows: a new random view of each original image every epoch (the training split's
    images joined to its cached rows), with the clean view's logits."""
    import datasets

    image_column = manifest.dataset["image_column"]
    images = undecoded(_source_split(manifest, options.train_split), image_column).select_columns([image_column])
    if image_column != IMAGE:
        images = images.rename_column(image_column, IMAGE)
    return ViewRows(
        datasets.concatenate_datasets(
            [rows.select_columns([LABELS, *teacher_outputs(rows.column_names)]), images], axis=1
        ),
        ViewRecipe(manifest.pixel_shape[1:], getattr(pipeline.processor, "resample", 3), seed=options.seed),
        options.seed,
        fresh=True,
        student_size=size,
        labels=labels.labels,
    )


def unlabeled_splits(manifest: Manifest, options: TrainingOptions, cache_path) -> list[str]:
    """The cached splits without labels that the run trains on besides the training split: --unlabeled-splits, or by
    default every split of the cache that has no labelled row (none with alpha 0, --online or --student-only-augment,
    which cannot use them), each refused in one line when it cannot go with the training split."""
    given = options.unlabeled_splits
    if given is None:
        if options.alpha == 0 or options.online or options.student_only_augment:
            return []
        given = [
            name
            for name in manifest.splits
            if manifest.labeled_rows(name) == 0 and name not in (options.train_split, options.eval_split)
        ]
    for name in given:
        if name not in manifest.splits:
            raise KdcacheError(
                f"--unlabeled-splits names '{name}', which is not a split of cache '{cache_path}' "
                f"(splits: {', '.join(manifest.splits)})"
            )
        if name in (options.train_split, options.eval_split):
            raise KdcacheError(
                f"--unlabeled-splits names '{name}', the {'training' if name == options.train_split else 'evaluation'} "
                "split; name splits besides those two"
            )
        if manifest.views_of(name) != manifest.views_of(options.train_split):
            raise KdcacheError(
                f"split '{name}' of cache '{cache_path}' has {manifest.views_of(name)} views per image and the "
                f"training split '{options.train_split}' {manifest.views_of(options.train_split)}; make the cache with "
                "the same views for both (--view-splits), or leave that split out of --unlabeled-splits"
            )
    return list(given)


@dataclass
class TrainingLabels:
    """The labels a run trains with, one per row of its training split and unlabeled splits in that order (-1: none),
    and which of those rows it serves (None: all; with alpha 0, the labelled ones alone)."""

    splits: list[str]
    labels: np.ndarray
    offsets: np.ndarray  # the position of each row's split's first row
    served: np.ndarray | None
    changed: bool  # labels differ from the cached ones (a label budget) or come from several splits

    @property
    def labeled_rows(self) -> int:
        return int((self.labels != NO_LABEL).sum())  # the rows served without a label are never labelled ones

    @property
    def rows(self) -> int:
        return len(self.labels) if self.served is None else len(self.served)

    def concatenated(self, cached):
        """The cached training rows: the training split, followed by the unlabeled splits (no copy: their files are
        memory-mapped side by side)."""
        import datasets

        if len(self.splits) == 1:
            return cached[self.splits[0]]
        return datasets.concatenate_datasets([cached[name] for name in self.splits])

    def serve(self, rows, relabel: bool = True):
        """`rows` as the run serves them: as they are when nothing changes, else through TrainRows."""
        if not self.changed and self.served is None:
            return rows
        return TrainRows(rows, self.served, self.labels if relabel else None)

    def recipe(self) -> dict:
        return {
            "unlabeled_splits": self.splits[1:],
            "training_rows": self.rows,
            "labeled_rows": self.labeled_rows,
        }


def training_labels(cached, manifest: Manifest, options: TrainingOptions) -> TrainingLabels:
    """Which training rows keep their labels (kdcache.labels): the training split's, less those a --labeled-fraction
    leaves out, and none of the unlabeled splits'; with alpha 0, only the labelled rows are trained on (the
    label-budget baseline: the same labelled rows, from scratch)."""
    splits = [options.train_split, *options.unlabeled_splits]
    lengths = [len(cached[name]) for name in splits]
    labels = np.concatenate(
        [np.asarray(cached[name].with_format("numpy", columns=[LABELS])[LABELS]) for name in splits]
    )
    offsets = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    changed = len(splits) > 1
    if options.labeled_fraction is not None and options.labeled_fraction < 1:
        train = lengths[0]
        keep = labeled_subset(labels[:train], options.labeled_fraction, options.seed, manifest.label_names)
        labels[:train] = masked_labels(labels[:train], keep)
        changed = True
    if LOSS_SPECS[options.loss].needs_target_class and (labels == NO_LABEL).any():
        raise KdcacheError(
            f"--loss {options.loss} splits the teacher's outputs around each image's labelled class, and "
            f"{int((labels == NO_LABEL).sum())} training rows have no label; use {others(options.loss)}"
        )
    if options.alpha == 0 and not (labels != NO_LABEL).any():
        # (a --labeled-fraction never gets here from a labelled split: it keeps at least one row of every class)
        raise KdcacheError(
            f"--alpha 0 learns from labels alone, and the training split '{options.train_split}' has no labelled "
            "row (every label is -1): nothing to learn from; give --alpha above 0 to learn from the teacher"
        )
    served = np.flatnonzero(labels != NO_LABEL) if options.alpha == 0 and (labels == NO_LABEL).any() else None
    if options.alpha > 0 and not (labels != NO_LABEL).any() and options.alpha < 1:
        log.warning("no training row has a label: the student learns from the teacher alone")
    return TrainingLabels(splits, labels, offsets, served, changed)
