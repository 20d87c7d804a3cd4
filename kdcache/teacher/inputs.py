"""Stage one's inputs, checked before any work: the dataset, the teacher and its image processor, the labels, the
views; and what they fingerprint (the recipe) and need on disk."""

import contextlib
import hashlib
import io
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from kdcache.data import (
    ImagePipeline,
    ViewRecipe,
    find_image_column,
    find_label_column,
    label_names,
    labeled_rows,
    load_extra_images,
    load_image_dataset,
    load_image_processor,
    undecoded,
    warn_of_unfound_labels,
)
from kdcache.errors import KdcacheError
from kdcache.format.codec import index_dtype
from kdcache.format.columns import storage_recipe
from kdcache.format.manifest import RECIPE_VERSION_CLEAN, RECIPE_VERSION_VIEWS
from kdcache.models import align_labels, load_classifier, weights_sha256
from kdcache.options import CacheOptions
from kdcache.runtime import slug

# What each chunk of stage one costs besides its rows: its Arrow schema (with datasets' features as metadata) and
# the last partly used disk block, and the record of its checksum (a block of its own).
CHUNK_FILES_BYTES = 12 * 1024


def default_cache_path(dataset: str, teacher: str) -> Path:
    return Path("data") / f"{slug(dataset)}--{slug(teacher)}"


@dataclass
class Inputs:
    """What stage one reads, checked: the dataset's splits and columns, the teacher, its processor and the views."""

    dataset: str  # as given: a hub id or a local path
    teacher: str
    dataset_dict: object  # a datasets.DatasetDict
    splits: list[str]
    view_splits: list[str]
    image_column: str
    label_column: str | None  # None: no split has labels
    label_columns: dict  # split -> its label column, or None for a split of images without labels
    labeled_rows: dict  # split -> how many of its rows have a label
    names: list[str]
    processor: object
    model: torch.nn.Module
    mapping: list[int]  # the teacher's output index of each dataset label
    pipeline: ImagePipeline
    pixel_shape: tuple[int, int, int]
    view_recipe: ViewRecipe | None
    # split -> the source row of each row kept, where rows were left out (--bad-images skip: kdcache.teacher.images)
    source_rows: dict = field(default_factory=dict)


def load_inputs(dataset: str, teacher: str, options: CacheOptions) -> Inputs:
    """The dataset and the teacher, refused in one line when they do not fit together or with the options."""
    dataset_dict, splits, image_column, label_column = _dataset_splits(dataset, options)
    label_columns = {name: label_column if label_column in dataset_dict[name].features else None for name in splits}
    labelled = [name for name in splits if label_columns[name]]
    names = label_names(dataset_dict[labelled[0]], label_column) if labelled else None
    for name in labelled[1:]:
        if label_names(dataset_dict[name], label_column) != names:
            raise KdcacheError(f"split '{name}' has other label names than split '{labelled[0]}'")
    view_splits = _view_splits(splits, options)

    loading = dict(revision=options.revision, trust_remote_code=options.trust_remote_code)
    processor = load_image_processor(teacher, **loading)
    model = load_classifier(teacher, **loading)
    if names is None:  # no split has labels: the classes are the teacher's, in its order
        names = [str(model.config.id2label[index]) for index in range(len(model.config.id2label))]
    mapping = align_labels(model.config.id2label, names, "teacher", by_index=options.match_labels_by_index)
    if options.top_k is not None and options.top_k >= len(names):
        raise KdcacheError(
            f"--top-k {options.top_k} keeps every one of the {len(names)} classes; give a K below {len(names)}, "
            "or leave --top-k out to store every logit"
        )
    pipeline = ImagePipeline(processor)
    pixel_shape = tuple(pipeline.pixels([Image.new("RGB", (333, 257))]).shape[1:])
    source_size = round(max(pixel_shape[1:]) * 8 / 7) if options.source_size is None else options.source_size
    if options.mix_alpha and not view_splits:
        raise KdcacheError("--mix-alpha mixes augmented views: give --views K (K > 1) as well")
    view_recipe = (
        ViewRecipe(
            pixel_shape[1:],
            getattr(processor, "resample", 3),
            scale=options.view_scale,
            seed=options.view_seed,
            source_size=source_size or None,
            mix_alpha=options.mix_alpha,
        )
        if view_splits
        else None
    )
    return Inputs(
        dataset=dataset,
        teacher=teacher,
        dataset_dict=dataset_dict,
        splits=splits,
        view_splits=view_splits,
        image_column=image_column,
        label_column=label_column,
        label_columns=label_columns,
        labeled_rows={name: labeled_rows(dataset_dict[name], label_columns[name]) for name in splits},
        names=names,
        processor=processor,
        model=model,
        mapping=mapping,
        pipeline=pipeline,
        pixel_shape=pixel_shape,
        view_recipe=view_recipe,
    )


