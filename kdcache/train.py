"""Stage two: train a student from cached teacher logits with the Hugging Face Trainer.

The batch carries `teacher_logits` read from the cache. In `online` mode (the tutorial's way, kept as a reference
for tests and benchmarks) the batch is built from the original images and the teacher is run on it inside
`compute_loss`; everything else, including the student's input pixels, is the same code.
"""

import json
import logging
import math
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Trainer, TrainerCallback

from kdcache.cache import (
    IMAGE,
    LABELS,
    LOGIT_COLUMNS,
    LOGITS,
    MIX_PARTNERS,
    MIX_VIEWS,
    MIX_WEIGHTS,
    PIXELS,
    SOURCE,
    SOURCE_SHAPE,
    VIEWS,
    load_cache,
    logit_columns,
    rebuilt_logits,
)
from kdcache.data import ImagePipeline, ViewRecipe, from_raw_source, load_image_dataset, undecoded
from kdcache.devices import OneDeviceArguments
from kdcache.ensemble import open_ensemble
from kdcache.errors import KdcacheError, hub_error
from kdcache.hub import push_folder
from kdcache.labels import NO_LABEL, labeled_subset, masked_labels
from kdcache.loss import LOSSES
from kdcache.manifest import Manifest
from kdcache.models import align_labels, count_parameters, load_classifier, weights_sha256
from kdcache.options import TrainingOptions, check_loss_for_cache, check_resumable, record_options, run_options
from kdcache.outputs import (
    OutputFolder,
    OutputKind,
    check_free_space,
    guards_output,
    report_disk_full,
    safe_output,
    training_bytes,
    unfinished_checkpoints,
)
from kdcache.runtime import (
    MappedFiles,
    agreed,
    cpus_per_process,
    distributed,
    is_main,
    output_path,
    placement,
    slug,
)

log = logging.getLogger("kdcache")


