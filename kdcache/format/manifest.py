"""The manifest of a logit cache (CACHE/kdcache.json): the cache's public contract, in one type.

`Manifest` is the manifest's JSON as a dict (so it is written, compared and dumped as one), plus what every stage
needs of it: reading with one-line errors, upgrading older format versions in memory so that no reader has to
know them, building a new one (stage one), verifying a loaded cache against it, and accessors for the fields the
other stages read. A new field is added here (in `build`, an accessor, and `_upgrade` for caches without it); a new
column of the splits is declared in kdcache.format.columns, which gives the manifest its `columns`.

Format versions:
  5: the teacher logits may be stored compact (`kdcache teacher-logits --logits-dtype fp16 --top-k K`): float16
     values, or the top K logits with their class indices (teacher_logits_indices) and the log-mean-exp of the other
     logits (teacher_logits_tail); `columns.teacher_logits` says which (dtype, top_k), and stage two rebuilds the
     full logits (kdcache.format.codec.expand_logits). A cache of float32 logits is laid out as in format 4.
  4: each split is the chunk files stage one wrote (CACHE/<split>/chunk-NNNNNN.arrow, listed in the split's state.json),
     and the manifest records every chunk file's size and sha256 (`chunks` per split) instead of one logits_sha256 per
     split. Verification hashes the files block by block, before datasets reads them.
  3: view splits hold the source as reduced raw pixels (source, source_shape), and optionally mixed views
     (mix_partners, mix_views, mix_weights); a cache without views was written as
     format 2.
  2: optional augmented views per image (views, image columns).
  1: one clean view (no `views`, at the top or per split): read as views=None, and 1 view per split.

A cache pulled from an address (kdcache.format.remote) has one more entry, of any format: `source` (address, revision
(a Hub commit) or etag (an object store's), manifest_sha256 (of the manifest as pushed), pulled (when)). It is not part
of the cache (a push leaves it out); it says where this copy came from and whether it is up to date.
"""

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path

from kdcache.errors import KdcacheError, first_line
from kdcache.format.columns import LABELS, LOGITS, Layout, manifest_columns, upgrade_columns
from kdcache.version import __version__

FORMAT_VERSION = 5
# What the fingerprint's recipe calls its "format_version": the last format that changed what a cache's logits and
# pixels are (2 for clean caches, 3 for view caches). Format 4 changed only how the files are laid out, so a cache of
# format 2 or 3 made from the same inputs keeps its fingerprint, is up to date for a rerun, and loads as it is.
RECIPE_VERSION_CLEAN, RECIPE_VERSION_VIEWS = 2, 3
SUPPORTED_FORMAT_VERSIONS = (1, 2, 3, 4, 5)
CHUNK_CHECKSUMS_SINCE = 4  # the first format whose splits list their chunk files with checksums
MANIFEST = "kdcache.json"


