"""How an option is declared, once: a dataclass field whose metadata carries its command-line help, flags and
parsing (kdcache.cli builds the commands from them, in the spirit of transformers' HfArgumentParser), and what the
stages' options share. Free of heavy imports, as all of kdcache.options: `kdcache --help` stays instant."""

import math
from dataclasses import field

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
BAD_IMAGES = ("fail", "skip")  # stage one's choices for an unreadable image (--bad-images)

# What the commands and the library take when no dataset, teacher or study is named.
DEFAULT_DATASET = "beans"
DEFAULT_TEACHER = "merve/beans-vit-224"
DEFAULT_STUDY = "kdcache-sweep"

DEVICE_HELP = "auto (cuda, then mps, then cpu), cpu, cuda, cuda:1, mps."
TEACHER_WEIGHTS_HELP = (
    "With several caches: the weight of each cache's teacher in the ensemble, comma-separated in the caches' order "
    "(e.g. 0.7,0.3); normalised to sum 1."
)


def option(default, help=None, **metadata):
    """A field written once, in the spirit of transformers' HfArgumentParser: its default, and in `metadata` its
    command-line help and how kdcache.cli makes it an option. Keys: `flags` (names besides --field-name, e.g.
    ("--temperature", "-T")), `show_default` (text shown for a default of None), `metavar`, `type` and `parse` (the
    type the command line reads, and the function making it the field's value, e.g. a comma-separated list),
    `cli_default` (the field's default as the command line takes it), `sweep` (present: an option of `kdcache sweep`
    too, with these keys overridden), `how_it_runs` (it says how fast, how loud or where a run goes, not what it
    trains: --resume may change it and the run's recipe leaves it out), `in_recipe` (False: the recipe gives it
    resolved), `in_config` (False: kdcache_config.yaml leaves it out, as what to do with an earlier output or
    whether to publish, not what the run makes). A field declared without `help` is no command-line option."""
    return field(default=default, metadata={"help": help, **metadata})


def either(names) -> str:
    """'a, b or c', as a help text lists the choices."""
    return f"{', '.join(names[:-1])} or {names[-1]}"


def split_list(value: str | None) -> list[str] | None:
    """'train, validation' -> ['train', 'validation']; nothing given -> None."""
    return [part.strip() for part in value.split(",") if part.strip()] if value else None


def none_or_split_list(value: str | None) -> list[str] | None:
    """As split_list, with 'none' for an empty list (--unlabeled-splits none)."""
    return [] if (value or "").lower() == "none" else split_list(value)


def none_or_name(value: str) -> str | None:
    """'none' for None (--eval-split none)."""
    return None if value.lower() == "none" else value


def parse_teacher_weights(value: str | None) -> list[float] | None:
    """--teacher-weights 0.5,0.5: one number per cache (checked by check_teacher_weights)."""
    if value is None:
        return None
    try:
        return [float(part) for part in split_list(value) or [""]]
    except ValueError:
        raise KdcacheError(
            f"--teacher-weights '{value}' is not a comma-separated list of numbers, one per cache (e.g. 0.5,0.5)"
        ) from None


def finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def check_teacher_weights(weights, caches: int) -> None:
    """--teacher-weights: one finite weight > 0 per cache of an ensemble (train-student and evaluate)."""
    if weights is None:
        return
    given = ",".join(f"{weight:g}" if finite(weight) else str(weight) for weight in weights)
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
    if not all(finite(weight) and weight > 0 for weight in weights):
        raise KdcacheError(
            f"--teacher-weights {given}: every weight must be a number > 0 (they are normalised to sum 1); "
            "leave a teacher out by leaving out its cache"
        )
