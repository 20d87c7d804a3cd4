"""Stage two's options (`kdcache train-student`, `kdcache sweep`, `train_student`): each declared once with its
default and help, their checks before any work, and the record that lets --resume refuse a changed command."""

import json
from dataclasses import dataclass, fields, replace
from pathlib import Path

from kdcache.errors import KdcacheError
from kdcache.losses import LOSS_SPECS, check_loss_settings, others
from kdcache.options.fields import (
    DEVICE_HELP,
    PRECISIONS,
    SCHEDULERS,
    TEACHER_WEIGHTS_HELP,
    check_teacher_weights,
    either,
    finite,
    none_or_name,
    none_or_split_list,
    option,
    parse_teacher_weights,
)
from kdcache.options.resolution import check_every_size_trains, parse_student_size, size_schedule

OPTIONS_FILE = "kdcache_options.json"

# --epochs and --learning-rate where not given: a student trained from its initial weights (measured: the
# TrainingOptions docstring), and a quantization-aware continuation of a trained one, which only has to learn to live
# with int8 rounding: a few epochs at a tenth of the learning rate, as quantization-aware fine-tuning is done
# (docs/training.md, "Quantization-aware distillation").
EPOCHS, LEARNING_RATE = 20, 1e-3
QUANTIZATION_AWARE_EPOCHS, QUANTIZATION_AWARE_LEARNING_RATE = 3, 1e-4


