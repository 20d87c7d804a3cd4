"""Stage one: run the teacher once over a dataset and store its logits as an Arrow column, with a manifest.

Layout of a cache folder (a `datasets.DatasetDict` in the layout of `save_to_disk`, which `load_from_disk` reads
memory-mapped, plus two files):

    CACHE/dataset_dict.json                      the splits
    CACHE/<split>/chunk-NNNNNN.arrow             the chunks as stage one wrote them (Arrow IPC streams, as datasets
                                                 writes its shards); columns: row_index, labels, teacher_logits,
                                                 pixel_values (or the view columns)
    CACHE/<split>/state.json, dataset_info.json  the split's chunk files in row order, and its features
    CACHE/kdcache.json                           the manifest: what produced the cache, and each chunk's sha256
    CACHE/preprocessor_config.json               the teacher's image processor (students are saved with it)

The logits may be stored compact (--logits-dtype fp16, --top-k K: teacher_logits then holds the K largest, with
teacher_logits_indices and teacher_logits_tail; kdcache.loss.compress_logits), and `rebuilt_logits` gives them back
as float32 logits over every class, which is all stage two, evaluation and verification read.
`pixel_values` holds the teacher's resized and cropped view as uint8 (3, H, W): stage two turns it into the
model input with a per-pixel lookup table (data.ImagePipeline) instead of decoding and resizing every epoch.
The work happens in `CACHE.partial/`, chunk by chunk, so a killed run resumes: each chunk file is hashed as it is
written, and its checksum kept beside it (`CACHE.partial/records/`) until the manifest records it. The chunks are
written once: finishing a run writes the small JSON files and renames the folder of chunks into place (_finish).
"""

import contextlib
import hashlib
import json
import logging
import math
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.data import (
    ImagePipeline,
    ViewRecipe,
    decode_images,
    find_image_column,
    find_label_column,
    label_names,
    labeled_rows,
    load_extra_images,
    load_image_dataset,
    load_image_processor,
    raw_source,
    undecoded,
)
from kdcache.errors import KdcacheError, first_line
from kdcache.labels import NO_LABEL
from kdcache.loss import compress_logits, expand_logits, index_dtype
from kdcache.manifest import (  # noqa: F401 (the format's names, importable from here as before)
    FORMAT_VERSION,
    IMAGE,
    LABELS,
    LOGIT_COLUMNS,
    LOGIT_INDICES,
    LOGIT_TAIL,
    LOGITS,
    MANIFEST,
    MIX_PARTNERS,
    MIX_VIEWS,
    MIX_WEIGHTS,
    PIXELS,
    RECIPE_VERSION_CLEAN,
    RECIPE_VERSION_VIEWS,
    ROW,
    SOURCE,
    SOURCE_SHAPE,
    SUPPORTED_FORMAT_VERSIONS,
    VIEWS,
    Manifest,
    logits_sha256,
)
from kdcache.models import align_labels, load_classifier, weights_sha256
from kdcache.options import CacheOptions
from kdcache.outputs import (
    OutputFolder,
    OutputKind,
    bytes_under,
    check_free_space,
    guards_output,
    human_bytes,
    report_disk_full,
    safe_output,
    stage_one_bytes,
)
from kdcache.runtime import agreed, cpus_per_process, distributed, is_main, output_path, placement, slug

log = logging.getLogger("kdcache")


def default_cache_path(dataset: str, teacher: str) -> Path:
    return Path("data") / f"{slug(dataset)}--{slug(teacher)}"


# The chunks are written in CACHE.partial/splits, which becomes CACHE.partial/cache when all are written (and then
# CACHE, by safe_output); their checksums wait in CACHE.partial/records.
CACHE_OUTPUT = OutputKind("a kdcache cache", "kdcache teacher-logits", MANIFEST, finished="cache", resumable=True)


