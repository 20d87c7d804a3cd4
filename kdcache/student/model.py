"""The student: MobileNetV2 (or any image classifier) with the cache's labels, its image processor at the student's
size, and the checks that it belongs with the cache's teacher."""

from pathlib import Path

import torch

from kdcache.errors import KdcacheError, hub_error
from kdcache.models import NO_HUB_KERNELS, align_labels, weights_sha256


class OnlineTeacher(torch.nn.Module):
    """The teacher run on every batch, its outputs put in the dataset's label order as the cache stores them."""

    def __init__(self, model, mapping):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.register_buffer("index", torch.tensor(mapping), persistent=False)

    @torch.no_grad()
    def forward(self, pixel_values):
        return self.model(pixel_values=pixel_values).logits.float()[:, self.index]

    def train(self, mode=True):  # stays in eval mode whatever Trainer does to the modules around it
        return super().train(False)


def student_processor(processor, teacher_size, student_size):
    """The teacher's image processor scaled to feed the student at its own size: every pixel size in `size` and
    `crop_size` times student/teacher (a ViT's 224x224 becomes 128x128; a shortest edge 256, crop 224 becomes
    146, 128), so a student trained at a lower resolution is saved with a processor that gives it what it saw."""
    if student_size is None or tuple(student_size) == tuple(teacher_size):
        return processor
    factor = student_size[0] / teacher_size[0]
    settings = processor.to_dict()
    for key in ("size", "crop_size"):
        if isinstance(settings.get(key), dict):
            exact = {"height": student_size[0], "width": student_size[1]}
            settings[key] = {
                name: exact.get(name, round(value * factor)) if isinstance(value, int) else value
                for name, value in settings[key].items()
                if value is not None
            }
    return type(processor).from_dict(settings)


def build_student(student, names, pixel_shape, seed, trained: bool = False):
    """The student: a MobileNetV2Config() from scratch by default (the tutorial's), a config name (model type) from
    scratch, or a hub id / local folder (pretrained weights, with a fresh head when its classes differ); its BatchNorm
    momentum in PyTorch's convention (`pytorch_batchnorm_momentum`). `trained`: it must be a trained classifier of
    these classes, weights and head (--quantization-aware continues one); anything else is refused."""
    return pytorch_batchnorm_momentum(_student_model(student, names, pixel_shape, seed, trained))


# transformers' MobileNetV2 (and other ports of TensorFlow models) pass TensorFlow's BatchNorm decay, 0.997, as
# PyTorch's `momentum`, which is the weight of the *new* batch: the running statistics are then those of about the
# last training batch alone, often the epoch's small remainder batch (10 images on beans). Every evaluation and the
# saved student inherit them: the K=1 defaults' validation curve fell from 0.89 to 0.79 (mean of 3 seeds) over the
# last 3 epochs of a cosine schedule whose learning rate was near zero. torchvision's MobileNetV2 uses PyTorch's
# default 0.1 (about the last 10 batches); 1 - 0.997 = 0.003 would average over ~330 steps, half of a 660-step run
# whose weights move throughout.
BATCHNORM_MOMENTUM = 0.1


def pytorch_batchnorm_momentum(model):
    """Set BatchNorm layers whose momentum is in TensorFlow's convention (> 0.5: the old statistics' weight) to
    BATCHNORM_MOMENTUM; sane values are left alone. Only training reads it: the saved weights and config are unchanged."""
    for module in model.modules():
        if (
            isinstance(module, torch.nn.modules.batchnorm._BatchNorm)
            and module.momentum is not None
            and module.momentum > 0.5
        ):
            module.momentum = BATCHNORM_MOMENTUM
    return model


def _student_model(student, names, pixel_shape, seed, trained):
    from transformers import AutoConfig, AutoModelForImageClassification, MobileNetV2Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, num_labels=len(names))
    torch.manual_seed(seed)  # the initial weights depend on the seed alone, so runs with the same seed compare
    if student is None:
        return AutoModelForImageClassification.from_config(MobileNetV2Config(image_size=pixel_shape[-1], **labels))
    if student in CONFIG_MAPPING and not Path(student).exists():
        _refuse_untrained(trained, student, "is a model type, which starts from scratch")
        try:
            return AutoModelForImageClassification.from_config(AutoConfig.for_model(student, **labels))
        except ValueError:
            raise KdcacheError(f"--student '{student}' is not an image classification architecture") from None
    try:
        config = AutoConfig.from_pretrained(student)
        if config.num_labels == len(names):  # a head for these classes must be for these classes
            generic = all(str(name).startswith("LABEL_") for name in config.id2label.values())
            align_labels(config.id2label, names, "student", by_index=generic)
        folder = Path(student)
        if folder.is_dir() and not any(folder.glob("*.safetensors")) and not any(folder.glob("*.bin")):
            _refuse_untrained(trained, student, "holds a config without weights")
            config.update(labels)  # a config without weights: that architecture, from scratch
            return AutoModelForImageClassification.from_config(config)
        if config.num_labels != len(names):
            _refuse_untrained(
                trained, student, f"classifies {config.num_labels} classes, not the cache's {len(names)}"
            )
        return AutoModelForImageClassification.from_pretrained(
            student, ignore_mismatched_sizes=config.num_labels != len(names), **labels, **NO_HUB_KERNELS
        )
    except KdcacheError:
        raise
    except Exception as error:
        raise hub_error("student", student, "--student", error) from None


def _refuse_untrained(trained: bool, student: str, why: str) -> None:
    if trained:
        raise KdcacheError(
            f"--quantization-aware continues a trained student, and --student '{student}' {why}; name a student "
            "trained on this cache's classes (a kdcache train-student output)"
        )


def check_same_teacher(model, teacher: str | None, manifest: dict, cache_path: Path) -> None:
    """--online runs a teacher instead of reading the cache: it must be the teacher that made the cache, or the
    cache's pixels, labels and recipe would be paired with another model's outputs under the cache's name."""
    expected, found = manifest["teacher"]["weights_sha256"], weights_sha256(model)
    if found == expected:
        return
    if teacher:
        raise KdcacheError(
            f"--teacher '{teacher}' is not the teacher that made cache '{cache_path}' (weights sha256 "
            f"{found[:16]}..., the cache's {expected[:16]}...); leave out --teacher to run the cache's "
            "teacher, or make a cache with this one (kdcache teacher-logits --teacher ...)"
        )
    raise KdcacheError(
        f"the cache's teacher '{manifest['teacher']['name_or_path']}' no longer has the weights that made "
        f"cache '{cache_path}' (weights sha256 {found[:16]}..., the cache's {expected[:16]}...); pass "
        "the teacher that made it with --teacher, or make the cache again"
    )
