"""The columns of a cache's splits, declared once (COLUMNS): each column's name, what it holds, in which splits and
with which datasets feature (its Arrow type) stage one writes it, what the manifest and `kdcache info` say of it,
what the fingerprint records of how it is stored, and what older caches' manifests lack of it.

Everything that knows the columns reads them here: stage one's chunk schema (`split_features`), the manifest's
`columns` (`manifest_columns`, `upgrade_columns`), the fingerprint (`storage_recipe`), `kdcache info`
(`info_lines`), and the readers that serve the teacher's outputs on each view (`teacher_outputs`: stage two's rows,
verify, ensembles). A new column is one Column here, its writer in stage one and its consumer; docs/cache-format.md
says how.
"""

from collections.abc import Callable
from dataclasses import dataclass

from kdcache.format.codec import index_dtype

ROW, LABELS, LOGITS, PIXELS = "row_index", "labels", "teacher_logits", "pixel_values"
LOGIT_INDICES, LOGIT_TAIL = "teacher_logits_indices", "teacher_logits_tail"  # a top-K cache's (format 5)
LOGIT_COLUMNS = (LOGITS, LOGIT_INDICES, LOGIT_TAIL)  # what float32 logits are rebuilt from (kdcache.format.codec)
VIEWS, IMAGE = "views", "image"
SOURCE, SOURCE_SHAPE = "source", "source_shape"
MIX_PARTNERS, MIX_VIEWS, MIX_WEIGHTS = "mix_partners", "mix_views", "mix_weights"


@dataclass(frozen=True)
class Layout:
    """What a cache's columns and their types depend on: its classes, the teacher's input, how the logits are stored,
    and for one split, its views per image (1: the one clean view) and whether they are mixed."""

    label_names: list[str]
    pixel_shape: tuple[int, int, int]
    logits_dtype: str = "float32"  # as stored: float32 or float16
    top_k: int | None = None
    views: int = 1
    mixed: bool = False


@dataclass(frozen=True)
class Column:
    """One column of a cache's splits. `stored` and `feature` take a split's Layout; `manifest_entry` the cache's
    (its views are not the entry's business); `info` and `upgrade` the manifest, `recipe` stage one's CacheOptions."""

    name: str
    holds: str  # what it holds, as docs/cache-format.md's table says it
    stored: Callable[[Layout], bool]  # whether stage one writes it in a split of that layout
    feature: Callable[[Layout], object]  # its datasets feature there
    # The teacher's output on each view: stage two serves view k's with view k (ViewRows, the collator), verify
    # reads it with each (row, view) it reruns, and an ensemble drops it with the logits it replaces.
    teacher_output: bool = False
    manifest_entry: Callable[[Layout], object] | None = None  # None: another column's entry describes it
    manifest_key: str | None = None  # its entry's key in the manifest's `columns`, when not its name
    info: Callable[[dict], tuple[str, str]] | None = None  # its line in `kdcache info`: title, text
    # What the fingerprint records of how it is stored, beyond the inputs (nothing for a layout older than the
    # option: such caches keep their fingerprints). A new column that every new cache has must record something,
    # or stage one would call a cache made before it up to date.
    recipe: Callable[[object], dict] = lambda options: {}
    upgrade: Callable[[dict], None] | None = None  # fills in what older manifests' `columns` lack of it

    @property
    def key(self) -> str:
        return self.manifest_key or self.name


def per_view(layout: Layout, dtype: str, length: int | None = None):
    """The feature of one value (`length` None) or a vector of `length` values per view: as it is in a split of one
    clean view, with a leading axis of the views in a view split."""
    import datasets

    if layout.views == 1:
        return datasets.Value(dtype) if length is None else datasets.List(datasets.Value(dtype), length=length)
    if length is None:
        return datasets.List(datasets.Value(dtype), length=layout.views)
    return datasets.Array2D(shape=(layout.views, length), dtype=dtype)


# Where a column is written (its `stored`).
def every_split(layout: Layout) -> bool:
    return True


def clean_splits(layout: Layout) -> bool:
    return layout.views == 1