@guards_output
def teacher_logits(
    dataset: str = "beans",
    teacher: str = "merve/beans-vit-224",
    output: str | Path | None = None,
    options: CacheOptions | None = None,
    *,
    progress: bool = True,
    **overrides,
) -> Path:
    """Run `teacher` over `dataset` once and write the logit cache to `output`; returns the cache's path.

    The options are a CacheOptions (kdcache.options: every option, its default and its checks), given whole as
    `options`, one by one as keywords (`teacher_logits(dataset, teacher, output=..., views=8)`), or both (the
    keywords win). With views=K > 1, each image of the `view_splits` (default: train) gets K augmented views (random
    resized crop and flip, ViewRecipe), each stored as its five parameters with the teacher's logits on exactly that
    view; the other splits keep the one clean view of the teacher's processor. The source image is stored beside the
    views, its shorter side reduced to `source_size` (default 8/7 of the teacher's input, 256 for 224; 0 keeps it
    whole), as raw pixels. mix_alpha > 0 mixes every view with a view of another image of the split (mixup, weight
    from Beta(mix_alpha, mix_alpha) folded to >= 0.5) and stores the teacher's logits on the mixed image. Re-running
    with the same inputs is a no-op; a killed run resumes from its finished chunks.
    """
    options = replace(options or CacheOptions(), **overrides)
    processes = distributed(options.device)  # None on a plain run, which then goes exactly as it always has
    with agreed(processes):  # every process checks the same inputs; an error is printed once
        options.check()
        place = placement(options.device, options.precision, processes, training=False)
    output = output_path(output) if output is not None else default_cache_path(dataset, teacher)
    with safe_output(output, CACHE_OUTPUT, processes) as folder:
        with agreed(processes):
            inputs = _load_inputs(dataset, teacher, options)
        recipe, fingerprint = _recipe(inputs, options)
        space = _needed_bytes(inputs, options)
        plan = _plan(folder, fingerprint, space, inputs, options, processes)
        if plan is None:
            return output  # up to date
        started = time.perf_counter()
        speed = _compute_chunks(inputs, plan, folder, space, options, place, processes, progress)
        with agreed(processes), _quiet_datasets():
            if is_main(processes):
                _write_cache(folder, inputs, recipe, fingerprint, dataset, teacher, options, place, speed, started)
    return output


@dataclass
class _Inputs:
    """What stage one reads, checked: the dataset's splits and columns, the teacher, its processor and the views."""

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


def _load_inputs(dataset: str, teacher: str, options: CacheOptions) -> _Inputs:
    """The dataset and the teacher, refused in one line when they do not fit together or with the options."""
    import datasets

    dataset_dict = load_image_dataset(dataset, revision=options.dataset_revision)
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
    label_columns = {name: label_column if label_column in dataset_dict[name].features else None for name in splits}
    labelled = [name for name in splits if label_columns[name]]
    names = label_names(dataset_dict[labelled[0]], label_column) if labelled else None
    for name in labelled[1:]:
        if label_names(dataset_dict[name], label_column) != names:
            raise KdcacheError(f"split '{name}' has other label names than split '{labelled[0]}'")
    # the splits a student trains on: the training split, and the extra images (kdcache.labels)
    default_view_splits = [
        name for name in splits if name == "train" or (options.extra_images and name == options.extra_split)
    ]
    view_splits = (
        (default_view_splits if options.view_splits is None else list(options.view_splits))
        if options.views > 1
        else []
    )
    for name in view_splits:
        if name not in splits:
            raise KdcacheError(
                f"--view-splits names '{name}', which is not among the splits cached ({', '.join(splits)})"
            )

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
    return _Inputs(
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


def _recipe(inputs: _Inputs, options: CacheOptions) -> tuple[dict, str]:
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
        **_stored_logits(options),
        "views": (
            {"count": options.views, "splits": inputs.view_splits, "recipe": inputs.view_recipe.to_dict()}
            if inputs.view_recipe
            else None
        ),
    }
    return recipe, hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()[:16]


def _unlabeled(inputs: _Inputs) -> dict:
    """Which splits have no label column, for the fingerprint (their rows' -1 labels are not in the data's
    fingerprints): nothing when every split has one, so that such a cache keeps the fingerprint it had before
    unlabeled splits existed."""
    unlabeled = [name for name in inputs.splits if inputs.label_columns[name] is None]
    return {"splits_without_labels": unlabeled} if unlabeled else {}


def _stored_logits(options: CacheOptions) -> dict:
    """How compact logits are stored, for the fingerprint: nothing for float32 logits of every class, so that a cache
    of those keeps the fingerprint it had before compact logits existed."""
    if options.logits_dtype == "fp32" and options.top_k is None:
        return {}
    return {"stored_logits": {"dtype": options.logits_dtype, "top_k": options.top_k}}


def _logit_bytes(classes: int, options: CacheOptions) -> int:
    """The bytes of one view's logits as stored: values, and for top K their class indices and the tail's logit."""
    value = getattr(torch, options.stored_dtype).itemsize
    if options.top_k is None:
        return value * classes
    return (value + index_dtype(classes).itemsize) * options.top_k + 4


def _needed_bytes(inputs: _Inputs, options: CacheOptions) -> int:
    return stage_one_bytes(
        inputs.dataset_dict,
        inputs.splits,
        inputs.image_column,
        inputs.pixel_shape,
        len(inputs.names),
        options.views,
        inputs.view_splits,
        options.chunk_size,
        inputs.view_recipe.source_size if inputs.view_recipe else None,
        bool(inputs.view_recipe and inputs.view_recipe.mixed),
        logit_bytes=_logit_bytes(len(inputs.names), options),
    )


