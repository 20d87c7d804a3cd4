"""Each stage's options, declared once: a dataclass per command whose fields carry their default, their help and
their command-line flags (kdcache.options.fields: `option`), with their checks before any work, and (stage two) the
record that lets --resume refuse a changed command. kdcache.cli generates the commands' options from these fields.
Kept free of heavy imports so that `kdcache --help` stays instant."""

from kdcache.options.evaluation import EvaluationOptions
from kdcache.options.export import INT8_MODES, ExportOptions
from kdcache.options.fields import (
    CACHE_PRECISIONS,
    DEFAULT_DATASET,
    DEFAULT_STUDY,
    DEFAULT_TEACHER,
    LOGITS_DTYPES,
    PRECISIONS,
    SCHEDULERS,
    check_teacher_weights,
    option,
)
from kdcache.options.remote import PushOptions, RemoteOptions
from kdcache.options.sweep import SweepOptions
from kdcache.options.teacher import CacheOptions, VerifyOptions
from kdcache.options.training import (
    OPTIONS_FILE,
    TrainingOptions,
    check_ensemble_options,
    check_loss_for_cache,
    check_resumable,
    record_options,
    run_options,
)

__all__ = [
    "CACHE_PRECISIONS",
    "DEFAULT_DATASET",
    "DEFAULT_STUDY",
    "DEFAULT_TEACHER",
    "INT8_MODES",
    "LOGITS_DTYPES",
    "OPTIONS_FILE",
    "PRECISIONS",
    "SCHEDULERS",
    "CacheOptions",
    "EvaluationOptions",
    "ExportOptions",
    "PushOptions",
    "RemoteOptions",
    "SweepOptions",
    "TrainingOptions",
    "VerifyOptions",
    "check_ensemble_options",
    "check_loss_for_cache",
    "check_resumable",
    "check_teacher_weights",
    "option",
    "record_options",
    "run_options",
]
