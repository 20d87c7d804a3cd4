"""kdcache: knowledge distillation for image classifiers, with the teacher run once.

Stage one (`teacher_logits`) runs the teacher over a dataset and stores its logits as an Arrow column;
stage two (`train_student`) trains a student from those cached soft targets; `evaluate` measures models.
"""

import logging
import sys

__version__ = "0.1.0"

from kdcache.errors import KdcacheError  # noqa: F401 (public: `from kdcache import KdcacheError`)


class _Stdout(logging.StreamHandler):
    """A handler that writes to whatever sys.stdout is when a line is logged (a redirect, a test's capture)."""

    def __init__(self):
        super().__init__(sys.stdout)

    @property
    def stream(self):
        return sys.stdout

    @stream.setter
    def stream(self, value):
        pass


# What the stages have to say (a cache up to date, the batch a run trains with, its result) goes through the
# 'kdcache' logger, to stdout as plain lines by default, as print did; silence or redirect it with the logging module
# (logging.getLogger("kdcache").setLevel(logging.WARNING)).
log = logging.getLogger("kdcache")
if not log.handlers:
    log.addHandler(_Stdout())
    log.setLevel(logging.INFO)
    log.propagate = False


def __getattr__(name):
    # Lazy: importing transformers costs seconds, and `kdcache --help` should not pay it.
    if name in ("teacher_logits", "load_cache", "verify_cache"):
        from kdcache import cache

        return getattr(cache, name)
    if name == "train_student":
        from kdcache.train import train_student

        return train_student
    if name == "sweep":  # the module, callable as the function (kdcache.sweep._CallableModule)
        import importlib

        return importlib.import_module("kdcache.sweep")
    if name == "evaluate_models":
        from kdcache.evaluation import evaluate_models

        return evaluate_models
    if name == "distillation_loss":
        from kdcache.loss import distillation_loss

        return distillation_loss
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