def _plan(folder: OutputFolder, fingerprint: str, space: int, inputs: _Inputs, options: CacheOptions, processes):
    """The chunks still to compute, as the main process alone decides them (see _plan_work) for every process; None
    when the output already holds this cache."""
    plan = None
    with agreed(processes):
        if is_main(processes):
            rows = {name: len(inputs.dataset_dict[name]) for name in inputs.splits}
            plan = _plan_work(folder.path, folder.work, fingerprint, options.overwrite, options.chunk_size, rows)
            if plan is not None:  # before the teacher runs
                check_free_space(folder.path, space, "the cache", folder.work)
    return processes.share(plan) if processes else plan


def _compute_chunks(
    inputs: _Inputs, plan: dict, folder: OutputFolder, space: int, options, place, processes, progress
):
    """Run the teacher over this process's share of the chunks still to do, writing each into the work folder;
    returns the images per second of each split, of all processes together."""
    # channels_last lets oneDNN (CPU) and cuDNN pick their faster convolution kernels: about 1.2x on a CNN
    # teacher on CPU (BENCHMARKS.md); a ViT only has its patch embedding as a convolution.
    inputs.model.to(place.device, memory_format=torch.channels_last)
    job = _Job(
        model=inputs.model,
        pipeline=inputs.pipeline,
        mapping=inputs.mapping,
        names=inputs.names,
        image_column=inputs.image_column,
        label_column=inputs.label_column,
        device=place.device,
        precision=options.precision,
        num_workers=options.num_workers,
        batch_size=options.batch_size,
        chunk_size=plan["chunk_size"],
        progress=progress and is_main(processes),
        cpus=cpus_per_process(processes),
        processes=place.processes,
        logits_dtype=options.stored_dtype,
        top_k=options.top_k,
    )
    # Chunks are independent and named by index, so any process can write any chunk: process r takes every
    # count-th of the chunks still to do (all splits in a row, so that small splits do not all land on process 0).
    mine = plan["todo"][processes.index :: processes.count] if processes else plan["todo"]
    work = folder.work
    # A full disk keeps the finished chunks; only this process's half-written ones are removed.
    report_disk_full(work, space, scratch=lambda: [_partial(_chunk_path(work, name, k)) for name, k in mine])
    timings = {}
    with _quiet_datasets():
        for name in inputs.splits:
            if name in inputs.view_splits:
                job.views, job.view_recipe = options.views, inputs.view_recipe
            else:
                job.views, job.view_recipe = 1, None
            job.label_column = inputs.label_columns[name]
            split = inputs.dataset_dict[name]
            timings[name] = _run_split(job, split, name, work, [k for part, k in mine if part == name])
    # A failure above (an unreadable image) ends this process at once, with its message; the launcher then ends the
    # others, and a process waiting here learns that its peer is gone. Nothing is lost: finished chunks are kept.
    everyone = processes.gather(timings) if processes else [timings]  # also: every chunk is written
    return {name: _images_per_second([timings[name] for timings in everyone]) for name in inputs.splits}


def _write_cache(
    folder: OutputFolder, inputs: _Inputs, recipe, fingerprint, dataset, teacher, options, place, speed, started
) -> None:
    """Make the chunks the finished cache, with its manifest and the teacher's image processor."""
    chunks = _finish(folder, inputs, options, fingerprint)
    manifest = Manifest.build(
        logits_dtype=options.stored_dtype,
        top_k=options.top_k,
        recipe=recipe,
        fingerprint=fingerprint,
        pixel_shape=inputs.pixel_shape,
        teacher={
            "name_or_path": teacher,
            "revision": options.revision,
            "trust_remote_code": options.trust_remote_code,
            "id2label": {str(k): v for k, v in inputs.model.config.id2label.items()},
        },
        dataset={
            "name_or_path": dataset,
            "revision": options.dataset_revision,
            **(
                {
                    "extra_images": {
                        "name_or_path": options.extra_images,
                        "split": options.extra_images_split,
                        "cached_as": options.extra_split,
                    }
                }
                if options.extra_images
                else {}
            ),
        },
        splits={
            name: {
                "fingerprint": recipe["split_fingerprints"][name],
                "num_rows": len(inputs.dataset_dict[name]),
                "labeled_rows": inputs.labeled_rows[name],
                "views": options.views if name in inputs.view_splits else 1,
                "chunks": chunks[name],
            }
            for name in inputs.splits
        },
        run={
            "precision": options.precision,
            "device": str(place.device),
            "processes": place.processes,
            "versions": _library_versions(),
            "seconds": round(time.perf_counter() - started, 1),
            "images_per_second": speed,
        },
    )
    manifest.write(folder.finished)
    inputs.processor.save_pretrained(str(folder.finished))