@dataclass
class TrainingOptions:
    """Every option of stage two, with its default and its command-line help: `kdcache train-student` (and, for
    those marked `sweep`, `kdcache sweep`) and `train_student(cache, **options)` all build one, `check` refuses a bad
    one, and the run's record (--resume), summary and model card read it.

    The training recipe's defaults were chosen by measurement on the beans validation split (BENCHMARKS.md,
    "Choosing the defaults"): AdamW at 1e-3 beat 3e-3 (validation 0.955 vs 0.895 after 20 epochs), and 20 epochs beat
    10 (0.955 vs 0.820): a student trained from scratch needs a from-scratch recipe, not the tutorial's fine-tuning
    one (5e-5, no schedule).
    """

    student: str | None = option(
        None,
        "Student: a model type from scratch (e.g. mobilenet_v2), a config-only folder, or a hub id / folder with "
        "weights.",
        show_default="MobileNetV2Config() from scratch",
        sweep=dict(help="As in train-student."),
    )
    quantization_aware: bool = option(
        False,
        "Continue the trained student named by --student under fake int8 quantization, rounded as kdcache export's "
        "static int8 (ONNX Runtime QDQ, per-channel weights) will round it, so that it keeps its accuracy once "
        f"quantized; by default {QUANTIZATION_AWARE_EPOCHS} epochs at learning rate "
        f"{QUANTIZATION_AWARE_LEARNING_RATE:g}.",
    )
    loss: str = option(
        "kd",  # a name in kdcache.losses
        "Distillation loss. " + " ".join(f"{loss.name}: {loss.summary}." for loss in LOSS_SPECS.values()),
        sweep=dict(help=f"{either(list(LOSS_SPECS))} (as in train-student)."),
    )
    temperature: float | None = option(
        None,  # None: the loss's, as kdcache.losses declares it
        "Softmax temperature T of the distillation term.",
        flags=("--temperature", "-T"),
        show_default=", ".join(f"{loss.temperature:g} for {loss.name}" for loss in LOSS_SPECS.values()),
        sweep=dict(help="Softmax temperature T.", show_default="the loss's"),
    )
    alpha: float = option(
        0.5,
        "Weight of the distillation part against the labels' cross-entropy, for every --loss: 0 = labels only (a "
        "from-scratch baseline), 1 = teacher only; 0.5 is the DKD and DIST papers' 1:1.",
        flags=("--alpha", "--lambda"),
        sweep=dict(help="Weight of the distillation part against the labels' CE.", flags=("--alpha",)),
    )
    standardize_logits: bool = option(
        False,
        "z-score each image's logits, student's and teacher's, before the softmax: the student matches the teacher's "
        "ranking of the classes, not the range of its logits, and T becomes a base temperature (Sun et al. 2024 use "
        "2). " + " and ".join(loss.name for loss in LOSS_SPECS.values() if loss.standardizable) + ".",
        sweep=dict(help=None),
    )
    teacher_weights: list[float] | None = option(
        None,  # one per cache of an ensemble, normalised; None: equal
        TEACHER_WEIGHTS_HELP,
        show_default="equal",
        type=str,
        parse=parse_teacher_weights,
        sweep=dict(),
    )
    epochs: float | None = option(
        None,  # None: EPOCHS, or QUANTIZATION_AWARE_EPOCHS (TrainingOptions.with_recipe_defaults)
        "Training epochs.",
        show_default=f"{EPOCHS}; {QUANTIZATION_AWARE_EPOCHS} with --quantization-aware",
        sweep=dict(help="Training epochs of every trial.", show_default=str(EPOCHS)),  # no --quantization-aware
    )
    learning_rate: float | None = option(
        None,  # None: LEARNING_RATE, or QUANTIZATION_AWARE_LEARNING_RATE
        "Peak AdamW learning rate.",
        show_default=f"{LEARNING_RATE:g}; {QUANTIZATION_AWARE_LEARNING_RATE:g} with --quantization-aware",
        sweep=dict(show_default=f"{LEARNING_RATE:g}"),
    )
    batch_size: int = option(
        32,
        "Images per training step: the global batch, of all processes together when there are several (each takes "
        "its share).",
        sweep=dict(help="Images per training step."),
    )
    weight_decay: float = option(0.05, "AdamW weight decay.", sweep=dict())
    warmup_ratio: float = option(
        0.05,
        "Fraction of steps spent warming the learning rate up (>= 0 and < 1).",
        sweep=dict(help="Fraction of steps warming up."),
    )
    scheduler: str = option(
        "cosine",
        f"Learning-rate schedule: {either(SCHEDULERS)}.",
        sweep=dict(help="Learning-rate schedule (as in train-student)."),
    )
    seed: int = option(
        42,
        "Seed for the student's initial weights and the data order.",
        sweep=dict(help="Seed of every trial's student (unless swept)."),
    )
    train_split: str = option("train", in_recipe=False)
    eval_split: str | None = option(
        "validation",
        "Split evaluated after each epoch; the best epoch is kept. 'none' to skip.",
        type=str,
        parse=none_or_name,
        in_recipe=False,
        sweep=dict(help="Split each trial is scored on, at its best epoch."),
    )
    labeled_fraction: float | None = option(
        None,  # None: every label of the training split (kdcache.labels)
        "Keep the labels of this share of the training split's rows (seeded by --seed, stratified by class; e.g. "
        "0.1) and train on the others without labels, taught by the teacher alone: a label budget. With --alpha 0, "
        "trains on the labelled share alone (the from-scratch baseline at the same budget).",
        show_default="every label",
    )
    unlabeled_splits: list[str] | None = option(
        None,  # None: every cached split without labels, when alpha > 0 (none with alpha 0, --online, --student-only-augment)
        "Cached splits of images without labels to train on besides the training split, comma-separated (e.g. "
        "unlabeled, from teacher-logits --extra-images); 'none' for none. Their rows add the distillation term alone.",
        show_default="every cached split without labels (none with --alpha 0)",
        type=str,
        parse=none_or_split_list,
    )
    max_steps: int = -1
    resume: bool = option(
        False,
        "Continue an interrupted run from its last checkpoint; refused if it was started with other options "
        "(workers, device and logging may change).",
        how_it_runs=True,
        in_config=False,
    )
    overwrite: bool = option(
        False, "Replace an existing output folder (or discard an interrupted run).", how_it_runs=True, in_config=False
    )
    online: bool = option(
        False, "Reference mode: run the teacher on every batch, as the tutorial does (for tests and benchmarks)."
    )
    teacher: str | None = option(
        None,
        "With --online: where to load the teacher from (the cache's teacher elsewhere; its weights must match the "
        "cache's).",
        show_default="the one recorded in the cache",
        in_recipe=False,
    )
    student_only_augment: bool = option(
        False,
        "Baseline for experiments: random views for the student, paired with the teacher's logits of the clean "
        "view (inconsistent teaching).",
    )
    student_size: int | str | None = option(
        None,  # an int, or a schedule as canonical text (kdcache.options.resolution)
        "Train the student at S x S pixels: each view is the teacher's crop, resized to S (cheaper steps; saved with "
        "a processor that feeds S). A schedule trains at growing sizes and ends at the one it is validated and saved "
        "at: 128:0.7,224 is 128 px for the first 70% of the epochs, then 224 px.",
        show_default="the teacher's input size",
        metavar="SIZE",
        type=str,
        parse=parse_student_size,
        sweep=dict(help="Train the students at S x S pixels, or a schedule of sizes (as in train-student)."),
    )
    ema_decay: float | None = option(
        None,
        "Keep an exponential moving average of the student's weights with this decay per step (e.g. 0.998); it is "
        "evaluated each epoch and saved as the student.",
        show_default="no EMA",
        sweep=dict(help="EMA decay of the weights."),
    )
    num_workers: int | None = option(
        None,
        "DataLoader worker processes.",
        show_default="1 for caches with views, else 0",
        how_it_runs=True,
        sweep=dict(help="DataLoader workers.", show_default="as train-student"),
    )
    device: str = option(
        "auto",
        DEVICE_HELP[:-1] + ": one device, also on a machine with several GPUs (use them all with --num-processes).",
        how_it_runs=True,
        sweep=dict(help="auto, cpu, cuda, cuda:1, mps: one device per process."),
    )
    precision: str = option(
        "auto",
        "auto (bf16 on CUDA GPUs that compute in it natively, Ampere or newer; else fp32), fp32, bf16, fp16.",
        sweep=dict(help="auto, fp32, bf16, fp16."),
    )
    logging_steps: int = option(10, how_it_runs=True)
    save_checkpoints: bool = option(True, in_recipe=False)
    license: str | None = option(
        None,
        "The license the student's model card declares: a Hub license id (apache-2.0, mit, cc-by-4.0, other...).",
        show_default="the teacher's, else the dataset's, where its card on this machine says one",
        how_it_runs=True,  # the card's, not what is trained
    )
    push_to_hub: str | None = option(
        None,
        "Once the student is saved, upload its folder (weights, image processor, model card) to this hub "
        "repository, created if needed (needs a login: hf auth login).",
        metavar="REPO",
        how_it_runs=True,
        in_config=False,
    )

    def with_recipe_defaults(self) -> "TrainingOptions":
        """These options with --epochs and --learning-rate filled in where not given: those of a run from the
        student's initial weights, or of a quantization-aware continuation."""
        continuing = self.quantization_aware
        return replace(
            self,
            epochs=(QUANTIZATION_AWARE_EPOCHS if continuing else EPOCHS) if self.epochs is None else self.epochs,
            learning_rate=(QUANTIZATION_AWARE_LEARNING_RATE if continuing else LEARNING_RATE)
            if self.learning_rate is None
            else self.learning_rate,
        )

    def resolved(self) -> "TrainingOptions":
        """These options with what a default of None stands for filled in (the loss's declared temperature, the
        recipe's epochs and learning rate)."""
        return replace(
            self.with_recipe_defaults(),
            temperature=LOSS_SPECS[self.loss].temperature if self.temperature is None else self.temperature,
            student_size=parse_student_size(self.student_size),  # one spelling of a schedule, for --resume to compare
        )

    def compared(self) -> dict:
        """The options a --resume must repeat: all but those marked `how_it_runs`."""
        return {
            field.name: getattr(self, field.name) for field in fields(self) if not field.metadata.get("how_it_runs")
        }

    def recipe(self) -> dict:
        """The options as the summary's recipe records them, as given: those a --resume must repeat, less those the
        recipe gives resolved (marked `in_recipe=False`: the run's teacher, its splits)."""
        return {
            name: value
            for name, value in self.compared().items()
            if self.__dataclass_fields__[name].metadata.get("in_recipe", True)
        }

    def check(self, processes: int = 1, caches: int = 1) -> None:
        """Every option that can be wrong on its own, each refused with one line naming the fix. `processes`: how
        many processes share the batch; `caches`: how many caches the teachers' targets come from (an ensemble)."""
        from kdcache.labels import check_label_options

        check_loss_settings(self.loss, self.temperature, self.alpha, self.standardize_logits)
        check_label_options(
            labeled_fraction=self.labeled_fraction,
            unlabeled_splits=self.unlabeled_splits,
            alpha=self.alpha,
            online=self.online,
            student_only_augment=self.student_only_augment,
            loss=self.loss,
        )
        check_teacher_weights(self.teacher_weights, caches)
        if caches > 1:
            check_ensemble_options(alpha=self.alpha, standardize_logits=self.standardize_logits, online=self.online)
        self._check_quantization_aware()
        self._check_schedule(processes)
        self._check_run()

    def _check_schedule(self, processes: int) -> None:
        """The recipe's numbers: steps, learning rate, batch, schedule, seed."""
        recipe = self.with_recipe_defaults()
        epochs, max_steps, batch_size = recipe.epochs, self.max_steps, self.batch_size
        if max_steps != -1 and max_steps < 1:
            raise KdcacheError(f"max_steps={max_steps} must be at least 1 (or -1, the default, to train for --epochs)")
        if max_steps == -1 and not (finite(epochs) and epochs > 0):
            raise KdcacheError(f"--epochs {epochs} must be > 0")
        if not (finite(recipe.learning_rate) and recipe.learning_rate > 0):
            raise KdcacheError(f"--learning-rate {recipe.learning_rate} must be > 0")
        if batch_size < 1:
            raise KdcacheError(f"--batch-size {batch_size} must be at least 1")
        if batch_size % processes:
            raise KdcacheError(
                f"--batch-size {batch_size} is the batch of all {processes} processes together; "
                f"make it a multiple of {processes}"
            )
        if not (finite(self.weight_decay) and self.weight_decay >= 0):
            raise KdcacheError(f"--weight-decay {self.weight_decay} must be >= 0")
        # transformers reads warmup_steps < 1 as a fraction of the steps and >= 1 as a number of steps.
        if not (finite(self.warmup_ratio) and 0 <= self.warmup_ratio < 1):
            raise KdcacheError(
                f"--warmup-ratio {self.warmup_ratio} is the fraction of the steps spent warming up: it must be >= 0 "
                "and < 1"
            )
        if self.scheduler not in SCHEDULERS:
            raise KdcacheError(f"--scheduler '{self.scheduler}' is not one of {', '.join(SCHEDULERS)}")
        if not 0 <= self.seed < 2**32:
            raise KdcacheError(f"--seed {self.seed} must be >= 0 and < 2**32")

    def _check_run(self) -> None:
        """How the run goes: workers, logging, student size, EMA, precision, the teacher, resuming, the hub."""
        if self.num_workers is not None and self.num_workers < 0:
            raise KdcacheError(f"--num-workers {self.num_workers} must be >= 0")
        if self.logging_steps < 1:
            raise KdcacheError(f"logging_steps={self.logging_steps} must be at least 1")
        if len(size_schedule(self.student_size)) > 1:
            if self.max_steps == -1:
                check_every_size_trains(self.student_size, self.with_recipe_defaults().epochs)
            if self.online:
                raise KdcacheError(
                    f"--online runs the teacher on the student's input, which must then be the teacher's at every "
                    f"step; leave out the schedule --student-size {self.student_size}, or train from the cache"
                )
        if self.ema_decay is not None and not (finite(self.ema_decay) and 0 < self.ema_decay < 1):
            raise KdcacheError(
                f"--ema-decay {self.ema_decay} must be between 0 and 1 (e.g. 0.99); leave it out for no EMA"
            )
        if self.precision not in PRECISIONS:
            raise KdcacheError(f"--precision '{self.precision}' is not one of {', '.join(PRECISIONS)}")
        if self.teacher is not None and not self.online:
            raise KdcacheError(
                "--teacher is used with --online only: without it the student learns from the cache's "
                "logits, made by the cache's teacher"
            )
        if self.online and self.student_only_augment:
            raise KdcacheError(
                "--online and --student-only-augment are two different runs: the online teacher sees "
                "the student's own input; pass one of them"
            )
        if self.resume and not self.save_checkpoints:
            raise KdcacheError(
                "--resume continues from the checkpoints of an interrupted run; it cannot go with "
                "save_checkpoints=False"
            )
        if self.push_to_hub is not None:
            from huggingface_hub.utils import HFValidationError, validate_repo_id

            try:
                validate_repo_id(self.push_to_hub)
            except HFValidationError:
                raise KdcacheError(
                    f"--push-to-hub '{self.push_to_hub}' is not a hub repository id; use NAME or OWNER/NAME "
                    "(letters, digits, '-', '_', '.')"
                ) from None

    def _check_quantization_aware(self) -> None:
        """What --quantization-aware needs (a trained student to continue) and cannot go with (see each why)."""
        if not self.quantization_aware:
            return
        if self.student is None:
            raise KdcacheError(
                "--quantization-aware continues a trained student; name it with --student FOLDER (a kdcache "
                "train-student output, or a hub id of a classifier of the cache's classes)"
            )
        if len(size_schedule(self.student_size)) > 1:
            raise KdcacheError(
                f"--quantization-aware trains at the one size the student is exported at, with activation ranges "
                f"and BatchNorm statistics of that size; give --student-size one size, not the schedule "
                f"{self.student_size}"
            )
        if self.ema_decay is not None:
            raise KdcacheError(
                "--quantization-aware freezes its activation ranges and BatchNorm statistics for the weights they "
                "were observed with, and --ema-decay would average them over steps; leave out --ema-decay (an EMA "
                "student can be the --student it continues)"
            )


