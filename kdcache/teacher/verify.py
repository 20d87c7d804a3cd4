"""`kdcache verify`: recompute a sample of a cache's logits with its teacher and compare.

The checksums in the manifest (checked whenever a cache is loaded) catch logits that changed after the cache was
written. They cannot catch logits that were wrong when written, or altered with the checksums written again: only
running the teacher once more on the cached inputs can. This module does that for N random (row, view) pairs per
split: the teacher recorded in the manifest (its weights hash checked), on the input as stage one built it (a clean
row's stored pixels; a view rebuilt from its source and box; a mixed view from both sources, both boxes and the
weight), in the dataset's label order.
"""

from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from kdcache.data import ImagePipeline
from kdcache.errors import KdcacheError
from kdcache.format.codec import tail_logit
from kdcache.format.columns import (
    LOGIT_INDICES,
    LOGIT_TAIL,
    LOGITS,
    MIX_PARTNERS,
    MIX_VIEWS,
    MIX_WEIGHTS,
    PIXELS,
    VIEWS,
    teacher_outputs,
)
from kdcache.format.reader import load_cache, rebuilt_logits
from kdcache.format.remote import local_cache
from kdcache.format.views import readable_sources, render_views, source_image, stored_view
from kdcache.models import load_classifier, weights_sha256
from kdcache.options import VerifyOptions
from kdcache.runtime import pick_device
from kdcache.teacher.batches import autocast

# Absolute, in logit units, by the precision the cache was computed in. fp32: the teacher rerun on another device,
# batch size or kernel (oneDNN, cuDNN with TF32 convolutions) differs by up to about 1e-4 on logits of order 10, and
# an altered or mismatched cache by far more than 1e-3. bf16/fp16 autocast keeps 8 and 11 bits of mantissa: logits of
# order 10 are only known to a few hundredths, and a rerun on another device may round the other way.
DEFAULT_TOLERANCE = {"fp32": 1e-3, "fp16": 2e-2, "bf16": 1e-1}


def verify_teacher_logits(
    cache: str | Path, options: VerifyOptions | None = None, *, progress: bool = True, **overrides
) -> dict:
    """Rerun the cache's teacher on `sample` random cached inputs of each split and compare with the stored logits.

    The options are a VerifyOptions (kdcache.options: sample, tolerance, seed, teacher, device, batch_size, with
    their defaults), given whole as `options`, one by one as keywords, or both (the keywords win).
    The cache's files are held to their checksums first (kdcache.format.reader.load_cache), which cannot tell logits
    that were wrong when written. `teacher` loads the teacher from elsewhere (a local copy of a hub teacher, offline);
    its weights must hash as the manifest records. `tolerance` is the largest absolute logit difference that passes
    (default by the cache's precision, DEFAULT_TOLERANCE). Returns per split and overall: the pairs checked, the
    max |logit difference|, the top-1 mismatches, and `passed`.
    """
    options = replace(options or VerifyOptions(), **overrides)
    options.check()
    sample, tolerance, seed, teacher = options.sample, options.tolerance, options.seed, options.teacher
    device, batch_size = options.device, options.batch_size
    cache_path = local_cache(cache, progress=progress)  # an address: its verified local copy
    cached, manifest = load_cache(cache_path)
    recorded, precision = manifest.teacher, manifest.precision
    if tolerance is None:
        tolerance = DEFAULT_TOLERANCE.get(precision, DEFAULT_TOLERANCE["fp32"])
    model = _recorded_teacher(manifest, teacher, cache_path)
    torch_device = pick_device(device)
    model.to(torch_device)
    from transformers import AutoImageProcessor

    pipeline = ImagePipeline(AutoImageProcessor.from_pretrained(str(cache_path), backend="pil"))
    plan = _sampled_pairs(cached, manifest, sample, seed)
    from tqdm.auto import tqdm

    report = {
        "cache": str(cache_path),
        "teacher": teacher or recorded["name_or_path"],
        "precision": precision,
        "device": str(torch_device),
        "tolerance": tolerance,
        "seed": seed,
        "splits": {},
    }
    with tqdm(
        total=sum(map(len, plan.values())), unit="img", desc="verify: rerunning the teacher", disable=not progress
    ) as bar:
        for name, pairs in plan.items():
            report["splits"][name] = _rerun_split(
                model, torch_device, cached[name], pairs, manifest, pipeline, batch_size, bar
            )
    splits = report["splits"].values()
    report["checked"] = sum(split["checked"] for split in splits)
    report["max_abs_difference"] = max(split["max_abs_difference"] for split in splits)
    report["top1_mismatches"] = sum(split["top1_mismatches"] for split in splits)
    report["passed"] = report["max_abs_difference"] <= tolerance
    return report


def _recorded_teacher(manifest, teacher: str | None, cache_path: Path):
    """The teacher that made the cache, from where the manifest says or from `teacher`; its weights must hash as
    recorded."""
    recorded = manifest.teacher
    model = load_classifier(
        teacher or recorded["name_or_path"],
        revision=None if teacher else recorded.get("revision"),
        trust_remote_code=recorded.get("trust_remote_code", False),
    )
    found = weights_sha256(model)
    if found != recorded["weights_sha256"]:
        source = f"--teacher '{teacher}'" if teacher else f"the cache's teacher '{recorded['name_or_path']}'"
        raise KdcacheError(
            f"{source} has other weights than the teacher that made cache '{cache_path}' (weights sha256 "
            f"{found[:16]}..., the cache's {recorded['weights_sha256'][:16]}...); pass the teacher that "
            "made it with --teacher"
        )
    return model