def _plan_work(
    output: Path, work: Path, fingerprint: str, overwrite: bool, chunk_size: int, rows: dict
) -> dict | None:
    """Check the output, set up `work` (resuming a partial run of the same inputs) and list the chunks still to
    compute, as [split, chunk index] pairs; None when `output` already holds this cache (safe_output has refused a
    folder that is not a cache)."""
    _undo_unfinished_finish(work)  # first: safe_output would move a half-finished cache into place
    if (output / MANIFEST).exists():
        existing = read_manifest(output)
        if existing.get("fingerprint") == fingerprint:
            log.info(f"cache '{output}' is up to date (fingerprint {fingerprint}); nothing to do")
            return None
        if not overwrite:
            raise KdcacheError(
                f"'{output}' holds a cache made from other inputs (fingerprint {existing.get('fingerprint')}, "
                f"now {fingerprint}); pass --overwrite to replace it, or choose another --output"
            )

    plan = {"fingerprint": fingerprint, "chunk_size": chunk_size}
    if (work / "plan.json").exists():
        previous = json.loads((work / "plan.json").read_text())
        if previous.get("fingerprint") == fingerprint:
            plan = previous  # resume with the chunking the finished chunks were written with
        else:
            shutil.rmtree(work)
    try:
        work.mkdir(parents=True, exist_ok=True)
        _write_json(work / "plan.json", plan)
        for name in rows:
            (work / SPLITS / name).mkdir(parents=True, exist_ok=True)
            (work / RECORDS / name).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdcacheError(f"cannot write under '{work.parent}' ({error.strerror}); choose another --output") from None
    todo = [
        [name, k]
        for name, count in rows.items()
        for k in range(math.ceil(count / plan["chunk_size"]))
        if not _is_written(_chunk_path(work, name, k))
    ]
    return {**plan, "todo": todo}


def _undo_unfinished_finish(work: Path) -> None:
    """Put back the chunks of a run stopped while finishing (after _finish renamed them, before safe_output moved
    the cache into place), so that the work folder is again one that resumes."""
    finishing = work / CACHE_OUTPUT.finished
    if not finishing.is_dir():
        return
    if (work / SPLITS).exists():  # not a state _finish leaves: start over rather than guess
        shutil.rmtree(work)
        return
    finishing.rename(work / SPLITS)
    for entry in (work / SPLITS).iterdir():
        if not entry.is_dir():  # dataset_dict.json, the manifest, the processor: written again by _finish
            entry.unlink()


@dataclass
class _Job:
    """What every split's pass shares."""

    model: torch.nn.Module
    pipeline: ImagePipeline
    mapping: list
    names: list
    image_column: str
    label_column: str | None  # of the split at work; None: its images have no labels
    device: torch.device
    precision: str
    num_workers: int | None
    batch_size: int
    chunk_size: int
    progress: bool
    cpus: int  # the cores this process may count on (shared with the other processes of a launch)
    processes: int
    views: int = 1
    view_recipe: ViewRecipe | None = None
    logits_dtype: str = "float32"  # as stored
    top_k: int | None = None


