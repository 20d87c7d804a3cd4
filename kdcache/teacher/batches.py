"""Stage one's teacher loop: the rows of a split in batches (decoded, viewed, through the image processor on loader
workers), the teacher run on them, the logits written chunk by chunk."""

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kdcache.data import (
    ImagePipeline,
    UnreadableImage,
    ViewRecipe,
    decode_images,
    raw_source,
    undecoded,
)
from kdcache.errors import KdcacheError
from kdcache.format.codec import compress_logits
from kdcache.format.columns import (
    LABELS,
    LOGIT_INDICES,
    LOGIT_TAIL,
    LOGITS,
    MIX_PARTNERS,
    MIX_VIEWS,
    MIX_WEIGHTS,
    PIXELS,
    ROW,
    SOURCE,
    SOURCE_SHAPE,
    VIEWS,
    Layout,
    split_features,
)
from kdcache.format.views import View, render_views
from kdcache.labels import NO_LABEL
from kdcache.outputs import write_json
from kdcache.teacher.images import unreadable_refusal
from kdcache.teacher.work import chunk_path, chunk_record_path, write_chunk_file


@dataclass
class Job:
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
    source_rows: np.ndarray | None = None  # of the split at work: the source row of each row kept (None: all kept)


class _Batches(torch.utils.data.Dataset):
    """Batch i of a list of row spans, decoded and resized (or cut into views): what a DataLoader worker prepares
    ahead of the teacher. A batch holds the values of the cache's columns under their names (kdcache.format.columns),
    as _write_chunk writes them; PIXELS is the teacher's input, stored only in a split of one clean view."""

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
                ROW: np.asarray(rows, dtype=np.int64),
                LABELS: (
                    np.asarray(self.split[start:end][self.label_column], dtype=np.int64)
                    if self.label_column
                    else np.full(end - start, NO_LABEL, dtype=np.int64)  # images nobody labelled
                ),
            }
            if self.view_recipe is None:
                batch[PIXELS] = self.pipeline.pixels(images)
            else:
                batch.update(self.viewed(rows, images))
            return batch
        except UnreadableImage as error:  # the main process counts the others (--bad-images fail)
            return {"error": str(error), "unreadable": (error.row, error.file, error.reason)}
        except KdcacheError as error:  # carried to the main process as data: a worker's traceback is not a message
            return {"error": error}  # itself: its type tells safe_output whether the data is at fault (DataError)

    def viewed(self, rows: list[int], images: list) -> dict:
        """The views of a batch's rows, drawn from (seed, row) and rendered, with what is stored of them: their boxes,
        the reduced sources, and for mixed views the partners, the partners' boxes and the weights."""
        recipe, count = self.view_recipe, self.views
        sources = {row: recipe.reduce(image) for row, image in zip(rows, images)}
        boxes = np.stack([recipe.sample(*sources[row].size, row, count) for row in rows])
        raw = [raw_source(sources[row]) for row in rows]
        batch = {VIEWS: boxes, SOURCE: [data for data, _ in raw], SOURCE_SHAPE: [shape for _, shape in raw]}
        if not recipe.mixed:
            views = [View(row, box) for row, row_boxes in zip(rows, boxes) for box in row_boxes]
            batch[PIXELS], _, _ = render_views(recipe, views, sources)
            return batch
        drawn = [recipe.sample_partners(row, len(self.split), count) for row in rows]
        partners = np.stack([partner_rows for partner_rows, _ in drawn])
        weights = np.stack([row_weights for _, row_weights in drawn])
        wanted = sorted(set(partners.ravel().tolist()) - set(sources))  # a partner in the batch is reduced already
        decoded = decode_images(self.split, self.image_column, wanted, self.split_name)
        sources.update((row, recipe.reduce(image)) for row, image in zip(wanted, decoded))
        mix_views = np.stack(
            [
                [recipe.sample_partner_view(*sources[int(b)].size, row, k) for k, b in enumerate(row_partners)]
                for row, row_partners in zip(rows, partners)
            ]
        )
        views = [
            View(row, box, int(partner), partner_box, float(weight))
            for row, *of_row in zip(rows, boxes, partners, mix_views, weights)
            for box, partner, partner_box, weight in zip(*of_row)
        ]
        batch[PIXELS], batch["partner_pixels"], _ = render_views(recipe, views, sources)
        batch.update({MIX_PARTNERS: partners, MIX_VIEWS: mix_views, MIX_WEIGHTS: weights})
        return batch


