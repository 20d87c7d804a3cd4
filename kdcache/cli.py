"""The `kdcache` command: thin typer wrappers over the library functions, one per stage, whose options are generated
from the stages' options dataclasses (kdcache.options: each field's help and flags in its metadata; `with_options`).
Every command takes --config FILE, any of its options in one file, the flags given winning (`ConfigCommand`)."""

import difflib
import functools
import inspect
import os
import sys
import typing
from dataclasses import fields
from pathlib import Path
from typing import Optional

import typer

from kdcache.errors import KdcacheError, first_line
from kdcache.options import (
    DEFAULT_DATASET,
    DEFAULT_TEACHER,
    CacheOptions,
    EvaluationOptions,
    ExportOptions,
    PushOptions,
    RemoteOptions,
    SweepOptions,
    TrainingOptions,
    VerifyOptions,
)
from kdcache.options.config import PATH_OR_ID, read_config

CONFIG_HELP = (
    "A YAML or JSON file of this command's options by name (learning_rate: 0.001, or a kdcache_config.yaml that "
    "an output folder holds, to rerun it); the options given on the command line win. Relative paths in it are "
    "relative to its folder."
)


class ConfigCommand(typer.core.TyperCommand):
    """A command that reads --config FILE before its other parameters, as their defaults (click's default_map):
    every parameter the command line leaves out takes the file's value, then the command's own default. An unknown
    key, a value the parameter refuses or a file that cannot be read is one line naming the key and the file."""

    def parse_args(self, ctx, args):
        try:
            parsed = super().parse_args(ctx, args)
        except typer.BadParameter as error:
            name = error.param.name if error.param is not None else None
            file = ctx.meta.get(CONFIG_META)
            if name is None or file is None or ctx.get_parameter_source(name).name != "DEFAULT_MAP":
                raise
            _refuse(f"--config '{file}', key {name}: {first_line(error.message)}")
        except KdcacheError as error:  # from reading the file (load_config)
            _refuse(str(error))
        file = ctx.meta.get(CONFIG_META)
        # what `friendly` adds to an error naming a flag whose value came from the file
        _FROM_CONFIG.clear()
        _FROM_CONFIG.update(
            {
                opt: (name, file)
                for name in ctx.params
                for opt in _opts(self, name)
                if _source(ctx, name) == "DEFAULT_MAP"
            }
        )
        return parsed


CONFIG_META = "kdcache.config"
_FROM_CONFIG: dict = {}  # {flag: (key, file)} of this process's command, for `friendly`


def _refuse(message: str):
    typer.echo(f"kdcache: error: {message}", err=True)
    raise typer.Exit(1)


def _source(ctx, name: str) -> str | None:
    source = ctx.get_parameter_source(name)
    return source.name if source is not None else None


def _opts(command, name: str) -> list[str]:
    return [opt for param in command.params if param.name == name for opt in param.opts if opt.startswith("--")]


def load_config(ctx, file: Optional[Path], annotations: dict):
    """--config FILE, read before the other parameters (it is eager): its values become their defaults.
    `annotations`: the command's parameters' types, {name: type}."""
    if file is None or ctx.resilient_parsing:
        return file
    values = read_config(file)
    command, params = ctx.info_name, {param.name: param for param in ctx.command.params if param.name != "config"}
    wrote = values.pop("command", command)
    if wrote != command:
        raise KdcacheError(
            f"--config '{file}' is the config of kdcache {wrote}, not of kdcache {command}; give it to kdcache {wrote}"
        )
    defaults = {}
    for key, value in values.items():
        param = params.get(key)
        if param is None or param.name == "help":
            near = difflib.get_close_matches(key, list(params), n=1)
            raise KdcacheError(
                f"--config '{file}', key {key}: kdcache {command} has no such option"
                + (f"; did you mean {near[0]}?" if near else f"; its keys are {', '.join(sorted(params))}")
            )
        if value is not None:
            defaults[key] = _as_default(param, annotations[key], value, Path(file).parent)
    ctx.default_map = {**(ctx.default_map or {}), **defaults}
    ctx.meta[CONFIG_META] = str(file)
    return file