class _Batches(torch.utils.data.Dataset):
    """Batch i of a list of row spans, decoded and resized (or cut into views): what a DataLoader worker prepares
    ahead of the teacher."""

    def __init__(self, split, split_name, spans, job):
        self.split = undecoded(split, job.image_column)
        self.split_name, self.spans = split_name, spans
        self.image_column, self.label_column = job.image_column, job.label_column
        self.pipeline, self.views, self.view_recipe = job.pipeline, job.views, job.view_recipe

    def __len__(self):
        return len(self.spans)

    def __getitem__(self, index):
        start, end = self.spans[index]
        rows = list(range(start, end))
        try:
            images = decode_images(self.split, self.image_column, rows, self.split_name)
            batch = {
                "rows": np.asarray(rows, dtype=np.int64),
                "labels": (
                    np.asarray(self.split[start:end][self.label_column], dtype=np.int64)
                    if self.label_column
                    else np.full(end - start, NO_LABEL, dtype=np.int64)  # images nobody labelled
                ),
            }
            if self.view_recipe is None:
                batch["pixels"] = self.pipeline.pixels(images)
                return batch
            recipe = self.view_recipe
            images = [recipe.reduce(image) for image in images]
            views = np.stack([recipe.sample(*image.size, row, self.views) for image, row in zip(images, rows)])
            batch["views"] = views
            batch["pixels"] = np.stack(
                [recipe.render(image, view) for image, row_views in zip(images, views) for view in row_views]
            )
            batch["sources"] = [raw_source(image) for image in images]
            if recipe.mixed:
                drawn = [recipe.sample_partners(row, len(self.split), self.views) for row in rows]
                partners = np.stack([partner_rows for partner_rows, _ in drawn])
                wanted = sorted(set(partners.ravel().tolist()))
                partner_images = dict(
                    zip(
                        wanted,
                        (
                            recipe.reduce(image)
                            for image in decode_images(self.split, self.image_column, wanted, self.split_name)
                        ),
                    )
                )
                mix_views = np.stack(
                    [
                        [
                            recipe.sample_partner_view(*partner_images[int(b)].size, row, k)
                            for k, b in enumerate(row_partners)
                        ]
                        for row, row_partners in zip(rows, partners)
                    ]
                )
                batch["partner_pixels"] = np.stack(
                    [
                        recipe.render(partner_images[int(b)], view)
                        for row_partners, row_views in zip(partners, mix_views)
                        for b, view in zip(row_partners, row_views)
                    ]
                )
                batch["mix_partners"], batch["mix_views"] = partners, mix_views
                batch["mix_weights"] = np.stack([weights for _, weights in drawn])
            return batch
        except KdcacheError as error:  # carried to the main process as data: a worker's traceback is not a message
            return {"error": str(error)}


def _run_split(job: _Job, split, name: str, work: Path, chunks: list[int]):
    """Compute and write the given chunks of one split; returns (images, seconds), or None when there were none."""
    from tqdm.auto import tqdm

    rows = len(split)
    images_per_batch = max(1, job.batch_size // job.views)  # a forward pass still sees about batch_size images
    spans = []
    for k in chunks:  # batches never cross a chunk's bounds: a chunk's logits do not depend on who computes it
        start, end = k * job.chunk_size, min(rows, (k + 1) * job.chunk_size)
        spans += [(s, min(end, s + images_per_batch)) for s in range(start, end, images_per_batch)]
    if not spans:
        return None
    num_workers = job.num_workers
    if num_workers is None:
        num_workers = min(8, job.cpus - 1) if job.device.type == "cuda" else (1 if job.cpus >= 2 else 0)
    loader = torch.utils.data.DataLoader(
        _Batches(split, name, spans, job),
        batch_size=None,
        num_workers=num_workers,
        pin_memory=job.device.type == "cuda",
        prefetch_factor=4 if num_workers else None,
    )
    index = torch.tensor(job.mapping, device=job.device)
    pending = []
    todo_rows = sum(end - start for start, end in spans)
    description = f"teacher logits [{name}" + (f", {job.views} views per image" if job.views > 1 else "")
    description += f", process 0 of {job.processes}]" if job.processes > 1 else "]"
    started = time.perf_counter()
    # closed on an error too, so that the error's message starts a line of its own
    with tqdm(total=todo_rows * job.views, unit="img", desc=description, disable=not job.progress) as bar:
        for batch in loader:
            if "error" in batch:
                raise KdcacheError(batch["error"])
            if "partner_pixels" in batch:  # mixed on CPU, by the same function that mixes the student's input
                pixel_values = job.pipeline.mix(
                    torch.as_tensor(batch["pixels"]),
                    torch.as_tensor(batch["partner_pixels"]),
                    torch.as_tensor(batch["mix_weights"]).reshape(-1),
                )
            else:
                pixel_values = job.pipeline.normalize(torch.as_tensor(batch["pixels"]))
            pixel_values = pixel_values.to(job.device, non_blocking=True)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), _autocast(job.device, job.precision):
                logits = job.model(pixel_values=pixel_values).logits
            logits = logits.float()[:, index]
            if job.views > 1:
                logits = logits.reshape(len(batch["rows"]), job.views, -1)
            stored = compress_logits(logits, job.top_k, getattr(torch, job.logits_dtype))
            batch["logits"] = stored["values"].cpu().numpy()
            if job.top_k:
                batch["logit_indices"] = stored["indices"].cpu().numpy()
                batch["logit_tail"] = stored["tail"].cpu().numpy()
            pending.append(batch)
            bar.update(len(pixel_values))
            chunk = int(pending[0]["rows"][0]) // job.chunk_size
            if int(pending[-1]["rows"][-1]) + 1 == min(rows, (chunk + 1) * job.chunk_size):
                _write_chunk(_chunk_path(work, name, chunk), pending, job)
                pending = []
    return todo_rows * job.views, time.perf_counter() - started