class Manifest(dict):
    """A cache's manifest: its JSON (a dict), upgraded to the current shape, with the accessors the stages use."""

    # reading, writing, building

    @classmethod
    def read(cls, path: str | Path) -> "Manifest":
        """The manifest of the cache folder `path`, refused in one line when missing or unreadable (not checked
        against a format version: `check_format` does that, so that `kdcache info` can still show an old one)."""
        file = Path(path) / MANIFEST
        try:
            data = json.loads(file.read_text())
        except FileNotFoundError:
            raise KdcacheError(
                f"'{path}' is not a kdcache cache ({MANIFEST} is missing); create one with kdcache teacher-logits"
            ) from None
        except (OSError, json.JSONDecodeError) as error:
            raise KdcacheError(
                f"the manifest '{file}' cannot be read ({first_line(error)}); recreate the cache"
            ) from None
        return cls(_upgrade(data))

    def check_format(self, path) -> None:
        """Refuse a manifest that is not kdcache's, or of a format version this kdcache does not read."""
        version = self.get("format_version")
        if self.get("format") != "kdcache" or version not in SUPPORTED_FORMAT_VERSIONS:
            raise KdcacheError(
                f"cache '{path}' has format version {version!r}; this kdcache (v{__version__}) reads "
                f"{', '.join(map(str, SUPPORTED_FORMAT_VERSIONS))}: recreate it with kdcache teacher-logits"
            )

    def write(self, folder: Path) -> None:
        """Write into `folder` (atomically: a reader never sees half a manifest)."""
        partial = folder / (MANIFEST + ".tmp")
        partial.write_text(json.dumps(self, indent=2) + "\n")
        partial.replace(folder / MANIFEST)

    @classmethod
    def build(
        cls,
        *,
        recipe: dict,
        fingerprint: str,
        teacher: dict,
        dataset: dict,
        splits: dict,
        pixel_shape,
        run: dict,
        logits_dtype: str = "float32",
        top_k: int | None = None,
    ) -> "Manifest":
        """Stage one's manifest. `recipe` is what the fingerprint was taken of (kdcache.teacher.inputs.cache_recipe);
        `teacher` and `dataset` name them (name_or_path, revision, ...); `splits` gives each split's fingerprint,
        num_rows, views and chunks (file, rows, bytes, sha256 of each chunk file, in row order), and with
        --bad-images skip the source rows left out (skipped_images: row, file, reason); `run` says how the
        logits were made (precision, device, processes, versions, seconds, images_per_second). The `columns` entry
        is the columns' own (kdcache.format.columns)."""
        names = recipe["label_names"]
        return cls(
            {
                "format": "kdcache",
                "format_version": FORMAT_VERSION,
                "fingerprint": fingerprint,
                "kdcache_version": __version__,
                "created": datetime.now(UTC).isoformat(timespec="seconds"),
                "teacher": {
                    "name_or_path": teacher["name_or_path"],
                    "revision": teacher["revision"],
                    "class": recipe["teacher_class"],
                    "weights_sha256": recipe["teacher_weights_sha256"],
                    "id2label": teacher["id2label"],
                    "trust_remote_code": teacher["trust_remote_code"],
                },
                "image_processor": recipe["image_processor"],
                "dataset": {
                    "name_or_path": dataset["name_or_path"],
                    "revision": dataset["revision"],
                    "image_column": recipe["image_column"],
                    "label_column": recipe["label_column"],
                    **({"extra_images": dataset["extra_images"]} if "extra_images" in dataset else {}),
                    "splits": splits,
                },
                "label_names": names,
                "teacher_to_dataset": recipe["teacher_to_dataset"],
                "columns": manifest_columns(Layout(names, tuple(pixel_shape), logits_dtype, top_k)),
                "views": recipe["views"],
                "precision": run["precision"],
                "device": run["device"],
                "processes": run["processes"],
                "versions": run["versions"],
                "seconds": run["seconds"],
                "images_per_second": run[
                    "images_per_second"
                ],  # of all processes together, over the time of the slowest
            }
        )

    # verifying

    def verify_files(self, path, share: tuple[int, int] | None = None) -> None:
        """Refuse a cache (format 4 on) whose chunk files are not the ones stage one wrote: each split's state.json
        must list the manifest's chunk files, and each file must have its recorded size and sha256. The files are
        hashed block by block (hashlib.file_digest), so memory stays flat whatever the cache's size. Run before
        datasets reads the files, so that a damaged file is reported as such rather than as an unreadable table.
        `share` (index, count): hash only every count-th chunk file from the index-th, all splits in a row; the
        processes of a launch split the reading of a cache this way, and agree on the outcome (kdcache.runtime.agreed)
        rather than each reading all of it."""
        if self["format_version"] < CHUNK_CHECKSUMS_SINCE:
            return  # older caches have one logits checksum per split, checked by `verify`
        path = Path(path)
        fix = "the cache is damaged: recreate it with kdcache teacher-logits"
        index, count = share or (0, 1)
        position = 0
        for name, split in self.splits.items():
            try:
                state = json.loads((path / name / "state.json").read_text())
                listed = [data_file["filename"] for data_file in state["_data_files"]]
            except (OSError, ValueError, KeyError, TypeError) as error:
                raise KdcacheError(
                    f"cache '{path}' split '{name}' has no readable state.json ({first_line(error)}); {fix}"
                ) from None
            if listed != [chunk["file"] for chunk in split["chunks"]]:
                raise KdcacheError(f"cache '{path}' split '{name}' lists other files than its manifest; {fix}")
            for chunk in split["chunks"]:
                position, mine = position + 1, position % count == index
                if not mine:
                    continue
                file = path / name / chunk["file"]
                try:
                    size = file.stat().st_size
                    if size == chunk["bytes"]:
                        with open(file, "rb") as handle:
                            digest = hashlib.file_digest(handle, "sha256").hexdigest()
                except OSError as error:
                    raise KdcacheError(
                        f"cache '{path}' file '{name}/{chunk['file']}' cannot be read "
                        f"({error.strerror or error}); {fix}"
                    ) from None
                if size != chunk["bytes"] or digest != chunk["sha256"]:
                    raise KdcacheError(
                        f"cache '{path}' file '{name}/{chunk['file']}' does not match its checksum; {fix}"
                    )

    def verify(self, cache, path) -> None:
        """Refuse a loaded cache (a DatasetDict) that no longer matches this manifest: a missing split, another
        row count, other label names, and before format 4, logits that do not match their checksum (from format 4
        on, `verify_files` has checked every byte of every chunk before the cache was loaded)."""
        for name, expected in self["dataset"]["splits"].items():
            if name not in cache:
                raise KdcacheError(f"cache '{path}' lacks split '{name}' that its manifest lists; recreate it")
            if len(cache[name]) != expected["num_rows"]:
                raise KdcacheError(
                    f"cache '{path}' split '{name}' has {len(cache[name])} rows, its manifest says "
                    f"{expected['num_rows']}; the cache is damaged: recreate it"
                )
            if "logits_sha256" in expected and logits_sha256(cache[name]) != expected["logits_sha256"]:
                raise KdcacheError(
                    f"cache '{path}' split '{name}': teacher logits do not match their checksum; the "
                    "cache is damaged: recreate it"
                )
            if list(cache[name].features[LABELS].names) != self.label_names:
                raise KdcacheError(
                    f"cache '{path}' split '{name}': label names differ from the manifest's; recreate it"
                )

    # accessors

    @property
    def fingerprint(self) -> str:
        return self["fingerprint"]

    @property
    def source(self) -> dict | None:
        """Where a pulled copy came from (address, revision, etag, manifest_sha256, pulled); None for a cache made
        here."""
        return self.get("source")

    @property
    def label_names(self) -> list[str]:
        return self["label_names"]

    @property
    def teacher(self) -> dict:
        """name_or_path, revision, class, weights_sha256, id2label, trust_remote_code."""
        return self["teacher"]

    @property
    def dataset(self) -> dict:
        """name_or_path, revision, image_column, label_column, splits."""
        return self["dataset"]

    @property
    def splits(self) -> dict:
        return self["dataset"]["splits"]

    def split(self, name: str) -> dict:
        """fingerprint, num_rows, views, and chunks (format 4 on) or logits_sha256 (before) of split `name`."""
        return self["dataset"]["splits"][name]

    def labeled_rows(self, split: str) -> int:
        """How many rows of `split` have a label (caches made before unlabeled splits existed: all of them)."""
        return self.split(split).get("labeled_rows", self.split(split)["num_rows"])

    def skipped_images(self, split: str) -> list[dict]:
        """The rows of the source split that stage one left out as unreadable (--bad-images skip): each one's row in
        the source split, its file (or None) and why; the cache's rows are the others, in order."""
        return self.split(split).get("skipped_images", [])

    def views_of(self, split: str) -> int:
        """Views per image of `split` (1: the one clean view)."""
        return self.split(split)["views"]

    @property
    def teacher_to_dataset(self) -> list[int]:
        """The teacher's output index of each dataset label: the cached logits are in the dataset's label order."""
        return self["teacher_to_dataset"]

    @property
    def precision(self) -> str:
        """What the logits were computed in: fp32, or bf16/fp16 autocast."""
        return self["precision"]

    @property
    def pixel_shape(self) -> tuple[int, int, int]:
        """(3, height, width) of the teacher's input, as the clean splits store it."""
        return tuple(self["columns"]["pixel_values"]["shape"])

    @property
    def view_recipe(self):
        """The ViewRecipe of the view splits, or None for a cache without views."""
        from kdcache.data import ViewRecipe

        return ViewRecipe.from_dict(self["views"]["recipe"]) if self["views"] else None

    @property
    def logits_dtype(self) -> str:
        """How the logits are stored: float32, or float16."""
        return self["columns"]["teacher_logits"]["dtype"]

    @property
    def top_k(self) -> int | None:
        """K when the cache stores the teacher's top K logits per view (and the tail's), else None: all of them."""
        return self["columns"]["teacher_logits"]["top_k"]

    @property
    def mixed_views(self) -> bool:
        return bool(self["views"] and self["views"]["recipe"].get("mix_alpha"))


