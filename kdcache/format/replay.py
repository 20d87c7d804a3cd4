"""The cache's rows replayed as stage two serves them to the student: stored views rendered from their source images
at the student's size (a mixed view with its partner), clean pixels resized to it, and the batch normalised as the
student's image processor would (the collator). Stage two trains on them; the export stage calibrates and checks an
exported student on them, so both see the very inputs the student was taught on."""

import numpy as np
import torch
import torch.nn.functional as F

from kdcache.data import ImagePipeline, ViewRecipe
from kdcache.format.columns import LABELS, LOGITS, MIX_WEIGHTS, PIXELS, SOURCE, SOURCE_SHAPE, VIEWS, teacher_outputs
from kdcache.format.reader import rebuilt_logits
from kdcache.format.views import View, readable_sources, render_views, source_image, stored_view


class Collator:
    """Rows of uint8 pixels (+ labels, + cached logits) to a batch in channels_last; the per-pixel normalisation
    happens here, on the whole batch at once, through the teacher processor's lookup table.

    Pixels of another size than `student_size` (height, width) are resized to it first: the cache's clean views are
    stored at the teacher's size, and a student trained at a lower resolution sees the same crop, smaller. Mixed
    views (rows with a partner) become weight * view + (1 - weight) * partner, with labels mixed the same way.
    `mapped` (kdcache.runtime.MappedFiles) is told of every batch read, to keep the cache's mapped pages in check.
    """

    def __init__(self, pipeline: ImagePipeline, student_size=None, num_classes=None, mapped=None):
        self.pipeline, self.num_classes, self.mapped = pipeline, num_classes, mapped
        self.student_size = tuple(student_size) if student_size else None
        self.resample = int(getattr(pipeline.processor, "resample", 3))

    def resized(self, pixels: torch.Tensor) -> torch.Tensor:
        if self.student_size is None or tuple(pixels.shape[-2:]) == self.student_size:
            return pixels
        return torch.stack(
            [torch.from_numpy(resize_pixels(image.numpy(), self.student_size, self.resample)) for image in pixels]
        )

    def __call__(self, rows):
        pixels = self.resized(stack_pixels(row[PIXELS] for row in rows))
        labels = torch.as_tensor([int(row[LABELS]) for row in rows])
        if MIX_WEIGHTS in rows[0]:
            weights = torch.as_tensor([float(row[MIX_WEIGHTS]) for row in rows], dtype=torch.float32)
            partner_pixels = self.resized(stack_pixels(row["partner_pixels"] for row in rows))
            pixel_values = self.pipeline.mix(pixels, partner_pixels, weights)
            partner_labels = torch.as_tensor([int(row["partner_labels"]) for row in rows])
            # a mixed view is labelled when both its images are (half a label would tell the student "mostly not
            # this class"); one that is not gets an all-zero row, which the cross-entropy leaves out (kdcache.student.loss)
            both = ((labels >= 0) & (partner_labels >= 0))[:, None]
            labels = both * (
                weights[:, None] * F.one_hot(labels.clamp(min=0), self.num_classes)
                + (1 - weights[:, None]) * F.one_hot(partner_labels.clamp(min=0), self.num_classes)
            )
        else:
            pixel_values = self.pipeline.normalize(pixels)
        # channels_last: oneDNN's and cuDNN's faster convolutions for the student's forward and backward (BENCHMARKS.md)
        batch = {"pixel_values": pixel_values.contiguous(memory_format=torch.channels_last), "labels": labels}
        if LOGITS in rows[0]:
            stored = {column: np.stack([row[column] for row in rows]) for column in teacher_outputs(rows[0])}
            batch["teacher_logits"] = rebuilt_logits(stored, self.num_classes)
        if self.mapped is not None:  # the rows were read (in this process) from the cache's memory-mapped files
            self.mapped.read()
        return batch


def stack_pixels(pixels) -> torch.Tensor:
    """uint8 (batch, 3, H, W) from rows' pixels (numpy arrays read from the cache's memory map, or tensors)."""
    return torch.from_numpy(np.stack([np.asarray(image, dtype=np.uint8) for image in pixels]))


def resize_pixels(pixels: np.ndarray, size, resample: int) -> np.ndarray:
    """uint8 (3, H, W) pixels resized to size (height, width) with PIL, as the image processors resize."""
    from PIL import Image

    image = Image.fromarray(np.ascontiguousarray(pixels.transpose(1, 2, 0)), "RGB")
    return np.array(image.resize((size[1], size[0]), resample), dtype=np.uint8).transpose(2, 0, 1)