def _images_per_second(timings: list) -> float | None:
    """Images per second of all processes on one split: their images over the time of the slowest."""
    done = [timing for timing in timings if timing is not None]
    if not done:
        return None
    return round(sum(images for images, _ in done) / max(seconds for _, seconds in done), 2)


# In the work folder: the chunks of each split, in the layout of the finished cache, and each chunk's record.
SPLITS, RECORDS = "splits", "records"


def _chunk_path(work: Path, split: str, index: int) -> Path:
    return work / SPLITS / split / f"chunk-{index:06d}.arrow"


def _record_path(chunk: Path) -> Path:
    """Where the checksum of a chunk waits for the manifest: outside the folder that becomes the cache."""
    return chunk.parents[2] / RECORDS / chunk.parent.name / f"{chunk.stem}.json"


def _partial(path: Path) -> Path:
    return path.with_name(path.name + ".tmp")


def _is_written(chunk: Path) -> bool:
    """A chunk counts once its record exists, which is written after the chunk file is complete."""
    return _record_path(chunk).exists() and chunk.exists()


def _features(names: list[str], views: int, mixed: bool, pixel_shape, logits_dtype="float32", top_k=None):
    import datasets

    columns = {ROW: datasets.Value("int64"), LABELS: datasets.ClassLabel(names=names)}
    stored = top_k or len(names)  # logits per view
    indices = str(index_dtype(len(names))).removeprefix("torch.")
    if views > 1:
        columns[LOGITS] = datasets.Array2D(shape=(views, stored), dtype=logits_dtype)
        if top_k:
            columns[LOGIT_INDICES] = datasets.Array2D(shape=(views, stored), dtype=indices)
            columns[LOGIT_TAIL] = datasets.List(datasets.Value("float32"), length=views)
        columns[VIEWS] = datasets.Array2D(shape=(views, 5), dtype="int32")
        columns[SOURCE] = datasets.Value("binary")
        columns[SOURCE_SHAPE] = datasets.List(datasets.Value("int32"), length=3)
        if mixed:
            columns[MIX_PARTNERS] = datasets.List(datasets.Value("int32"), length=views)
            columns[MIX_VIEWS] = datasets.Array2D(shape=(views, 5), dtype="int32")
            columns[MIX_WEIGHTS] = datasets.List(datasets.Value("float32"), length=views)
    else:
        columns[LOGITS] = datasets.List(datasets.Value(logits_dtype), length=stored)
        if top_k:
            columns[LOGIT_INDICES] = datasets.List(datasets.Value(indices), length=stored)
            columns[LOGIT_TAIL] = datasets.Value("float32")
        columns[PIXELS] = datasets.Array3D(shape=tuple(pixel_shape), dtype="uint8")
    return datasets.Features(columns)


def _write_chunk(path: Path, batches: list[dict], job: _Job) -> None:
    """Write one chunk's rows as the Arrow file `path`, and then its record (rows, bytes, sha256)."""
    import datasets

    def joined(key):
        return np.concatenate([batch[key] for batch in batches])

    columns = {ROW: joined("rows"), LABELS: joined("labels"), LOGITS: joined("logits")}
    if job.top_k:
        columns[LOGIT_INDICES], columns[LOGIT_TAIL] = joined("logit_indices"), joined("logit_tail")
    if job.views > 1:
        columns[VIEWS] = joined("views")
        columns[SOURCE] = [data for batch in batches for data, _ in batch["sources"]]
        columns[SOURCE_SHAPE] = [shape for batch in batches for _, shape in batch["sources"]]
        if job.view_recipe.mixed:
            for key in (MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS):
                columns[key] = joined(key)
    else:
        columns[PIXELS] = joined("pixels")
    mixed = bool(job.view_recipe and job.view_recipe.mixed)
    features = _features(job.names, job.views, mixed, batches[0]["pixels"].shape[1:], job.logits_dtype, job.top_k)
    record = write_chunk_file(path, datasets.Dataset.from_dict(columns, features=features))
    _write_json(_record_path(path), record)  # the chunk counts as written from here on


class _HashingWriter:
    """A binary file that hashes what is written through it: the chunk's checksum costs no second read."""

    def __init__(self, file, digest):
        self.file, self.digest, self.closed = file, digest, False

    def write(self, data) -> int:
        self.digest.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.closed = True  # the file itself is closed by its owner


