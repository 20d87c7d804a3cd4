"""Datasets in, model inputs out: loading from the hub or a local path, finding the columns, and the
teacher's preprocessing split into an 8-bit geometric part (cached once) and a per-pixel part (a lookup table)."""

import json
import logging
import os
import re
from pathlib import Path

import numpy as np
import torch

from kdcache.errors import DataError, KdcacheError, first_line, hub_error

log = logging.getLogger("kdcache")

IMAGE_COLUMNS = ("image", "img")
LABEL_COLUMNS = ("labels", "label")


def load_image_dataset(name_or_path: str, revision: str | None = None, label_column: str | None = None):
    """A DatasetDict from a hub id or a local folder (save_to_disk output, parquet files with a card, image folder),
    its label column (`label_column`, else one of LABEL_COLUMNS) a ClassLabel even where the files hold names."""
    import datasets

    path = Path(name_or_path).expanduser()
    try:
        if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
            loaded = _load_from_disk(path)
        elif path.is_dir():
            loaded = datasets.load_dataset(str(path))
        elif path.exists():
            raise KdcacheError(f"--dataset '{name_or_path}' is a file; pass a dataset folder or a hub id")
        else:
            loaded = datasets.load_dataset(name_or_path, revision=revision)
    except KdcacheError:
        raise
    except Exception as error:  # the hub and the builders raise many types; the user needs one message
        empty = re.search(r'Instruction "([^"]+)" corresponds to no data', str(error))
        if empty:
            raise KdcacheError(
                f"split '{empty.group(1)}' of dataset '{name_or_path}' is empty; remove its files or add rows to it"
            ) from None
        if path.exists():
            raise KdcacheError(
                f"could not read a dataset from the folder '{name_or_path}' ({type(error).__name__}: {first_line(error)}); "
                "pass a folder written by save_to_disk, a folder of parquet files, or an image folder"
            ) from None
        raise KdcacheError(
            f"could not load dataset '{name_or_path}' from the hub (no network, or no such dataset) and there is no "
            f"local folder of that name; pass a local path with --dataset"
        ) from None
    if isinstance(loaded, datasets.Dataset):
        loaded = datasets.DatasetDict({"train": loaded})
    if not isinstance(loaded, datasets.DatasetDict):
        raise KdcacheError(f"--dataset '{name_or_path}' did not load as a dataset with splits")
    return encode_label_names(loaded, label_column)


def encode_label_names(dataset_dict, label_column: str | None = None):
    """The label column as a ClassLabel where a dataset holds it as text (an image folder's metadata.csv, a CSV or
    JSON dataset): its names sorted over every split, as `datasets`' class_encode_column names them, so that each
    stage and split that loads the dataset numbers the classes alike; an empty name is a row without a label (-1)."""
    import datasets

    def is_text(feature) -> bool:
        return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")

    candidates = [label_column] if label_column else list(LABEL_COLUMNS)
    present = [name for name in candidates if any(name in split.features for split in dataset_dict.values())]
    if not present or not any(is_text(split.features.get(present[0])) for split in dataset_dict.values()):
        return dataset_dict
    column = present[0]
    texts = {name: list(split[column]) for name, split in dataset_dict.items() if is_text(split.features.get(column))}
    names = sorted({value for values in texts.values() for value in values if value})
    index = {name: position for position, name in enumerate(names)}
    feature = datasets.ClassLabel(names=names)
    encoded = dict(dataset_dict)
    for name, values in texts.items():
        numbers = [index[value] if value else -1 for value in values]
        encoded[name] = dataset_dict[name].remove_columns(column).add_column(column, numbers, feature=feature)
    return datasets.DatasetDict(encoded)


def _load_from_disk(path: Path):
    """`datasets.load_from_disk`, except that a split saved with no rows loads as an empty split.

    save_to_disk writes an empty split as no data file at all, and load_from_disk then fails on the whole folder with
    an IndexError that names nothing; loaded empty, the split is named by the checks of the stage that uses it, and the
    other splits stay usable.
    """
    import datasets

    def empty(folder: Path) -> bool:
        state = folder / "state.json"
        return state.exists() and json.loads(state.read_text()).get("_data_files") == []

    def load(folder: Path):
        if not empty(folder):
            return datasets.load_from_disk(str(folder))
        info = datasets.DatasetInfo.from_directory(str(folder))
        return datasets.Dataset.from_dict({name: [] for name in info.features}, features=info.features, info=info)

    if not (path / "dataset_dict.json").exists():
        return load(path)
    names = json.loads((path / "dataset_dict.json").read_text())["splits"]
    if not any(empty(path / name) for name in names):
        return datasets.load_from_disk(str(path))
    return datasets.DatasetDict({name: load(path / name) for name in names})


