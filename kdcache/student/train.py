"""Stage two: train a student from cached teacher logits with the Hugging Face Trainer.

The batch carries `teacher_logits` read from the cache. In `online` mode (the tutorial's way, kept as a reference
for tests and benchmarks) the batch is built from the original images and the teacher is run on it inside
`compute_loss`; everything else, including the student's input pixels, is the same code."""

import json
import logging
import shutil
from dataclasses import replace
from pathlib import Path

import torch

from kdcache.data import ImagePipeline
from kdcache.errors import KdcacheError
from kdcache.format.ensemble import open_ensemble
from kdcache.format.manifest import (
    Manifest,
)
from kdcache.format.reader import load_cache
from kdcache.format.remote import local_cache
from kdcache.hub import push_folder
from kdcache.models import count_parameters
from kdcache.options import TrainingOptions, check_resumable, record_options, run_options
from kdcache.options.config import as_given, write_config
from kdcache.options.resolution import final_size, size_schedule
from kdcache.outputs import (
    TRAINING_RECORD,
    OutputFolder,
    OutputKind,
    check_free_space,
    safe_output,
    training_bytes,
    unfinished_checkpoints,
)
from kdcache.runtime import (
    agreed,
    distributed,
    is_main,
    output_path,
    placement,
    slug,
)
from kdcache.student.card import model_card, public_record, summary_line
from kdcache.student.model import build_student, student_processor
from kdcache.student.quantization import FakeQuantization
from kdcache.student.rows import training_rows, unlabeled_splits
from kdcache.student.trainer import StudentRun, build_trainer, run_training, training_callbacks

log = logging.getLogger("kdcache")


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
    `cache` may be an address (hf://datasets/OWNER/NAME, s3://...: kdcache.format.remote.local_cache pulls it once
    into the cache folder) and may also be a list of caches of the same rows and views: a teacher ensemble, whose teachers'
    probabilities at the temperature are averaged (weighted by `teacher_weights`, normalised; equal by default) into
    the targets every loss reads (kdcache.format.ensemble; kdcache.format.ensemble.ensemble_teacher_logits).

    The options are a TrainingOptions (kdcache.options: every option, its default and its checks), given whole as
    `options`, one by one as keywords (`train_student(cache, output=..., seed=1, alpha=0)`), or both (the keywords
    win). `loss` is a name in kdcache.losses (kd, dkd, dist); `temperature` None is that loss's paper's
    (its declaration in kdcache.losses); `alpha` weights the loss's distillation part against the labels' cross-entropy;
    `standardize_logits` z-scores student and teacher logits before the softmax (kd and dkd). `student_size` S trains (and saves) the student at S x S pixels: each view is the same crop as the
    teacher's, resized to S; a schedule ('128:0.7,224') trains at each size in turn and saves at the last
    (kdcache.options.resolution). `ema_decay` (e.g. 0.998) keeps an exponential moving average of the weights, evaluated
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
    caches = [local_cache(path, progress=progress) for path in caches]  # an address: its verified local copy
    processes = distributed(options.device)  # None on a plain run, which then goes exactly as it always has
    with agreed(processes):  # every process checks the same inputs; an error is printed once
        options.check(processes.count if processes else 1, caches=len(caches))
        options = options.resolved()  # the loss's own temperature where none was given
        place = placement(options.device, options.precision, processes, training=True)
    with safe_output(_output_path(output, caches, options), STUDENT_OUTPUT, processes) as folder:
        with agreed(processes):
            run = _prepare(caches, folder, options, place, processes, callbacks, progress, verify)
        # once every check has passed on every process: a refused run leaves no work folder (a damaged chunk file may
        # be found by another process than the main one, which learns of it only when the step above is agreed)
        with agreed(processes):
            if is_main(processes) and not run.options.resume:
                record_options(folder.work, _run_options(run))
        trainer = build_trainer(run)
        if progress and is_main(processes):
            log.info(place.describe(trainer.args.train_batch_size))
        seconds = run_training(trainer, run.options)
        summary = _summary(run, trainer, seconds)
        _save(run, trainer, summary)
    # the student is in place now, on every process (safe_output waits for the main one's rename)
    if progress and is_main(processes):
        log.info(summary_line(summary))
    _push(folder.path, run.options, progress, processes)
    return summary


def _prepare(caches, folder, options, place, processes, callbacks, progress, verify) -> StudentRun:
    """Every input of the run, each checked before any work: the cache (or the ensemble of caches) opened and
    verified, the output claimed, the student built, the disk checked, the training rows picked."""
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
    model = build_student(
        options.student, manifest.label_names, (3, *size), options.seed, trained=options.quantization_aware
    )
    # channels_last: 1.5x faster training steps for a CNN student on CPU (BENCHMARKS.md); the Trainer's
    # .to(device) keeps the format, and the collator hands it channels_last batches
    model = model.to(memory_format=torch.channels_last)
    # --quantization-aware: on before the Trainer loads a checkpoint (--resume), whose keys and ranges are its own
    fake_quantization = FakeQuantization(model, (3, *size)) if options.quantization_aware else None
    _check_space(model, folder, options, processes)
    pipeline = ImagePipeline(processor)
    rows = training_rows(cached, manifest, cache_path, options, pipeline, size, place)
    return StudentRun(
        options=options,
        place=place,
        processes=processes,
        folder=folder,
        caches=caches,
        cache_path=cache_path,
        manifest=manifest,
        ensemble=ensemble,
        fingerprint=fingerprint,
        processor=processor,
        pipeline=pipeline,
        size=size,
        model=model,
        fake_quantization=fake_quantization,
        rows=rows,
        callbacks=training_callbacks(callbacks, rows, options, fake_quantization),
        progress=progress,
    )