class DistillationTrainer(Trainer):
    """Trainer whose loss is one of kdcache's distillation losses (kdcache.loss.LOSSES) over the batch's
    `teacher_logits`."""

    loss_is_scaled_for_ga = False  # every kdcache loss is a per-batch mean

    def __init__(self, *args, temperature=5.0, alpha=0.5, teacher=None, loss="kd", standardize=False, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature, self.alpha, self.teacher = temperature, alpha, teacher
        self.loss_function, self.standardize = LOSSES[loss], standardize
        self.loss_terms, self.loss_term_steps = {}, 0  # summed since the last log: what each term contributes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.get("teacher_logits")
        if self.teacher is not None and self.alpha > 0:
            teacher_logits = self.teacher(inputs["pixel_values"])
        outputs = model(pixel_values=inputs["pixel_values"])
        loss, terms = self.loss_function(
            outputs.logits,
            inputs["labels"],
            teacher_logits,
            self.temperature,
            self.alpha,
            return_terms=True,
            standardize=self.standardize,
        )
        if model.training:
            for name, value in terms.items():
                self.loss_terms[name] = self.loss_terms.get(name, 0.0) + value
            self.loss_term_steps += 1
        return (loss, outputs) if return_outputs else loss

    def log(self, logs, start_time=None):
        """Every training log line also gets the unweighted terms (loss_ce, loss_kl; loss_tckd, loss_nckd for dkd;
        loss_inter, loss_intra for dist), averaged over its steps and
        processes, beside the weighted total: which term dominates is the first question when distillation fails."""
        if "loss" in logs and self.loss_term_steps:
            for name, total in self.loss_terms.items():
                mean = self.accelerator.reduce(
                    torch.as_tensor(total, device=self.args.device) / self.loss_term_steps, "mean"
                )
                logs[f"loss_{name}"] = round(float(mean), 6)
            self.loss_terms, self.loss_term_steps = {}, 0
        super().log(logs, start_time)


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
            # this class"); one that is not gets an all-zero row, which the cross-entropy leaves out (kdcache.loss)
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
            stored = {column: np.stack([row[column] for row in rows]) for column in LOGIT_COLUMNS if column in rows[0]}
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
        import datasets

        self.raw = SOURCE in rows.column_names  # format 3: reduced raw pixels; format 2: the source image file
        self.rows = rows if self.raw else undecoded(rows, IMAGE)
        self.recipe, self.seed, self.fresh, self.epoch = recipe, seed, fresh, 0
        self.labels, self.offsets = labels, offsets
        self.size = tuple(student_size) if student_size else recipe.size
        self.count = 1 if fresh else rows.features[VIEWS].shape[0]
        self.mixed = MIX_WEIGHTS in rows.column_names
        if self.mixed:  # partners are any rows of the split: read only what a partner needs
            self.partner_rows = rows.select_columns([SOURCE, SOURCE_SHAPE, LABELS])
        self.decoder = datasets.Image()

    def __len__(self):
        return len(self.rows)

    def view_index(self, row: int) -> int:
        cycle, position = divmod(self.epoch, self.count)
        return int(np.random.default_rng([self.seed, row, cycle]).permutation(self.count)[position])

    def source(self, batch, position):
        if self.raw:
            return from_raw_source(batch[SOURCE][position], batch[SOURCE_SHAPE][position])
        return self.decoder.decode_example(batch[IMAGE][position]).convert("RGB")

    def __getitems__(self, indices):
        batch = self.rows[list(indices)]
        chosen = [0 if self.fresh else self.view_index(row) for row in indices]
        partners = {}
        if self.mixed:
            wanted = sorted(
                {self.partner(row, batch[MIX_PARTNERS][i][k]) for i, (row, k) in enumerate(zip(indices, chosen))}
            )
            partner_rows = self.partner_rows[wanted]
            partners = {
                row: (self.source(partner_rows, i), self.label(partner_rows, i, row)) for i, row in enumerate(wanted)
            }
        items = []
        logit_columns = [column for column in LOGIT_COLUMNS if column in batch]
        for position, (row, k) in enumerate(zip(indices, chosen)):
            image = self.source(batch, position)
            # the clean view's logits (fresh), or those of view k (and a top-K cache's indices and tail of view k)
            logits = {column: batch[column][position] for column in logit_columns}
            if self.fresh:
                view = self.recipe.sample(*image.size, (row, self.epoch), 1)[0]
            else:
                view = batch[VIEWS][position][k]
                logits = {column: np.asarray(value)[k] for column, value in logits.items()}
            item = {
                PIXELS: torch.from_numpy(self.recipe.render(image, view, self.size)),
                LABELS: self.label(batch, position, row),
                **logits,
            }
            if self.mixed:
                partner, partner_label = partners[self.partner(row, batch[MIX_PARTNERS][position][k])]
                item.update(
                    partner_pixels=torch.from_numpy(
                        self.recipe.render(partner, batch[MIX_VIEWS][position][k], self.size)
                    ),
                    partner_labels=partner_label,
                    **{MIX_WEIGHTS: batch[MIX_WEIGHTS][position][k]},
                )
            items.append(item)
        return items

    def __getitem__(self, index):
        return self.__getitems__([index])[0]

    def partner(self, row: int, partner) -> int:
        """The row of `rows` that a mixed view of `row` is mixed with (stored as a row of the same split)."""
        return int(partner) + (int(self.offsets[row]) if self.offsets is not None else 0)

    def label(self, batch, position: int, row: int):
        return batch[LABELS][position] if self.labels is None else self.labels[row]


class TrainRows(torch.utils.data.Dataset):
    """The training rows a run serves, out of `rows` (a Dataset or ViewRows): those at `served` (None: all), with
    their labels replaced by `labels` (one per row of `rows`, -1 for none; None: as they are), for label budgets and
    unlabeled rows (kdcache.labels). Rows are fetched in batches, as the Dataset (or ViewRows) fetches them."""

    def __init__(self, rows, served=None, labels=None):
        self.rows, self.served, self.labels = rows, served, labels

    def __len__(self):
        return len(self.rows) if self.served is None else len(self.served)

    def __getitems__(self, positions):
        indices = [int(i) for i in (positions if self.served is None else self.served[list(positions)])]
        items = self.rows.__getitems__(indices)
        if self.labels is not None:
            for item, index in zip(items, indices):
                item[LABELS] = self.labels[index]
        return items

    def __getitem__(self, position):
        return self.__getitems__([position])[0]


class SetEpoch(TrainerCallback):
    """Tells the view rows which epoch is starting (Trainer tells samplers, not map-style datasets)."""

    def __init__(self, rows: ViewRows):
        self.rows = rows

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.rows.epoch = int(math.floor((state.epoch or 0) + 1e-6))


def ema_decay_at(decay: float, updates: int) -> float:
    """The EMA's decay after `updates` averaged steps: min(decay, (1 + t) / (10 + t)), timm's and TensorFlow's
    warm-up (ModelEmaV3's `use_warmup`, tf.train.ExponentialMovingAverage's num_updates).

    Without it the average starts from the random initial weights and forgets them only at decay**t: at 0.99 they
    still weigh 27% after the 132 steps of 4 beans epochs, and a student so averaged predicted one class (validation
    0.331 at every epoch while the training weights reached 0.774; BENCHMARKS.md, "The EMA")."""
    return min(decay, (1 + updates) / (10 + updates))


def warmed_up_ema(decay: float):
    """AveragedModel's multi_avg_fn for an EMA whose decay warms up (ema_decay_at); integer buffers (BatchNorm's
    num_batches_tracked) follow the model's."""

    @torch.no_grad()
    def update(averaged: list, current: list, updates) -> None:
        weight = 1 - ema_decay_at(decay, int(updates))
        floating = [(a, c) for a, c in zip(averaged, current, strict=True) if torch.is_floating_point(a)]
        if floating:
            torch._foreach_lerp_([a for a, _ in floating], [c for _, c in floating], weight)
        for a, c in zip(averaged, current, strict=True):
            if not torch.is_floating_point(a):
                a.copy_(c)

    return update


class StudentEMA(TrainerCallback):
    """An exponential moving average of the student's weights, BatchNorm statistics included (PyTorch's
    AveragedModel; the decay warms up as timm's does, ema_decay_at), updated after every optimiser step.

    At each epoch's end the averaged weights are swapped into the model, so that the Trainer evaluates, checkpoints
    and (with load_best_model_at_end) keeps the EMA; the training weights come back when the next epoch starts.
    A checkpoint also holds the training weights and the average (kdcache_ema.pt), so --resume continues both.
    """

    FILE = "kdcache_ema.pt"

    def __init__(self, decay: float):
        self.decay, self.ema, self.training_weights = decay, None, None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from torch.optim.swa_utils import AveragedModel

        self.ema = AveragedModel(model, multi_avg_fn=warmed_up_ema(self.decay), use_buffers=True)
        saved = Path(args.output_dir) / f"checkpoint-{state.global_step}" / self.FILE
        if state.global_step and saved.exists():  # resuming: the checkpoint's weights are the EMA's
            kept = torch.load(saved, map_location="cpu", weights_only=True)
            model.load_state_dict(kept["training"])
            self.ema.load_state_dict(kept["ema"])

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self.ema.update_parameters(model)

    def on_epoch_end(self, args, state, control, model=None, **kwargs):
        self.swap_in(model)

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        if self.training_weights is not None:
            model.load_state_dict(self.training_weights)
            self.training_weights = None

    def on_save(self, args, state, control, model=None, **kwargs):
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if args.should_save and folder.exists():
            torch.save(
                {"training": self.training_weights or model.state_dict(), "ema": self.ema.state_dict()},
                folder / self.FILE,
            )

    def on_train_end(self, args, state, control, model=None, **kwargs):
        if not args.load_best_model_at_end:  # otherwise the best checkpoint, already an EMA, was loaded
            self.swap_in(model)

    def swap_in(self, model):
        if self.training_weights is None:
            self.training_weights = {name: value.detach().clone() for name, value in model.state_dict().items()}
            model.load_state_dict(self.ema.module.state_dict())


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


def _online_rows(split, image_column, label_column, pipeline):
    """The original images, decoded and resized on every access: the tutorial's data path."""
    import datasets

    decoder = datasets.Image()

    def transform(batch):
        images = [decoder.decode_example(value).convert("RGB") for value in batch[image_column]]
        return {PIXELS: list(pipeline.pixels(images)), LABELS: batch[label_column]}

    return undecoded(split, image_column).with_transform(transform)


def build_student(student, names, pixel_shape, seed):
    """The student: a MobileNetV2Config() from scratch by default (the tutorial's), a config name (model type) from
    scratch, or a hub id / local folder (pretrained weights, with a fresh head when its classes differ); its BatchNorm
    momentum in PyTorch's convention (`pytorch_batchnorm_momentum`)."""
    return pytorch_batchnorm_momentum(_student_model(student, names, pixel_shape, seed))


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


def _student_model(student, names, pixel_shape, seed):
    from transformers import AutoConfig, AutoModelForImageClassification, MobileNetV2Config
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    labels = dict(id2label=dict(enumerate(names)), label2id={n: i for i, n in enumerate(names)}, num_labels=len(names))
    torch.manual_seed(seed)  # the initial weights depend on the seed alone, so runs with the same seed compare
    if student is None:
        return AutoModelForImageClassification.from_config(MobileNetV2Config(image_size=pixel_shape[-1], **labels))
    if student in CONFIG_MAPPING and not Path(student).exists():
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
            config.update(labels)  # a config without weights: that architecture, from scratch
            return AutoModelForImageClassification.from_config(config)
        return AutoModelForImageClassification.from_pretrained(
            student, ignore_mismatched_sizes=config.num_labels != len(names), **labels
        )
    except KdcacheError:
        raise
    except Exception as error:
        raise hub_error("student", student, "--student", error) from None


def accuracy_metric(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


@guards_output
def train_student(
    cache: str | Path | list,
    output: str | Path | None = None,
    options: TrainingOptions | None = None,
    *,
    callbacks: list | None = None,
    progress: bool = True,
    verify: bool = True,
    **overrides,
) -> dict:
    """Train a student from the cache at `cache` and save it (model, image processor, model card) to `output`.
    `cache` may also be a list of caches of the same rows and views: a teacher ensemble, whose teachers'
    probabilities at the temperature are averaged (weighted by `teacher_weights`, normalised; equal by default) into
    the targets every loss reads (kdcache.ensemble; kdcache.loss.ensemble_teacher_logits).

    The options are a TrainingOptions (kdcache.options: every option, its default and its checks), given whole as
    `options`, one by one as keywords (`train_student(cache, output=..., seed=1, alpha=0)`), or both (the keywords
    win). `loss` is a name in kdcache.loss.LOSSES (kd, dkd, dist); `temperature` None is that loss's paper's
    (DEFAULT_TEMPERATURES); `alpha` weights the loss's distillation part against the labels' cross-entropy;
    `standardize_logits` z-scores student and teacher logits before the softmax (kd and dkd). `student_size` S trains (and saves) the student at S x S pixels: each view is the same crop as the
    teacher's, resized to S. `ema_decay` (e.g. 0.998) keeps an exponential moving average of the weights, evaluated
    each epoch and saved as the student. `callbacks` are transformers TrainerCallbacks (or classes), passed to the
    Trainer as they are. `verify=False` skips the checksums of the cache's files, for a caller that has verified
    them already in this process (kdcache.sweep, once for all its trials).

    Returns a summary: output folder, best validation accuracy and its epoch, wall time, the per-epoch history.
    Launched as several processes (accelerate launch, torchrun), it trains data-parallel: `batch_size` is the
    global batch, split evenly among the processes; only the main process writes the output. Every process returns
    the summary, the same on all (the Trainer gathers losses and metrics) except for its own wall time.
    """
    options = replace(options or TrainingOptions(), **overrides)
    caches = [cache] if isinstance(cache, (str, Path)) else list(cache)
    if not caches:
        raise KdcacheError("name at least one cache to train from (a folder written by kdcache teacher-logits)")
    processes = distributed(options.device)  # None on a plain run, which then goes exactly as it always has
    with agreed(processes):  # every process checks the same inputs; an error is printed once
        options.check(processes.count if processes else 1, caches=len(caches))
        options = options.resolved()  # the loss's own temperature where none was given
        place = placement(options.device, options.precision, processes, training=True)
    with safe_output(_output_path(output, caches, options), STUDENT_OUTPUT, processes) as folder:
        with agreed(processes):
            # every process hashes its share of the chunk files, and agreed() makes a damaged one everyone's error
            share = (processes.index, processes.count) if processes else None
            cache_path, cached, manifest = _open_cache(caches[0], options, share, verify)
            options = replace(options, unlabeled_splits=unlabeled_splits(manifest, options, cache_path))
            ensemble = None
            if len(caches) > 1:  # from here on the first cache's splits carry the ensemble's teacher logits
                splits = [options.train_split, *options.unlabeled_splits]
                splits += [options.eval_split] if options.eval_split is not None else []
                cached, ensemble = open_ensemble(
                    caches, cached, manifest, splits, options.teacher_weights, options.temperature, share, verify
                )
            fingerprint = ensemble.fingerprints if ensemble else manifest.fingerprint
            _claim_output(folder, fingerprint, options, place, processes)
            processor, size = _student_input(cache_path, manifest, options)
            model = build_student(options.student, manifest.label_names, (3, *size), options.seed)
            # channels_last: 1.5x faster training steps for a CNN student on CPU (BENCHMARKS.md); the Trainer's
            # .to(device) keeps the format, and the collator hands it channels_last batches
            model = model.to(memory_format=torch.channels_last)
            _check_space(model, folder.path, folder.work, options, processes)
            rows = training_rows(
                cached, manifest, cache_path, options, ImagePipeline(processor), processor, size, place
            )
            callbacks = _callbacks(callbacks, rows, options)
        # once every check has passed on every process: a refused run leaves no work folder (a damaged chunk file may
        # be found by another process than the main one, which learns of it only when the step above is agreed)
        with agreed(processes):
            if is_main(processes) and not options.resume:
                record_options(
                    folder.work, run_options(options, cache_fingerprint=fingerprint, precision=place.precision)
                )
        trainer = _trainer(
            model,
            rows,
            folder.work,
            options,
            place,
            ImagePipeline(processor),
            size,
            len(manifest.label_names),
            callbacks,
            progress,
            processes,
            caches,
        )
        if progress and is_main(processes):
            log.info(place.describe(trainer.args.train_batch_size))
        seconds = _train(trainer, options)
        summary = _summary(
            trainer, seconds, folder.path, cache_path, manifest, model, rows, options, place, size, ensemble
        )
        _save(trainer, summary, folder, manifest, processor, size, options, processes)
    # the student is in place now, on every process (safe_output waits for the main one's rename)
    if progress and is_main(processes):
        log.info(summary_line(summary))
    _push(folder.path, options, progress, processes)
    return summary


# The student's folder: written as OUTPUT.partial/final beside the run's checkpoints, which --resume continues from.
STUDENT_OUTPUT = OutputKind(
    "a kdcache student", "kdcache train-student", "kdcache_training.json", finished="final", resumable=True
)


def _open_cache(cache, options: TrainingOptions, share=None, verify: bool = True):
    """The verified cache (this process's `share` of its files hashed), refused when it lacks the splits asked for."""
    cache_path = Path(cache)
    cached, manifest = load_cache(cache_path, verify=verify, share=share)
    for split, flag in ((options.train_split, "--train-split"), (options.eval_split, "--eval-split")):
        if split is not None and split not in cached:
            raise KdcacheError(f"{flag} '{split}' is not in cache '{cache_path}' (splits: {', '.join(cached)})")
    return cache_path, cached, manifest


def _output_path(output, caches: list, options: TrainingOptions) -> Path:
    kind = "online" if options.online else "distilled" if options.alpha > 0 else "scratch"
    if len(caches) > 1:
        kind = f"ensemble{len(caches)}-{kind}"
    if output is not None:
        return output_path(output)
    return Path("data") / "students" / f"{slug(Path(caches[0]))}-{kind}"


def _claim_output(folder: OutputFolder, fingerprint, options: TrainingOptions, place, processes) -> None:
    """What an earlier student in the output and an interrupted run in its work folder mean for this run: refused,
    replaced (--overwrite) or continued (--resume). The main process alone decides about them. `fingerprint`: the
    cache's, or the list of an ensemble's caches'."""
    if not is_main(processes):
        return
    output, work = folder.path, folder.work
    if output.exists() and not options.overwrite:
        raise KdcacheError(f"--output '{output}' exists; pass --overwrite to replace it, or choose another --output")
    if work.exists() and not options.resume:
        if not options.overwrite:
            raise KdcacheError(
                f"'{work}' holds an interrupted training run; pass --resume to continue it or --overwrite to start over"
            )
        shutil.rmtree(work)
    if options.resume:
        check_resumable(work, run_options(options, cache_fingerprint=fingerprint, precision=place.precision))


def _student_input(cache_path: Path, manifest: Manifest, options: TrainingOptions):
    """The teacher's image processor (saved in the cache) and the student's input size (height, width)."""
    from transformers import AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(str(cache_path), backend="pil")
    teacher_size = manifest.pixel_shape[1:]
    size = (options.student_size, options.student_size) if options.student_size else teacher_size
    if options.online and size != teacher_size:
        raise KdcacheError(
            f"--online runs the teacher on the student's input, which must then be the teacher's "
            f"{teacher_size[0]}x{teacher_size[1]} pixels; leave out --student-size or train from the cache"
        )
    return processor, size


def _check_space(model, output: Path, work: Path, options: TrainingOptions, processes) -> None:
    space = training_bytes(model, checkpoints=2 if options.save_checkpoints else 0)  # save_total_limit in _trainer
    if is_main(processes):
        check_free_space(output, space, "its checkpoints and the student", work)
    report_disk_full(
        work,
        space,
        then="run the same command with --resume to continue from the last checkpoint",
        scratch=lambda: [work / "final", *unfinished_checkpoints(work)] if is_main(processes) else [],
    )


@dataclass
class TrainingRows:
    """What the student learns from and is evaluated on, and the teacher behind it."""

    mode: str  # cached, views, mixed views, online, student-only
    train: object
    eval: object | None
    teacher_run: str  # the teacher whose outputs the student learns from
    views: int = 1
    online_teacher: torch.nn.Module | None = None
    labels: "TrainingLabels | None" = None


def training_rows(
    cached, manifest: Manifest, cache_path: Path, options: TrainingOptions, pipeline, processor, size, place
) -> TrainingRows:
    """The one place that picks the training rows: cached (one clean view), views or mixed views (K consistent views
    per image), online (the teacher run on every batch) or student-only (random views for the student, the clean
    view's logits); contradictory modes are refused."""
    data, train_split, eval_split = manifest.dataset, options.train_split, options.eval_split
    views = manifest.views_of(train_split)
    if views > 1 and (options.online or options.student_only_augment):
        raise KdcacheError(
            f"--online and --student-only-augment need a cache without views; '{cache_path}' has "
            f"{views} views per image of split '{train_split}'"
        )
    if eval_split and manifest.labeled_rows(eval_split) < manifest.split(eval_split)["num_rows"]:
        raise KdcacheError(
            f"--eval-split '{eval_split}' has {manifest.split(eval_split)['num_rows'] - manifest.labeled_rows(eval_split)} "
            "rows without a label, and the best epoch is chosen on its accuracy; give a labelled split"
        )
    if eval_split and manifest.views_of(eval_split) > 1:
        raise KdcacheError(
            f"--eval-split '{eval_split}' is cached with views; evaluate on a split with one clean view"
        )
    check_loss_for_cache(options.loss, len(manifest.label_names), views > 1 and manifest.mixed_views, cache_path)

    def source_split(split):
        """The original rows the cache was made from, for the modes that need the images themselves."""
        rows = load_image_dataset(data["name_or_path"], data.get("revision"))[split]
        if rows._fingerprint != manifest.split(split)["fingerprint"]:
            raise KdcacheError(
                f"split '{split}' of '{data['name_or_path']}' changed since the cache was made; "
                "this mode must see the same rows"
            )
        return rows

    columns = [PIXELS, LABELS] + (logit_columns(cached[train_split]) if options.alpha > 0 else [])
    # numpy rows: the torch format would widen the uint8 pixels to int64, 8x the bytes to move per batch
    eval_rows = cached[eval_split].with_format("numpy", columns=columns) if eval_split else None
    labels = training_labels(cached, manifest, options)
    teacher_run = manifest.teacher["name_or_path"]
    if options.online:
        teacher_run = options.teacher or teacher_run
        teacher_model = load_classifier(
            teacher_run,
            revision=None if options.teacher else manifest.teacher.get("revision"),
            trust_remote_code=manifest.teacher.get("trust_remote_code", False),
        )
        check_same_teacher(teacher_model, options.teacher, manifest, cache_path)
        online_teacher = OnlineTeacher(
            teacher_model, align_labels(teacher_model.config.id2label, manifest.label_names)
        )
        train_rows, eval_rows = (
            _online_rows(source_split(split), data["image_column"], data["label_column"], pipeline) if split else None
            for split in (train_split, eval_split)
        )
        return TrainingRows(
            "online", labels.serve(train_rows), eval_rows, teacher_run, views, online_teacher.to(place.device), labels
        )
    rows = labels.concatenated(cached)
    if views > 1:
        train_rows = ViewRows(
            rows, manifest.view_recipe, options.seed, student_size=size, labels=labels.labels, offsets=labels.offsets
        )
        mode = "mixed views" if manifest.mixed_views else "views"
        return TrainingRows(
            mode, labels.serve(train_rows, relabel=False), eval_rows, teacher_run, views, labels=labels
        )
    if options.student_only_augment:
        import datasets

        images = undecoded(source_split(train_split), data["image_column"]).select_columns([data["image_column"]])
        if data["image_column"] != IMAGE:
            images = images.rename_column(data["image_column"], IMAGE)
        train_rows = ViewRows(
            datasets.concatenate_datasets([rows.select_columns([LABELS, *logit_columns(rows)]), images], axis=1),
            ViewRecipe(manifest.pixel_shape[1:], getattr(processor, "resample", 3), seed=options.seed),
            options.seed,
            fresh=True,
            student_size=size,
            labels=labels.labels,
        )
        return TrainingRows(
            "student-only", labels.serve(train_rows, relabel=False), eval_rows, teacher_run, views, labels=labels
        )
    return TrainingRows(
        "cached",
        labels.serve(rows.with_format("numpy", columns=columns)),
        eval_rows,
        teacher_run,
        views,
        labels=labels,
    )


def unlabeled_splits(manifest: Manifest, options: TrainingOptions, cache_path) -> list[str]:
    """The cached splits without labels that the run trains on besides the training split: --unlabeled-splits, or by
    default every split of the cache that has no labelled row (none with alpha 0, --online or --student-only-augment,
    which cannot use them), each refused in one line when it cannot go with the training split."""
    given = options.unlabeled_splits
    if given is None:
        if options.alpha == 0 or options.online or options.student_only_augment:
            return []
        given = [
            name
            for name in manifest.splits
            if manifest.labeled_rows(name) == 0 and name not in (options.train_split, options.eval_split)
        ]
    for name in given:
        if name not in manifest.splits:
            raise KdcacheError(
                f"--unlabeled-splits names '{name}', which is not a split of cache '{cache_path}' "
                f"(splits: {', '.join(manifest.splits)})"
            )
        if name in (options.train_split, options.eval_split):
            raise KdcacheError(
                f"--unlabeled-splits names '{name}', the {'training' if name == options.train_split else 'evaluation'} "
                "split; name splits besides those two"
            )
        if manifest.views_of(name) != manifest.views_of(options.train_split):
            raise KdcacheError(
                f"split '{name}' of cache '{cache_path}' has {manifest.views_of(name)} views per image and the "
                f"training split '{options.train_split}' {manifest.views_of(options.train_split)}; make the cache with "
                "the same views for both (--view-splits), or leave that split out of --unlabeled-splits"
            )
    return list(given)


@dataclass
class TrainingLabels:
    """The labels a run trains with, one per row of its training split and unlabeled splits in that order (-1: none),
    and which of those rows it serves (None: all; with alpha 0, the labelled ones alone)."""

    splits: list[str]
    labels: np.ndarray
    offsets: np.ndarray  # the position of each row's split's first row
    served: np.ndarray | None
    changed: bool  # labels differ from the cached ones (a label budget) or come from several splits

    @property
    def labeled_rows(self) -> int:
        return int((self.labels != NO_LABEL).sum())  # the rows served without a label are never labelled ones

    @property
    def rows(self) -> int:
        return len(self.labels) if self.served is None else len(self.served)

    def concatenated(self, cached):
        """The cached training rows: the training split, followed by the unlabeled splits (no copy: their files are
        memory-mapped side by side)."""
        import datasets

        if len(self.splits) == 1:
            return cached[self.splits[0]]
        return datasets.concatenate_datasets([cached[name] for name in self.splits])

    def serve(self, rows, relabel: bool = True):
        """`rows` as the run serves them: as they are when nothing changes, else through TrainRows."""
        if not self.changed and self.served is None:
            return rows
        return TrainRows(rows, self.served, self.labels if relabel else None)

    def recipe(self) -> dict:
        return {
            "unlabeled_splits": self.splits[1:],
            "training_rows": self.rows,
            "labeled_rows": self.labeled_rows,
        }


def training_labels(cached, manifest: Manifest, options: TrainingOptions) -> TrainingLabels:
    """Which training rows keep their labels (kdcache.labels): the training split's, less those a --labeled-fraction
    leaves out, and none of the unlabeled splits'; with alpha 0, only the labelled rows are trained on (the
    label-budget baseline: the same labelled rows, from scratch)."""
    splits = [options.train_split, *options.unlabeled_splits]
    lengths = [len(cached[name]) for name in splits]
    labels = np.concatenate(
        [np.asarray(cached[name].with_format("numpy", columns=[LABELS])[LABELS]) for name in splits]
    )
    offsets = np.repeat(np.cumsum([0, *lengths[:-1]]), lengths)
    changed = len(splits) > 1
    if options.labeled_fraction is not None and options.labeled_fraction < 1:
        train = lengths[0]
        keep = labeled_subset(labels[:train], options.labeled_fraction, options.seed, manifest.label_names)
        labels[:train] = masked_labels(labels[:train], keep)
        changed = True
    if options.loss == "dkd" and (labels == NO_LABEL).any():
        raise KdcacheError(
            "--loss dkd splits the teacher's outputs around each image's labelled class, and "
            f"{int((labels == NO_LABEL).sum())} training rows have no label; use --loss kd or --loss dist"
        )
    served = np.flatnonzero(labels != NO_LABEL) if options.alpha == 0 and (labels == NO_LABEL).any() else None
    if options.alpha > 0 and not (labels != NO_LABEL).any() and options.alpha < 1:
        log.warning("no training row has a label: the student learns from the teacher alone")
    return TrainingLabels(splits, labels, offsets, served, changed)


def _callbacks(callbacks, rows: TrainingRows, options: TrainingOptions) -> list:
    callbacks = list(callbacks or [])
    view_rows = rows.train.rows if isinstance(rows.train, TrainRows) else rows.train
    if isinstance(view_rows, ViewRows):
        callbacks.append(SetEpoch(view_rows))
    if options.ema_decay is not None:
        callbacks.append(StudentEMA(options.ema_decay))
    return callbacks


def _trainer(
    model,
    rows: TrainingRows,
    work: Path,
    options: TrainingOptions,
    place,
    pipeline,
    size,
    classes: int,
    callbacks: list,
    progress: bool,
    processes,
    cache_folders: list,
) -> "DistillationTrainer":
    import importlib.util

    num_workers = options.num_workers
    if num_workers is None:  # rebuilding views costs a few ms of CPU per image: prepare them ahead of the step
        views = isinstance(rows.train.rows if isinstance(rows.train, TrainRows) else rows.train, ViewRows)
        num_workers = 1 if views and cpus_per_process(processes) >= 2 else 0
    evaluating = rows.eval is not None
    args = OneDeviceArguments(
        output_dir=str(work),
        kdcache_device=str(place.device),
        # Under DDP the Trainer gives each process its share of every batch (and averages the gradients), so the
        # optimiser steps, the learning rate and the loss are those of one process at the same --batch-size.
        per_device_train_batch_size=options.batch_size // place.processes,
        per_device_eval_batch_size=options.batch_size // place.processes,
        learning_rate=options.learning_rate,
        weight_decay=options.weight_decay,
        warmup_steps=options.warmup_ratio,
        lr_scheduler_type=options.scheduler,
        num_train_epochs=options.epochs,
        max_steps=options.max_steps,
        eval_strategy="epoch" if evaluating else "no",
        save_strategy="epoch" if options.save_checkpoints else "no",
        save_total_limit=2,
        load_best_model_at_end=evaluating and options.save_checkpoints,
        metric_for_best_model="accuracy" if evaluating else None,
        greater_is_better=True,
        logging_steps=options.logging_steps,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        seed=options.seed,
        remove_unused_columns=False,
        dataloader_num_workers=num_workers,
        use_cpu=place.device.type == "cpu",
        bf16=place.precision == "bf16",
        fp16=place.precision == "fp16",
        disable_tqdm=not progress,
        push_to_hub=False,  # kdcache pushes the finished student folder itself, once (kdcache.hub)
    )
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=rows.train,
        eval_dataset=rows.eval,
        data_collator=Collator(pipeline, size, classes, MappedFiles(cache_folders)),
        compute_metrics=accuracy_metric if evaluating else None,
        temperature=options.temperature,
        alpha=options.alpha,
        teacher=rows.online_teacher,
        loss=options.loss,
        standardize=options.standardize_logits,
        callbacks=callbacks,
    )
    if not progress:  # Trainer prints every log line when its bar is off; quiet means quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    return trainer


def _train(trainer, options: TrainingOptions) -> float:
    """Train (continuing from the last checkpoint with --resume); returns the wall time in seconds."""
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if options.resume else None)  # check_resumable found a checkpoint
    return time.perf_counter() - started