def run_split(job: Job, split, name: str, work: Path, chunks: list[int]):
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
    with (
        tqdm(total=todo_rows * job.views, unit="img", desc=description, disable=not job.progress) as bar,
        _current_device(job.device),  # the loader pins memory for the current device, from its first batch on
    ):
        for batch in loader:
            if "unreadable" in batch:
                raise unreadable_refusal(UnreadableImage(name, *batch["unreadable"]), split, job.image_column)
            if "error" in batch:
                raise batch["error"]
            # mixed (if it is) on CPU, by the same function that mixes the student's input
            pixel_values = job.pipeline.inputs(batch[PIXELS], batch.get("partner_pixels"), batch.get(MIX_WEIGHTS))
            pixel_values = pixel_values.to(job.device, non_blocking=True)
            pixel_values = pixel_values.contiguous(memory_format=torch.channels_last)
            with torch.inference_mode(), autocast(job.device, job.precision):
                logits = job.model(pixel_values=pixel_values).logits
            # compressed on CPU: a compact cache's columns are then the same function of the fp32 logits whichever
            # device ran the teacher (a GPU's log-mean-exp of the tail differs from a CPU's in its last bits)
            logits = logits.float()[:, index].cpu()
            if job.views > 1:
                logits = logits.reshape(len(batch[ROW]), job.views, -1)
            stored = compress_logits(logits, job.top_k, getattr(torch, job.logits_dtype))
            batch[LOGITS] = stored["values"].numpy()
            if job.top_k:
                batch[LOGIT_INDICES] = stored["indices"].numpy()
                batch[LOGIT_TAIL] = stored["tail"].numpy()
            pending.append(batch)
            bar.update(len(pixel_values))
            chunk = int(pending[0][ROW][0]) // job.chunk_size
            if int(pending[-1][ROW][-1]) + 1 == min(rows, (chunk + 1) * job.chunk_size):
                _write_chunk(chunk_path(work, name, chunk), pending, job)
                pending = []
    return todo_rows * job.views, time.perf_counter() - started


def split_images_per_second(timings: list) -> float | None:
    """Images per second of all processes on one split: their images over the time of the slowest."""
    done = [timing for timing in timings if timing is not None]
    if not done:
        return None
    return round(sum(images for images, _ in done) / max(seconds for _, seconds in done), 2)


def _write_chunk(path: Path, batches: list[dict], job: Job) -> None:
    """Write one chunk's rows as the Arrow file `path`, and then its record (rows, bytes, sha256): each column of the
    split's layout (kdcache.format.columns), from the batches' values under its name."""
    import datasets

    mixed = bool(job.view_recipe and job.view_recipe.mixed)
    pixel_shape = tuple(batches[0][PIXELS].shape[1:])
    layout = Layout(job.names, pixel_shape, job.logits_dtype, job.top_k, job.views, mixed)
    features = split_features(layout)
    columns = {name: _joined([batch[name] for batch in batches]) for name in features}
    if job.source_rows is not None:  # rows were left out (--bad-images skip): row_index is the row in the source
        columns[ROW] = job.source_rows[columns[ROW]]
    record = write_chunk_file(path, datasets.Dataset.from_dict(columns, features=features))
    write_json(chunk_record_path(path), record)  # the chunk counts as written from here on


def _joined(values: list):
    """One column's values over a chunk's batches: arrays concatenated, lists (of a view split's sources) chained."""
    if isinstance(values[0], list):
        return [value for part in values for value in part]
    return np.concatenate(values)


def _current_device(device: torch.device):
    """Make `device` the current CUDA device for the block. The DataLoader pins memory for the current device, which
    is cuda:0 unless set: a run on cuda:1 would open a CUDA context (and take its memory) on cuda:0 as well."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def autocast(device: torch.device, precision: str):
    """The teacher's forward in `precision`: fp32 as it is, bf16/fp16 as autocast on `device`."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