def _run_options(run: StudentRun) -> dict:
    """The options as recorded for --resume to compare with."""
    return run_options(run.options, cache_fingerprint=run.fingerprint, precision=run.place.precision)


def _checkpoints(work: Path) -> str | None:
    """What a failed run leaves for --resume: its finished checkpoints (the Trainer writes trainer_state.json last)."""
    steps = sorted(int(path.parent.name.rpartition("-")[2]) for path in work.glob("checkpoint-*/trainer_state.json"))
    return f"a checkpoint at step {steps[-1]}" if steps else None


# The student's folder: written as OUTPUT.partial/final beside the run's checkpoints, which --resume continues from.
STUDENT_OUTPUT = OutputKind(
    "a kdcache student",
    "kdcache train-student",
    TRAINING_RECORD,
    finished="final",
    resumable=True,
    holds=_checkpoints,
    resume="rerun the same command with --resume",
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
    if options.quantization_aware:  # beside the student it continues, which may be in the default folder
        kind += "-qat"
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
    final = final_size(options.student_size)  # a schedule's last size: the one validated and saved
    size = (final, final) if final else teacher_size
    if options.online and size != teacher_size:
        raise KdcacheError(
            f"--online runs the teacher on the student's input, which must then be the teacher's "
            f"{teacher_size[0]}x{teacher_size[1]} pixels; leave out --student-size or train from the cache"
        )
    return processor, size


def _check_space(model, folder: OutputFolder, options: TrainingOptions, processes) -> None:
    output, work = folder.path, folder.work
    space = training_bytes(
        model, checkpoints=2 if options.save_checkpoints else 0
    )  # save_total_limit in build_trainer
    if is_main(processes):
        check_free_space(output, space, "its checkpoints and the student", work)
    folder.on_disk_full(
        space,
        then="run the same command with --resume to continue from the last checkpoint",
        scratch=lambda: [work / "final", *unfinished_checkpoints(work)] if is_main(processes) else [],
    )


def _summary(run: StudentRun, trainer, seconds: float) -> dict:
    """What the run did and what it trained (kdcache_training.json): accuracies, epochs, losses, and the recipe."""
    options, manifest = run.options, run.manifest
    schedule = size_schedule(options.student_size)
    history = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    best = max(history, key=lambda entry: entry["eval_accuracy"]) if history else None
    last = history[-1] if history else None
    args = trainer.args
    return {
        "output": str(run.folder.path),
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
        # --quantization-aware: the int8 scheme its weights were trained under (kdcache export quantizes so)
        **({"quantization_aware": run.fake_quantization.record()} if run.fake_quantization else {}),
        "recipe": {
            # the options as given (those that say what is trained), then what they resolved to
            **options.recipe(),
            "teacher": run.rows.teacher_run,
            "cache": str(run.cache_path),
            "cache_fingerprint": manifest.fingerprint,
            "teacher_weights_sha256": manifest.teacher["weights_sha256"],
            "student": options.student or "MobileNetV2Config() from scratch",
            "student_parameters": count_parameters(run.model),
            # the batch and processes as the Trainer ran them (one device per process: kdcache.devices)
            "batch_size": args.train_batch_size * args.world_size,
            "views": run.rows.views,
            "mixed_views": manifest.mixed_views,
            **(run.rows.labels.recipe() if run.rows.labels else {}),
            "student_size": list(run.size),
            # a schedule: each size and the share of the epochs it ends at (the last one is student_size)
            **({"student_size_schedule": [list(phase) for phase in schedule]} if len(schedule) > 1 else {}),
            "precision": run.place.precision,
            "device": str(args.device),
            "processes": args.world_size,
            # an ensemble: its teachers, their normalised weights and their caches, as lists in the caches' order
            **(run.ensemble.recipe() if run.ensemble else {}),
        },
    }


def _save(run: StudentRun, trainer, summary: dict) -> None:
    """The final student (the best epoch's, or the EMA's) with its processor and model card, in the output folder's
    `finished`, which safe_output moves into place."""
    final, work, processes, manifest = run.folder.finished, run.folder.work, run.processes, run.manifest
    if run.fake_quantization is not None:  # off before saving: the student folder holds plain float weights
        run.fake_quantization.remove()
    if is_main(processes):
        shutil.rmtree(final, ignore_errors=True)
    trainer.save_model(str(final))  # on every process: under DDP the Trainer has the main one write
    if is_main(processes):
        student_processor(run.processor, manifest.pixel_shape[1:], run.size).save_pretrained(str(final))
        (final / "training_args.bin").unlink(missing_ok=True)  # the Trainer's pickle, which names the work folder
        (final / TRAINING_RECORD).write_text(json.dumps(public_record(summary), indent=2) + "\n")
        card = model_card(summary, manifest, manifest.label_names, run.options.push_to_hub, run.options.license)
        (final / "README.md").write_text(card)
        caches = [Path(cache) for cache in run.caches]
        given = {"cache": caches[0] if len(caches) == 1 else caches, "output": run.folder.path}
        write_config(final, "train-student", {**given, **as_given(run.options)}, home=run.folder.path)
        if (work / "runs").exists():
            shutil.move(str(work / "runs"), str(final / "runs"))


def _push(output: Path, options: TrainingOptions, progress: bool, processes) -> None:
    with agreed(processes):  # a failed push is said once, and every process exits with it
        if options.push_to_hub and is_main(processes):
            url = push_folder(output, options.push_to_hub)
            if progress:
                log.info(f"pushed to {url}")