class ViewRows(torch.utils.data.Dataset):
    """Training rows of a split cached with K views per image. Each epoch uses one view of each image, drawn so that
    all K views come up once in every K epochs; the view is rebuilt from the (reduced) source image and its stored
    parameters, at the student's size, and paired with the teacher's logits on exactly that view. A mixed view
    also rebuilds its partner's view (the collator mixes them).

    fresh=True is the inconsistent baseline: a new random view every epoch, paired with the logits the teacher gave
    the clean (unaugmented) view, which is what augmenting the student alone amounts to.

    `rows` may be several cached splits concatenated (the training split and unlabeled ones): `offsets` then gives
    each row the position of its split's first row, since a mixed view's partner is a row of its own split. `labels`
    (one per row; -1 for none) replaces the cached labels, of the rows and of their partners (kdcache.labels).
    """

    def __init__(
        self, rows, recipe: ViewRecipe, seed: int, fresh: bool = False, student_size=None, labels=None, offsets=None
    ):
        self.rows = readable_sources(rows)
        self.recipe, self.seed, self.fresh, self.epoch = recipe, seed, fresh, 0
        self.labels, self.offsets = labels, offsets
        self.size = tuple(student_size) if student_size else recipe.size
        self.count = 1 if fresh else rows.features[VIEWS].shape[0]
        self.mixed = MIX_WEIGHTS in rows.column_names
        if self.mixed:  # partners are any rows of the split: read only what a partner needs
            self.partner_rows = rows.select_columns([SOURCE, SOURCE_SHAPE, LABELS])

    def __len__(self):
        return len(self.rows)

    def view_index(self, row: int) -> int:
        cycle, position = divmod(self.epoch, self.count)
        return int(np.random.default_rng([self.seed, row, cycle]).permutation(self.count)[position])

    def __getitems__(self, indices):
        batch = self.rows[list(indices)]
        records = [{column: values[position] for column, values in batch.items()} for position in range(len(indices))]
        sources = {row: source_image(record) for row, record in zip(indices, records)}
        if self.fresh:  # a new view of the clean image, with the clean view's logits
            views = [View(row, self.recipe.sample(*sources[row].size, (row, self.epoch), 1)[0]) for row in indices]
            outputs = [{column: record[column] for column in teacher_outputs(record)} for record in records]
        else:  # view k of each row, with the teacher's outputs on view k (logits, a top-K cache's indices and tail)
            chosen = [self.view_index(row) for row in indices]
            views = [self.view(record, row, k) for record, row, k in zip(records, indices, chosen)]
            outputs = [
                {column: np.asarray(record[column])[k] for column in teacher_outputs(record)}
                for record, k in zip(records, chosen)
            ]
        partner_labels = self.read_partners(views, sources) if self.mixed else {}
        pixels, partner_pixels, weights = render_views(self.recipe, views, sources, self.size)
        items = []
        for position, (row, view) in enumerate(zip(indices, views)):
            item = {PIXELS: torch.from_numpy(pixels[position]), LABELS: self.label(batch, position, row)}
            item.update(outputs[position])
            if self.mixed:
                item.update(
                    partner_pixels=torch.from_numpy(partner_pixels[position]),
                    partner_labels=partner_labels[view.partner],
                    **{MIX_WEIGHTS: weights[position]},
                )
            items.append(item)
        return items

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def view(self, record, row: int, k: int) -> View:
        """View k of `row`, its partner (if mixed) a row of `rows`: stored as a row of the same split."""
        return stored_view(record, row, k, int(self.offsets[row]) if self.offsets is not None else 0)

    def read_partners(self, views: list[View], sources: dict) -> dict:
        """Add the sources of the views' partners to `sources`; returns the partners' labels."""
        wanted = sorted({view.partner for view in views})
        partner_rows = self.partner_rows[wanted]
        labels = {}
        for position, row in enumerate(wanted):
            sources[row] = source_image({column: values[position] for column, values in partner_rows.items()})
            labels[row] = self.label(partner_rows, position, row)
        return labels

    def label(self, batch, position: int, row: int):
        return batch[LABELS][position] if self.labels is None else self.labels[row]


def replayed_batch(cached, manifest, split: str, indices, pipeline: ImagePipeline, size, seed: int = 0) -> dict:
    """The rows at `indices` of a cached split as stage two's first epoch served them, as one batch (pixel_values,
    labels, teacher_logits): a split of views renders the view that ViewRows draws for each row with `seed` (mixed
    with its partner where the views are mixed), a split of one clean view resizes its pixels; both at `size`
    (height, width) and normalised by `pipeline` (the student's image processor)."""
    indices, rows = [int(index) for index in indices], cached[split]
    if manifest.views_of(split) > 1:
        items = ViewRows(rows, manifest.view_recipe, seed, student_size=size).__getitems__(indices)
    else:
        batch = rows.with_format("numpy", columns=[PIXELS, LABELS, *teacher_outputs(rows.column_names)])[indices]
        items = [{column: values[position] for column, values in batch.items()} for position in range(len(indices))]
    return Collator(pipeline, size, len(manifest.label_names))(items)
