"""Stage one's options: `kdcache teacher-logits` (CacheOptions) and `kdcache verify` (VerifyOptions), each field
declared once with its default and help."""

from dataclasses import dataclass

from kdcache.errors import KdcacheError
from kdcache.options.fields import (
    BAD_IMAGES,
    CACHE_PRECISIONS,
    DEVICE_HELP,
    LOGITS_DTYPES,
    finite,
    option,
    split_list,
)


@dataclass
class CacheOptions:
    """Every option of stage one besides its dataset, teacher and output, with its default: `kdcache teacher-logits`
    and `teacher_logits(dataset, teacher, output=..., **options)` both build one, and `check` refuses a bad one.
    The fingerprint of a cache is taken of what these options produce (kdcache.teacher.run), not of the options."""

    splits: list[str] | None = option(
        None, "Comma-separated splits to cache.", show_default="all", type=str, parse=split_list
    )  # None: all of the dataset's
    # images without labels added as a split of the cache (kdcache.labels): a hub id, a save_to_disk folder, or a
    # folder of image files; the split of it to read (None: its only one, or train); the cache's name for it
    extra_images: str | None = option(
        None,
        "Images without labels to cache beside the dataset's splits, as the split --extra-split: a hub dataset id, a "
        "save_to_disk folder, or a folder of image files. train-student then teaches them by the teacher alone.",
        metavar="SOURCE",
    )
    extra_images_split: str | None = option(
        None, "The split of --extra-images to read.", show_default="its only split, or train"
    )
    extra_split: str = option("unlabeled", "The cache's name for the split of --extra-images.")
    batch_size: int = option(32, "Images per teacher forward pass.")
    device: str = option("auto", DEVICE_HELP)
    precision: str = option("fp32", "fp32, or on CUDA bf16/fp16 autocast (recorded in the manifest).")
    revision: str | None = option(None, "Teacher revision (branch, tag or commit) on the hub.")
    dataset_revision: str | None = option(None, "Dataset revision on the hub.")
    image_column: str | None = option(None, "Image column.", show_default="image or img")
    label_column: str | None = option(
        None,
        "Label column: a ClassLabel, or class names as text (numbered in sorted order). A split without it, and a row "
        "whose label is -1 (or an empty name), holds images without labels.",
        show_default="labels or label",
    )
    trust_remote_code: bool = option(False, "Allow a teacher whose repository ships its own model code.")
    match_labels_by_index: bool = option(
        False, "Trust that the teacher's outputs follow the dataset's label order even though the names differ."
    )
    views: int = option(
        1,
        "Augmented views per training image (random resized crop + flip), each with the teacher's logits on exactly "
        "that view; 1 = the one clean view. Costs K teacher passes per image.",
    )
    view_splits: list[str] | None = option(
        None,  # None: train, when views > 1
        "Comma-separated splits that get --views; the others keep one clean view.",
        show_default="train and --extra-split",
        type=str,
        parse=split_list,
    )
    view_scale: tuple[float, float] = option(
        (0.25, 1.0),
        "Smallest crop area of a view, as a fraction of the image (the largest is 1).",
        type=float,
        parse=lambda smallest: (smallest, 1.0),
        cli_default=lambda scale: scale[0],
    )
    view_seed: int = option(0, "Seed of the views (a row's views depend on it and the row alone).")
    mix_alpha: float = option(
        0.0,
        "Mix every view with a view of another image (mixup, weight ~ Beta(a, a) folded to >= 0.5) and store the "
        "teacher's logits on the mixed image: 'function matching'. 0 = no mixing; 1 = uniform weights.",
    )
    source_size: int | None = option(
        None,  # None: 8/7 of the teacher's input; 0: the whole image
        "With --views: the shorter side the source image is reduced to once, stored as raw pixels that both stages "
        "render views from; 0 keeps it whole.",
        show_default="8/7 of the teacher's input (256 for 224)",
    )
    logits_dtype: str = option(
        "fp32",
        "How the logits are stored: fp32, or fp16 (half the bytes; the soft targets move by a KL of 2e-8 at T=5 on a "
        "100-class teacher).",
    )
    top_k: int | None = option(
        None,  # None: every logit; K: the K largest and the tail (kdcache.format.codec)
        "Store only the teacher's K largest logits per image (with their classes) and one logit for the other "
        "classes' share, spread evenly over them: for teachers of thousands of classes. On a 100-class teacher at "
        "T=5, top 10 moved the soft targets by a KL of 0.047 and trained students as good as full logits did; top 1 "
        "did not (BENCHMARKS.md, 'Compact logits').",
        show_default="every class",
    )
    # what stage one does with an image it cannot decode, or an empty file (kdcache.teacher.images)
    bad_images: str = option(
        "fail",
        "What to do with an unreadable or empty image: fail (stop, naming it) or skip (leave it out of the cache, "
        "listed in the manifest and by kdcache info).",
    )
    max_bad_share: float = option(
        0.05,
        "With --bad-images skip: the largest share of a split's images that may be left out; more refuses the run "
        "(so many bad files is more likely a wrong folder or format than stray damage).",
    )
    overwrite: bool = option(False, "Replace an existing cache made from other inputs.", in_config=False)
    num_workers: int | None = option(
        None,
        "Processes decoding images ahead of the teacher (per process).",
        show_default="1 on CPU (0 when a process has 1 core), up to 8 on CUDA",
    )
    chunk_size: int = option(512, "Rows per chunk: the unit of resuming, and one file of the cache.")

    @property
    def stored_dtype(self) -> str:
        """The logits' dtype in the cache's files (and manifest): float32 or float16."""
        return "float16" if self.logits_dtype == "fp16" else "float32"

    def check(self) -> None:
        """Every option that can be wrong on its own, each refused with one line naming the fix (the view settings'
        ranges: by kdcache.data.ViewRecipe, once the views are made)."""
        for flag, value in (("--batch-size", self.batch_size), ("--chunk-size", self.chunk_size)):
            if value < 1:
                raise KdcacheError(f"{flag} {value} must be at least 1")
        if self.views < 1:
            raise KdcacheError(f"--views {self.views} must be at least 1 (1: the one clean view of each image)")
        if self.precision not in CACHE_PRECISIONS:
            raise KdcacheError(f"--precision '{self.precision}' is not one of {', '.join(CACHE_PRECISIONS)}")
        if self.num_workers is not None and self.num_workers < 0:
            raise KdcacheError(f"--num-workers {self.num_workers} must be >= 0")
        if self.logits_dtype not in LOGITS_DTYPES:
            raise KdcacheError(f"--logits-dtype '{self.logits_dtype}' is not one of {', '.join(LOGITS_DTYPES)}")
        if self.top_k is not None and self.top_k < 1:
            raise KdcacheError(f"--top-k {self.top_k} must be at least 1 (leave it out to store every class's logit)")
        if self.view_seed < 0:
            raise KdcacheError(f"--view-seed {self.view_seed} must be >= 0")
        if not (finite(self.mix_alpha) and self.mix_alpha >= 0):
            raise KdcacheError(f"--mix-alpha {self.mix_alpha} must be >= 0 (0: no mixing)")
        if self.bad_images not in BAD_IMAGES:
            raise KdcacheError(f"--bad-images '{self.bad_images}' is not one of {', '.join(BAD_IMAGES)}")
        if not (finite(self.max_bad_share) and 0 <= self.max_bad_share <= 1):
            raise KdcacheError(f"--max-bad-share {self.max_bad_share} must be a share from 0 to 1 (0.05: 5%)")


