"""Reading a cache: its manifest, its splits (checked against the manifest's checksums), and the teacher's logits
rebuilt as float32 over every class whatever the cache stores. What stage two, evaluation and verify read."""

import contextlib
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import KdcacheError, first_line
from kdcache.format.codec import expand_logits
from kdcache.format.columns import LOGIT_COLUMNS, LOGIT_INDICES, LOGIT_TAIL, LOGITS, info_lines
from kdcache.format.manifest import Manifest
from kdcache.outputs import (
    bytes_under,
    human_bytes,
)


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
        with quiet_datasets():
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
    numpy arrays or lists): the stored logits, upcast, or a top-K cache's rebuilt by kdcache.format.codec.expand_logits."""
    values = torch.as_tensor(np.asarray(record[LOGITS]))
    if LOGIT_INDICES not in record:
        return values.float()
    indices = torch.as_tensor(np.asarray(record[LOGIT_INDICES]))
    return expand_logits(values, indices, torch.as_tensor(np.asarray(record[LOGIT_TAIL])), classes)


SKIPPED_SHOWN = 20  # skipped rows kdcache info lists per split; the manifest lists them all


def describe(path: str | Path) -> str:
    """A readable summary of a cache's manifest (kdcache info): one page, written top to bottom as it prints (over 60
    lines because it is one template; split, its lines would be read out of order)."""
    manifest = Manifest.read(path)
    teacher, data = manifest["teacher"], manifest["dataset"]
    lines = [
        f"kdcache cache: {path}",
        f"  format version  {manifest['format_version']} (kdcache {manifest['kdcache_version']}), "
        f"created {manifest['created']}",
        f"  fingerprint     {manifest['fingerprint']}",
        *(
            [
                f"  pulled from     {manifest.source['address']}"
                + (f" @ {manifest.source['revision']}" if manifest.source.get("revision") else "")
                + (f" (ETag {manifest.source['etag']})" if manifest.source.get("etag") else "")
                + f", {manifest.source['pulled']}"
            ]
            if manifest.source
            else []
        ),
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
        *(f"  {title:<16}{text}" for title, text in info_lines(manifest)),
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
        skipped = split.get("skipped_images", [])
        lines += [
            f"      skipped row {image['row']}: {image['file'] or 'an image stored in the dataset'} ({image['reason']})"
            for image in skipped[:SKIPPED_SHOWN]
        ]
        if len(skipped) > SKIPPED_SHOWN:
            lines.append(
                f"      ... and {len(skipped) - SKIPPED_SHOWN} more skipped rows, each listed in kdcache.json"
            )
    images = sum(split["num_rows"] for split in data["splits"].values())
    size = bytes_under(Path(path))
    lines.append(
        f"  size on disk    {human_bytes(size)}, {human_bytes(size / max(1, images))} per image ({images} images)"
    )
    processor = manifest["image_processor"]
    keys = ("image_processor_type", "size", "crop_size", "resample", "image_mean", "image_std")
    lines.append("  image processor " + ", ".join(f"{k}={processor[k]}" for k in keys if k in processor))
    if any("skipped_images" in split for split in data["splits"].values()):
        skipped = {name: len(split.get("skipped_images", [])) for name, split in data["splits"].items()}
        counts = ", ".join(f"{name} {count}" for name, count in skipped.items() if count) or "none"
        lines.append(
            f"  skipped images  {sum(skipped.values())} unreadable or empty, left out (--bad-images skip): {counts}"
        )
    return "\n".join(lines)


@contextlib.contextmanager
def quiet_datasets():
    """datasets prints a progress bar for every chunk it saves; ours is the one that matters."""
    import datasets

    was_enabled = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        yield
    finally:
        if was_enabled:
            datasets.enable_progress_bars()