def _dataset_splits(dataset: str, options: CacheOptions):
    """The dataset's splits to cache (with the extra images' split, if any), checked: (the DatasetDict, the split
    names, the image column, the label column or None)."""
    import datasets

    dataset_dict = load_image_dataset(dataset, revision=options.dataset_revision, label_column=options.label_column)
    splits = list(dataset_dict) if not options.splits else list(options.splits)
    for name in splits:
        if name not in dataset_dict:
            raise KdcacheError(f"split '{name}' is not in dataset '{dataset}' (splits: {', '.join(dataset_dict)})")
        if len(dataset_dict[name]) == 0:
            raise KdcacheError(f"split '{name}' of dataset '{dataset}' is empty; leave it out with --splits")
    image_column = find_image_column(dataset_dict[splits[0]], options.image_column)
    for name in splits[1:]:
        find_image_column(dataset_dict[name], image_column)
    label_column = find_label_column({name: dataset_dict[name] for name in splits}, options.label_column)
    warn_of_unfound_labels({name: dataset_dict[name] for name in splits}, label_column)
    if options.extra_images:  # a split of images without labels, beside the dataset's (kdcache.labels)
        if options.extra_split in splits:
            raise KdcacheError(
                f"--extra-split '{options.extra_split}' is already a split of dataset '{dataset}'; name the extra "
                "images' split otherwise with --extra-split"
            )
        dataset_dict = datasets.DatasetDict(dataset_dict)  # the loaded DatasetDict stays as it was
        dataset_dict[options.extra_split] = load_extra_images(
            options.extra_images, options.extra_images_split, image_column
        )
        splits.append(options.extra_split)
    return dataset_dict, splits, image_column, label_column


def _view_splits(splits: list[str], options: CacheOptions) -> list[str]:
    """The splits cached with views: --view-splits, or by default the splits a student trains on (the training split,
    and the extra images: kdcache.labels); none without --views."""
    if options.views <= 1:
        return []
    if options.view_splits is None:
        return [name for name in splits if name == "train" or (options.extra_images and name == options.extra_split)]
    for name in options.view_splits:
        if name not in splits:
            raise KdcacheError(
                f"--view-splits names '{name}', which is not among the splits cached ({', '.join(splits)})"
            )
    return list(options.view_splits)


def cache_recipe(inputs: Inputs, options: CacheOptions) -> tuple[dict, str]:
    """What the logits depend on, and its fingerprint: a cache with the same fingerprint need not be made again."""
    recipe = {
        "format_version": RECIPE_VERSION_VIEWS if inputs.view_recipe else RECIPE_VERSION_CLEAN,
        "teacher_weights_sha256": weights_sha256(inputs.model),
        "teacher_class": type(inputs.model).__name__,
        "image_processor": json.loads(inputs.processor.to_json_string()),
        "split_fingerprints": {name: inputs.dataset_dict[name]._fingerprint for name in inputs.splits},
        "image_column": inputs.image_column,
        "label_column": inputs.label_column,
        "label_names": inputs.names,
        **_unlabeled(inputs),
        "teacher_to_dataset": inputs.mapping,
        "precision": options.precision,
        **storage_recipe(options),  # how the columns are stored, where not as ever (compact logits)
        # the rows left out are the source's unreadable ones, found again from the same data; a cache made as ever
        # (fail) keeps the fingerprint it had before skipping existed
        **({"bad_images": "skip"} if options.bad_images == "skip" else {}),
        "views": (
            {"count": options.views, "splits": inputs.view_splits, "recipe": inputs.view_recipe.to_dict()}
            if inputs.view_recipe
            else None
        ),
    }
    return recipe, hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _unlabeled(inputs: Inputs) -> dict:
    """Which splits have no label column, for the fingerprint (their rows' -1 labels are not in the data's
    fingerprints): nothing when every split has one, so that such a cache keeps the fingerprint it had before
    unlabeled splits existed."""
    unlabeled = [name for name in inputs.splits if inputs.label_columns[name] is None]
    return {"splits_without_labels": unlabeled} if unlabeled else {}


