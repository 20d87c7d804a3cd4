"""Each stage's options, declared once: their defaults, their checks before any work, and (stage two) the record
that lets --resume refuse a changed command. Kept free of heavy imports so that `kdcache --help` stays instant."""

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from kdcache.errors import KdcacheError

# transformers schedules that need nothing beyond warmup and the step count. The others need settings kdcache does
# not pass (cosine_with_min_lr, warmup_stable_decay) or step on a metric assumed to be a loss (reduce_lr_on_plateau,
# greedy), while kdcache keeps the best accuracy.
SCHEDULERS = (
    "linear",
    "cosine",
    "cosine_with_restarts",
    "polynomial",
    "constant",
    "constant_with_warmup",
    "inverse_sqrt",
)
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
CACHE_PRECISIONS = ("fp32", "bf16", "fp16")  # stage one computes in fp32 unless told otherwise
LOGITS_DTYPES = ("fp32", "fp16")  # how stage one stores the logits, whatever it computed them in

OPTIONS_FILE = "kdcache_options.json"
# Options that change how fast, how loud or where a run goes, not what it trains: --resume may change them.
NOT_COMPARED = (
    "cache",
    "output",
    "resume",
    "overwrite",
    "num_workers",
    "device",
    "logging_steps",
    "push_to_hub",
    "callbacks",
    "progress",
)


class Options:
    """What every stage's options dataclass shares."""

    @classmethod
    def default(cls, name: str):
        """The default of option `name` (for the command line's options)."""
        return next(field.default for field in fields(cls) if field.name == name)


