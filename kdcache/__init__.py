"""kdcache: knowledge distillation for image classifiers, with the teacher run once.

Stage one (`teacher_logits`) runs the teacher over a dataset and stores its logits as an Arrow column;
stage two (`train_student`) trains a student from those cached soft targets; `evaluate` measures models.
"""

import logging
import sys

from kdcache.errors import KdcacheError  # noqa: F401 (public: `from kdcache import KdcacheError`)
from kdcache.version import __version__  # noqa: F401 (public: kdcache.__version__)


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


# Where each public name lives; imported on first use, since importing transformers costs seconds and
# `kdcache --help` should not pay it.
_PUBLIC = {
    "teacher_logits": "kdcache.teacher.run",
    "load_cache": "kdcache.format.reader",
    "verify_cache": "kdcache.format.reader",
    "train_student": "kdcache.student.train",
    "evaluate_models": "kdcache.evaluation.evaluate",
    "distillation_loss": "kdcache.student.loss",
    "sweep": "kdcache.sweeps.run",
}


def __getattr__(name):
    import importlib

    if name in _PUBLIC:
        return getattr(importlib.import_module(_PUBLIC[name]), name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