def _as_default(param, annotation, value, folder: Path):
    """A config's value as the parameter's default: a list where the parameter repeats, a list joined with commas
    where it takes a comma-separated text; a relative path made relative to the config's folder."""
    annotation = next((kind for kind in typing.get_args(annotation) if kind is not type(None)), annotation)  # Optional
    repeated = param.multiple or param.nargs == -1
    if repeated and not isinstance(value, list):
        value = [value]
    if not repeated and isinstance(value, list) and annotation is str:
        value = ",".join(str(item) for item in value)
    item_type = typing.get_args(annotation)[0] if repeated and typing.get_args(annotation) else annotation
    if item_type is Path or (param.name in PATH_OR_ID and item_type is str):
        # a relative cache is always a folder (an address has '://'); a dataset or teacher may be a hub id
        rebase = functools.partial(_relative_to, folder, existing=item_type is str and param.name != "cache")
        value = [rebase(item) for item in value] if repeated else rebase(value)
    return value


def _relative_to(folder: Path, value, existing: bool):
    """`value` read relative to `folder` when it is a relative path (and, for a hub id or folder, one that exists
    there); as it is otherwise."""
    if not isinstance(value, str) or Path(value).expanduser().is_absolute() or "://" in value:
        return value
    path = folder / value
    return str(path) if not existing or path.exists() else value


class Kdcache(typer.Typer):
    """kdcache's app: every command it registers takes --config FILE (ConfigCommand), with no line of its own."""

    def command(self, *args, **kwargs):
        register = super().command(*args, cls=kwargs.pop("cls", None) or ConfigCommand, **kwargs)
        return lambda command: register(with_config(command))


def with_config(command):
    """`command` with the parameter --config FILE, read first (load_config); the command never sees it."""
    own = inspect.signature(command).parameters.values()
    annotations = {parameter.name: parameter.annotation for parameter in own}

    def read(ctx: typer.Context, file: Optional[Path]):
        return load_config(ctx, file, annotations)

    option = typer.Option(
        None, "--config", help=CONFIG_HELP, is_eager=True, expose_value=False, callback=read, metavar="FILE"
    )
    parameters = [
        *own,
        inspect.Parameter("config", inspect.Parameter.KEYWORD_ONLY, default=option, annotation=Optional[Path]),
    ]

    @functools.wraps(command)
    def wrapper(**values):
        values.pop("config", None)  # typer passes it, as None, although it is not exposed
        return command(**values)

    wrapper.__signature__ = inspect.Signature(parameters)
    wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
    return wrapper