def _logit_bytes(classes: int, options: CacheOptions) -> int:
    """The bytes of one view's logits as stored: values, and for top K their class indices and the tail's logit."""
    value = getattr(torch, options.stored_dtype).itemsize
    if options.top_k is None:
        return value * classes
    return (value + index_dtype(classes).itemsize) * options.top_k + 4


def needed_bytes(inputs: Inputs, options: CacheOptions) -> int:
    """The disk stage one needs: the cache, written once (its chunks become the cache's files), plus for each chunk
    its Arrow schema and the record of its checksum, and each split's small JSON files.

    A row of a split with one clean view holds row_index and labels (int64), the logits (one view's stored logits:
    float32 x classes, less for compact logits) and the uint8 pixels; a row with K views holds K logit vectors, K
    view boxes (5 x int32), the source's raw pixels and their shape, and with mixing K partners (int32), K partner
    boxes and K weights (float32).
    """
    classes, views, recipe = len(inputs.names), options.views, inputs.view_recipe
    logit_bytes = _logit_bytes(classes, options)
    cache = files = 0
    for name in inputs.splits:
        split = inputs.dataset_dict[name]
        if name in inputs.view_splits:
            row = 16 + views * logit_bytes + _list_offsets((views, classes)) + 20 * views + _list_offsets((views, 5))
            source = average_source_bytes(split, inputs.image_column, recipe.source_size if recipe else None)
            row += source + 8 + 12  # bytes, offsets, shape
            if recipe and recipe.mixed:
                row += 28 * views + 2 * _list_offsets((views,)) + _list_offsets((views, 5))
        else:
            row = 16 + logit_bytes + math.prod(inputs.pixel_shape) + _list_offsets(inputs.pixel_shape)
        cache += len(split) * row
        # the split's chunks, and its state.json and dataset_info.json
        files += -(-len(split) // options.chunk_size) + 1
    return int(cache + files * CHUNK_FILES_BYTES)


def _list_offsets(shape) -> int:
    """Bytes of the Arrow offsets of one row of a datasets ArrayXD (nested lists): 4 per list at every level."""
    lists, product = 0, 1
    for size in shape[:-1]:
        lists += product
        product *= size
    return 4 * (lists + product)


def average_source_bytes(split, image_column: str, source_size: int | None, sample: int = 64) -> float:
    """The mean size of a split's sources as a view split stores them: raw RGB pixels of the image with its shorter
    side reduced to `source_size` (never enlarged), from up to `sample` rows spread over it (headers only are read)."""
    if len(split) == 0:
        return 0.0
    rows = sorted({round(i * (len(split) - 1) / max(1, sample - 1)) for i in range(min(sample, len(split)))})
    sizes = []
    for value in undecoded(split, image_column).select(rows)[image_column]:
        with contextlib.suppress(OSError, ValueError):  # an unreadable image is stage one's to report, with its row
            opened = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") is not None else value["path"])
            width, height = opened.size
            scale = min(1.0, source_size / min(width, height)) if source_size else 1.0
            sizes.append(round(width * scale) * round(height * scale) * 3)
    return sum(sizes) / len(sizes) if sizes else 0.0