def _sampled_pairs(cached, manifest, sample: int, seed: int) -> dict:
    """Split name -> up to `sample` (row, view) pairs drawn without replacement from (seed), in row order."""
    rng = np.random.default_rng(seed)
    plan = {}
    for name in manifest.splits:
        rows, views = cached[name], manifest.views_of(name)
        picked = np.sort(rng.choice(len(rows) * views, size=min(sample, len(rows) * views), replace=False))
        plan[name] = [(int(k) // views, int(k) % views) for k in picked]
    return plan


def _rerun_split(model, device, rows, pairs, manifest, pipeline, batch_size: int, bar) -> dict:
    """The teacher rerun on the (row, view) pairs of one split, batch by batch: how many were checked, the largest
    |logit difference| and the top-1 mismatches."""
    index = torch.tensor(manifest.teacher_to_dataset, device=device)
    # the cache's autocast where it can be repeated (CUDA); elsewhere fp32, within the precision's tolerance
    precision = manifest.precision if device.type == "cuda" else "fp32"
    differences, mismatches = [], 0
    for start in range(0, len(pairs), batch_size):
        batch = pairs[start : start + batch_size]
        inputs, stored = _rebuild(rows, batch, manifest.view_recipe, pipeline)
        with torch.inference_mode(), autocast(device, precision):
            logits = model(pixel_values=inputs.to(device)).logits
        difference, top1_differs = _compare(logits.float()[:, index].cpu(), stored, manifest)
        differences.append(difference)
        mismatches += int(top1_differs.sum())
        bar.update(len(batch))
    difference = np.concatenate(differences)
    return {"checked": len(pairs), "max_abs_difference": float(difference.max()), "top1_mismatches": mismatches}


def _compare(logits: torch.Tensor, stored: dict, manifest) -> tuple[np.ndarray, np.ndarray]:
    """Each recomputed row's largest |logit difference| from the stored logits, beyond the rounding of their storage,
    and whether its top-1 class differs. A compact cache is compared on what it stores: the recomputed logits
    compressed as stage one compressed them (a top-K cache: at the stored classes, and the tail's logit over the
    others), so that what the compression dropped is not counted as a difference."""
    classes = logits.shape[-1]
    stored_values = torch.as_tensor(np.asarray(stored[LOGITS])).float()
    if LOGIT_INDICES in stored:
        indices = torch.as_tensor(np.asarray(stored[LOGIT_INDICES])).long()
        recomputed = logits.gather(-1, indices)
        recomputed = torch.cat([recomputed, tail_logit(logits, indices)[:, None]], dim=-1)
        stored_values = torch.cat(
            [stored_values, torch.as_tensor(np.asarray(stored[LOGIT_TAIL])).float()[:, None]], -1
        )
    else:
        recomputed = logits
    difference = (recomputed - stored_values).abs()
    if manifest.logits_dtype == "float16":  # half of a float16 step at each stored value: the storage's rounding
        rounding = np.spacing(np.abs(stored_values.numpy()).astype(np.float16)).astype(np.float32) / 2
        if LOGIT_INDICES in stored:
            rounding[:, -1] = 0  # the tail is stored as float32
        difference = (difference - torch.from_numpy(rounding)).clamp(min=0)
    top1_differs = logits.argmax(-1) != rebuilt_logits(stored, classes).argmax(-1)
    return difference.max(dim=-1).values.numpy(), top1_differs.numpy()


def _rebuild(rows, pairs, recipe, pipeline):
    """The teacher's inputs for (row, view) pairs of one split, normalised as stage one fed them, and its stored
    outputs (the logits, and any other of kdcache.format.columns.teacher_outputs), one row per pair."""
    stored_columns = teacher_outputs(rows.column_names)
    if VIEWS not in rows.column_names:  # a clean split stores the teacher's input itself
        data = rows.with_format("numpy", columns=[PIXELS, *stored_columns])[[row for row, _ in pairs]]
        pixels = pipeline.normalize(torch.from_numpy(np.asarray(data[PIXELS])))
        return pixels, {column: np.asarray(data[column]) for column in stored_columns}
    parameters = rows.select_columns(
        [c for c in (VIEWS, *stored_columns, MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS) if c in rows.column_names]
    )
    records = {row: parameters[row] for row in sorted({row for row, _ in pairs})}
    views = [stored_view(records[row], row, k) for row, k in pairs]
    sources = readable_sources(rows)
    needed = {view.row for view in views} | {view.partner for view in views if view.partner is not None}
    images = {row: source_image(sources[row]) for row in sorted(needed)}
    inputs = pipeline.inputs(*render_views(recipe, views, images))
    stored = {column: np.stack([np.asarray(records[row][column])[k] for row, k in pairs]) for column in stored_columns}
    return inputs, stored


def describe(report: dict) -> str:
    """The human summary of a verification, ending with the verdict."""
    lines = [
        f"kdcache verify: {report['cache']} (teacher {report['teacher']}, logits computed in {report['precision']}, "
        f"rerun on {report['device']}, seed {report['seed']})"
    ]
    for name, split in report["splits"].items():
        lines.append(
            f"  {name:<12} {split['checked']:>6} inputs  max |logit difference| {split['max_abs_difference']:.3g}  "
            f"top-1 mismatches {split['top1_mismatches']} ({split['top1_mismatches'] / split['checked']:.1%})"
        )
    verdict = "passed" if report["passed"] else "FAILED"
    lines.append(
        f"  {verdict}: max |logit difference| {report['max_abs_difference']:.3g} "
        f"{'<=' if report['passed'] else '>'} tolerance {report['tolerance']:g} over {report['checked']} inputs"
        + (
            ""
            if report["passed"]
            else "; the cached logits are not the teacher's on the cached inputs: "
            "recreate the cache with kdcache teacher-logits"
        )
    )
    return "\n".join(lines)