app = Kdcache(
    help=(
        "Knowledge distillation for image classifiers, with the teacher run once.\n\n"
        "\b\n"
        "  kdcache teacher-logits   run the teacher once over a dataset, store its logits\n"
        "  kdcache train-student    train a small student from the cached soft targets\n"
        "  kdcache sweep            train many students: an Optuna study over train-student's options\n"
        "  kdcache export           ship a student as an ONNX folder (int8 when asked), checked\n"
        "  kdcache evaluate         measure students, teachers and exports on a split\n"
        "  kdcache info CACHE       what a cache holds and what produced it\n"
        "  kdcache verify CACHE     rerun the teacher on a sample of a cache: are its logits the teacher's?\n"
        "  kdcache push-cache       share a cache: push it to a Hub dataset repository or object storage\n"
        "  kdcache pull-cache       pull a shared cache, every file verified\n"
        "  kdcache demo             the whole pipeline offline, on scikit-learn's digits\n\n"
        "Every model or dataset argument takes a Hugging Face hub id or a local folder; every cache argument a folder "
        "or an address (hf://datasets/OWNER/NAME, s3://bucket/prefix), pulled once. "
        "Run 'kdcache COMMAND --help' for a command's options and an example."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def friendly(command):
    """User errors become one line and exit status 1, never a traceback. The line ends with what the run kept for the
    next to resume, if anything (the error's notes, from kdcache.outputs.safe_output; a crash's traceback ends with
    them too)."""

    @functools.wraps(command)
    def wrapper(*args, **kwargs):
        try:
            return command(*args, **kwargs)
        except KdcacheError as error:
            if not getattr(error, "reported_elsewhere", False):  # several processes agreed on it: the main one says it
                lines = [f"kdcache: error: {error}{_set_by_config(error)}", *getattr(error, "__notes__", ())]
                typer.echo("; ".join(lines), err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt as interrupt:
            kept = getattr(interrupt, "__notes__", None) or ["run the same command again to resume"]
            typer.echo("; ".join(["kdcache: interrupted", *kept]), err=True)
            raise typer.Exit(130) from None

    return wrapper


def _set_by_config(error) -> str:
    """' (set by --config FILE, key KEY)' when the error names a flag whose value came from a --config file."""
    text = str(error)
    named = [(key, file) for flag, (key, file) in _FROM_CONFIG.items() if f"{flag} " in text or f"{flag}=" in text]
    return f" (set by --config '{named[0][1]}', key {named[0][0]})" if named else ""


def _this_command() -> list[str]:
    """This process's command line, without --num-processes (the launched processes must not relaunch)."""
    arguments, skip = [], False
    for argument in sys.argv[1:]:
        if skip or argument.startswith("--num-processes="):
            skip = False
            continue
        if argument == "--num-processes":
            skip = True
            continue
        arguments.append(argument)
    return arguments


def _launcher_arguments(num_processes: int, command: list[str]) -> list[str]:
    """accelerate launch's arguments for `command` as N processes on this machine, on a free port."""
    return [
        *("--multi_gpu", "--num_processes", str(num_processes), "--num_machines", "1"),
        *("--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"),
        *("-m", "kdcache", *command),
    ]


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
    launch = launch_command_parser().parse_args(_launcher_arguments(num_processes, _this_command()))
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


CACHE_HELP = (
    "A cache folder written by kdcache teacher-logits, or its address (hf://datasets/OWNER/NAME, s3://bucket/prefix), "
    "pulled once into --cache-dir."
)
ADDRESS_HELP = (
    "A Hub dataset repository (OWNER/NAME, or hf://datasets/OWNER/NAME[@REVISION]) or an fsspec URL "
    "(s3://bucket/prefix, gs://, az://, file:///path)."
)

NUM_PROCESSES = typer.Option(
    None,
    show_default="1, or as accelerate launch says",
    help=(
        "Start this command as N processes through accelerate's launcher, on this machine (one per GPU, "
        "or N CPU processes); for several machines use accelerate launch (README)."
    ),
)


def with_options(options_class, *, sweep: bool = False, after: dict | None = None, into: str = "options"):
    """A command's parameter `options` becomes one command-line option per field of `options_class` declared with a
    help (kdcache.options.fields.option), in the fields' order and at that parameter's place, and the command gets
    the options object built from them: each option written once, in the spirit of transformers'
    HfArgumentParser. `sweep`: the fields marked for `kdcache sweep`, with its overrides. `after`: {a parameter of
    the command's own: a field} places that parameter after that field's option (evaluate's --output). `into`: the
    parameter that takes the options object (a command with two options classes names two)."""

    def decorate(command):
        declared = [(field, spec) for field in fields(options_class) if (spec := _spec(field, sweep))]
        generated = {field.name: _parameter(field, spec) for field, spec in declared}
        own = inspect.signature(command).parameters
        moved = after or {}
        parameters = []
        for parameter in own.values():
            if parameter.name == into:
                for name, option in generated.items():
                    parameters += [option, *(own[mine] for mine, field in moved.items() if field == name)]
            elif parameter.name not in moved:
                parameters.append(parameter)
        parameters = [parameter.replace(kind=inspect.Parameter.KEYWORD_ONLY) for parameter in parameters]

        @functools.wraps(command)
        def wrapper(**values):
            given = {field.name: spec.get("parse", _same)(values.pop(field.name)) for field, spec in declared}
            return command(**values, **{into: options_class(**given)})

        wrapper.__signature__ = inspect.Signature(parameters)
        wrapper.__annotations__ = {parameter.name: parameter.annotation for parameter in parameters}
        return wrapper

    return decorate


def _spec(field, sweep: bool) -> dict | None:
    """How `field` is an option of this command (its metadata, with the sweep's overrides), or None."""
    if sweep:
        return {**field.metadata, **field.metadata["sweep"]} if "sweep" in field.metadata else None
    return dict(field.metadata) if field.metadata.get("help") else None


def _parameter(field, spec: dict) -> inspect.Parameter:
    """The typer option of `field`: the type the command line reads (its own, less None, unless `type` says), the
    default as the command line takes it, and a bool as a plain flag (--online, not --online/--no-online)."""
    kind = spec.get("type") or next(t for t in typing.get_args(field.type) or (field.type,) if t is not type(None))
    default = spec.get("cli_default", _same)(field.default)
    flags = spec.get("flags") or (("--" + field.name.replace("_", "-"),) if kind is bool else ())
    option = typer.Option(
        default, *flags, help=spec["help"], show_default=spec.get("show_default", True), metavar=spec.get("metavar")
    )
    annotation = Optional[kind] if default is None else kind
    return inspect.Parameter(field.name, inspect.Parameter.KEYWORD_ONLY, default=option, annotation=annotation)


def _same(value):
    return value


@app.command("teacher-logits")
@friendly
@with_options(CacheOptions)
def teacher_logits_command(
    dataset: str = typer.Option(
        DEFAULT_DATASET,
        help="Hub dataset id, or a local folder: save_to_disk output, parquet files with a card, or an image folder.",
    ),
    teacher: str = typer.Option(
        DEFAULT_TEACHER, help="Hub model id or local folder of a fine-tuned image classifier."
    ),
    output: Optional[Path] = typer.Option(
        None, show_default="data/<dataset>--<teacher>", help="Cache folder to write."
    ),
    options: CacheOptions = None,
    num_processes: Optional[int] = NUM_PROCESSES,
):
    """Run the teacher once over the dataset and store its logits as an Arrow column, with a manifest.

    The cache is a datasets.DatasetDict on disk (columns row_index, labels, teacher_logits, pixel_values) plus
    kdcache.json. Logits are raw (not softened), in the dataset's label order: float32, or compact for teachers of
    many classes (--logits-dtype fp16, --top-k K). A killed run resumes from its finished chunks when you run the
    same command again; re-running a complete cache is a no-op.

    Examples (the hub defaults; then the teacher that `python benchmarks/make_teacher.py --output teachers/effl0-beans`
    rebuilds; then 8 augmented views per training image; then 16 mixed views):

    \b
      kdcache teacher-logits
      kdcache teacher-logits --dataset beans --teacher teachers/effl0-beans
      kdcache teacher-logits --dataset beans --teacher teachers/effl0-beans --views 8
      kdcache teacher-logits --dataset beans --teacher teachers/effl0-beans \
          --views 16 --view-scale 0.05 --mix-alpha 1 --output data/beans-effl0-mixed16

    Images nobody labelled, cached beside a labelled dataset (train-student teaches them by the teacher alone):

    \b
      kdcache teacher-logits --dataset beans --teacher teachers/effl0-beans \
          --extra-images photos/ --output data/beans-effl0-extra

    Several processes (GPUs, machines) split the chunks among them and give the same cache as one:

    \b
      accelerate launch --num_processes 4 -m kdcache teacher-logits ...
      kdcache teacher-logits --num-processes 4 ...
    """
    relaunch(num_processes, options.device)
    from kdcache.format.reader import describe
    from kdcache.runtime import is_main
    from kdcache.teacher.run import teacher_logits

    path = teacher_logits(dataset=dataset, teacher=teacher, output=output, options=options)
    if is_main():
        typer.echo(describe(path))


@app.command("evaluate")
@friendly
@with_options(EvaluationOptions, after={"output": "device"})
@with_options(RemoteOptions, into="remote")
def evaluate_command(
    models: list[str] = typer.Argument(
        ...,
        metavar="MODEL",
        help="One or more models: hub ids or folders written by save_pretrained (a kdcache student, a teacher), or by kdcache export (the folder, or one of its .onnx files, run in ONNX Runtime).",
        show_default=False,
    ),
    output: Optional[Path] = typer.Option(
        None,
        help="Folder to write.",
        show_default="MODEL/eval-SPLIT for a local model, data/eval/NAME-SPLIT for a hub id, data/eval/compare-SPLIT for several models",
    ),
    options: EvaluationOptions = None,
    remote: RemoteOptions = None,
):
    """Measure models on a split: accuracy, macro-F1, per-class precision/recall/F1, the confusion matrix,
    expected calibration error (15 bins), parameters, size on disk and images/s; with --cache, how close each is
    to the teacher; with --speed, batch-1 latency and batch-32 throughput, timed the same way for every model.

    Each model is fed through its own image processor, as pipeline() would, and its outputs are matched to the
    dataset's labels by name. Writes metrics.json, confusion_matrix.png and reliability_diagram.png (and, for several models, one folder
    per model plus a combined metrics.json and comparison.png). Metrics are computed by evaluate modules shipped
    with kdcache, so nothing is fetched from the hub.

    Examples (offline, local paths):

    \b
      kdcache evaluate data/students/beans--effl0-beans-distilled --dataset beans
      kdcache evaluate data/students/beans--effl0-beans-distilled --cache data/beans--effl0-beans
      kdcache evaluate teachers/effl0-beans data/students/* --cache data/beans--effl0-beans
      kdcache evaluate data/students/beans--effl0-beans-distilled data/exports/beans-int8 --speed \\
          --cache data/beans--effl0-beans
    """
    from dataclasses import replace

    from kdcache.evaluation.evaluate import evaluate_models
    from kdcache.evaluation.report import describe
    from kdcache.format.remote import local_caches

    options = replace(options, cache=local_caches(options.caches, remote))
    typer.echo(describe(evaluate_models(models, output=output, options=options)))


@app.command("export")
@friendly
@with_options(ExportOptions)
def export_command(
    student: Path = typer.Argument(
        ...,
        metavar="STUDENT",
        help="A student folder written by kdcache train-student (or any image classifier saved with save_pretrained beside its image processor).",
        show_default=False,
    ),
    output: Path = typer.Option(
        ...,
        help="Folder to write: model.onnx, model_int8.onnx, the configs, README.md, export.json.",
        show_default=False,
    ),
    options: ExportOptions = None,
):
    """Ship the student: an ONNX folder that ONNX Runtime runs, int8 when asked, checked before it is written.

    model.onnx is the student exported by torch.onnx.export (dynamo); --int8 adds model_int8.onnx (static: QDQ,
    calibrated on a cache's images with their stored views replayed; dynamic: weights only). The check, on rows of a
    cache (default: the one the student was trained from, split validation): the fp32 ONNX model must give the
    PyTorch student's logits on every row (within 1e-4 + 1e-4*|logit|, the same top-1), or nothing is written; the
    int8 model's top-1 agreement with the student and with the cached teacher, and the accuracy, are reported in a
    table, in README.md and in export.json. The student folder is only read. Needs the optional extra:
    pip install 'kdcache[export]'.

    \b
      kdcache export data/students/beans--effl0-beans-distilled --output data/exports/beans
      kdcache export data/students/beans--effl0-beans-distilled --output data/exports/beans-int8 \\
          --int8 static --calibration data/beans--effl0-beans
      kdcache evaluate data/students/beans--effl0-beans-distilled data/exports/beans-int8/model_int8.onnx \\
          --cache data/beans--effl0-beans --speed
    """
    from kdcache.export.report import describe
    from kdcache.export.run import export

    typer.echo(describe(export(student, output, options=options)))


@app.command("info")
@friendly
@with_options(RemoteOptions, into="remote")
def info_command(
    cache: str = typer.Argument(..., metavar="CACHE", help=CACHE_HELP),
    remote: RemoteOptions = None,
):
    """Print a cache's manifest: what produced it (and, for a pulled copy, where from), its splits and their
    checksums, and its size on disk."""
    from kdcache.format.reader import describe
    from kdcache.format.remote import local_cache

    typer.echo(describe(local_cache(cache, remote)))


@app.command("verify")
@friendly
@with_options(VerifyOptions)
@with_options(RemoteOptions, into="remote")
def verify_command(
    cache: str = typer.Argument(..., metavar="CACHE", help=CACHE_HELP),
    options: VerifyOptions = None,
    remote: RemoteOptions = None,
):
    """Rerun the cache's teacher on a random sample of its inputs and compare with the cached logits.

    The checksums checked on every load catch bytes changed after the cache was written; this catches logits that
    are not the teacher's at all (altered with their checksums, or written wrong). Clean rows are rerun on their
    stored pixels, views and mixed views rebuilt from their source images and parameters, as stage one built them.
    Prints max |logit difference| and top-1 mismatches per split; exits 1 above --tolerance.

    \b
      kdcache verify data/beans--effl0-beans
      kdcache verify data/beans-effl0-mixed16 --sample 256 --teacher teachers/effl0-beans
    """
    from kdcache.format.remote import local_cache
    from kdcache.teacher.verify import describe, verify_teacher_logits

    report = verify_teacher_logits(local_cache(cache, remote), options)
    typer.echo(describe(report))
    if not report["passed"]:
        raise typer.Exit(1)


@app.command("train-student")
@friendly
@with_options(TrainingOptions)
@with_options(RemoteOptions, into="remote")
def train_student_command(
    cache: list[str] = typer.Argument(
        ...,
        metavar="CACHE",
        help="A cache folder written by kdcache teacher-logits, or its address (hf://datasets/OWNER/NAME, s3://...); several caches of the same rows and views: a teacher ensemble, their probabilities averaged at T.",
        show_default=False,
    ),
    output: Optional[Path] = typer.Option(
        None,
        show_default="data/students/<cache>-distilled (-distilled-qat with --quantization-aware)",
        help="Folder for the trained student.",
    ),
    options: TrainingOptions = None,
    remote: RemoteOptions = None,
    num_processes: Optional[int] = NUM_PROCESSES,
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

    From a cache someone shared (pulled once into --cache-dir, verified, reused while up to date):

    \b
      kdcache train-student hf://datasets/me/beans-effl0-logits
      kdcache train-student s3://bucket/caches/beans-effl0

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

    Quantization-aware: a trained student continued under the int8 rounding of kdcache export's static int8:

    \b
      kdcache train-student data/beans--effl0-beans --student data/students/beans-student --quantization-aware

    Several processes train data-parallel (DDP) at the same global --batch-size:

    \b
      accelerate launch --num_processes 4 -m kdcache train-student data/beans--effl0-beans
      kdcache train-student data/beans--effl0-beans --num-processes 4
    """
    relaunch(num_processes, options.device)
    from kdcache.format.remote import local_caches
    from kdcache.student.train import train_student

    caches = local_caches(cache, remote)
    train_student(caches[0] if len(caches) == 1 else caches, output=output, options=options, progress=True)


@app.command("sweep")
@friendly
@with_options(TrainingOptions, sweep=True)
@with_options(SweepOptions, into="study")
@with_options(RemoteOptions, into="remote")
def sweep_command(
    cache: list[str] = typer.Argument(
        ...,
        metavar="CACHE",
        help="A cache folder written by kdcache teacher-logits, or its address (several: a teacher ensemble, as in train-student).",
        show_default=False,
    ),
    study: SweepOptions = None,
    options: TrainingOptions = None,
    remote: RemoteOptions = None,
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
    from kdcache.format.remote import local_caches
    from kdcache.sweeps.run import optuna_module, sweep

    optuna_module()  # without Optuna: one line saying how to install it, before anything else
    caches = local_caches(cache, remote)
    sweep(caches[0] if len(caches) == 1 else caches, options=options, **vars(study))


@app.command("push-cache")
@friendly
@with_options(PushOptions)
def push_cache_command(
    cache: Path = typer.Argument(..., metavar="CACHE", help="A cache folder written by kdcache teacher-logits."),
    dest: str = typer.Argument(..., metavar="DEST", help=ADDRESS_HELP),
    options: PushOptions = None,
):
    """Push a cache where others can train from it: a Hub dataset repository (with a dataset card that
    datasets.load_dataset reads) or object storage.

    Every chunk file is verified before it leaves; the files go first (on the Hub in commits of at most 50 files) and
    the manifest last, so the address never shows a cache as complete before it is. A rerun of an interrupted push
    uploads only what is missing; another cache at DEST is refused unless --overwrite. Credentials come from where
    their ecosystem keeps them: 'hf auth login' or HF_TOKEN, the AWS environment or profile, --storage-options.

    \b
      kdcache push-cache data/beans--effl0-beans me/beans-effl0-logits
      kdcache push-cache data/beans--effl0-beans s3://bucket/caches/beans-effl0
      kdcache push-cache data/beans--effl0-beans s3://bucket/caches/beans-effl0 \\
          --storage-options '{"endpoint_url": "http://localhost:9000"}'
    """
    from kdcache.format.remote import push_cache

    report = push_cache(cache, dest, options)
    typer.echo(
        f"kdcache: pushed '{cache}' to {report['address']}: {report['uploaded_files']} files uploaded "
        f"({report['uploaded_bytes']} bytes), {report['kept_files']} already there"
    )


@app.command("pull-cache")
@friendly
@with_options(RemoteOptions, into="remote")
def pull_cache_command(
    src: str = typer.Argument(..., metavar="SRC", help=ADDRESS_HELP),
    output: Optional[Path] = typer.Option(
        None,
        show_default="its folder in --cache-dir",
        help="Folder to pull into: a new or empty folder, or an earlier pull of the same address (updated).",
    ),
    remote: RemoteOptions = None,
):
    """Pull a shared cache into a folder, every chunk file checked against the sha256 its manifest records.

    A damaged or missing file is fetched once more, then refused. A rerun of an interrupted pull fetches only what
    is missing; a copy that is up to date is left as it is. The copy's manifest records where it came from (the
    address, and the Hub revision or the object's ETag): 'kdcache info' shows it. The commands that read a cache
    take the address itself and pull it into --cache-dir.

    \b
      kdcache pull-cache me/beans-effl0-logits --output data/beans-effl0
      kdcache pull-cache s3://bucket/caches/beans-effl0 --output data/beans-effl0
    """
    from kdcache.format.remote import pull_cache

    report = pull_cache(src, output, remote)
    revision = f" @ {report['revision']}" if report.get("revision") else ""
    typer.echo(
        f"kdcache: pulled {report['address']}{revision} into '{report['path']}': {report['fetched_files']} files "
        f"fetched ({report['fetched_bytes']} bytes), {report['kept_files']} verified and kept"
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
    from kdcache.runtime import end_process, is_main, launched_processes

    if not is_main():  # one launch, one set of progress bars: the main process's
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