def view_splits(layout: Layout) -> bool:
    return layout.views > 1


def mixed_view_splits(layout: Layout) -> bool:
    return layout.views > 1 and layout.mixed


def top_k_caches(layout: Layout) -> bool:
    return bool(layout.top_k)


def older_caches(layout: Layout) -> bool:
    """Not written any more: only caches of an older format have it."""
    return False


def _value(dtype: str):
    import datasets

    return datasets.Value(dtype)


def _class_label(layout: Layout):
    import datasets

    return datasets.ClassLabel(names=list(layout.label_names))


def _logits_per_view(layout: Layout) -> int:
    return layout.top_k or len(layout.label_names)


def _index_dtype(layout: Layout) -> str:
    return str(index_dtype(len(layout.label_names))).removeprefix("torch.")


def _image_file(layout: Layout):
    import datasets

    return datasets.Image()


def _pixels(layout: Layout):
    import datasets

    return datasets.Array3D(shape=tuple(layout.pixel_shape), dtype="uint8")


def _source_shape(layout: Layout):
    import datasets

    return datasets.List(datasets.Value("int32"), length=3)


def _logits_entry(layout: Layout) -> dict:
    return {
        "name": LOGITS,
        "dtype": layout.logits_dtype,
        "length": len(layout.label_names),
        "order": "dataset labels",
        "per_view_shape": "(views, classes) in view splits",
        "top_k": layout.top_k,
        "indices": LOGIT_INDICES,
        "tail": LOGIT_TAIL,
        "compact": "with top_k=K, teacher_logits holds the K largest logits (descending), teacher_logits_indices "
        "their classes, and teacher_logits_tail the log-mean-exp of the other logits, the logit of every other class",
    }


def _logits_info(manifest) -> tuple[str, str]:
    compact = (
        f", the top {manifest.top_k} of {len(manifest.label_names)} classes per view (+ one logit for the others)"
        if manifest.top_k
        else ""
    )
    processes = f" ({manifest['processes']} processes)" if manifest.get("processes", 1) > 1 else ""
    return (
        "logits",
        f"{manifest.logits_dtype}{compact}, computed in {manifest['precision']} on {manifest['device']}{processes}",
    )


def _logits_recipe(options) -> dict:
    """How compact logits are stored, for the fingerprint: nothing for float32 logits of every class, so that a cache
    of those keeps the fingerprint it had before compact logits existed."""
    if options.logits_dtype == "fp32" and options.top_k is None:
        return {}
    return {"stored_logits": {"dtype": options.logits_dtype, "top_k": options.top_k}}


def _pixels_info(manifest) -> tuple[str, str]:
    pixels = manifest["columns"][PIXELS]
    return "student input", f"{pixels['dtype']} {pixels['shape']}"


