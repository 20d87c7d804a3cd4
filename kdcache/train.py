"""Stage two: train a student from cached teacher logits with the Hugging Face Trainer.

The batch carries `teacher_logits` read from the cache. In `online` mode (the tutorial's way, kept as a reference
for tests and benchmarks) the batch is built from the original images and the teacher is run on it inside
`compute_loss`; everything else, including the student's input pixels, is the same code.
"""

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments

from kdcache import KdcacheError
from kdcache.cache import IMAGE, LABELS, LOGITS, PIXELS, VIEWS, load_cache
from kdcache.defaults import TRAINING as DEFAULTS
from kdcache.data import ImagePipeline, ViewRecipe, hub_error, load_image_dataset, undecoded
from kdcache.loss import check_loss_settings, distillation_loss
from kdcache.models import align_labels, count_parameters, load_classifier
from kdcache.outputs import (
    check_free_space,
    guards_output,
    lock_output,
    report_disk_full,
    training_bytes,
    unfinished_checkpoints,
)
from kdcache.runtime import (
    agreed,
    check_writable_parent,
    cpus_per_process,
    distributed,
    is_main,
    move_into_place,
    pick_device,
    slug,
    tune_malloc,
)


class DistillationTrainer(Trainer):
    """Trainer whose loss is kdcache's distillation loss over the batch's `teacher_logits`."""

    loss_is_scaled_for_ga = False  # distillation_loss is a per-batch mean

    def __init__(self, *args, temperature=5.0, alpha=0.5, teacher=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.temperature, self.alpha, self.teacher = temperature, alpha, teacher

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        teacher_logits = inputs.get("teacher_logits")
        if self.teacher is not None and self.alpha > 0:
            teacher_logits = self.teacher(inputs["pixel_values"])
        outputs = model(pixel_values=inputs["pixel_values"])
        loss = distillation_loss(outputs.logits, inputs["labels"], teacher_logits, self.temperature, self.alpha)
        return (loss, outputs) if return_outputs else loss


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
    """Rows of uint8 pixels (+ labels, + cached logits) to a batch; the per-pixel normalisation happens here, on
    the whole batch at once, through the teacher processor's lookup table."""

    def __init__(self, pipeline: ImagePipeline):
        self.pipeline = pipeline

    def __call__(self, rows):
        batch = {
            "pixel_values": self.pipeline.normalize(torch.stack([torch.as_tensor(row[PIXELS]) for row in rows])),
            "labels": torch.as_tensor([int(row[LABELS]) for row in rows]),
        }
        if LOGITS in rows[0]:
            batch["teacher_logits"] = torch.stack([torch.as_tensor(row[LOGITS], dtype=torch.float32) for row in rows])
        return batch


class ViewRows(torch.utils.data.Dataset):
    """Training rows of a split cached with K views per image. Each epoch uses one view of each image, drawn so that
    all K views come up once in every K epochs; the view is rebuilt from the image and its stored parameters and
    paired with the teacher's logits on exactly that view.

    fresh=True is the inconsistent baseline: a new random view every epoch, paired with the logits the teacher gave
    the clean (unaugmented) view, which is what augmenting the student alone amounts to.
    """

    def __init__(self, rows, recipe: ViewRecipe, seed: int, fresh: bool = False):
        import datasets

        self.rows = undecoded(rows, IMAGE)
        self.recipe, self.seed, self.fresh, self.epoch = recipe, seed, fresh, 0
        self.count = 1 if fresh else rows.features[VIEWS].shape[0]
        self.decoder = datasets.Image()

    def __len__(self):
        return len(self.rows)

    def view_index(self, row: int) -> int:
        cycle, position = divmod(self.epoch, self.count)
        return int(np.random.default_rng([self.seed, row, cycle]).permutation(self.count)[position])

    def __getitems__(self, indices):
        batch = self.rows[list(indices)]
        items = []
        for position, row in enumerate(indices):
            image = self.decoder.decode_example(batch[IMAGE][position]).convert("RGB")
            logits = batch[LOGITS][position]
            if self.fresh:
                view = self.recipe.sample(*image.size, (row, self.epoch), 1)[0]
            else:
                k = self.view_index(row)
                view, logits = batch[VIEWS][position][k], logits[k]
            items.append({PIXELS: torch.from_numpy(self.recipe.render(image, view)), LABELS: batch[LABELS][position],
                          LOGITS: logits})
        return items

    def __getitem__(self, index):
        return self.__getitems__([index])[0]


class SetEpoch(TrainerCallback):
    """Tells the view rows which epoch is starting (Trainer tells samplers, not map-style datasets)."""

    def __init__(self, rows: ViewRows):
        self.rows = rows

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.rows.epoch = int(math.floor((state.epoch or 0) + 1e-6))


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
    scratch, or a hub id / local folder (pretrained weights, with a fresh head when its classes differ)."""
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
    cache: str | Path,
    output: str | Path | None = None,
    student: str | None = None,
    temperature: float = 5.0,
    alpha: float = 0.5,
    epochs: float = DEFAULTS["epochs"],
    learning_rate: float = DEFAULTS["learning_rate"],
    batch_size: int = DEFAULTS["batch_size"],
    weight_decay: float = DEFAULTS["weight_decay"],
    warmup_ratio: float = DEFAULTS["warmup_ratio"],
    scheduler: str = DEFAULTS["scheduler"],
    seed: int = 42,
    train_split: str = "train",
    eval_split: str | None = "validation",
    max_steps: int = -1,
    resume: bool = False,
    overwrite: bool = False,
    online: bool = False,
    teacher: str | None = None,
    student_only_augment: bool = False,
    num_workers: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    logging_steps: int = 10,
    save_checkpoints: bool = True,
    push_to_hub: str | None = None,
    callbacks: list | None = None,
    progress: bool = True,
) -> dict:
    """Train a student from the cache at `cache` and save it (model, image processor, model card) to `output`.

    Returns a summary: output folder, best validation accuracy and its epoch, wall time, the per-epoch history.
    `callbacks` are transformers TrainerCallbacks (or classes), passed to the Trainer as they are.

    Launched as several processes (accelerate launch, torchrun), it trains data-parallel: `batch_size` is the
    global batch, split evenly among the processes; only the main process writes the output. Every process returns
    the summary, the same on all (the Trainer gathers losses and metrics) except for its own wall time.
    """
    processes = distributed(device)  # None on a plain run, which then goes exactly as it always has
    with agreed(processes):  # every process checks the same inputs; an error is printed once
        check_loss_settings(temperature, alpha)
        if epochs <= 0 and max_steps <= 0:
            raise KdcacheError("--epochs must be > 0")
        if learning_rate <= 0 or batch_size < 1:
            raise KdcacheError("--learning-rate must be > 0 and --batch-size at least 1")
        if processes and batch_size % processes.count:
            raise KdcacheError(f"--batch-size {batch_size} is the batch of all {processes.count} processes together; "
                               f"make it a multiple of {processes.count}")
        tune_malloc()
        torch_device = pick_device(device)
        if processes and torch_device.type == "cuda":
            torch_device = processes.device  # one GPU per process (the online teacher goes there too)
        cache_path = Path(cache)
        cached, manifest = load_cache(cache_path)
        names = manifest["label_names"]
        for split, flag in ((train_split, "--train-split"), (eval_split, "--eval-split")):
            if split is not None and split not in cached:
                raise KdcacheError(f"{flag} '{split}' is not in cache '{cache_path}' (splits: {', '.join(cached)})")
        output = Path(output) if output is not None else Path("data") / "students" / f"{slug(cache_path)}-{'online' if online else 'distilled' if alpha > 0 else 'scratch'}"
        work = output.with_name(output.name + ".partial")
        if is_main(processes):  # the main process alone decides about the output, and clears it
            lock_output(output)  # held until this function returns: a second run on this output is refused
            if output.exists() and not overwrite:
                raise KdcacheError(f"--output '{output}' exists; pass --overwrite to replace it, or choose another --output")
            check_writable_parent(output, "--output")
            if work.exists() and not resume:
                if not overwrite:
                    raise KdcacheError(
                        f"'{work}' holds an interrupted training run; pass --resume to continue it or --overwrite to start over"
                    )
                shutil.rmtree(work)

        from transformers import AutoImageProcessor

        processor = AutoImageProcessor.from_pretrained(str(cache_path), backend="pil")
        pipeline = ImagePipeline(processor)
        pixel_shape = manifest["columns"]["pixel_values"]["shape"]
        model = build_student(student, names, pixel_shape, seed)
        space = training_bytes(model, checkpoints=2 if save_checkpoints else 0)  # save_total_limit below
        if is_main(processes):
            check_free_space(output, space, "its checkpoints and the student", work)
        report_disk_full(work, space, then="run the same command with --resume to continue from the last checkpoint",
                         scratch=lambda: [work / "final", *unfinished_checkpoints(work)] if is_main(processes) else [])

        data = manifest["dataset"]
        views = data["splits"][train_split].get("views", 1)
        if views > 1 and (online or student_only_augment):
            raise KdcacheError(f"--online and --student-only-augment need a cache without views; '{cache_path}' has "
                               f"{views} views per image of split '{train_split}'")
        if eval_split and data["splits"][eval_split].get("views", 1) > 1:
            raise KdcacheError(f"--eval-split '{eval_split}' is cached with views; evaluate on a split with one clean view")

        def source_split(split):
            """The original rows the cache was made from, for the modes that need the images themselves."""
            rows = load_image_dataset(data["name_or_path"], data.get("revision"))[split]
            if rows._fingerprint != data["splits"][split]["fingerprint"]:
                raise KdcacheError(f"split '{split}' of '{data['name_or_path']}' changed since the cache was made; "
                                   "this mode must see the same rows")
            return rows

        online_teacher = None
        columns = [PIXELS, LABELS] + ([LOGITS] if alpha > 0 else [])
        eval_rows = cached[eval_split].with_format("torch", columns=columns) if eval_split else None
        if online:
            teacher = teacher or manifest["teacher"]["name_or_path"]
            teacher_model = load_classifier(teacher, revision=manifest["teacher"].get("revision"),
                                            trust_remote_code=manifest["teacher"].get("trust_remote_code", False))
            online_teacher = OnlineTeacher(teacher_model, align_labels(teacher_model.config.id2label, names)).to(torch_device)
            train_rows, eval_rows = (
                _online_rows(source_split(split), data["image_column"], data["label_column"], pipeline) if split else None
                for split in (train_split, eval_split)
            )
        elif views > 1:
            train_rows = ViewRows(cached[train_split], ViewRecipe.from_dict(manifest["views"]["recipe"]), seed)
        elif student_only_augment:
            import datasets

            images = undecoded(source_split(train_split), data["image_column"]).select_columns([data["image_column"]])
            if data["image_column"] != IMAGE:
                images = images.rename_column(data["image_column"], IMAGE)
            train_rows = ViewRows(
                datasets.concatenate_datasets([cached[train_split].select_columns([LABELS, LOGITS]), images], axis=1),
                ViewRecipe(pixel_shape[1:], getattr(processor, "resample", 3), seed=seed),
                seed,
                fresh=True,
            )
        else:
            train_rows = cached[train_split].with_format("torch", columns=columns)
        callbacks = list(callbacks or [])
        if isinstance(train_rows, ViewRows):
            callbacks.append(SetEpoch(train_rows))
        if num_workers is None:  # rebuilding views costs a few ms of CPU per image: prepare them ahead of the step
            num_workers = 1 if isinstance(train_rows, ViewRows) and cpus_per_process(processes) >= 2 else 0

        bf16 = precision == "bf16" or (precision == "auto" and torch_device.type == "cuda" and torch.cuda.is_bf16_supported())
        fp16 = precision == "fp16"
        if (bf16 or fp16) and torch_device.type != "cuda":
            raise KdcacheError(f"--precision {precision} needs a CUDA device (bf16 on CPU is several times slower); use fp32")
    checkpoint = resume and any(work.glob("checkpoint-*"))  # after the main process has cleared what it had to
    import importlib.util

    count = processes.count if processes else 1
    evaluating = eval_rows is not None
    args = TrainingArguments(
        output_dir=str(work),
        # Under DDP the Trainer gives each process its share of every batch (and averages the gradients), so the
        # optimiser steps, the learning rate and the loss are those of one process at the same --batch-size.
        per_device_train_batch_size=batch_size // count,
        per_device_eval_batch_size=batch_size // count,
        learning_rate=learning_rate,
        weight_decay=weight_decay,
        warmup_steps=warmup_ratio,
        lr_scheduler_type=scheduler,
        num_train_epochs=epochs,
        max_steps=max_steps,
        eval_strategy="epoch" if evaluating else "no",
        save_strategy="epoch" if save_checkpoints else "no",
        save_total_limit=2,
        load_best_model_at_end=evaluating and save_checkpoints,
        metric_for_best_model="accuracy" if evaluating else None,
        greater_is_better=True,
        logging_steps=logging_steps,
        report_to=["tensorboard"] if importlib.util.find_spec("tensorboard") else "none",
        seed=seed,
        remove_unused_columns=False,
        dataloader_num_workers=num_workers,
        use_cpu=torch_device.type == "cpu",
        bf16=bf16,
        fp16=fp16,
        disable_tqdm=not progress,
        push_to_hub=push_to_hub is not None,
        hub_model_id=push_to_hub,
    )
    trainer = DistillationTrainer(
        model=model,
        args=args,
        train_dataset=train_rows,
        eval_dataset=eval_rows,
        data_collator=Collator(pipeline),
        compute_metrics=accuracy_metric if evaluating else None,
        temperature=temperature,
        alpha=alpha,
        teacher=online_teacher,
        callbacks=callbacks,
    )
    if not progress:  # Trainer prints every log line when its bar is off; quiet means quiet
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
    started = time.perf_counter()
    trainer.train(resume_from_checkpoint=True if checkpoint else None)
    seconds = time.perf_counter() - started

    history = [entry for entry in trainer.state.log_history if "eval_accuracy" in entry]
    best = max(history, key=lambda entry: entry["eval_accuracy"]) if history else None
    summary = {
        "output": str(output),
        "best_eval_accuracy": best["eval_accuracy"] if best else None,
        "best_epoch": best["epoch"] if best else None,
        "eval_split": eval_split,
        "epochs": trainer.state.epoch,
        "steps": trainer.state.global_step,
        "seconds": round(seconds, 1),
        "train_losses": [entry["loss"] for entry in trainer.state.log_history if "loss" in entry],
        "history": [{"epoch": e["epoch"], "eval_accuracy": e["eval_accuracy"], "eval_loss": e["eval_loss"]} for e in history],
        "recipe": {
            "teacher": manifest["teacher"]["name_or_path"], "cache": str(cache_path), "cache_fingerprint": manifest["fingerprint"],
            "student": student or "MobileNetV2Config() from scratch", "student_parameters": count_parameters(model),
            "temperature": temperature, "alpha": alpha, "epochs": epochs, "max_steps": max_steps,
            "learning_rate": learning_rate, "batch_size": batch_size, "weight_decay": weight_decay,
            "warmup_ratio": warmup_ratio, "scheduler": scheduler, "seed": seed, "online": online,
            "views": views, "student_only_augment": student_only_augment,
            "precision": "bf16" if bf16 else "fp16" if fp16 else "fp32", "device": str(torch_device),
            "processes": count,
        },
    }
    final = work / "final"
    if is_main(processes):
        shutil.rmtree(final, ignore_errors=True)
    trainer.save_model(str(final))  # on every process: under DDP the Trainer has the main one write
    if is_main(processes):
        processor.save_pretrained(str(final))
        (final / "kdcache_training.json").write_text(json.dumps(summary, indent=2) + "\n")
        (final / "README.md").write_text(model_card(summary, manifest, names))
        if (work / "runs").exists():
            shutil.move(str(work / "runs"), str(final / "runs"))
    if push_to_hub:
        trainer.push_to_hub()  # on every process: the main one pushes
    if is_main(processes):
        move_into_place(final, output)
        shutil.rmtree(work, ignore_errors=True)
        if progress:
            print(summary_line(summary))
    if processes:
        processes.wait()  # the others return once the student is in place
    return summary


def summary_line(summary: dict) -> str:
    if summary["best_eval_accuracy"] is None:
        quality = "no evaluation split"
    else:
        quality = (f"best {summary['eval_split']} accuracy {summary['best_eval_accuracy']:.4f} at epoch "
                   f"{summary['best_epoch']:g} of {summary['epochs']:g}")
    return f"{quality}; {summary['seconds']:.0f} s; student saved to {summary['output']}"


def model_card(summary: dict, manifest: dict, names: list[str]) -> str:
    recipe = summary["recipe"]
    accuracy = summary["best_eval_accuracy"]
    lines = [
        "---",
        "library_name: transformers",
        "pipeline_tag: image-classification",
        "tags:",
        "- kdcache",
        "- knowledge-distillation",
        "- image-classification",
        "---",
        "",
        f"# {Path(summary['output']).name}",
        "",
        (f"A student distilled by kdcache from the teacher `{recipe['teacher']}`"
         if recipe["alpha"] > 0 else "A student trained from labels alone (alpha=0) by kdcache, as a baseline")
        + f", on `{manifest['dataset']['name_or_path']}` ({', '.join(names)}).",
        "",
        "| | |",
        "|---|---|",
        f"| teacher | `{recipe['teacher']}` (weights sha256 `{manifest['teacher']['weights_sha256'][:16]}...`) |",
        f"| logit cache | fingerprint `{recipe['cache_fingerprint']}`" + (" (teacher run online)" if recipe["online"] else "") + " |",
        f"| student | {recipe['student']}, {recipe['student_parameters']:,} parameters |",
        f"| loss | (1-alpha) CE + alpha T^2 KL(teacher/T, student/T), T={recipe['temperature']}, alpha={recipe['alpha']} |",
        f"| training | {summary['epochs']:g} epochs ({summary['steps']} steps), AdamW lr {recipe['learning_rate']}, "
        f"{recipe['scheduler']} schedule, batch {recipe['batch_size']}"
        + (f" ({recipe['processes']} processes of {recipe['batch_size'] // recipe['processes']})" if recipe.get("processes", 1) > 1 else "")
        + f", weight decay {recipe['weight_decay']}, seed {recipe['seed']} |",
    ]
    if accuracy is not None:
        lines.append(f"| {summary['eval_split']} accuracy | {accuracy:.4f} (best epoch {summary['best_epoch']:g}, the weights kept) |")
    lines += [
        "",
        "```python",
        "from transformers import pipeline",
        f'classifier = pipeline("image-classification", model="{summary["output"]}")',
        "```",
        "",
    ]
    return "\n".join(lines)