def _summary(
    trainer,
    seconds,
    output,
    cache_path,
    manifest: Manifest,
    model,
    rows: TrainingRows,
    options: TrainingOptions,
    place,
    size,
    ensemble=None,
) -> dict:
    history = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    best = max(history, key=lambda entry: entry["eval_accuracy"]) if history else None
    last = history[-1] if history else None
    args = trainer.args
    return {
        "output": str(output),
        "best_eval_accuracy": best["eval_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        # the last epoch beside the best: a best epoch far from the last says the schedule overshot, or it was luck
        "last_eval_accuracy": last["eval_accuracy"] if last else None,
        "last_epoch": last["epoch"] if last else None,
        "saved_epoch": (best if args.load_best_model_at_end else last)["epoch"] if history else None,
        "eval_split": options.eval_split,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "train_log": [
            {key: value for key, value in entry.items() if key in ("step", "loss") or key.startswith("loss_")}
            for entry in trainer.state.log_history
            if "loss" in entry
        ],
        "history": [
            {"epoch": e["epoch"], "eval_accuracy": e["eval_accuracy"], "eval_loss": e["eval_loss"]} for e in history
        ],
        "recipe": {
            # the options as given (those that say what is trained), then what they resolved to
            **{name: value for name, value in asdict(options).items() if name not in NOT_RECORDED},
            "teacher": rows.teacher_run,
            "cache": str(cache_path),
            "cache_fingerprint": manifest.fingerprint,
            "student": options.student or "MobileNetV2Config() from scratch",
            "student_parameters": count_parameters(model),
            # the batch and processes as the Trainer ran them (one device per process: kdcache.devices)
            "batch_size": args.train_batch_size * args.world_size,
            "views": rows.views,
            "mixed_views": manifest.mixed_views,
            **(rows.labels.recipe() if rows.labels else {}),
            "student_size": list(size),
            "precision": place.precision,
            "device": str(args.device),
            "processes": args.world_size,
            # an ensemble: its teachers, their normalised weights and their caches, as lists in the caches' order
            **(ensemble.recipe() if ensemble else {}),
        },
    }


# Options that say how a run goes, not what it trains, or that the recipe gives resolved (teacher: the run's teacher)
NOT_RECORDED = (
    "resume",
    "overwrite",
    "num_workers",
    "device",
    "logging_steps",
    "push_to_hub",
    "save_checkpoints",
    "train_split",
    "eval_split",
    "teacher",
)


def _save(
    trainer, summary: dict, folder: OutputFolder, manifest: Manifest, processor, size, options, processes
) -> None:
    """The final student (the best epoch's, or the EMA's) with its processor and model card, in `folder.finished`,
    which safe_output moves into place."""
    final, work = folder.finished, folder.work
    if is_main(processes):
        shutil.rmtree(final, ignore_errors=True)
    trainer.save_model(str(final))  # on every process: under DDP the Trainer has the main one write
    if is_main(processes):
        student_processor(processor, manifest.pixel_shape[1:], size).save_pretrained(str(final))
        (final / "kdcache_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (final / "README.md").write_text(model_card(summary, manifest, manifest.label_names, options.push_to_hub))
        if (work / "runs").exists():
            shutil.move(str(work / "runs"), str(final / "runs"))


def _push(output: Path, options: TrainingOptions, progress: bool, processes) -> None:
    with agreed(processes):  # a failed push is said once, and every process exits with it
        if options.push_to_hub and is_main(processes):
            url = push_folder(output, options.push_to_hub)
            if progress:
                log.info(f"pushed to {url}")


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


def summary_line(summary: dict) -> str:
    if summary["best_eval_accuracy"] is None:
        quality = "no evaluation split"
    else:
        quality = (
            f"best {summary['eval_split']} accuracy {summary['best_eval_accuracy']:.4f} at epoch "
            f"{summary['best_epoch']:g}, last {summary['last_eval_accuracy']:.4f} at epoch "
            f"{summary['last_epoch']:g} of {summary['epochs']:g}"
        )
    return f"{quality}; {summary['seconds']:.0f} s; student saved to {summary['output']}"


def loss_formula(recipe: dict) -> str:
    """The training loss as the model card states it (a summary written before --loss existed used kd)."""
    loss, settings = recipe.get("loss", "kd"), f"T={recipe['temperature']}, alpha={recipe['alpha']}"
    standardized = "z-scored " if recipe.get("standardize_logits") else ""
    distillation = {
        "kd": f"T^2 KL({standardized}teacher/T, {standardized}student/T)",
        "dkd": f"T^2 (TCKD + 8 NCKD) of the {standardized}logits/T (decoupled KD, Zhao et al. 2022)",
        "dist": "T^2 (inter + intra), one minus the Pearson correlations of softmax(logits/T) per image and per class "
        "(DIST, Huang et al. 2022)",
    }[loss]
    return f"{loss}: (1-alpha) CE + alpha {distillation}, {settings}" + (
        ", logits standardised" if standardized else ""
    )


def public_name(name_or_path: str) -> tuple[str, bool]:
    """How a model card names an input: `(hub id, True)` for one read from the hub, else `(folder name, False)`: the
    path it was read from would publish the trainer's folder layout with the card. Local is what the loaders took as
    local (a path that exists, as kdcache.data and from_pretrained decide) or what is written as a path."""
    path = Path(name_or_path).expanduser()
    if path.exists() or path.is_absolute() or name_or_path.startswith((".", "~")):
        return path.resolve().name or name_or_path, False
    return name_or_path, True


def card_metadata(summary: dict, manifest: dict, repo: str | None = None) -> str:
    """The card's YAML metadata in the Hub's conventions, those of transformers' `Trainer.create_model_card`: the
    dataset (a hub id only: a folder name would link nowhere), the metric, a model-index with the accuracy of the
    saved epoch on the split it was chosen on, and `base_model` for a student that started from a hub model."""
    from huggingface_hub import EvalResult, ModelCardData

    recipe = summary["recipe"]
    dataset, dataset_from_hub = public_name(manifest["dataset"]["name_or_path"])
    student = recipe.get("student") or ""
    hub_student = bool(student) and "/" in student and public_name(student)[1]  # a config name has no owner
    results = []
    if summary["best_eval_accuracy"] is not None:
        best = summary.get("saved_epoch", summary["best_epoch"]) == summary["best_epoch"]
        results.append(
            EvalResult(
                task_type="image-classification",
                task_name="Image Classification",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=summary["eval_split"],
                dataset_revision=manifest["dataset"].get("revision") if dataset_from_hub else None,
                metric_type="accuracy",
                metric_name="Accuracy",
                metric_value=summary["best_eval_accuracy"] if best else summary["last_eval_accuracy"],
            )
        )
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=["kdcache", "knowledge-distillation", "image-classification"],
        datasets=[dataset] if dataset_from_hub else None,
        metrics=["accuracy"],
        base_model=student if hub_student else None,
        model_name=repo or Path(summary["output"]).name,
        eval_results=results or None,
    )
    return data.to_yaml()


def model_card(summary: dict, manifest: dict, names: list[str], repo: str | None = None) -> str:
    recipe = summary["recipe"]
    accuracy = summary["best_eval_accuracy"]
    ensemble = isinstance(recipe["teacher"], list)  # several caches: their teachers, weights and caches are lists
    if ensemble:
        teachers = [public_name(teacher)[0] for teacher in recipe["teacher"]]
        teacher_intro = (
            f"an ensemble of {len(teachers)} teachers ("
            + ", ".join(f"`{teacher}`" for teacher in teachers)
            + f"), their probabilities at T={recipe['temperature']} averaged"
        )
        teacher_row = "| teachers (weight) | " + ", ".join(
            f"`{teacher}` ({weight:g}, weights sha256 `{sha[:16]}...`)"
            for teacher, weight, sha in zip(teachers, recipe["teacher_weights"], recipe["teacher_weights_sha256"])
        )
        cache_row = "| logit caches | fingerprints " + ", ".join(f"`{f}`" for f in recipe["cache_fingerprint"])
    else:
        teacher = public_name(recipe["teacher"])[0]
        teacher_intro = f"the teacher `{teacher}`"
        teacher_row = f"| teacher | `{teacher}` (weights sha256 `{manifest['teacher']['weights_sha256'][:16]}...`)"
        cache_row = f"| logit cache | fingerprint `{recipe['cache_fingerprint']}`"
    student = recipe["student"]
    if student != "MobileNetV2Config() from scratch":  # a config name, a hub id or a folder
        student = f"`{public_name(student)[0]}`"
    lines = [
        "---",
        card_metadata(summary, manifest, repo).rstrip("\n"),
        "---",
        "",
        f"# {Path(summary['output']).name}",
        "",
        (
            f"A student distilled by kdcache from {teacher_intro}"
            if recipe["alpha"] > 0
            else "A student trained from labels alone (alpha=0) by kdcache, as a baseline"
        )
        + f", on `{public_name(manifest['dataset']['name_or_path'])[0]}` ({', '.join(names)}).",
        "",
        "| | |",
        "|---|---|",
        teacher_row + " |",
        cache_row + (" (teacher run online)" if recipe["online"] else "") + " |",
        f"| student | {student}, {recipe['student_parameters']:,} parameters |",
        f"| loss | {loss_formula(recipe)} |",
        f"| training | {summary['epochs']:g} epochs ({summary['steps']} steps), AdamW lr {recipe['learning_rate']}, "
        f"{recipe['scheduler']} schedule, batch {recipe['batch_size']}"
        + (
            f" ({recipe['processes']} processes of {recipe['batch_size'] // recipe['processes']})"
            if recipe.get("processes", 1) > 1
            else ""
        )
        + f", weight decay {recipe['weight_decay']}, seed {recipe['seed']} |",
    ]
    labeled, training = recipe.get("labeled_rows"), recipe.get("training_rows")
    if labeled is not None and labeled < training:
        budget = recipe.get("labeled_fraction")
        lines.append(
            f"| labels | {labeled:,} of the {training:,} training images labelled"
            + (f" (a stratified {budget:g} of the training split, seed {recipe['seed']})" if budget else "")
            + (f"; unlabeled splits {', '.join(recipe['unlabeled_splits'])}" if recipe.get("unlabeled_splits") else "")
            + "; images without a label are taught by the teacher alone |"
        )
    size = recipe.get("student_size")
    if size:
        views = recipe.get("views", 1)
        lines.append(
            f"| input | {size[0]}x{size[1]} pixels"
            + (
                f"; {views} {'mixed ' if recipe.get('mixed_views') else ''}views per image, each the teacher's own"
                if views > 1
                else ""
            )
            + (f"; weights: EMA with decay {recipe['ema_decay']}" if recipe.get("ema_decay") else "")
            + " |"
        )
    if accuracy is not None:
        saved = "best" if summary.get("saved_epoch", summary["best_epoch"]) == summary["best_epoch"] else "last"
        lines.append(
            f"| {summary['eval_split']} accuracy | best {accuracy:.4f} (epoch {summary['best_epoch']:g}), last "
            f"{summary['last_eval_accuracy']:.4f} (epoch {summary['last_epoch']:g}); the {saved} epoch's weights are saved |"
        )
    lines += [
        "",
        "```python",
        "from transformers import pipeline",
        # the hub id once pushed; before, the folder this card is in
        f'classifier = pipeline("image-classification", model="{repo or Path(summary["output"]).name}")',
        "```",
        "",
    ]
    return "\n".join(lines)
