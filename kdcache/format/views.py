"""View replay: the one function that renders views (a box, a flip, a mix partner) from reduced source images, for
stage one (the views it draws), stage two and verify (the views a cache stores), and the readers of the stored ones.
Rendered by the same code, a stored view is the very input the teacher saw, so cached == online stays exact."""

from dataclasses import dataclass

import numpy as np

from kdcache.data import ViewRecipe, from_raw_source, undecoded
from kdcache.format.columns import IMAGE, MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS, SOURCE, SOURCE_SHAPE, VIEWS


@dataclass
class View:
    """One view to render: the row whose source it is cut from, its box (x0, y0, x1, y1, flip), and for a mixed view
    the partner row, the partner's box and the weight of the row's own view."""

    row: int
    box: np.ndarray
    partner: int | None = None
    partner_box: np.ndarray | None = None
    weight: float | None = None


def render_views(recipe: ViewRecipe, views: list[View], sources, size=None):
    """uint8 (len(views), 3, H, W) pixels of `views` at `size` (height, width; default the teacher's), each cut from
    `sources[row]` (a reduced RGB image), and of their mix partners: (pixels, partner_pixels, weights), the last two
    None when the views are not mixed. The weights are float32, as stored and as ImagePipeline.mix takes them."""
    pixels = np.stack([recipe.render(sources[view.row], view.box, size) for view in views])
    if views[0].partner is None:
        return pixels, None, None
    partner_pixels = np.stack([recipe.render(sources[view.partner], view.partner_box, size) for view in views])
    return pixels, partner_pixels, np.asarray([view.weight for view in views], dtype=np.float32)


def readable_sources(rows):
    """The rows of a view split as source_image reads them: format 2's image file left undecoded (source_image
    decodes it), format 3's raw pixels as they are."""
    return rows if SOURCE in rows.column_names else undecoded(rows, IMAGE)


def source_image(record):
    """The reduced source image a stored view is cut from, out of a view split's record (or a batch's columns at one
    position): format 3's raw pixels (source, source_shape), or format 2's image file (image)."""
    if SOURCE in record:
        return from_raw_source(record[SOURCE], record[SOURCE_SHAPE])
    import datasets

    return datasets.Image().decode_example(record[IMAGE]).convert("RGB")


def stored_view(record, row: int, k: int, offset: int = 0) -> View:
    """View k of `row` as stored in its record: the box, and for a mixed view the partner (a row of the same split,
    shifted by `offset` where the split's rows do not start at 0), the partner's box and the weight."""
    box = np.asarray(record[VIEWS])[k]
    if MIX_WEIGHTS not in record:
        return View(row, box)
    partner = int(record[MIX_PARTNERS][k]) + offset
    return View(row, box, partner, np.asarray(record[MIX_VIEWS])[k], float(record[MIX_WEIGHTS][k]))
