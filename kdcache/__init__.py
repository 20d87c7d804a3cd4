"""kdcache: knowledge distillation for image classifiers, with the teacher run once.

Stage one (`teacher_logits`) runs the teacher over a dataset and stores its logits as an Arrow column;
stage two (`train_student`) trains a student from those cached soft targets; `evaluate` measures models.
"""

__version__ = "0.1.0"

from kdcache.errors import KdcacheError  # noqa: F401 (public: `from kdcache import KdcacheError`)


def __getattr__(name):
    # Lazy: importing transformers costs seconds, and `kdcache --help` should not pay it.
    if name in ("teacher_logits", "load_cache", "verify_cache"):
        from kdcache import cache

        return getattr(cache, name)
    if name == "train_student":
        from kdcache.train import train_student

        return train_student
    if name == "evaluate_models":
        from kdcache.evaluation import evaluate_models

        return evaluate_models
    if name == "distillation_loss":
        from kdcache.loss import distillation_loss

        return distillation_loss
    raise AttributeError(f"module 'kdcache' has no attribute {name!r}")