def write_chunk_file(path: Path, rows) -> dict:
    """Write a Dataset's rows as one Arrow IPC stream, the format of datasets' own shards (its features in the schema's
    metadata), first as PATH.tmp and renamed once complete; returns its record for the manifest: file, rows, bytes and
    the sha256 of its bytes, computed while they are written. `rows` has no indices mapping (as `Dataset.from_dict`
    makes it; `flatten_indices` one that has), since its table is written as it is."""
    import pyarrow as pa

    table = rows.data.table  # the schema carries datasets' features
    partial = _partial(path)
    digest = hashlib.sha256()
    with open(partial, "wb") as file:
        sink = pa.PythonFile(_HashingWriter(file, digest), mode="w")
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
        file.flush()
        os.fsync(file.fileno())  # the manifest will vouch for these bytes: they must be on disk, not in a cache
    partial.rename(path)
    return {"file": path.name, "rows": len(rows), "bytes": path.stat().st_size, "sha256": digest.hexdigest()}


def _finish(folder: OutputFolder, inputs: _Inputs, options: CacheOptions, fingerprint: str) -> dict:
    """Make the written chunks the finished cache, without copying them: write each split's state.json (its chunk
    files, in row order) and dataset_info.json (its features), and dataset_dict.json, as `DatasetDict.save_to_disk`
    would, then rename the folder of chunks to `folder.finished`. Returns each split's chunk records, in row order."""
    from datasets import DatasetInfo
    from datasets.utils.py_utils import asdict

    work, chunks = folder.work, {}
    plan = json.loads((work / "plan.json").read_text())
    for name in inputs.splits:
        split = work / SPLITS / name
        for stray in split.glob("*.tmp"):  # a chunk half-written by a killed run, not listed anywhere
            stray.unlink()
        count = math.ceil(len(inputs.dataset_dict[name]) / plan["chunk_size"])
        paths = [_chunk_path(work, name, k) for k in range(count)]
        records = [json.loads(_record_path(path).read_text()) if _is_written(path) else None for path in paths]
        expected = [
            min(plan["chunk_size"], len(inputs.dataset_dict[name]) - k * plan["chunk_size"]) for k in range(count)
        ]
        if [record and record["rows"] for record in records] != expected:
            raise KdcacheError(
                f"the partial cache in '{work}' is inconsistent for split '{name}'; delete it and rerun"
            )
        chunks[name] = records
        views = options.views if name in inputs.view_splits else 1
        mixed = bool(inputs.view_recipe and inputs.view_recipe.mixed and name in inputs.view_splits)
        features = _features(inputs.names, views, mixed, inputs.pixel_shape, options.stored_dtype, options.top_k)
        info = asdict(DatasetInfo(features=features))
        _write_json(split / "dataset_info.json", {key: info[key] for key in sorted(info)})
        files = [record["sha256"] for record in records]
        state = {
            "_data_files": [{"filename": record["file"]} for record in records],
            # datasets keys its own caches (of .map and the like) by this: the chunks' content, and nothing else
            "_fingerprint": hashlib.sha256(json.dumps([fingerprint, name, files]).encode()).hexdigest()[:16],
            "_format_columns": None,
            "_format_kwargs": {},
            "_format_type": None,
            "_output_all_columns": False,
            "_split": None,
        }
        _write_json(split / "state.json", state)
    _write_json(work / SPLITS / "dataset_dict.json", {"splits": inputs.splits})
    (work / SPLITS).rename(folder.finished)  # the one step that makes the chunks the cache: no byte is copied
    return chunks


def read_manifest(path: str | Path) -> Manifest:
    return Manifest.read(path)


def load_cache(path: str | Path, verify: bool = True, share: tuple[int, int] | None = None):
    """The cache as (DatasetDict, Manifest). With verify, a stale or damaged cache is refused: unknown format
    version, missing split, other row count, or logits that no longer match their checksum. `share` (index, count):
    this process hashes only its share of the chunk files (Manifest.verify_files), for the processes of a launch."""
    import datasets

    path = Path(path)
    if not path.is_dir():
        raise KdcacheError(f"cache '{path}' does not exist; create it with kdcache teacher-logits")
    manifest = Manifest.read(path)
    manifest.check_format(path)
    if verify:
        manifest.verify_files(path, share)  # before datasets maps the files: a damaged one is reported as such
    try:
        with _quiet_datasets():
            cache = datasets.load_from_disk(str(path))
    except Exception as error:
        raise KdcacheError(
            f"cache '{path}' cannot be read ({first_line(error)}); recreate it with kdcache teacher-logits"
        ) from None
    if verify:
        manifest.verify(cache, path)
    return cache, manifest


def logit_columns(rows) -> list[str]:
    """The columns of a cache's split (a Dataset) that hold the teacher's logits: teacher_logits, and a top-K cache's
    indices and tail."""
    return [column for column in LOGIT_COLUMNS if column in rows.column_names]