@dataclass
class VerifyOptions:
    """The options of `kdcache verify` and `verify_teacher_logits(cache, **options)` (kdcache.teacher.verify)."""

    sample: int = option(64, "Random (row, view) pairs rechecked per split.")
    tolerance: float | None = option(
        None,  # None: by the cache's precision (kdcache.teacher.verify.DEFAULT_TOLERANCE)
        "Largest |logit difference| that passes; above it the command exits with status 1.",
        show_default="1e-3 for an fp32 cache, 2e-2 fp16, 1e-1 bf16",
    )
    seed: int = option(0, "Seed of the sample.")
    teacher: str | None = option(
        None,
        "Load the cache's teacher from here instead (a local copy of a hub teacher, offline); its weights must match "
        "the cache's.",
        show_default="the one recorded in the cache",
    )
    device: str = option("auto", DEVICE_HELP)
    batch_size: int = option(32, "Inputs per teacher forward pass.")

    def check(self) -> None:
        if self.sample < 1:
            raise KdcacheError(f"--sample {self.sample} must be at least 1")
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size {self.batch_size} must be at least 1")
        if self.tolerance is not None and not self.tolerance >= 0:
            raise KdcacheError(f"--tolerance {self.tolerance} must be >= 0 (a largest absolute logit difference)")
