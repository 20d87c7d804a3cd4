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
teacher_logits_indices and teacher_logits_tail; kdcache.format.codec.compress_logits), and `rebuilt_logits` gives them back
as float32 logits over every class, which is all stage two, evaluation and verification read.
`pixel_values` holds the teacher's resized and cropped view as uint8 (3, H, W): stage two turns it into the
model input with a per-pixel lookup table (data.ImagePipeline) instead of decoding and resizing every epoch.
The work happens in `CACHE.partial/`, chunk by chunk, so a killed run resumes: each chunk file is hashed as it is
written, and its checksum kept beside it (`CACHE.partial/records/`) until the manifest records it; a resumed run
hashes each chunk again before it carries it over, and computes again any that does not match (carried_over). The
chunks are written once: finishing a run writes the small JSON files and renames the folder of chunks into place
(_finish), once the finished cache has passed the checks `load_cache` makes (_check_finished)."""

import hashlib
import json
import logging
import math
import shutil
import time
from dataclasses import replace
from pathlib import Path

import torch

from kdcache.errors import KdcacheError
from kdcache.format.columns import Layout, split_features
from kdcache.format.manifest import MANIFEST, Manifest
from kdcache.format.reader import load_cache, quiet_datasets
from kdcache.options import DEFAULT_DATASET, DEFAULT_TEACHER, CacheOptions
from kdcache.options.config import as_given, write_config
from kdcache.outputs import (
    OutputFolder,
    check_free_space,
    safe_output,
    write_json,
)
from kdcache.runtime import agreed, cpus_per_process, distributed, is_main, output_path, placement
from kdcache.teacher.batches import Job, run_split, split_images_per_second
from kdcache.teacher.images import check_share, find_bad_images, leave_out
from kdcache.teacher.inputs import Inputs, cache_recipe, default_cache_path, load_inputs, needed_bytes
from kdcache.teacher.work import (
    CACHE_OUTPUT,
    RECORDS,
    SPLITS,
    carried_over,
    chunk_path,
    chunk_record_path,
    is_written,
    partial_path,
    undo_unfinished_finish,
)

log = logging.getLogger("kdcache")


def teacher_logits(
    dataset: str = DEFAULT_DATASET,
    teacher: str = DEFAULT_TEACHER,
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
            inputs = load_inputs(dataset, teacher, options)
        recipe, fingerprint = cache_recipe(inputs, options)
        space = needed_bytes(inputs, options)
        plan = _plan(folder, fingerprint, space, inputs, options, processes, progress)
        if plan is None:
            return output  # up to date
        leave_out(inputs, plan["skipped"])  # every process: the rows the main process found bad, if any
        started = time.perf_counter()
        speed = _compute_chunks(inputs, plan, folder, space, options, place, processes, progress)
        with agreed(processes), quiet_datasets():
            if is_main(processes):
                _write_cache(folder, inputs, recipe, fingerprint, options, place, speed, started)
        with agreed(processes):  # the processes of a launch hash a share of the files each
            _check_finished(folder, processes)
    return output


def _plan(
    folder: OutputFolder, fingerprint: str, space: int, inputs: Inputs, options: CacheOptions, processes, progress
):
    """The chunks still to compute, as the main process alone decides them (see _plan_work) for every process; None
    when the output already holds this cache. With --bad-images skip, the plan also lists each split's unreadable
    rows (kdcache.teacher.images), found once: a resumed run reads them from the plan."""
    plan = None
    with agreed(processes):
        if is_main(processes):
            rows = {name: len(inputs.dataset_dict[name]) for name in inputs.splits}

            def bad_images(found: dict | None) -> dict:
                if options.bad_images != "skip":
                    return {}
                if found is None:  # decoding is the pass's main cost on CPU: as many workers as it would have
                    workers = options.num_workers
                    workers = min(8, cpus_per_process(processes) - 1) if workers is None else workers
                    found = find_bad_images(inputs, workers, progress)
                check_share(found, rows, options.max_bad_share)
                return found

            plan = _plan_work(
                folder.path, folder.work, fingerprint, options.overwrite, options.chunk_size, rows, space, bad_images
            )
    return processes.share(plan) if processes else plan


def _compute_chunks(inputs: Inputs, plan: dict, folder: OutputFolder, space: int, options, place, processes, progress):
    """Run the teacher over this process's share of the chunks still to do, writing each into the work folder;
    returns the images per second of each split, of all processes together."""
    # channels_last lets oneDNN (CPU) and cuDNN pick their faster convolution kernels: about 1.2x on a CNN
    # teacher on CPU (BENCHMARKS.md); a ViT only has its patch embedding as a convolution.
    inputs.model.to(place.device, memory_format=torch.channels_last)
    job = Job(
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
    folder.on_disk_full(space, scratch=lambda: [partial_path(chunk_path(work, name, k)) for name, k in mine])
    timings = {}
    with quiet_datasets():
        for name in inputs.splits:
            if name in inputs.view_splits:
                job.views, job.view_recipe = options.views, inputs.view_recipe
            else:
                job.views, job.view_recipe = 1, None
            job.label_column, job.source_rows = inputs.label_columns[name], inputs.source_rows.get(name)
            split = inputs.dataset_dict[name]
            timings[name] = run_split(job, split, name, work, [k for part, k in mine if part == name])
    # A failure above (an unreadable image) ends this process at once, with its message; the launcher then ends the
    # others, and a process waiting here learns that its peer is gone. Nothing is lost: finished chunks are kept.
    everyone = processes.gather(timings) if processes else [timings]  # also: every chunk is written
    return {name: split_images_per_second([timings[name] for timings in everyone]) for name in inputs.splits}


def _write_cache(folder: OutputFolder, inputs: Inputs, recipe, fingerprint, options, place, speed, started) -> None:
    """Make the chunks the finished cache, with its manifest and the teacher's image processor."""
    chunks = _finish(folder, inputs, options, fingerprint)
    skipped = json.loads((folder.work / "plan.json").read_text()).get("skipped", {})
    manifest = Manifest.build(
        logits_dtype=options.stored_dtype,
        top_k=options.top_k,
        recipe=recipe,
        fingerprint=fingerprint,
        pixel_shape=inputs.pixel_shape,
        teacher={
            "name_or_path": inputs.teacher,
            "revision": options.revision,
            "trust_remote_code": options.trust_remote_code,
            "id2label": {str(k): v for k, v in inputs.model.config.id2label.items()},
        },
        dataset={
            "name_or_path": inputs.dataset,
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
                # each row left out (its source row, file and why), stage one's rows being the others (num_rows)
                **({"skipped_images": skipped[name]} if options.bad_images == "skip" else {}),
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
    given = {"dataset": inputs.dataset, "teacher": inputs.teacher, "output": folder.path, **as_given(options)}
    write_config(folder.finished, "teacher-logits", given, home=folder.path)


def _failed_check(path: Path, share=None) -> str | None:
    """Why `load_cache` refuses the cache at `path` (its message without its advice), or None when it loads."""
    try:
        load_cache(path, share=share)
    except KdcacheError as error:
        return str(error).split("; ")[0]
    return None


def _check_finished(folder: OutputFolder, processes=None) -> None:
    """Refuse to move into place a finished cache that `load_cache` would refuse: every check it makes (the files each
    split lists, each chunk file's size and sha256 against the manifest, the rows, the label names) on the cache in
    the work folder. The chunks are hashed a second time here (a resumed run hashed its carried-over chunks when it
    planned, a new chunk was hashed as it was written), which costs one read of the cache (BENCHMARKS.md) and
    catches what changed a file after it was hashed. A refused cache stays in the work folder: the next run puts its
    chunks back and computes the damaged ones again (_plan_work)."""
    damage = _failed_check(folder.finished, (processes.index, processes.count) if processes else None)
    if damage is not None:
        raise KdcacheError(
            f"{damage}: the cache failed its final check, so '{folder.path}' was not written; run the same command "
            "again to compute the damaged chunks again"
        )


def _plan_work(
    output: Path,
    work: Path,
    fingerprint: str,
    overwrite: bool,
    chunk_size: int,
    rows: dict,
    space: int,
    bad_images,
) -> dict | None:
    """Check the output and the free space (`space` bytes in all), set up `work` (resuming a partial run of the same
    inputs, whose chunks are checked against their records: carried_over) and list the chunks still to compute, as
    [split, chunk index] pairs; None when `output` already holds this cache and it passes load_cache's checks (one
    that fails them is made again; safe_output has refused a folder that is not a cache). `bad_images(found)` gives
    the rows each split leaves out, the plan's `skipped` (scanning the images when `found`, an earlier run's list of
    them, is None). A refusal leaves the work folder as it found it."""
    undo_unfinished_finish(work)  # first: safe_output would move a half-finished cache into place
    if (output / MANIFEST).exists():
        existing = Manifest.read(output)
        if existing.get("fingerprint") == fingerprint:
            damage = _failed_check(output)  # "up to date" vouches for the cache as a finished run does
            if damage is None:
                log.info(f"cache '{output}' is up to date (fingerprint {fingerprint}); nothing to do")
                return None
            log.warning(f"{damage}; it is made again (its inputs have not changed)")
        elif not overwrite:
            raise KdcacheError(
                f"'{output}' holds a cache made from other inputs (fingerprint {existing.get('fingerprint')}, "
                f"now {fingerprint}); pass --overwrite to replace it, or choose another --output"
            )

    check_free_space(output, space, "the cache", work)  # before the teacher runs, and before work is set up
    plan = {"fingerprint": fingerprint, "chunk_size": chunk_size}
    if (work / "plan.json").exists():
        previous = json.loads((work / "plan.json").read_text())
        if previous.get("fingerprint") == fingerprint:
            plan = previous  # resume with the chunking the finished chunks were written with
        else:
            shutil.rmtree(work)
    # found once (a resumed run keeps the rows its chunks were computed from), checked on every run
    plan["skipped"] = bad_images(plan.get("skipped"))
    try:
        work.mkdir(parents=True, exist_ok=True)
        write_json(work / "plan.json", plan)
        for name in rows:
            (work / SPLITS / name).mkdir(parents=True, exist_ok=True)
            (work / RECORDS / name).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise KdcacheError(f"cannot write under '{work.parent}' ({error.strerror}); choose another --output") from None
    size = plan["chunk_size"]
    kept = {name: count - len(plan["skipped"].get(name, [])) for name, count in rows.items()}
    todo = [
        [name, k]
        for name, count in kept.items()
        for k in range(math.ceil(count / size))
        if not carried_over(work, name, k, min(size, count - k * size))
    ]
    return {**plan, "todo": todo}


def _finish(folder: OutputFolder, inputs: Inputs, options: CacheOptions, fingerprint: str) -> dict:
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
        paths = [chunk_path(work, name, k) for k in range(count)]
        records = [json.loads(chunk_record_path(path).read_text()) if is_written(path) else None for path in paths]
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
        layout = Layout(inputs.names, inputs.pixel_shape, options.stored_dtype, options.top_k, views, mixed)
        features = split_features(layout)
        info = asdict(DatasetInfo(features=features))
        write_json(split / "dataset_info.json", {key: info[key] for key in sorted(info)})
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
        write_json(split / "state.json", state)
    write_json(work / SPLITS / "dataset_dict.json", {"splits": inputs.splits})
    (work / SPLITS).rename(folder.finished)  # the one step that makes the chunks the cache: no byte is copied
    return chunks


def _library_versions() -> dict:
    import datasets
    import transformers

    return {"torch": torch.__version__, "transformers": transformers.__version__, "datasets": datasets.__version__}