@dataclass
class TrainingOptions(Options):
    """Every option of stage two, with its default: `kdcache train-student` and `train_student(cache, **options)`
    both build one, `check` refuses a bad one, and the run's record (--resume), summary and model card read it.

    The training recipe's defaults were chosen by measurement on the beans validation split (BENCHMARKS.md,
    "Choosing the defaults"): AdamW at 1e-3 beat 3e-3 (validation 0.955 vs 0.895 after 20 epochs), and 20 epochs beat
    10 (0.955 vs 0.820): a student trained from scratch needs a from-scratch recipe, not the tutorial's fine-tuning
    one (5e-5, no schedule).
    """

    student: str | None = None
    loss: str = "kd"  # a name in kdcache.student.loss.LOSSES
    temperature: float | None = None  # None: the loss's paper's (kdcache.student.loss.DEFAULT_TEMPERATURES)
    alpha: float = 0.5
    standardize_logits: bool = False
    teacher_weights: list[float] | None = None  # one per cache of an ensemble, normalised; None: equal
    epochs: float = 20
    learning_rate: float = 1e-3
    batch_size: int = 32
    weight_decay: float = 0.05
    warmup_ratio: float = 0.05
    scheduler: str = "cosine"
    seed: int = 42
    train_split: str = "train"
    eval_split: str | None = "validation"
    # None: every cached split without labels, when alpha > 0 (none with alpha 0, --online, --student-only-augment)
    unlabeled_splits: list[str] | None = None
    labeled_fraction: float | None = None  # None: every label of the training split (kdcache.labels)
    max_steps: int = -1
    resume: bool = False
    overwrite: bool = False
    online: bool = False
    teacher: str | None = None
    student_only_augment: bool = False
    student_size: int | None = None
    ema_decay: float | None = None
    num_workers: int | None = None
    device: str = "auto"
    precision: str = "auto"
    logging_steps: int = 10
    save_checkpoints: bool = True
    push_to_hub: str | None = None

    def check(self, processes: int = 1, caches: int = 1) -> None:
        """Every option that can be wrong on its own, each refused with one line naming the fix. `processes`: how
        many processes share the batch; `caches`: how many caches the teachers' targets come from (an ensemble)."""
        check_training_options(processes=processes, caches=caches, **asdict(self))

    def resolved(self) -> "TrainingOptions":
        """These options with what a default of None stands for filled in (the loss's temperature)."""
        from kdcache.student.loss import DEFAULT_TEMPERATURES

        return replace(
            self, temperature=DEFAULT_TEMPERATURES[self.loss] if self.temperature is None else self.temperature
        )


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_training_options(
    *,
    temperature,
    alpha,
    epochs,
    max_steps,
    learning_rate,
    batch_size,
    processes,
    weight_decay,
    warmup_ratio,
    scheduler,
    seed,
    num_workers,
    logging_steps,
    precision,
    online,
    teacher,
    student_only_augment,
    resume,
    save_checkpoints,
    push_to_hub,
    student_size=None,
    ema_decay=None,
    loss="kd",
    standardize_logits=False,
    teacher_weights=None,
    caches=1,
    labeled_fraction=None,
    unlabeled_splits=None,
    **unchecked,
) -> None:
    """Every option of train_student that can be wrong on its own, each refused with one line naming the fix."""
    from kdcache.labels import check_label_options
    from kdcache.student.loss import DEFAULT_TEMPERATURES, LOSSES, check_loss_settings

    if loss not in LOSSES:
        raise KdcacheError(f"--loss '{loss}' is not one of {', '.join(LOSSES)}")
    check_label_options(
        labeled_fraction=labeled_fraction,
        unlabeled_splits=unlabeled_splits,
        alpha=alpha,
        online=online,
        student_only_augment=student_only_augment,
        loss=loss,
    )
    if standardize_logits and loss == "dist":
        raise KdcacheError(
            "--standardize-logits is an option of the KL-based losses (kd, dkd), which its paper "
            "defines it for, not of --loss dist; leave it out or use --loss kd or dkd"
        )
    check_loss_settings(DEFAULT_TEMPERATURES[loss] if temperature is None else temperature, alpha)
    check_teacher_weights(teacher_weights, caches)
    if caches > 1:
        check_ensemble_options(alpha=alpha, standardize_logits=standardize_logits, online=online)
    if max_steps != -1 and max_steps < 1:
        raise KdcacheError(f"max_steps={max_steps} must be at least 1 (or -1, the default, to train for --epochs)")
    if max_steps == -1 and not (_finite(epochs) and epochs > 0):
        raise KdcacheError(f"--epochs {epochs} must be > 0")
    if not (_finite(learning_rate) and learning_rate > 0):
        raise KdcacheError(f"--learning-rate {learning_rate} must be > 0")
    if batch_size < 1:
        raise KdcacheError(f"--batch-size {batch_size} must be at least 1")
    if batch_size % processes:
        raise KdcacheError(
            f"--batch-size {batch_size} is the batch of all {processes} processes together; "
            f"make it a multiple of {processes}"
        )
    if not (_finite(weight_decay) and weight_decay >= 0):
        raise KdcacheError(f"--weight-decay {weight_decay} must be >= 0")
    # transformers reads warmup_steps < 1 as a fraction of the steps and >= 1 as a number of steps.
    if not (_finite(warmup_ratio) and 0 <= warmup_ratio < 1):
        raise KdcacheError(
            f"--warmup-ratio {warmup_ratio} is the fraction of the steps spent warming up: it must be >= 0 and < 1"
        )
    if scheduler not in SCHEDULERS:
        raise KdcacheError(f"--scheduler '{scheduler}' is not one of {', '.join(SCHEDULERS)}")
    if not 0 <= seed < 2**32:
        raise KdcacheError(f"--seed {seed} must be >= 0 and < 2**32")
    if num_workers is not None and num_workers < 0:
        raise KdcacheError(f"--num-workers {num_workers} must be >= 0")
    if logging_steps < 1:
        raise KdcacheError(f"logging_steps={logging_steps} must be at least 1")
    if student_size is not None and student_size < 16:
        raise KdcacheError(
            f"--student-size {student_size} is too small; give the student's input side in pixels (e.g. 128)"
        )
    if ema_decay is not None and not (_finite(ema_decay) and 0 < ema_decay < 1):
        raise KdcacheError(f"--ema-decay {ema_decay} must be between 0 and 1 (e.g. 0.99); leave it out for no EMA")
    if precision not in PRECISIONS:
        raise KdcacheError(f"--precision '{precision}' is not one of {', '.join(PRECISIONS)}")
    if teacher is not None and not online:
        raise KdcacheError(
            "--teacher is used with --online only: without it the student learns from the cache's "
            "logits, made by the cache's teacher"
        )
    if online and student_only_augment:
        raise KdcacheError(
            "--online and --student-only-augment are two different runs: the online teacher sees "
            "the student's own input; pass one of them"
        )
    if resume and not save_checkpoints:
        raise KdcacheError(
            "--resume continues from the checkpoints of an interrupted run; it cannot go with save_checkpoints=False"
        )
    if push_to_hub is not None:
        from huggingface_hub.utils import HFValidationError, validate_repo_id

        try:
            validate_repo_id(push_to_hub)
        except HFValidationError:
            raise KdcacheError(
                f"--push-to-hub '{push_to_hub}' is not a hub repository id; use NAME or OWNER/NAME "
                "(letters, digits, '-', '_', '.')"
            ) from None