def _upgrade(data: dict) -> dict:
    """An older format's manifest in the current shape, in memory (the file and its format_version stay)."""
    data.setdefault("views", None)  # format 1: no views
    for split in data.get("dataset", {}).get("splits", {}).values():
        split.setdefault("views", 1)
    data.get("teacher", {}).setdefault("trust_remote_code", False)
    data.setdefault("processes", 1)
    if isinstance(data.get("columns"), dict):
        upgrade_columns(data["columns"])
    return data


def logits_sha256(split, block_bytes: int = 64 * 1024**2) -> str:
    """The checksum of a split's teacher logits as formats 1 to 3 record it: sha256 of the little-endian float32s of
    the whole column, in row order. Hashed `block_bytes` of rows at a time (the bytes of a row-major column are its
    blocks' bytes one after the other), so memory stays flat whatever the split's size."""
    import numpy as np

    column = split.with_format("numpy", columns=[LOGITS])
    digest = hashlib.sha256()
    if len(split) == 0:
        return digest.hexdigest()
    row_bytes = np.asarray(column[0:1][LOGITS], dtype="<f4").nbytes
    rows = max(1, block_bytes // row_bytes)
    for start in range(0, len(split), rows):
        block = np.asarray(column[start : start + rows][LOGITS], dtype="<f4")
        digest.update(np.ascontiguousarray(block).tobytes())
    return digest.hexdigest()