def check_ensemble_options(*, alpha, standardize_logits, online) -> None:
    """What a teacher ensemble (several caches) cannot go with: its targets are the teachers' probabilities at T,
    averaged (kdcache.format.ensemble.ensemble_teacher_logits), which kd, dkd and dist read exactly; see each refusal's why."""
    if alpha == 0:
        raise KdcacheError(
            "--alpha 0 trains from the labels alone, so several caches would make no difference; pass one cache"
        )
    if standardize_logits:
        raise KdcacheError(
            "--standardize-logits z-scores each teacher's logits, and an ensemble's targets are its teachers' "
            "probabilities averaged at T, which have no logits of their own to z-score; leave it out, or pass one cache"
        )
    if online:
        raise KdcacheError(
            "--online runs the one teacher of a cache on every batch; an ensemble is trained from its caches: "
            "leave out --online, or pass one cache"
        )


def check_loss_for_cache(loss: str, classes: int, mixed_labels: bool, cache) -> None:
    """What a loss needs of the cache it trains from, refused before training (kdcache.student.loss.dkd_loss would
    refuse the first batch): a loss that needs each image's one target class (kdcache.losses: DKD) needs a third
    class for its non-target part, and one label per image for its target part."""
    if not LOSS_SPECS[loss].needs_target_class:
        return
    if classes <= 2:
        raise KdcacheError(
            f"--loss {loss} needs more than 2 classes (its non-target part is over the classes other than "
            f"the label's), and cache '{cache}' has {classes}; use {others(loss)}"
        )
    if mixed_labels:
        raise KdcacheError(
            f"--loss {loss} needs one label per image, and cache '{cache}' mixes images (mixup): each "
            f"training image has two weighted labels; use {others(loss)} with this cache"
        )


