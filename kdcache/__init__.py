"""kdcache: knowledge distillation for image classifiers, with the teacher run once.

Stage one (`teacher_logits`) runs the teacher over a dataset and stores its logits as an Arrow column;
stage two (`train_student`) trains a student from those cached soft targets; `export` ships it as an ONNX folder
(int8 when asked); `evaluate` measures models.
"""

from kdcache.errors import KdcacheError  # noqa: F401 (public: `from kdcache import KdcacheError`)
from kdcache.runtime import log_to_stdout
from kdcache.version import __version__  # noqa: F401 (public: kdcache.__version__)

log_to_stdout()


# Where each public name lives; imported on first use, since importing transformers costs seconds and
# `kdcache --help` should not pay it.
_PUBLIC = {
    "teacher_logits": "kdcache.teacher.run",
    "load_cache": "kdcache.format.reader",
    "push_cache": "kdcache.format.remote",
    "pull_cache": "kdcache.format.remote",
    "train_student": "kdcache.student.train",
    "evaluate_models": "kdcache.evaluation.evaluate",
    "distillation_loss": "kdcache.student.loss",
    "sweep": "kdcache.sweeps.run",
    "export": "kdcache.export",  # the stage's package, callable (kdcache/export/__init__.py says why)
}


def __getattr__(name):
    import importlib

    if name in _PUBLIC:
        module = importlib.import_module(_PUBLIC[name])
        return module if module.__name__ == f"kdcache.{name}" else getattr(module, name)
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