# In the order of a split's columns in its Arrow files (chunks written by an older kdcache are resumed beside new
# ones, so the order stays); the manifest's `columns` describes them in this order too.
COLUMNS = (
    Column(
        ROW, "the row in the source split", every_split, lambda layout: _value("int64"), manifest_entry=lambda _: ROW
    ),
    Column(
        LABELS,
        "the dataset's label, with its names (-1: an image without a label)",
        every_split,
        _class_label,
        manifest_entry=lambda _: LABELS,
    ),
    Column(
        LOGITS,
        "the teacher's raw logits (not softened), in the dataset's label order: every class's, or the K largest",
        every_split,
        lambda layout: per_view(layout, layout.logits_dtype, _logits_per_view(layout)),
        teacher_output=True,
        manifest_entry=_logits_entry,
        info=_logits_info,
        recipe=_logits_recipe,
        # formats 1 to 4 stored every logit, and their manifests say nothing of top K
        upgrade=lambda columns: columns.get(LOGITS, {}).setdefault("top_k", None),
    ),
    Column(
        LOGIT_INDICES,
        "a top-K cache's: the classes of the K logits, int16 (int32 past 32,767 classes)",
        top_k_caches,
        lambda layout: per_view(layout, _index_dtype(layout), layout.top_k),
        teacher_output=True,
    ),
    Column(
        LOGIT_TAIL,
        "a top-K cache's: the log-mean-exp of the other logits, the logit of every other class",
        top_k_caches,
        lambda layout: per_view(layout, "float32"),
        teacher_output=True,
    ),
    Column(
        VIEWS,
        "each view's box and flip: x0, y0, x1, y1, flip",
        view_splits,
        lambda layout: per_view(layout, "int32", 5),
        manifest_entry=lambda _: {
            "name": VIEWS,
            "dtype": "int32",
            "fields": ["x0", "y0", "x1", "y1", "flip"],
            "splits": "with views",
        },
    ),
    Column(
        SOURCE,
        "the source image's raw RGB bytes, its shorter side reduced to --source-size",
        view_splits,
        lambda layout: _value("binary"),
        manifest_entry=lambda _: {
            "name": SOURCE,
            "dtype": "binary",
            "shape_column": SOURCE_SHAPE,
            "splits": "with views: the source image's raw RGB bytes (height, width, 3), reduced to the "
            "recipe's source_size, to rebuild each view",
        },
    ),
    Column(SOURCE_SHAPE, "the source's height, width, 3", view_splits, _source_shape),
    Column(IMAGE, "format 2's view splits: the source image's file, in place of source", older_caches, _image_file),
    Column(
        MIX_PARTNERS,
        "the other row each view is mixed with",
        mixed_view_splits,
        lambda layout: per_view(layout, "int32"),
        manifest_key="mix",
        manifest_entry=lambda _: {
            "partners": MIX_PARTNERS,
            "views": MIX_VIEWS,
            "weights": MIX_WEIGHTS,
            "splits": "with mixed views: the partner row, its view, and the weight of the row's own view",
        },
    ),
    Column(
        MIX_VIEWS,
        "that row's view: x0, y0, x1, y1, flip",
        mixed_view_splits,
        lambda layout: per_view(layout, "int32", 5),
    ),
    Column(
        MIX_WEIGHTS, "the weight of the row's own view", mixed_view_splits, lambda layout: per_view(layout, "float32")
    ),
    Column(
        PIXELS,
        "the teacher's resized and cropped view of the image: the student's input",
        clean_splits,
        _pixels,
        manifest_entry=lambda layout: {
            "name": PIXELS,
            "dtype": "uint8",
            "shape": list(layout.pixel_shape),
            "splits": "without views",
        },
        info=_pixels_info,
    ),
)


def split_features(layout: Layout):
    """The datasets Features of a split of `layout`, as stage one writes its chunks and describes the split: the
    columns stored there, in the order of COLUMNS."""
    import datasets

    return datasets.Features({column.name: column.feature(layout) for column in COLUMNS if column.stored(layout)})


def manifest_columns(layout: Layout) -> dict:
    """The manifest's `columns`: each column's entry, for a cache of `layout` (the entries hold for every split, so
    they do not depend on its views)."""
    return {column.key: column.manifest_entry(layout) for column in COLUMNS if column.manifest_entry}


def upgrade_columns(columns: dict) -> None:
    """Fill in, in memory, what an older format's manifest `columns` lacks."""
    for column in COLUMNS:
        if column.upgrade:
            column.upgrade(columns)


def storage_recipe(options) -> dict:
    """What the fingerprint records of how the columns are stored (stage one's CacheOptions), beyond the inputs."""
    recipe = {}
    for column in COLUMNS:
        recipe.update(column.recipe(options))
    return recipe


def info_lines(manifest) -> list[tuple[str, str]]:
    """`kdcache info`'s lines of the columns the cache's manifest describes: (title, text) each."""
    described = manifest.get("columns", {})
    return [column.info(manifest) for column in COLUMNS if column.info and described.get(column.key) is not None]


def teacher_outputs(names) -> list[str]:
    """Of `names` (a split's columns, or a row's keys), those that hold the teacher's outputs on each view."""
    return [column.name for column in COLUMNS if column.teacher_output and column.name in names]
