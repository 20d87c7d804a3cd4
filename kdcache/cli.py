"""The `kdcache` command: thin typer wrappers over the library functions, one per stage."""

import functools
import os
import sys
from pathlib import Path
from typing import Optional

import typer

from kdcache.errors import KdcacheError
from kdcache.options import CacheOptions, EvaluationOptions, TrainingOptions

DEFAULT = TrainingOptions.default  # each stage's defaults are declared once, in kdcache.options
CACHE_DEFAULT, EVALUATION_DEFAULT = CacheOptions.default, EvaluationOptions.default

app = typer.Typer(
    help=(
        "Knowledge distillation for image classifiers, with the teacher run once.\n\n"
        "\b\n"
        "  kdcache teacher-logits   run the teacher once over a dataset, store its logits\n"
        "  kdcache train-student    train a small student from the cached soft targets\n"
        "  kdcache sweep            train many students: an Optuna study over train-student's options\n"
        "  kdcache evaluate         measure students and teachers on a split\n"
        "  kdcache info CACHE       what a cache holds and what produced it\n"
        "  kdcache verify CACHE     rerun the teacher on a sample of a cache: are its logits the teacher's?\n"
        "  kdcache demo             the whole pipeline offline, on scikit-learn's digits\n\n"
        "Every model or dataset argument takes a Hugging Face hub id or a local folder. "
        "Run 'kdcache COMMAND --help' for a command's options and an example."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def friendly(command):
    """User errors become one line and exit status 1, never a traceback."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdcacheError as error:
            if not getattr(error, "reported_elsewhere", False):  # several processes agreed on it: the main one says it
                typer.echo(f"kdcache: error: {error}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("kdcache: interrupted; run the same command again to resume", err=True)
            raise typer.Exit(130) from None

    return wrapper


NUM_PROCESSES_HELP = (
    "Start this command as N processes through accelerate's launcher, on this machine (one per GPU, "
    "or N CPU processes); for several machines use accelerate launch (README)."
)


def relaunch(num_processes: Optional[int], device: str) -> None:
    """--num-processes N: run the same command as N processes of one `accelerate launch` on this machine, then exit
    with its status. A shortcut for `accelerate launch --multi_gpu --num_processes N -m kdcache ...`: accelerate's
    --cpu launcher starts one process only (several CPU processes need MPI there), while its torchrun-based launcher
    starts CPU processes as well, and kdcache gives them a gloo process group."""
    from kdcache.runtime import launched_processes

    if num_processes is not None and num_processes < 1:
        raise KdcacheError("--num-processes must be at least 1")
    if num_processes in (None, 1) or launched_processes() > 1:
        return
    arguments, skip = [], False
    for argument in sys.argv[1:]:  # the same command, without --num-processes
        if skip or argument.startswith("--num-processes="):
            skip = False
            continue
        if argument == "--num-processes":
            skip = True
            continue
        arguments.append(argument)
    import logging

    import torch
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    gpus = torch.cuda.device_count() if device != "cpu" else 0
    if 0 < gpus < num_processes:
        raise KdcacheError(
            f"--num-processes {num_processes} needs one GPU each, and this machine has {gpus}; "
            f"use --num-processes {gpus}, or --device cpu for CPU processes"
        )
    launch = launch_command_parser().parse_args(
        [
            "--multi_gpu",
            "--num_processes",
            str(num_processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            "0",
            "-m",
            "kdcache",
            *arguments,
        ]
    )
    # A process that fails prints its own one-line error; the launcher's report of it would be a page of noise.
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    try:
        launch_command(launch)
    except ChildFailedError as error:
        rank, failure = error.get_first_failure()
        if failure.exitcode not in (1, 130):  # not one of kdcache's own exits, which have said why
            typer.echo(
                f"kdcache: error: process {rank} of {num_processes} ended with exit code {failure.exitcode}", err=True
            )
        raise typer.Exit(failure.exitcode if failure.exitcode > 0 else 1) from None
    raise typer.Exit(0)


def _split_list(value: Optional[str]) -> Optional[list[str]]:
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def _weights(value: Optional[str]) -> Optional[list[float]]:
    """--teacher-weights 0.5,0.5: one number per cache (checked by kdcache.options.check_teacher_weights)."""
    if value is None:
        return None
    try:
        return [float(part) for part in _split_list(value) or [""]]
    except ValueError:
        raise KdcacheError(
            f"--teacher-weights '{value}' is not a comma-separated list of numbers, one per cache (e.g. 0.5,0.5)"
        ) from None


TEACHER_WEIGHTS_HELP = (
    "With several caches: the weight of each cache's teacher in the ensemble, comma-separated in the caches' order "
    "(e.g. 0.7,0.3); normalised to sum 1."
)


@app.command("teacher-logits")
@friendly
def teacher_logits_command(
    dataset: str = typer.Option(
        "beans",
        help="Hub dataset id, or a local folder: save_to_disk output, parquet files with a card, or an image folder.",
    ),
    teacher: str = typer.Option(
        "merve/beans-vit-224", help="Hub model id or local folder of a fine-tuned image classifier."
    ),
    output: Optional[Path] = typer.Option(
        None, show_default="data/<dataset>--<teacher>", help="Cache folder to write."
    ),
    splits: Optional[str] = typer.Option(None, show_default="all", help="Comma-separated splits to cache."),
    extra_images: Optional[str] = typer.Option(
        None,
        metavar="SOURCE",
        help="Images without labels to cache beside the dataset's splits, as the split --extra-split: a hub dataset id, a save_to_disk folder, or a folder of image files. train-student then teaches them by the teacher alone.",
    ),
    extra_images_split: Optional[str] = typer.Option(
        None, show_default="its only split, or train", help="The split of --extra-images to read."
    ),
    extra_split: str = typer.Option(
        CACHE_DEFAULT("extra_split"), help="The cache's name for the split of --extra-images."
    ),
    batch_size: int = typer.Option(CACHE_DEFAULT("batch_size"), help="Images per teacher forward pass."),
    device: str = typer.Option(
        CACHE_DEFAULT("device"), help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."
    ),
    precision: str = typer.Option(
        CACHE_DEFAULT("precision"), help="fp32, or on CUDA bf16/fp16 autocast (recorded in the manifest)."
    ),
    revision: Optional[str] = typer.Option(None, help="Teacher revision (branch, tag or commit) on the hub."),
    dataset_revision: Optional[str] = typer.Option(None, help="Dataset revision on the hub."),
    image_column: Optional[str] = typer.Option(None, show_default="image or img", help="Image column."),
    label_column: Optional[str] = typer.Option(
        None,
        show_default="labels or label",
        help="Label column, a ClassLabel. A split without it, and a row whose label is -1, holds images without labels.",
    ),
    trust_remote_code: bool = typer.Option(
        False, "--trust-remote-code", help="Allow a teacher whose repository ships its own model code."
    ),
    match_labels_by_index: bool = typer.Option(
        False,
        "--match-labels-by-index",
        help="Trust that the teacher's outputs follow the dataset's label order even though the names differ.",
    ),
    views: int = typer.Option(
        CACHE_DEFAULT("views"),
        help="Augmented views per training image (random resized crop + flip), each with the teacher's logits on exactly that view; 1 = the one clean view. Costs K teacher passes per image.",
    ),
    view_splits: Optional[str] = typer.Option(
        None,
        show_default="train and --extra-split",
        help="Comma-separated splits that get --views; the others keep one clean view.",
    ),
    view_scale: float = typer.Option(
        CACHE_DEFAULT("view_scale")[0],
        help="Smallest crop area of a view, as a fraction of the image (the largest is 1).",
    ),
    view_seed: int = typer.Option(
        CACHE_DEFAULT("view_seed"), help="Seed of the views (a row's views depend on it and the row alone)."
    ),
    mix_alpha: float = typer.Option(
        CACHE_DEFAULT("mix_alpha"),
        help="Mix every view with a view of another image (mixup, weight ~ Beta(a, a) folded to >= 0.5) and store the teacher's logits on the mixed image: 'function matching'. 0 = no mixing; 1 = uniform weights.",
    ),
    source_size: Optional[int] = typer.Option(
        None,
        show_default="8/7 of the teacher's input (256 for 224)",
        help="With --views: the shorter side the source image is reduced to once, stored as raw pixels that both stages render views from; 0 keeps it whole.",
    ),
    logits_dtype: str = typer.Option(
        CACHE_DEFAULT("logits_dtype"),
        help="How the logits are stored: fp32, or fp16 (half the bytes; the soft targets move by a KL of 2e-8 at T=5 on a 100-class teacher).",
    ),
    top_k: Optional[int] = typer.Option(
        None,
        show_default="every class",
        help="Store only the teacher's K largest logits per image (with their classes) and one logit for the other classes' share, spread evenly over them: for teachers of thousands of classes. On a 100-class teacher at T=5, top 10 moved the soft targets by a KL of 0.047 and trained students as good as full logits did; top 1 did not (BENCHMARKS.md, 'Compact logits').",
    ),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache made from other inputs."),
    num_workers: Optional[int] = typer.Option(
        None,
        show_default="1 on CPU (0 when a process has 1 core), up to 8 on CUDA",
        help="Processes decoding images ahead of the teacher (per process).",
    ),
    chunk_size: int = typer.Option(
        CACHE_DEFAULT("chunk_size"), help="Rows per chunk: the unit of resuming, and one file of the cache."
    ),
    num_processes: Optional[int] = typer.Option(
        None, show_default="1, or as accelerate launch says", help=NUM_PROCESSES_HELP
    ),
):
    """Run the teacher once over the dataset and store its logits as an Arrow column, with a manifest.

    The cache is a datasets.DatasetDict on disk (columns row_index, labels, teacher_logits, pixel_values) plus
    kdcache.json. Logits are raw (not softened), in the dataset's label order: float32, or compact for teachers of
    many classes (--logits-dtype fp16, --top-k K). A killed run resumes from its finished chunks when you run the
    same command again; re-running a complete cache is a no-op.

    Examples (the hub defaults, then local paths, then 8 augmented views per training image, then 16 mixed views):

    \b
      kdcache teacher-logits
      kdcache teacher-logits --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans
      kdcache teacher-logits --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans --views 8
      kdcache teacher-logits --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \
          --views 16 --view-scale 0.05 --mix-alpha 1 --output data/beans-effl0-mixed16

    Images nobody labelled, cached beside a labelled dataset (train-student teaches them by the teacher alone):

    \b
      kdcache teacher-logits --dataset ../shared/data/beans --teacher ../shared/teachers/effl0-beans \
          --extra-images photos/ --output data/beans-effl0-extra

    Several processes (GPUs, machines) split the chunks among them and give the same cache as one:

    \b
      accelerate launch --num_processes 4 -m kdcache teacher-logits ...
      kdcache teacher-logits --num-processes 4 ...
    """
    relaunch(num_processes, device)
    from kdcache.format.reader import describe
    from kdcache.runtime import is_main_process
    from kdcache.teacher.run import teacher_logits

    options = CacheOptions(
        splits=_split_list(splits),
        extra_images=extra_images,
        extra_images_split=extra_images_split,
        extra_split=extra_split,
        batch_size=batch_size,
        device=device,
        precision=precision,
        revision=revision,
        dataset_revision=dataset_revision,
        image_column=image_column,
        label_column=label_column,
        trust_remote_code=trust_remote_code,
        match_labels_by_index=match_labels_by_index,
        views=views,
        view_splits=_split_list(view_splits),
        view_scale=(view_scale, 1.0),
        view_seed=view_seed,
        mix_alpha=mix_alpha,
        source_size=source_size,
        logits_dtype=logits_dtype,
        top_k=top_k,
        overwrite=overwrite,
        num_workers=num_workers,
        chunk_size=chunk_size,
    )
    path = teacher_logits(dataset=dataset, teacher=teacher, output=output, options=options)
    if is_main_process():
        typer.echo(describe(path))


@app.command("evaluate")
@friendly
def evaluate_command(
    models: list[str] = typer.Argument(
        ...,
        metavar="MODEL",
        help="One or more models: hub ids or folders written by save_pretrained (a kdcache student, a teacher).",
        show_default=False,
    ),
    dataset: Optional[str] = typer.Option(
        None, help="Hub dataset id or local folder.", show_default="the one --cache was made from, else beans"
    ),
    split: str = typer.Option(EVALUATION_DEFAULT("split"), help="Split to evaluate on."),
    cache: Optional[list[Path]] = typer.Option(
        None,
        help="A teacher-logits cache of the same data: adds agreement with the teacher (top-1, KL at T=1, teacher accuracy) without running the teacher. Repeat it for a teacher ensemble: agreement with each teacher and with the ensemble (probabilities averaged at T=1).",
    ),
    teacher_weights: Optional[str] = typer.Option(None, show_default="equal", help=TEACHER_WEIGHTS_HELP),
    batch_size: int = typer.Option(
        EVALUATION_DEFAULT("batch_size"), help="Images per forward pass (the throughput is measured at this size)."
    ),
    device: str = typer.Option(
        EVALUATION_DEFAULT("device"), help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."
    ),
    output: Optional[Path] = typer.Option(
        None,
        help="Folder to write.",
        show_default="MODEL/eval-SPLIT for a local model, data/eval/NAME-SPLIT for a hub id, data/eval/compare-SPLIT for several models",
    ),
    image_column: Optional[str] = typer.Option(
        None, help="Image column.", show_default="the cache's, else image or img"
    ),
    label_column: Optional[str] = typer.Option(
        None, help="Label column, a ClassLabel.", show_default="the cache's, else labels or label"
    ),
    match_labels_by_index: bool = typer.Option(
        False,
        "--match-labels-by-index",
        help="Trust that a model's outputs follow the dataset's label order even though the names differ.",
    ),
):
    """Measure models on a split: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix,
    expected calibration error (15 bins), parameters, size on disk and images/s; with --cache, how close each is
    to the teacher.

    Each model is fed through its own image processor, as pipeline() would, and its outputs are matched to the
    dataset's labels by name. Writes metrics.json, confusion_matrix.png and reliability_diagram.png (and, for several models, one folder
    per model plus a combined metrics.json and comparison.png). Metrics are computed by evaluate modules shipped
    with kdcache, so nothing is fetched from the hub.

    Examples (offline, local paths):

    \b
      kdcache evaluate data/students/beans--effl0-beans-distilled --dataset ../shared/data/beans
      kdcache evaluate data/students/beans--effl0-beans-distilled --cache data/beans--effl0-beans
      kdcache evaluate ../shared/teachers/effl0-beans data/students/* --cache data/beans--effl0-beans
    """
    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.evaluation.report import describe

    options = EvaluationOptions(
        dataset=dataset,
        split=split,
        cache=list(cache or []),
        batch_size=batch_size,
        device=device,
        image_column=image_column,
        label_column=label_column,
        match_labels_by_index=match_labels_by_index,
        teacher_weights=_weights(teacher_weights),
    )
    report = evaluate_models(models, output=output, options=options)
    typer.echo(describe(report))


@app.command("info")
@friendly
def info_command(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache folder written by kdcache teacher-logits."),
):
    """Print a cache's manifest: what produced it, its splits and their checksums, and its size on disk."""
    from kdcache.format.reader import describe

    typer.echo(describe(cache))


@app.command("verify")
@friendly
def verify_command(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache folder written by kdcache teacher-logits."),
    sample: int = typer.Option(64, help="Random (row, view) pairs rechecked per split."),
    tolerance: Optional[float] = typer.Option(
        None,
        show_default="1e-3 for an fp32 cache, 2e-2 fp16, 1e-1 bf16",
        help="Largest |logit difference| that passes; above it the command exits with status 1.",
    ),
    seed: int = typer.Option(0, help="Seed of the sample."),
    teacher: Optional[str] = typer.Option(
        None,
        show_default="the one recorded in the cache",
        help="Load the cache's teacher from here instead (a local copy of a hub teacher, offline); its weights must match the cache's.",
    ),
    device: str = typer.Option("auto", help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."),
    batch_size: int = typer.Option(32, help="Inputs per teacher forward pass."),
):
    """Rerun the cache's teacher on a random sample of its inputs and compare with the cached logits.

    The checksums checked on every load catch bytes changed after the cache was written; this catches logits that
    are not the teacher's at all (altered with their checksums, or written wrong). Clean rows are rerun on their
    stored pixels, views and mixed views rebuilt from their source images and parameters, as stage one built them.
    Prints max |logit difference| and top-1 mismatches per split; exits 1 above --tolerance.

    \b
      kdcache verify data/beans--effl0-beans
      kdcache verify data/beans-effl0-mixed16 --sample 256 --teacher ../shared/teachers/effl0-beans
    """
    from kdcache.teacher.verify import describe, verify_teacher_logits

    report = verify_teacher_logits(
        cache, sample=sample, tolerance=tolerance, seed=seed, teacher=teacher, device=device, batch_size=batch_size
    )
    typer.echo(describe(report))
    if not report["passed"]:
        raise typer.Exit(1)


@app.command("train-student")
@friendly
def train_student_command(
    cache: list[Path] = typer.Argument(
        ...,
        metavar="CACHE",
        help="A cache folder written by kdcache teacher-logits; several caches of the same rows and views: a teacher ensemble, their probabilities averaged at T.",
        show_default=False,
    ),
    output: Optional[Path] = typer.Option(
        None, show_default="data/students/<cache>-distilled", help="Folder for the trained student."
    ),
    student: Optional[str] = typer.Option(
        None,
        show_default="MobileNetV2Config() from scratch",
        help="Student: a model type from scratch (e.g. mobilenet_v2), a config-only folder, or a hub id / folder with weights.",
    ),
    loss: str = typer.Option(
        DEFAULT("loss"),
        help="Distillation loss. kd: KL to the teacher's softened outputs (Hinton). dkd: decoupled KD, the target class and the other classes weighted apart (1:8), for 3+ classes and unmixed caches. dist: matches the correlations of student and teacher probabilities, not their values, for a much stronger teacher.",
    ),
    temperature: Optional[float] = typer.Option(
        DEFAULT("temperature"),
        "--temperature",
        "-T",
        show_default="5 for kd, 4 for dkd, 1 for dist",
        help="Softmax temperature T of the distillation term.",
    ),
    alpha: float = typer.Option(
        DEFAULT("alpha"),
        "--alpha",
        "--lambda",
        help="Weight of the distillation part against the labels' cross-entropy, for every --loss: 0 = labels only (a from-scratch baseline), 1 = teacher only; 0.5 is the DKD and DIST papers' 1:1.",
    ),
    standardize_logits: bool = typer.Option(
        DEFAULT("standardize_logits"),
        "--standardize-logits",
        help="z-score each image's logits, student's and teacher's, before the softmax: the student matches the teacher's ranking of the classes, not the range of its logits, and T becomes a base temperature (Sun et al. 2024 use 2). kd and dkd.",
    ),
    teacher_weights: Optional[str] = typer.Option(None, show_default="equal", help=TEACHER_WEIGHTS_HELP),
    epochs: float = typer.Option(DEFAULT("epochs"), help="Training epochs."),
    learning_rate: float = typer.Option(DEFAULT("learning_rate"), help="Peak AdamW learning rate."),
    batch_size: int = typer.Option(
        DEFAULT("batch_size"),
        help="Images per training step: the global batch, of all processes together when there are several (each takes its share).",
    ),
    weight_decay: float = typer.Option(DEFAULT("weight_decay"), help="AdamW weight decay."),
    warmup_ratio: float = typer.Option(
        DEFAULT("warmup_ratio"), help="Fraction of steps spent warming the learning rate up (>= 0 and < 1)."
    ),
    scheduler: str = typer.Option(
        DEFAULT("scheduler"),
        help="Learning-rate schedule: linear, cosine, cosine_with_restarts, polynomial, constant, constant_with_warmup or inverse_sqrt.",
    ),
    seed: int = typer.Option(DEFAULT("seed"), help="Seed for the student's initial weights and the data order."),
    eval_split: str = typer.Option(
        "validation", help="Split evaluated after each epoch; the best epoch is kept. 'none' to skip."
    ),
    labeled_fraction: Optional[float] = typer.Option(
        None,
        show_default="every label",
        help="Keep the labels of this share of the training split's rows (seeded by --seed, stratified by class; e.g. 0.1) and train on the others without labels, taught by the teacher alone: a label budget. With --alpha 0, trains on the labelled share alone (the from-scratch baseline at the same budget).",
    ),
    unlabeled_splits: Optional[str] = typer.Option(
        None,
        show_default="every cached split without labels (none with --alpha 0)",
        help="Cached splits of images without labels to train on besides the training split, comma-separated (e.g. unlabeled, from teacher-logits --extra-images); 'none' for none. Their rows add the distillation term alone.",
    ),
    resume: bool = typer.Option(
        False,
        "--resume",
        help="Continue an interrupted run from its last checkpoint; refused if it was started with other options (workers, device and logging may change).",
    ),
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace an existing output folder (or discard an interrupted run)."
    ),
    online: bool = typer.Option(
        False,
        "--online",
        help="Reference mode: run the teacher on every batch, as the tutorial does (for tests and benchmarks).",
    ),
    teacher: Optional[str] = typer.Option(
        None,
        show_default="the one recorded in the cache",
        help="With --online: where to load the teacher from (the cache's teacher elsewhere; its weights must match the cache's).",
    ),
    student_only_augment: bool = typer.Option(
        False,
        "--student-only-augment",
        help="Baseline for experiments: random views for the student, paired with the teacher's logits of the clean view (inconsistent teaching).",
    ),
    student_size: Optional[int] = typer.Option(
        None,
        show_default="the teacher's input size",
        help="Train the student at S x S pixels: each view is the teacher's crop, resized to S (cheaper steps; saved with a processor that feeds S).",
    ),
    ema_decay: Optional[float] = typer.Option(
        None,
        show_default="no EMA",
        help="Keep an exponential moving average of the student's weights with this decay per step (e.g. 0.998); it is evaluated each epoch and saved as the student.",
    ),
    num_workers: Optional[int] = typer.Option(
        None, show_default="1 for caches with views, else 0", help="DataLoader worker processes."
    ),
    device: str = typer.Option(
        DEFAULT("device"),
        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps: one device, also on a machine with several GPUs (use them all with --num-processes).",
    ),
    precision: str = typer.Option(
        DEFAULT("precision"),
        help="auto (bf16 on CUDA GPUs that compute in it natively, Ampere or newer; else fp32), fp32, bf16, fp16.",
    ),
    push_to_hub: Optional[str] = typer.Option(
        None,
        metavar="REPO",
        help="Once the student is saved, upload its folder (weights, image processor, model card) to this hub repository, created if needed (needs a login: hf auth login).",
    ),
    num_processes: Optional[int] = typer.Option(
        None, show_default="1, or as accelerate launch says", help=NUM_PROCESSES_HELP
    ),
):
    """Train a student from the cached soft targets and save it for pipeline("image-classification").

    Loss: (1-alpha)*CE(student, labels) + alpha*D, where D is, by --loss, T^2*KL(softmax(teacher/T) ||
    softmax(student/T)) (kd), T^2*(TCKD + 8*NCKD) (dkd) or T^2*(inter + intra) (dist), each averaged over the batch;
    every term is logged (loss_ce, loss_kl; loss_tckd, loss_nckd; loss_inter, loss_intra).
    The cache is verified first (manifest, row counts, checksums of its files). The output folder holds the best
    epoch's model, the teacher's image processor, a model card, TensorBoard logs and kdcache_training.json.

    Examples (distilled; the same student from labels alone, as a baseline):

    \b
      kdcache train-student data/beans--effl0-beans
      kdcache train-student data/beans--effl0-beans --alpha 0 --output data/students/beans-scratch

    A teacher ensemble: two caches of the same data and views, by two teachers, their probabilities averaged at T:

    \b
      kdcache train-student data/beans--teacher-a data/beans--teacher-b --teacher-weights 0.6,0.4

    A label budget: labels on 10% of the training images, the teacher teaching all of them; the baseline from
    scratch on the same labelled 10% (same --seed, same number of steps: --epochs 10 times as many):

    \b
      kdcache train-student data/beans--effl0-beans --labeled-fraction 0.1
      kdcache train-student data/beans--effl0-beans --labeled-fraction 0.1 --alpha 0 --epochs 200

    From a cache of (mixed) views, patient and consistent: the teacher alone, at 128 px, with an EMA:

    \b
      kdcache train-student data/beans-effl0-mixed16 --alpha 1 --student-size 128 --ema-decay 0.99 --epochs 16

    Several processes train data-parallel (DDP) at the same global --batch-size:

    \b
      accelerate launch --num_processes 4 -m kdcache train-student data/beans--effl0-beans
      kdcache train-student data/beans--effl0-beans --num-processes 4
    """
    relaunch(num_processes, device)
    from kdcache.student.train import train_student

    options = TrainingOptions(
        student=student,
        loss=loss,
        temperature=temperature,
        alpha=alpha,
        standardize_logits=standardize_logits,
        teacher_weights=_weights(teacher_weights),
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        scheduler=scheduler,
        seed=seed,
        eval_split=None if eval_split.lower() == "none" else eval_split,
        labeled_fraction=labeled_fraction,
        unlabeled_splits=[] if (unlabeled_splits or "").lower() == "none" else _split_list(unlabeled_splits),
        resume=resume,
        overwrite=overwrite,
        online=online,
        teacher=teacher,
        student_only_augment=student_only_augment,
        student_size=student_size,
        ema_decay=ema_decay,
        num_workers=num_workers,
        device=device,
        precision=precision,
        push_to_hub=push_to_hub,
    )
    train_student(cache[0] if len(cache) == 1 else cache, output=output, options=options, progress=True)


@app.command("sweep")
@friendly
def sweep_command(
    cache: list[Path] = typer.Argument(
        ...,
        metavar="CACHE",
        help="A cache folder written by kdcache teacher-logits (several: a teacher ensemble, as in train-student).",
        show_default=False,
    ),
    param: Optional[list[str]] = typer.Option(
        None,
        "--param",
        metavar="NAME=SPEC",
        help="A train-student option to sweep and its distribution, SPEC one of loguniform(a,b), uniform(a,b), int(a,b), choice(x,y,...); repeat it, e.g. --param 'learning_rate=loguniform(1e-4,1e-2)' --param 'temperature=choice(2,5)'.",
    ),
    space: Optional[Path] = typer.Option(
        None, help="The same as a YAML or JSON file: option names to SPEC strings (a list of values is a choice)."
    ),
    trials: int = typer.Option(..., help="Trials in the whole study: a rerun of the same command continues up to N."),
    output: Path = typer.Option(
        ..., help="Folder of the sweep: trials/NNNN (one student each), best/, plots/, sweep.json, study.db."
    ),
    timeout: Optional[float] = typer.Option(
        None, show_default="none", help="Seconds after which this process starts no new trial."
    ),
    storage: Optional[str] = typer.Option(
        None,
        show_default="OUTPUT/study.db (SQLite)",
        help="Where the study lives: an SQLAlchemy URL (sqlite:///..., postgresql://...) that several processes or machines share, or the path of an Optuna journal file.",
    ),
    study_name: str = typer.Option("kdcache-sweep", help="The study's name in the storage."),
    pruner: str = typer.Option("median", help="Stops hopeless trials after an epoch: median, hyperband or none."),
    final_seeds: int = typer.Option(
        0,
        help="Once the study is complete, retrain the best options with seeds 0..K-1 (OUTPUT/final) and report validation mean ± sd.",
    ),
    sampler_seed: Optional[int] = typer.Option(None, show_default="random", help="Seed of Optuna's TPE sampler."),
    student: Optional[str] = typer.Option(
        None, show_default="MobileNetV2Config() from scratch", help="As in train-student."
    ),
    loss: str = typer.Option(DEFAULT("loss"), help="kd, dkd or dist (as in train-student)."),
    temperature: Optional[float] = typer.Option(
        DEFAULT("temperature"), "--temperature", "-T", show_default="the loss's", help="Softmax temperature T."
    ),
    alpha: float = typer.Option(DEFAULT("alpha"), help="Weight of the distillation part against the labels' CE."),
    standardize_logits: bool = typer.Option(DEFAULT("standardize_logits"), "--standardize-logits"),
    teacher_weights: Optional[str] = typer.Option(None, show_default="equal", help=TEACHER_WEIGHTS_HELP),
    epochs: float = typer.Option(DEFAULT("epochs"), help="Training epochs of every trial."),
    learning_rate: float = typer.Option(DEFAULT("learning_rate"), help="Peak AdamW learning rate."),
    batch_size: int = typer.Option(DEFAULT("batch_size"), help="Images per training step."),
    weight_decay: float = typer.Option(DEFAULT("weight_decay"), help="AdamW weight decay."),
    warmup_ratio: float = typer.Option(DEFAULT("warmup_ratio"), help="Fraction of steps warming up."),
    scheduler: str = typer.Option(DEFAULT("scheduler"), help="Learning-rate schedule (as in train-student)."),
    seed: int = typer.Option(DEFAULT("seed"), help="Seed of every trial's student (unless swept)."),
    eval_split: str = typer.Option("validation", help="Split each trial is scored on, at its best epoch."),
    student_size: Optional[int] = typer.Option(
        None, show_default="the teacher's input size", help="Train the students at S x S pixels."
    ),
    ema_decay: Optional[float] = typer.Option(None, show_default="no EMA", help="EMA decay of the weights."),
    num_workers: Optional[int] = typer.Option(None, show_default="as train-student", help="DataLoader workers."),
    device: str = typer.Option(DEFAULT("device"), help="auto, cpu, cuda, cuda:1, mps: one device per process."),
    precision: str = typer.Option(DEFAULT("precision"), help="auto, fp32, bf16, fp16."),
):
    """Train many students from one cache: an Optuna study over train-student's options, resumable, on one
    machine or many.

    Each trial is a train-student run into OUTPUT/trials/NNNN with options drawn from the space (--param, --space)
    over the fixed options given; it is scored by its best epoch's validation accuracy, reported after every epoch
    so that the pruner stops hopeless trials (a pruned trial leaves its record, not its student). The cache is
    verified once. A rerun of the same command continues the study; several processes given one --storage run
    distinct trials of it. Leaves sweep.json and a leaderboard, best/ (a normal student folder), and plots/.
    Needs Optuna: pip install -e '.[sweep]'.

    \b
      kdcache sweep data/beans--effl0-beans --trials 20 --output data/sweeps/beans \\
          --param 'learning_rate=loguniform(3e-4,3e-3)' --param 'temperature=choice(2,5)' --student-size 128

    Several machines, one study (each runs the same command):

    \b
      kdcache sweep data/beans--effl0-beans --trials 60 --output data/sweeps/beans \\
          --storage postgresql://user:password@host/sweeps --space space.yaml
    """
    from kdcache.sweep import optuna_module, sweep

    optuna_module()  # without Optuna: one line saying how to install it, before anything else
    options = TrainingOptions(
        student=student,
        loss=loss,
        temperature=temperature,
        alpha=alpha,
        standardize_logits=standardize_logits,
        teacher_weights=_weights(teacher_weights),
        epochs=epochs,
        learning_rate=learning_rate,
        batch_size=batch_size,
        weight_decay=weight_decay,
        warmup_ratio=warmup_ratio,
        scheduler=scheduler,
        seed=seed,
        eval_split=None if eval_split.lower() == "none" else eval_split,
        student_size=student_size,
        ema_decay=ema_decay,
        num_workers=num_workers,
        device=device,
        precision=precision,
    )
    sweep(
        cache[0] if len(cache) == 1 else cache,
        output,
        list(param or []),
        trials=trials,
        options=options,
        space_file=space,
        timeout=timeout,
        storage=storage,
        study_name=study_name,
        pruner=pruner,
        sampler_seed=sampler_seed,
        final_seeds=final_seeds,
    )


@app.command("demo")
@friendly
def demo_command(
    output: Path = typer.Option(
        Path("data/demo"),
        help="Folder for the demo's dataset, models, cache and report: a new or empty folder, or one an earlier demo wrote (replaced).",
    ),
    quick: bool = typer.Option(
        False, "--quick", help="A reduced run that still exercises every stage (about a minute; used by CI)."
    ),
    seed: int = typer.Option(0, help="Seed for the teacher and the students."),
):
    """Run the whole pipeline offline on scikit-learn's digits: fit a small ResNet teacher, cache its logits once,
    distil a MobileNetV2 student and train it from scratch, with every label and with 10% of them, and compare all
    five models on the test split."""
    from kdcache.demo import run_demo

    run_demo(output=output, quick=quick, seed=seed)


def main():
    # Hub downloads print their own bars; ours say what matters. Users can still turn verbosity up.
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from kdcache.runtime import end_process, is_main_process, launched_processes

    if not is_main_process():  # one launch, one set of progress bars: the main process's
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        app(prog_name="kdcache")
    except SystemExit as done:
        if launched_processes() <= 1:
            raise
        if isinstance(done.code, str):
            print(done.code, file=sys.stderr)
        end_process(done.code if isinstance(done.code, int) else 0 if done.code is None else 1)


if __name__ == "__main__":
    sys.exit(main())
