"""Unreadable images in stage one (--bad-images): finding them, and what a run does with them.

With `fail` (the default) the teacher pass stops at the first image that does not decode, naming it; the refusal
also says how many more a quick scan of that split finds (an empty file, or one whose header PIL cannot identify:
a stat and a few bytes per file, so it costs seconds where decoding costs as much as the pass; a damaged body shows
only when decoded) and the flag that skips them.

With `skip`, every image of the splits is decoded once before the teacher runs, by the very function the pass decodes
with (kdcache.data.decode_image), so that every row kept is certain to decode, and the pass never stops half way. The
bad rows are then left out of the splits stage one reads (`leave_out`), before anything is computed: position i of a
cached split is its i-th kept row (views, mix partners and chunks count in kept rows), its `row_index` the source row
it came from, and the manifest lists each skipped row of each split (its source row, its file, why). A split with more
than --max-bad-share of its images bad is refused: that many is more likely a wrong folder or a format PIL does not
read than stray damage, and a cache of what is left would silently be another dataset.
"""

import io
import math

import numpy as np
import torch

from kdcache.data import UnreadableImage, decode_image, is_empty_image, labeled_rows, undecoded
from kdcache.errors import DataError, KdcacheError

BLOCK_ROWS = 256  # rows a scan reads at a time: a few MB of encoded images


class _Decoded(torch.utils.data.Dataset):
    """Block i of a split's rows, decoded on a DataLoader worker: the entries of its bad rows."""

    def __init__(self, split, image_column: str, split_name: str):
        self.split, self.image_column, self.split_name = undecoded(split, image_column), image_column, split_name

    def __len__(self):
        return math.ceil(len(self.split) / BLOCK_ROWS)

    def __getitem__(self, index):
        rows = list(range(index * BLOCK_ROWS, min(len(self.split), (index + 1) * BLOCK_ROWS)))
        bad = []
        for row, value in zip(rows, self.split[rows][self.image_column]):
            try:
                decode_image(value, self.split_name, row)
            except UnreadableImage as error:
                bad.append({"row": row, "file": error.file, "reason": error.reason})
        return bad


def find_bad_images(inputs, workers: int, progress: bool) -> dict:
    """Each split's images that do not decode, as the manifest records them: {split: [{"row", "file", "reason"}]}
    in row order (an empty list for a split without any)."""
    from tqdm.auto import tqdm

    found = {}
    for name in inputs.splits:
        blocks = _Decoded(inputs.dataset_dict[name], inputs.image_column, name)
        loader = torch.utils.data.DataLoader(blocks, batch_size=None, num_workers=workers if len(blocks) > 1 else 0)
        description = f"checking images [{name}]"
        with tqdm(total=len(blocks.split), unit="img", desc=description, disable=not progress) as bar:
            found[name] = []
            for index, bad in enumerate(loader):
                found[name] += bad
                bar.update(min(BLOCK_ROWS, len(blocks.split) - index * BLOCK_ROWS))
    return found


def check_share(found: dict, rows: dict, max_share: float) -> None:
    """Refuse, in one line, a split with more than `max_share` of its `rows` bad (`found`: find_bad_images)."""
    for name, bad in found.items():
        if bad and len(bad) > max_share * rows[name]:
            first = bad[0]["file"] or f"row {bad[0]['row']}"
            raise KdcacheError(
                f"{len(bad)} of the {rows[name]} images of split '{name}' are unreadable or empty "
                f"({len(bad) / rows[name]:.1%}; the first: {first}, {bad[0]['reason']}), more than --max-bad-share "
                f"{max_share:g} allows; check that the dataset is the one meant, or raise --max-bad-share"
            )


def leave_out(inputs, found: dict) -> None:
    """Drop the bad rows from the splits stage one reads (every process, from the one list the main process found),
    keeping the source row of each kept row for the cache's row_index."""
    for name, bad in found.items():
        if not bad:
            continue
        split = inputs.dataset_dict[name]
        kept = np.setdiff1d(np.arange(len(split)), [entry["row"] for entry in bad])
        inputs.dataset_dict[name] = split.select(kept)
        inputs.source_rows[name] = kept
        inputs.labeled_rows[name] = labeled_rows(inputs.dataset_dict[name], inputs.label_columns[name])


def unreadable_refusal(error: UnreadableImage, split, image_column: str) -> DataError:
    """The refusal of `--bad-images fail` at `error`'s image: it, how many more a quick scan of its split finds, and
    the flag that leaves them out."""
    more = [row for row in quick_scan(split, image_column) if row != error.row]
    found = (
        f"a quick scan of the split finds {len(more)} more empty or unidentifiable image file"
        f"{'s' if len(more) != 1 else ''}"
        if more
        else "a quick scan of the split finds no other empty or unidentifiable image file"
    )
    return DataError(  # the data must change for a rerun to pass, and with it the fingerprint: nothing to resume
        f"{error.where}; {found} (damaged image data shows only when decoded); fix or remove them, or pass "
        "--bad-images skip to leave every unreadable image out (the manifest lists them)"
    )


def quick_scan(split, image_column: str) -> list[int]:
    """The rows of a split whose image is empty or has a header PIL cannot identify (Image.open reads the header
    only)."""
    from PIL import Image

    split, bad = undecoded(split, image_column), []
    for start in range(0, len(split), BLOCK_ROWS):
        for row, value in enumerate(split[start : start + BLOCK_ROWS][image_column], start):
            try:
                if is_empty_image(value):
                    bad.append(row)
                    continue
                with Image.open(io.BytesIO(value["bytes"]) if value["bytes"] is not None else value["path"]):
                    pass
            except Exception:  # any failure to open counts: the pass would fail on it too
                bad.append(row)
    return bad
