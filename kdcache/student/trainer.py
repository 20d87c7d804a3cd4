"""The Hugging Face Trainer, distilling: the loss read from the batch's cached teacher logits (or, online, from the
teacher run on the batch: the tutorial's way, kept as the reference the tests compare against), every term logged."""

import math
import time
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback

from kdcache.data import ImagePipeline
from kdcache.devices import OneDeviceArguments
from kdcache.format.manifest import Manifest
from kdcache.format.replay import Collator, ViewRows
from kdcache.options import TrainingOptions
from kdcache.options.resolution import epoch_sizes, size_schedule
from kdcache.outputs import OutputFolder
from kdcache.runtime import MappedFiles, Placement, Processes, cpus_per_process
from kdcache.student.ema import StudentEMA
from kdcache.student.loss import LOSSES
from kdcache.student.quantization import FakeQuantization, QuantizationSchedule
from kdcache.student.rows import TrainingRows, TrainRows


class DistillationTrainer(Trainer):
    """Trainer whose loss is one of kdcache's distillation losses (kdcache.student.loss.LOSSES) over the batch's
    `teacher_logits`, with a run's settings: the options' (TrainingOptions.resolved), checked once before training."""

    loss_is_scaled_for_ga = False  # every kdcache loss is a per-batch mean

    def __init__(self, *args, loss, temperature, alpha, standardize, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.alpha, self.teacher = alpha, teacher
        settings = dict(temperature=temperature, alpha=alpha)
        if standardize:  # only a loss declared standardizable takes it (the options refused it for the others)
            settings["standardize"] = True
        self.loss_function = partial(LOSSES[loss], **settings)
        self.loss_terms, self.loss_term_steps = {}, 0  # summed since the last log: what each term contributes

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.get("teacher_logits")
        if self.teacher is not None and self.alpha > 0:
            teacher_logits = self.teacher(inputs["pixel_values"])
        outputs = model(pixel_values=inputs["pixel_values"])
        loss, terms = self.loss_function(outputs.logits, inputs["labels"], teacher_logits, return_terms=True)
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


class SetEpoch(TrainerCallback):
    """Tells the view rows which epoch is starting (Trainer tells samplers, not map-style datasets)."""

    def __init__(self, rows: ViewRows):
        self.rows = rows

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.rows.epoch = int(math.floor((state.epoch or 0) + 1e-6))


class ResolutionSchedule(TrainerCallback):
    """--student-size as a schedule (kdcache.options.resolution): each epoch's training rows are rendered (ViewRows)
    and batched (Collator) at that epoch's size, and evaluation at the final size, the one the student is saved at.
    The DataLoader's workers start with each epoch, so they see the size set when it begins.

    At a size change the BatchNorm running statistics restart and are estimated from the new size's first epoch
    alone (a plain mean, then the usual momentum): the activations' statistics change with the apparent size of the
    objects (FixRes, Touvron et al. 2019), so the old size's would describe other inputs; the last phase at the
    final size is FixRes's fine-tuning at the test resolution. What happens at an epoch's start depends on its
    number alone, so a run resumed there does exactly what an uninterrupted one does."""

    def __init__(self, student_size, collator: Collator, view_rows: ViewRows | None, final: tuple):
        self.student_size, self.collator, self.view_rows = student_size, collator, view_rows
        self.final = tuple(final)
        self.momenta = {}  # BatchNorm modules whose momentum waits for the end of a size's first epoch

    def on_epoch_begin(self, args, state, control, model=None, **kwargs):
        sizes = epoch_sizes(self.student_size, state.num_train_epochs)
        epoch = min(int(math.floor((state.epoch or 0) + 1e-6)), len(sizes) - 1)
        self.collator.student_size = (sizes[epoch], sizes[epoch])
        if self.view_rows is not None:
            self.view_rows.size = (sizes[epoch], sizes[epoch])
        if epoch and sizes[epoch] != sizes[epoch - 1]:
            for module in model.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and module.track_running_stats:
                    module.reset_running_stats()
                    self.momenta[module], module.momentum = module.momentum, None  # None: a cumulative mean

    def on_epoch_end(self, args, state, control, **kwargs):
        self.collator.student_size = self.final
        for module, momentum in self.momenta.items():
            module.momentum = momentum
        self.momenta = {}


def accuracy_metric(prediction):
    logits = prediction.predictions[0] if isinstance(prediction.predictions, tuple) else prediction.predictions
    return {"accuracy": float((np.argmax(logits, axis=-1) == prediction.label_ids).mean())}


def training_callbacks(
    callbacks, rows: TrainingRows, options: TrainingOptions, fake_quantization: FakeQuantization | None = None
) -> list:
    callbacks = list(callbacks or [])
    view_rows = _view_rows(rows)
    if view_rows is not None:
        callbacks.append(SetEpoch(view_rows))
    if options.ema_decay is not None:
        callbacks.append(StudentEMA(options.ema_decay))
    if fake_quantization is not None:
        callbacks.append(QuantizationSchedule(fake_quantization))
    return callbacks


def _view_rows(rows: TrainingRows) -> ViewRows | None:
    """The training rows' ViewRows, when they are rendered from stored views."""
    view_rows = rows.train.rows if isinstance(rows.train, TrainRows) else rows.train
    return view_rows if isinstance(view_rows, ViewRows) else None


@dataclass
class StudentRun:
    """What the steps of one training run share (kdcache.student.train), as its checks and inputs produced it."""

    options: TrainingOptions  # resolved: the loss's temperature, the unlabeled splits
    place: Placement
    processes: Processes | None
    folder: OutputFolder
    caches: list  # the cache folders (several: a teacher ensemble)
    cache_path: Path  # the first
    manifest: Manifest  # the first cache's
    ensemble: object | None  # kdcache.format.ensemble's, for several caches
    fingerprint: object  # the cache's, or the list of an ensemble's caches'
    processor: object  # the teacher's image processor, saved in the cache
    pipeline: ImagePipeline
    size: tuple  # the student's input (height, width)
    model: torch.nn.Module
    fake_quantization: FakeQuantization | None  # --quantization-aware's, on the model until it is saved
    rows: TrainingRows
    callbacks: list
    progress: bool


def build_trainer(run: StudentRun) -> "DistillationTrainer":
    """The Trainer of a run: its arguments from the options, the rows, the collator, the loss and the callbacks."""
    options, place, rows = run.options, run.place, run.rows
    import importlib.util

    num_workers = options.num_workers
    if num_workers is None:  # rebuilding views costs a few ms of CPU per image: prepare them ahead of the step
        views = _view_rows(rows) is not None
        num_workers = 1 if views and cpus_per_process(run.processes) >= 2 else 0
    evaluating = rows.eval is not None
    args = OneDeviceArguments(
        output_dir=str(run.folder.work),
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
        disable_tqdm=not run.progress,
        push_to_hub=False,  # kdcache pushes the finished student folder itself, once (kdcache.hub)
    )
    collator = Collator(run.pipeline, run.size, len(run.manifest.label_names), MappedFiles(run.caches))
    callbacks = run.callbacks
    if len(size_schedule(options.student_size)) > 1:
        callbacks = [*callbacks, ResolutionSchedule(options.student_size, collator, _view_rows(rows), run.size)]
    trainer = DistillationTrainer(
        model=run.model,
        args=args,
        train_dataset=rows.train,
        eval_dataset=rows.eval,
        data_collator=collator,
        compute_metrics=accuracy_metric if evaluating else None,
        temperature=options.temperature,
        alpha=options.alpha,
        teacher=rows.online_teacher,
        loss=options.loss,
        standardize=options.standardize_logits,
        callbacks=callbacks,
    )
    if not run.progress:  # Trainer prints every log line when its bar is off; quiet means quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    if args.report_to == ["tensorboard"]:
        from transformers.integrations import TensorBoardCallback

        trainer.remove_callback(TensorBoardCallback)
        trainer.add_callback(public_tensorboard())
    return trainer


def public_tensorboard():
    """transformers' TensorBoard logging, less what would publish this machine with the student's runs/ (pushed
    with it): the text of the Trainer's arguments keeps their values but not their folders, and the run's folder is
    named by its time alone, not by the host's name too."""
    import json

    from transformers.integrations import TensorBoardCallback

    class PublicArguments:
        def __init__(self, args):
            self.args = args

        def to_json_string(self) -> str:
            public = {key: value for key, value in self.args.to_dict().items() if not key.endswith("_dir")}
            return json.dumps(public, indent=2, default=str)

    class PublicTensorBoard(TensorBoardCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            if self.logging_dir is None:
                self.logging_dir = str(Path(args.output_dir) / "runs" / time.strftime("%b%d_%H-%M-%S"))
            super().on_train_begin(PublicArguments(args), state, control, **kwargs)

    return PublicTensorBoard()


def run_training(trainer, options: TrainingOptions) -> float:
    """Train (continuing from the last checkpoint with --resume); returns the wall time in seconds."""
    started = time.perf_counter()
    try:
        trainer.train(resume_from_checkpoint=True if options.resume else None)  # check_resumable found a checkpoint
    except BaseException:
        _close_event_files(trainer)
        raise
    return time.perf_counter() - started


def _close_event_files(trainer) -> None:
    """Close TensorBoard's writers, which the Trainer closes only when training ends well: their thread would write on
    into a work folder that the failure removes (kdcache.outputs.safe_output), and fail there, noisily."""
    from transformers.integrations import TensorBoardCallback

    for callback in trainer.callback_handler.callbacks:
        if isinstance(callback, TensorBoardCallback) and getattr(callback, "tb_writer", None) is not None:
            callback.tb_writer.close()
