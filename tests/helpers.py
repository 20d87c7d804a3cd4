"""What the tests build: tiny models from configs and tiny generated images, so the suite needs no network and no
real dataset, and the small checks and tools that test files of several folders share. Imported by the tests as
`from helpers import ...`; the fixtures that share them are in conftest.py."""

import contextlib
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from kdcache.format.manifest import MANIFEST

LABELS = ["angular_leaf_spot", "bean_rust", "healthy"]
COLOURS = [(200, 60, 40), (60, 170, 60), (50, 70, 200)]


def make_images(count: int, seed: int, size=(40, 36)):
    """Images whose class shows in their colour and texture, of a few sizes, as a real dataset has."""
    rng = np.random.default_rng(seed)
    images, labels = [], []
    for index in range(count):
        label = index % len(LABELS)
        width, height = size[0] + 4 * (index % 3), size[1] + 2 * (index % 2)
        base = np.array(COLOURS[label], dtype=np.float32)
        noise = rng.normal(0, 40, (height, width, 3))
        stripes = (np.arange(width)[None, :, None] % (3 + label)) * 12.0
        pixels = np.clip(base + noise + stripes, 0, 255).astype(np.uint8)
        images.append(Image.fromarray(pixels, "RGB"))
        labels.append(label)
    return images, labels


def make_dataset_dict(sizes=None, seed=0):
    import datasets

    sizes = sizes or {"train": 24, "validation": 12, "test": 12}
    features = datasets.Features({"image": datasets.Image(), "labels": datasets.ClassLabel(names=LABELS)})
    splits = {}
    for offset, (name, count) in enumerate(sizes.items()):
        images, labels = make_images(count, seed + offset)
        splits[name] = datasets.Dataset.from_dict({"image": images, "labels": labels}, features=features)
    return datasets.DatasetDict(splits)


def save_vit_teacher(path, id2label=None, seed=0, image_size=32):
    from transformers import ViTConfig, ViTForImageClassification, ViTImageProcessorPil

    id2label = id2label or dict(enumerate(LABELS))
    config = ViTConfig(
        image_size=image_size,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=len(id2label),
        id2label=id2label,
        label2id={name: index for index, name in id2label.items()},
    )
    torch.manual_seed(seed)
    model = ViTForImageClassification(config).eval()
    model.save_pretrained(str(path))
    ViTImageProcessorPil(size={"height": image_size, "width": image_size}).save_pretrained(str(path))
    return path


def save_mobilenet_student(path, num_labels=3, seed=0, image_size=32):
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    config = MobileNetV2Config(image_size=image_size, depth_multiplier=0.35, num_labels=num_labels)
    torch.manual_seed(seed)
    MobileNetV2ForImageClassification(config).save_pretrained(str(path))
    return path


def save_student(path, teacher):
    """A tiny MobileNetV2 student folder as train-student leaves it: named labels and the teacher's processor."""
    from transformers import AutoConfig, AutoImageProcessor

    save_mobilenet_student(path)
    config = AutoConfig.from_pretrained(str(path))
    config.id2label, config.label2id = dict(enumerate(LABELS)), {name: i for i, name in enumerate(LABELS)}
    config.save_pretrained(str(path))
    AutoImageProcessor.from_pretrained(str(teacher), backend="pil").save_pretrained(str(path))
    return path


def old_format_copy(cache, target, version: int, rows=None):
    """`cache` as kdcache wrote it before format 4: the chunks concatenated and saved again with `save_to_disk` (what
    stage one's assembly did), and one sha256 of each split's whole logits column in the manifest instead of the
    chunks' checksums. `rows` replaces the DatasetDict saved (an older column layout); version 1 also drops `views`.
    """
    import hashlib
    import json
    import shutil

    import datasets

    rows = rows if rows is not None else datasets.load_from_disk(str(cache))
    rows.save_to_disk(str(target))
    manifest = json.loads((cache / "kdcache.json").read_text())
    manifest["format_version"] = version
    for name, split in manifest["dataset"]["splits"].items():
        split.pop("chunks")
        logits = np.asarray(rows[name].with_format("numpy")["teacher_logits"], dtype="<f4")
        split["logits_sha256"] = hashlib.sha256(np.ascontiguousarray(logits).tobytes()).hexdigest()
        if version == 1:
            split.pop("views")
    if version == 1:
        manifest.pop("views")
    (target / "kdcache.json").write_text(json.dumps(manifest))
    shutil.copy(cache / "preprocessor_config.json", target)
    return target