def check_teacher_weights(weights, caches: int) -> None:
    """--teacher-weights: one finite weight > 0 per cache of an ensemble (train-student and evaluate)."""
    if weights is None:
        return
    given = ",".join(f"{weight:g}" if _finite(weight) else str(weight) for weight in weights)
    if caches < 2:
        raise KdcacheError(
            f"--teacher-weights {given} weighs the teachers of several caches against each other, and "
            f"{caches} cache was given; leave it out, or give more caches"
        )
    if len(weights) != caches:
        raise KdcacheError(
            f"--teacher-weights {given} gives {len(weights)} weights for {caches} caches; give one per cache, "
            "in the caches' order"
        )
    if not all(_finite(weight) and weight > 0 for weight in weights):
        raise KdcacheError(
            f"--teacher-weights {given}: every weight must be a number > 0 (they are normalised to sum 1); "
            "leave a teacher out by leaving out its cache"
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
    """What a loss needs of the cache it trains from, refused before training (kdcache.student.loss.dkd_loss would refuse
    the first batch): DKD's non-target part needs a third class, and its target part one label per image."""
    if loss != "dkd":
        return
    if classes <= 2:
        raise KdcacheError(
            f"--loss dkd needs more than 2 classes (its non-target part is over the classes other than "
            f"the label's), and cache '{cache}' has {classes}; use --loss kd or --loss dist"
        )
    if mixed_labels:
        raise KdcacheError(
            f"--loss dkd needs one label per image, and cache '{cache}' mixes images (mixup): each "
            "training image has two weighted labels; use --loss kd or --loss dist with this cache"
        )


def run_options(options: TrainingOptions, **resolved) -> dict:
    """What a run trains with: its options less NOT_COMPARED, plus values resolved from them (the cache's
    fingerprint instead of its path, which may move; the precision that `auto` became), as JSON values."""
    recorded = {name: value for name, value in asdict(options).items() if name not in NOT_COMPARED}
    recorded.update(resolved)
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


@dataclass
class CacheOptions(Options):
    """Every option of stage one besides its dataset, teacher and output, with its default: `kdcache teacher-logits`
    and `teacher_logits(dataset, teacher, output=..., **options)` both build one, and `check` refuses a bad one.
    The fingerprint of a cache is taken of what these options produce (kdcache.teacher.run), not of the options."""

    splits: list[str] | None = None  # None: all of the dataset's
    # images without labels added as a split of the cache (kdcache.labels): a hub id, a save_to_disk folder, or a
    # folder of image files; the split of it to read (None: its only one, or train); the cache's name for it
    extra_images: str | None = None
    extra_images_split: str | None = None
    extra_split: str = "unlabeled"
    batch_size: int = 32
    device: str = "auto"
    precision: str = "fp32"
    revision: str | None = None
    dataset_revision: str | None = None
    image_column: str | None = None
    label_column: str | None = None
    trust_remote_code: bool = False
    match_labels_by_index: bool = False
    views: int = 1
    view_splits: list[str] | None = None  # None: train, when views > 1
    view_scale: tuple[float, float] = (0.25, 1.0)
    view_seed: int = 0
    source_size: int | None = None  # None: 8/7 of the teacher's input; 0: the whole image
    mix_alpha: float = 0.0
    logits_dtype: str = "fp32"
    top_k: int | None = None  # None: every logit; K: the K largest and the tail (kdcache.format.codec)
    overwrite: bool = False
    num_workers: int | None = None
    chunk_size: int = 512

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
        if not (_finite(self.mix_alpha) and self.mix_alpha >= 0):
            raise KdcacheError(f"--mix-alpha {self.mix_alpha} must be >= 0 (0: no mixing)")


@dataclass
class EvaluationOptions(Options):
    """Every option of `kdcache evaluate` besides its models and output, with its default: the command and
    `evaluate_models(models, output=..., **options)` both build one, and `check` refuses a bad one."""

    dataset: str | None = None  # None: the one the cache was made from, else beans
    split: str = "test"
    cache: str | Path | list | None = None  # several: a teacher ensemble
    teacher_weights: list[float] | None = None  # an ensemble's, one per cache; None: equal
    batch_size: int = 32
    device: str = "auto"
    image_column: str | None = None
    label_column: str | None = None
    match_labels_by_index: bool = False

    @property
    def caches(self) -> list:
        """The caches given, as a list (none, one, or an ensemble's)."""
        return [self.cache] if isinstance(self.cache, (str, Path)) else list(self.cache or [])

    def check(self) -> None:
        if self.batch_size < 1:
            raise KdcacheError(f"--batch-size {self.batch_size} must be at least 1")
        check_teacher_weights(self.teacher_weights, len(self.caches))