def rebuilt_logits(record, classes: int) -> torch.Tensor:
    """float32 teacher logits over all `classes` from a cache's logit columns as read (one row, or a batch of rows;
    numpy arrays or lists): the stored logits, upcast, or a top-K cache's rebuilt by kdcache.loss.expand_logits."""
    values = torch.as_tensor(np.asarray(record[LOGITS]))
    if LOGIT_INDICES not in record:
        return values.float()
    indices = torch.as_tensor(np.asarray(record[LOGIT_INDICES]))
    return expand_logits(values, indices, torch.as_tensor(np.asarray(record[LOGIT_TAIL])), classes)


def verify_cache(cache, manifest: dict, path) -> None:
    """Refuse a loaded cache that does not match its manifest (what `load_cache` checks when it verifies)."""
    manifest = Manifest(manifest)
    manifest.verify_files(path)
    manifest.verify(cache, path)


def describe(path: str | Path) -> str:
    """A readable summary of a cache's manifest (kdcache info)."""
    manifest = read_manifest(path)
    teacher, data = manifest["teacher"], manifest["dataset"]
    lines = [
        f"kdcache cache: {path}",
        f"  format version  {manifest['format_version']} (kdcache {manifest['kdcache_version']}), "
        f"created {manifest['created']}",
        f"  fingerprint     {manifest['fingerprint']}",
        f"  teacher         {teacher['name_or_path']}"
        + (f" @ {teacher['revision']}" if teacher.get("revision") else ""),
        f"                  {teacher['class']}, weights sha256 {teacher['weights_sha256'][:16]}...",
        f"  dataset         {data['name_or_path']} (image column '{data['image_column']}', "
        f"label column '{data['label_column']}')"
        + (
            f"; split '{data['extra_images']['cached_as']}': images from {data['extra_images']['name_or_path']}"
            if data.get("extra_images")
            else ""
        ),
        f"  labels          {', '.join(manifest['label_names'])}",
        f"  teacher->data   {manifest['teacher_to_dataset']} (teacher output index for each dataset label)",
        f"  logits          {manifest.logits_dtype}"
        + (
            f", the top {manifest.top_k} of {len(manifest.label_names)} classes per view (+ one logit for the others)"
            if manifest.top_k
            else ""
        )
        + f", computed in {manifest['precision']} "
        f"on {manifest['device']}"
        + (f" ({manifest['processes']} processes)" if manifest.get("processes", 1) > 1 else ""),
        f"  student input   {manifest['columns']['pixel_values']['dtype']} {manifest['columns']['pixel_values']['shape']}",
        "  splits:",
    ]
    if manifest.get("views"):
        views, recipe = manifest["views"], manifest["views"]["recipe"]
        lines.insert(
            -1,
            f"  views           {views['count']} per image of {', '.join(views['splits'])}: crops of "
            f"{recipe['scale'][0]:g}-{recipe['scale'][1]:g} of the area + flip, seed {recipe['seed']}"
            + (f", mixed (mixup alpha {recipe['mix_alpha']:g})" if recipe.get("mix_alpha") else "")
            + (f", sources reduced to {recipe['source_size']} px" if recipe.get("source_size") else ""),
        )
    for name, split in data["splits"].items():
        if "chunks" in split:
            stored = sum(chunk["bytes"] for chunk in split["chunks"])
            checksums = f"{len(split['chunks'])} chunk files ({human_bytes(stored)}) with sha256"
        else:
            checksums = f"logits sha256 {split['logits_sha256'][:16]}..."
        labelled = split.get("labeled_rows", split["num_rows"])
        unlabelled = "" if labelled == split["num_rows"] else f" ({labelled} labelled)" if labelled else " (no labels)"
        lines.append(
            f"    {name:<12} {split['num_rows']:>8} rows{unlabelled}  fingerprint {split['fingerprint']}  {checksums}"
        )
    images = sum(split["num_rows"] for split in data["splits"].values())
    size = bytes_under(Path(path))
    lines.append(
        f"  size on disk    {human_bytes(size)}, {human_bytes(size / max(1, images))} per image ({images} images)"
    )
    processor = manifest["image_processor"]
    keys = ("image_processor_type", "size", "crop_size", "resample", "image_mean", "image_std")
    lines.append("  image processor " + ", ".join(f"{k}={processor[k]}" for k in keys if k in processor))
    return "\n".join(lines)


def _write_json(path: Path, content: dict) -> None:
    partial = path.with_name(path.name + ".tmp")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    partial.replace(path)


def _autocast(device, precision):
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


@contextlib.contextmanager
def _quiet_datasets():
    """datasets prints a progress bar for every chunk it saves; ours is the one that matters."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()


def _library_versions() -> dict:
    import datasets
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}