def find_label_column(splits: dict, label_column: str | None = None) -> str | None:
    """The label column of a dataset's splits (`splits`: name -> Dataset), or None when none has one: the column
    given, or found by name or type in the first split that has one. A split without it holds images nobody labelled
    (as does a row whose label is -1, the `datasets` convention). A column given that no split has is refused."""
    import datasets

    if label_column is not None:
        if not any(label_column in split.features for split in splits.values()):
            columns = ", ".join(next(iter(splits.values())).features)
            raise KdcacheError(f"--label-column '{label_column}' is not a column of the dataset (columns: {columns})")
    else:
        found = [_find(split.features, LABEL_COLUMNS, datasets.ClassLabel) for split in splits.values()]
        label_column = next((name for name in found if name is not None), None)
    for split in splits.values():
        feature = split.features.get(label_column) if label_column else None
        if feature is not None and not isinstance(feature, datasets.ClassLabel):
            raise KdcacheError(
                f"label column '{label_column}' has no class names ({feature}); "
                "cast it with dataset.class_encode_column or cast_column(ClassLabel(names=...)) first"
            )
    return label_column


def warn_of_unfound_labels(splits: dict, label_column: str | None) -> None:
    """Warn when splits without a label column have integer columns that may be their labels under another name (a
    CSV's `target`): their rows would be cached without labels, and a student taught by the teacher alone."""
    import datasets

    unlabelled = [name for name, split in splits.items() if label_column not in split.features]
    columns = sorted(
        {
            column
            for name in unlabelled
            for column, feature in splits[name].features.items()
            if isinstance(feature, datasets.ClassLabel)
            or (isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint")))
        }
    )
    if columns:
        several = len(unlabelled) > 1
        log.warning(
            f"split{'s' if several else ''} {', '.join(map(repr, unlabelled))} {'have' if several else 'has'} no label "
            f"column (none given, and no ClassLabel named {' or '.join(LABEL_COLUMNS)}), so {'their' if several else 'its'}"
            f" rows are cached without labels (-1); the integer column{'s' if len(columns) > 1 else ''} "
            f"{', '.join(map(repr, columns))} may hold them: pass --label-column NAME, once a plain integer column is "
            "cast to ClassLabel(names=[...]) (dataset.cast_column): the ClassLabel's names become the cache's label "
            "names, and the teacher's outputs are matched to them by name (its id2label)"
        )


def find_image_column(split, image_column: str | None = None, flag: str = "--image-column") -> str:
    """The image column of a split: given, or found by name (image/img) or type."""
    import datasets

    features = split.features
    columns = ", ".join(features)
    image_column = image_column or _find(features, IMAGE_COLUMNS, datasets.Image)
    if image_column is None:
        raise KdcacheError(
            f"no image column found (looked for {'/'.join(IMAGE_COLUMNS)}; columns: {columns}); pass {flag}"
        )
    if image_column not in features:
        raise KdcacheError(f"{flag} '{image_column}' is not a column of the dataset (columns: {columns})")
    if not isinstance(features[image_column], datasets.Image):
        raise KdcacheError(f"column '{image_column}' holds {features[image_column]}, not images; pass {flag}")
    return image_column


def labeled_rows(split, label_column: str | None) -> int:
    """How many rows of a split have a label (none without a label column; -1 marks a row without one)."""
    if label_column is None or label_column not in split.features:
        return 0
    labels = split.select_columns([label_column]).with_format("numpy")[label_column]
    return int((np.asarray(labels) >= 0).sum())


def load_extra_images(source: str, split: str | None, image_column: str):
    """The images of `source` (a hub id, a save_to_disk folder, or a folder of image files) as a Dataset with the one
    column `image_column`: a split of images without labels, added to a cache by --extra-images. Its labels, if it
    has any, are not read: extra images are taught by the teacher alone."""
    import datasets

    try:
        loaded = load_image_dataset(source)
    except KdcacheError as error:
        raise KdcacheError(str(error).replace("--dataset", "--extra-images")) from None
    if split is None:
        if len(loaded) != 1 and "train" not in loaded:
            raise KdcacheError(
                f"--extra-images '{source}' has splits {', '.join(loaded)}; name one with --extra-images-split"
            )
        split = next(iter(loaded)) if len(loaded) == 1 else "train"
    if split not in loaded:
        raise KdcacheError(
            f"--extra-images-split '{split}' is not a split of '{source}' (splits: {', '.join(loaded)})"
        )
    rows = loaded[split]
    if len(rows) == 0:
        raise KdcacheError(f"--extra-images '{source}' split '{split}' has no rows; give a source with images")
    column = find_image_column(rows, None, flag="--extra-images (a dataset with one image column)")
    rows = rows.select_columns([column])
    if column != image_column:
        rows = rows.rename_column(column, image_column)
    return rows.cast_column(image_column, datasets.Image())


def _find(features, names, feature_type):
    for name in names:
        if name in features:
            return name
    typed = [name for name, feature in features.items() if isinstance(feature, feature_type)]
    return typed[0] if len(typed) == 1 else None


def label_names(split, label_column: str) -> list[str]:
    return list(split.features[label_column].names)


class UnreadableImage(DataError):
    """An image that does not decode: its split, its row, its file's name when the dataset knows one, and why."""

    def __init__(self, split_name: str, row: int, file: str | None, reason: str):
        self.split_name, self.row, self.file, self.reason = split_name, row, file, reason
        self.where = f"unreadable image in split '{split_name}', row {row}" + (f" ('{file}')" if file else "")
        self.where += f" ({reason})"
        super().__init__(f"{self.where}; fix or remove that row")


def decode_image(value, split_name: str = "", row: int = 0):
    """One undecoded image (datasets' {"bytes", "path"}) as an RGB PIL image; an empty or unreadable one raises
    UnreadableImage."""
    import datasets

    if value is None:
        raise UnreadableImage(split_name, row, None, "the row holds no image")
    file = value.get("path")  # a file's name, also beside bytes stored in the dataset
    try:
        if is_empty_image(value):
            raise UnreadableImage(split_name, row, file, "empty file")
        return datasets.Image().decode_example(value).convert("RGB")
    except UnreadableImage:
        raise
    except Exception as error:
        raise UnreadableImage(split_name, row, file, f"{type(error).__name__}: {first_line(error)}") from None


def is_empty_image(value) -> bool:
    """Whether an undecoded image holds no byte: empty bytes in the dataset, or an empty file (a missing one raises
    OSError)."""
    data = value.get("bytes")
    return len(data) == 0 if data is not None else os.path.getsize(value["path"]) == 0


def decode_images(split, image_column: str, rows: list[int], split_name: str) -> list:
    """Decode rows of an image column (stored undecoded) to RGB PIL images; a bad row is named in the error."""
    values = split[rows][image_column] if rows else []
    return [decode_image(value, split_name, row) for row, value in zip(rows, values)]


def undecoded(split, image_column: str):
    """The split with its image column left as bytes, so that decoding happens where errors can name the row."""
    import datasets

    return split.cast_column(image_column, datasets.Image(decode=False))


class ImagePipeline:
    """A teacher's image processor, split in two exact halves.

    The processor's geometry (resize, crop) yields 8-bit pixels: those are cached once, as uint8. Its rescale and
    normalize act on each pixel value alone, so they become a (channels, 256) lookup table built by calling the
    processor's own methods; applying it per batch reproduces `processor(images)` bit for bit.
    """

    def __init__(self, processor):
        self.processor = processor
        ramp = np.tile(np.arange(256, dtype=np.uint8), (3, 1, 1))
        values = ramp
        if getattr(processor, "do_rescale", False):
            values = processor.rescale(values, processor.rescale_factor)
        if getattr(processor, "do_normalize", False):
            values = processor.normalize(values.astype(np.float32), processor.image_mean, processor.image_std)
        self.lut = torch.from_numpy(np.ascontiguousarray(values[:, 0, :], dtype=np.float32))

    def pixels(self, images: list) -> np.ndarray:
        """8-bit (batch, 3, H, W) pixels after the processor's resize and crop."""
        out = self.processor(images, do_rescale=False, do_normalize=False, return_tensors="np")["pixel_values"]
        if out.dtype != np.uint8:
            if not np.array_equal(out, np.clip(np.round(out), 0, 255)):
                raise KdcacheError(
                    f"the image processor {type(self.processor).__name__} does not produce 8-bit pixels before "
                    "rescaling; kdcache supports processors whose resize/crop output is 8-bit (PIL backend)"
                )
            out = out.astype(np.uint8)
        if out.ndim != 4 or out.shape[1] != 3:
            raise KdcacheError(f"the image processor produced pixels of shape {out.shape}; expected (batch, 3, H, W)")
        return out

    def normalize(self, pixels: torch.Tensor) -> torch.Tensor:
        """float32 model input from 8-bit pixels, identical to the processor's full output."""
        out = torch.empty(pixels.shape, dtype=torch.float32)
        for channel in range(3):  # one 1-D gather per channel: twice as fast as one broadcast gather over all three
            out[:, channel] = self.lut[channel][pixels[:, channel].long()]
        return out

    def mix(self, pixels: torch.Tensor, partner_pixels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """float32 model input of mixed views: weight * input(view) + (1 - weight) * input(partner's view).
        Both stages call this on CPU, element by element, so the student's mixed input is the teacher's bit for bit."""
        weights = weights.to(torch.float32).view(-1, 1, 1, 1)
        return self.normalize(pixels) * weights + self.normalize(partner_pixels) * (1 - weights)

    def inputs(self, pixels, partner_pixels=None, weights=None) -> torch.Tensor:
        """float32 model input of 8-bit views (numpy or torch): mixed with their partners' when there are any."""
        pixels = torch.as_tensor(pixels)
        if partner_pixels is None:
            return self.normalize(pixels)
        return self.mix(pixels, torch.as_tensor(partner_pixels), torch.as_tensor(weights))

    def __call__(self, images: list) -> torch.Tensor:
        return self.normalize(torch.from_numpy(self.pixels(images)))


class ViewRecipe:
    """Augmented views of an image for the teacher and the student alike: a random resized crop (the box sampled as
    torchvision's RandomResizedCrop does) and a horizontal flip, resized to the teacher's input size; optionally
    mixed with a view of another image (mixup), the teacher then seeing the mixed image ("function matching",
    Beyer et al., CVPR 2022).

    A view is fully described by five integers (x0, y0, x1, y1, flip), stored in the cache beside the teacher's
    logits on it; `render` rebuilds the very same pixels from the image and those integers in stage two, at the
    teacher's size or at the student's (the same box, so the student is taught on what the teacher saw). A mixed
    view adds the partner row, the partner's view and the weight of the first image, all drawn from (seed, row).
    The views of a row depend on (seed, row) alone, not on batching, chunking or the number of processes.

    source_size: the shorter side the source image is reduced to, once, in stage one (None: kept as it is). Boxes
    are drawn on the reduced image, and both stages render from it, so teaching stays exact; rendering from raw
    8-bit pixels of that size costs a fraction of decoding and resizing the original every epoch (BENCHMARKS.md).
    """

    def __init__(
        self,
        size,
        resample,
        scale=(0.25, 1.0),
        ratio=(3 / 4, 4 / 3),
        flip=0.5,
        seed=0,
        source_size=None,
        mix_alpha=0.0,
    ):
        self.size = (int(size[0]), int(size[1]))  # (height, width)
        self.resample = int(resample)
        self.scale, self.ratio = (float(scale[0]), float(scale[1])), (float(ratio[0]), float(ratio[1]))
        self.flip, self.seed = float(flip), int(seed)
        self.source_size = int(source_size) if source_size else None
        self.mix_alpha = float(mix_alpha)
        if not (
            0 < self.scale[0] <= self.scale[1] <= 1 and 0 < self.ratio[0] <= self.ratio[1] and 0 <= self.flip <= 1
        ):
            raise KdcacheError(f"view settings out of range: scale {self.scale}, ratio {self.ratio}, flip {self.flip}")
        if self.mix_alpha < 0 or (self.source_size is not None and self.source_size < 8):
            raise KdcacheError(
                f"view settings out of range: mix alpha {self.mix_alpha} (>= 0), source size "
                f"{self.source_size} (at least 8, or 0 to keep the source as it is)"
            )

    @property
    def mixed(self) -> bool:
        return self.mix_alpha > 0

    def to_dict(self) -> dict:
        recipe = {
            "kind": "random-resized-crop+hflip",
            "size": list(self.size),
            "resample": self.resample,
            "scale": list(self.scale),
            "ratio": list(self.ratio),
            "flip": self.flip,
            "seed": self.seed,
        }
        if self.source_size or self.mixed:  # format 3's fields; a format 2 recipe reads back without them
            recipe.update(source_size=self.source_size, mix_alpha=self.mix_alpha)
        return recipe

    @classmethod
    def from_dict(cls, recipe: dict) -> "ViewRecipe":
        return cls(
            recipe["size"],
            recipe["resample"],
            recipe["scale"],
            recipe["ratio"],
            recipe["flip"],
            recipe["seed"],
            recipe.get("source_size"),
            recipe.get("mix_alpha", 0.0),
        )

    def reduce(self, image):
        """The source image as both stages render from it: its shorter side brought down to source_size."""
        if self.source_size is None or min(image.size) <= self.source_size:
            return image
        scale = self.source_size / min(image.size)
        width, height = (max(1, round(side * scale)) for side in image.size)
        return image.resize((width, height), self.resample)

    def sample(self, width: int, height: int, key, count: int) -> np.ndarray:
        """`count` views of a width x height image as an int32 (count, 5) array; `key` seeds them (e.g. the row)."""
        rng = np.random.default_rng([self.seed, *np.atleast_1d(key).tolist()])
        area = width * height
        log_ratio = np.log(self.ratio)
        views = np.zeros((count, 5), dtype=np.int32)
        for index in range(count):
            for _ in range(10):
                target = area * rng.uniform(*self.scale)
                aspect = np.exp(rng.uniform(*log_ratio))
                w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
                if 0 < w <= width and 0 < h <= height:
                    x0, y0 = int(rng.integers(0, width - w + 1)), int(rng.integers(0, height - h + 1))
                    break
            else:  # as torchvision: fall back to the largest centred crop within the allowed ratios
                aspect = min(max(width / height, self.ratio[0]), self.ratio[1])
                w, h = (
                    (width, int(round(width / aspect)))
                    if width / height < aspect
                    else (int(round(height * aspect)), height)
                )
                w, h = min(w, width), min(h, height)
                x0, y0 = (width - w) // 2, (height - h) // 2
            views[index] = (x0, y0, x0 + w, y0 + h, int(rng.random() < self.flip))
        return views

    # Keys of the mixing draws: longer than a row's own key (seed, row), so no stream is shared with it.
    _MIX = 2**31

    def sample_partners(self, row: int, rows: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """For `count` mixed views of `row` in a split of `rows`: the partner rows (never the row itself) and the
        weight of the row's own view, from Beta(mix_alpha, mix_alpha) folded to >= 0.5 so each view stays mostly
        its own image (as big_vision sorts its mixup weights)."""
        rng = np.random.default_rng([self.seed, row, self._MIX])
        partners = rng.integers(0, max(1, rows - 1), count)
        partners = np.where(partners >= row, partners + 1, partners) if rows > 1 else np.zeros(count, dtype=np.int64)
        weights = rng.beta(self.mix_alpha, self.mix_alpha, count).astype(np.float32)
        return partners.astype(np.int32), np.maximum(weights, np.float32(1) - weights)

    def sample_partner_view(self, width: int, height: int, row: int, index: int) -> np.ndarray:
        """The view of the partner image in mixed view `index` of `row` (the partner is width x height)."""
        return self.sample(width, height, (row, index, self._MIX), 1)[0]

    def render(self, image, view, size=None) -> np.ndarray:
        """uint8 (3, H, W) pixels of one view of an RGB PIL image, at `size` (height, width; default the teacher's)."""
        from PIL import Image

        height, width = size or self.size
        x0, y0, x1, y1, flip = (int(v) for v in view)
        pixels = image.resize((width, height), self.resample, box=(x0, y0, x1, y1))
        if flip:
            pixels = pixels.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.array(pixels, dtype=np.uint8).transpose(2, 0, 1)  # a copy: PIL's buffer is read-only


def raw_source(image) -> tuple[bytes, list[int]]:
    """A reduced source image as stored in a format 3 view split: raw RGB bytes and their (height, width, 3)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.uint8)
    return pixels.tobytes(), list(pixels.shape)


def from_raw_source(data: bytes, shape):
    from PIL import Image

    return Image.fromarray(np.frombuffer(data, dtype=np.uint8).reshape(tuple(int(v) for v in shape)), "RGB")


def load_image_processor(
    name_or_path: str, revision: str | None = None, trust_remote_code: bool = False, flag: str = "--teacher"
):
    """The PIL-backend image processor: it defines the pixels the teacher saw, so it must not change with the
    optional torchvision install (whose resize differs slightly)."""
    from transformers import AutoImageProcessor

    folder = Path(name_or_path).expanduser()
    if folder.is_dir() and (folder / "config.json").exists() and not (folder / "preprocessor_config.json").exists():
        # a Trainer given no processing_class, or model.save_pretrained alone: the model is there, its pixels are not
        raise KdcacheError(
            f"{flag} '{name_or_path}' holds a model but no image processor (preprocessor_config.json); save the one "
            f"it was trained with into it: AutoImageProcessor.from_pretrained(BASE_MODEL).save_pretrained('{name_or_path}')"
        )
    try:
        return AutoImageProcessor.from_pretrained(
            name_or_path, revision=revision, trust_remote_code=trust_remote_code, backend="pil"
        )
    except Exception as error:
        raise hub_error("image processor", name_or_path, flag, error) from None