def teacher_one_row_at_a_time(monkeypatch):
    """Make the online teacher run on one row at a time, in channels_last, as stage one runs it with batch_size=1.

    Tests of "training from the cache is online distillation" compare two runs step by step. The teacher's outputs of
    a row move in the 7th digit with the other rows of its batch on some CPUs (oneDNN blocks a batch's convolutions
    and matrix products by its size and content), and AdamW turns such noise into updates of a full step on the
    parameters whose true gradient is zero (a BatchNorm bias before another BatchNorm): the runs part after a few
    steps. With every row computed alone in both runs, their teacher logits, and so the runs, are identical."""
    from kdcache.student.model import OnlineTeacher

    @torch.no_grad()
    def forward(self, pixel_values):
        self.model.to(memory_format=torch.channels_last)
        rows = [
            self.model(pixel_values=pixel_values[i : i + 1].contiguous(memory_format=torch.channels_last)).logits
            for i in range(len(pixel_values))
        ]
        return torch.cat(rows).float()[:, self.index]

    monkeypatch.setattr(OnlineTeacher, "forward", forward)


def cached_logits(path, split):
    """A split's stored teacher logits as one numpy array."""
    import datasets

    from kdcache.format.manifest import LOGITS

    return datasets.load_from_disk(str(path))[split].with_format("numpy")[:][LOGITS]


def flip_bit(path, offset, bit=0):
    data = bytearray(path.read_bytes())
    data[offset] ^= 1 << bit
    path.write_bytes(bytes(data))


# Stage two's options for a quick run that logs every step.
FAST = dict(batch_size=8, progress=False, logging_steps=1)


def weights(folder):
    """A saved model's weights, by name."""
    from transformers import AutoModelForImageClassification

    return AutoModelForImageClassification.from_pretrained(str(folder)).state_dict()


@contextlib.contextmanager
def crash_after_first_save(monkeypatch):
    """Training runs in the block stop (as a Ctrl-C would) right after their first checkpoint."""
    from transformers import TrainerCallback

    from kdcache.student import trainer as train_module

    class StopAfterFirstSave(TrainerCallback):
        def on_save(self, args, state, control, **kwargs):
            raise KeyboardInterrupt

    original = train_module.DistillationTrainer.__init__

    def with_crash(self, *args, **kwargs):
        original(self, *args, **kwargs)
        self.add_callback(StopAfterFirstSave)

    with monkeypatch.context() as patch:
        patch.setattr(train_module.DistillationTrainer, "__init__", with_crash)
        yield


def direct_ece(probabilities, references, bins=15):
    """Guo et al. 2017, eq. (3), with a loop over the bins (lower, upper]."""
    total, error = len(probabilities), 0.0
    for b in range(bins):
        lower, upper = b / bins, (b + 1) / bins
        members = [i for i in range(total) if lower < max(probabilities[i]) <= upper]
        if members:
            accuracy = sum(int(np.argmax(probabilities[i]) == references[i]) for i in members) / len(members)
            confidence = sum(max(probabilities[i]) for i in members) / len(members)
            error += len(members) / total * abs(accuracy - confidence)
    return error


def cache_files(folder: Path) -> dict[str, bytes]:
    """The files a push sends besides the manifest and the card: all but the config, which names the fixtures' inputs
    by paths outside the cache's folder (kdcache.options.config.names_local_path), so it stays on this machine."""
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and path.name not in (MANIFEST, "README.md", "kdcache_config.yaml")
    }