def run_options(options: TrainingOptions, **resolved) -> dict:
    """What a run trains with: its options but those marked `how_it_runs` (TrainingOptions.compared), plus values
    resolved from them (the cache's fingerprint instead of its path, which may move; the precision that `auto`
    became), as JSON values."""
    recorded = {**options.compared(), **resolved}
    return json.loads(json.dumps(recorded, default=str))


def record_options(work: Path, options: dict) -> None:
    """Write the run's options into its work folder, before the Trainer writes anything there."""
    work.mkdir(parents=True, exist_ok=True)
    partial = work / (OPTIONS_FILE + ".tmp")
    partial.write_text(json.dumps(options, indent=2, sort_keys=True) + "\n")
    partial.replace(work / OPTIONS_FILE)


def check_resumable(work: Path, options: dict) -> None:
    """--resume: refuse unless `work` holds a checkpoint of a run started with the same options."""
    if not work.is_dir():
        raise KdcacheError(
            f"--resume: there is no interrupted run to continue ('{work}' does not exist); "
            "run without --resume to start one"
        )
    if not any(work.glob("checkpoint-*")):
        raise KdcacheError(
            f"--resume: the interrupted run in '{work}' stopped before its first checkpoint, so there "
            "is nothing to continue; pass --overwrite instead to start over"
        )
    try:
        recorded = json.loads((work / OPTIONS_FILE).read_text())
    except (OSError, ValueError):
        raise KdcacheError(
            f"--resume: the interrupted run in '{work}' has no readable record of its options "
            f"({OPTIONS_FILE}), so it cannot be checked; pass --overwrite instead to start over"
        ) from None
    changed = [
        f"{_label(name)} {json.dumps(recorded.get(name))} (now {json.dumps(options.get(name))})"
        for name in sorted(set(recorded) | set(options))
        if recorded.get(name) != options.get(name)
    ]
    if changed:
        raise KdcacheError(
            f"--resume: the interrupted run in '{work}' was started with other options: "
            f"{'; '.join(changed)}; resume with the same options, or pass --overwrite to start over"
        )


def _label(name: str) -> str:
    return "the cache's fingerprint" if name == "cache_fingerprint" else "--" + name.replace("_", "-")
