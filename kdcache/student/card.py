"""What a trained student says about itself: the summary line, the loss formula, the model card and its metadata."""

from pathlib import Path

from kdcache.losses import LOSS_SPECS
from kdcache.options.config import is_local


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
    distillation = LOSS_SPECS[loss].formula.format(z=standardized)
    return f"{loss}: (1-alpha) CE + alpha {distillation}, {settings}" + (
        ", logits standardised" if standardized else ""
    )


def public_name(name_or_path: str) -> tuple[str, bool]:
    """How a model card names an input: `(hub id, True)` for one read from the hub, else `(folder name, False)`: the
    path it was read from would publish the trainer's folder layout with the card. Local is what the loaders took as
    local (a path that exists, as kdcache.data and from_pretrained decide) or what is written as a path."""
    if is_local(name_or_path):
        return Path(name_or_path).expanduser().resolve().name or name_or_path, False
    return name_or_path, True


def public_record(summary: dict) -> dict:
    """The summary as kdcache_training.json publishes it, with the student (--push-to-hub uploads it): its inputs
    named as the card names them, a hub id as an id and a local folder by its name, beside its fingerprint (the
    cache's, the teacher's weights'); the summary that train_student returns keeps the paths."""
    recipe = summary["recipe"]

    def public(value):
        return [public(item) for item in value] if isinstance(value, list) else public_name(str(value))[0]

    named = {key: public(recipe[key]) for key in ("cache", "teacher") if recipe.get(key) is not None}
    if recipe.get("student") and recipe["student"] != "MobileNetV2Config() from scratch":
        named["student"] = public(recipe["student"])
    return {**summary, "output": Path(summary["output"]).name, "recipe": {**recipe, **named}}


def inherited_license(manifest: dict) -> str | None:
    """The license of the cache's teacher, else of its dataset, where the card (README.md's YAML `license:`) on this
    machine says one: a local folder's, or the one in the hub's cache (no network: a card not there gives none)."""
    from huggingface_hub import try_to_load_from_cache
    from huggingface_hub.repocard import metadata_load

    for kind, source in (("model", manifest["teacher"]), ("dataset", manifest["dataset"])):
        name, revision = source["name_or_path"], source.get("revision")
        try:
            card = (
                Path(name).expanduser() / "README.md"
                if is_local(name)
                else try_to_load_from_cache(name, "README.md", revision=revision, repo_type=kind)
            )
            found = (metadata_load(card) or {}).get("license") if isinstance(card, (str, Path)) else None
        except Exception:  # no card, an unreadable one, a name the hub's cache refuses: no license said
            found = None
        if isinstance(found, str) and found:
            return found
    return None


def card_metadata(summary: dict, manifest: dict, repo: str | None = None, license: str | None = None) -> str:
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
        license=license,
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


def model_card(
    summary: dict, manifest: dict, names: list[str], repo: str | None = None, license: str | None = None
) -> str:
    """The student's README.md: the hub metadata (`license`: given, else the teacher's or dataset's, if their cards
    say one), what it was distilled from and how, and how to use it."""
    recipe = summary["recipe"]
    teacher_intro, teacher_row, cache_row = _teacher_rows(recipe, manifest)
    student = recipe["student"]
    if student != "MobileNetV2Config() from scratch":  # a config name, a hub id or a folder
        student = f"`{public_name(student)[0]}`"
    lines = [
        "---",
        card_metadata(summary, manifest, repo, license or inherited_license(manifest)).rstrip("\n"),
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
    lines += _optional_rows(summary, recipe)
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


def _teacher_rows(recipe: dict, manifest: dict) -> tuple[str, str, str]:
    """How the card names the teacher (or the ensemble of teachers) in its first sentence, and its table's teacher
    and cache rows (without their closing bar)."""
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
    return teacher_intro, teacher_row, cache_row


def _optional_rows(summary: dict, recipe: dict) -> list[str]:
    """The table's rows that only some students have: a label budget, the input size and views, quantization-aware
    training, the accuracy."""
    lines = []
    accuracy = summary["best_eval_accuracy"]
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
            + (_schedule_text(recipe["student_size_schedule"]) if recipe.get("student_size_schedule") else "")
            + (
                f"; {views} {'mixed ' if recipe.get('mixed_views') else ''}views per image, each the teacher's own"
                if views > 1
                else ""
            )
            + (f"; weights: EMA with decay {recipe['ema_decay']}" if recipe.get("ema_decay") else "")
            + " |"
        )
    scheme = summary.get("quantization_aware")
    if scheme:
        lines.append(
            f"| quantization-aware | trained under fake int8 quantization as ONNX Runtime's static int8 ("
            f"{scheme['format']}) will round it: weights {scheme['weights']}, activations {scheme['activations']}; "
            "the weights saved here are float, for kdcache export to quantize |"
        )
    if accuracy is not None:
        saved = "best" if summary.get("saved_epoch", summary["best_epoch"]) == summary["best_epoch"] else "last"
        lines.append(
            f"| {summary['eval_split']} accuracy | best {accuracy:.4f} (epoch {summary['best_epoch']:g}), last "
            f"{summary['last_eval_accuracy']:.4f} (epoch {summary['last_epoch']:g}); the {saved} epoch's weights are saved |"
        )
    return lines


def _schedule_text(schedule) -> str:
    """'; trained at 128 px for the first 70% of the epochs, then 224 px' (a --student-size schedule)."""
    earlier = ", ".join(
        f"{size} px {'for the first' if position == 0 else 'until'} {until:.0%} of the epochs"
        for position, (size, until) in enumerate(schedule[:-1])
    )
    return f"; trained at {earlier}, then {schedule[-1][0]} px"
