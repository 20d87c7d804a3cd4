"""The suite's shared fixtures (a tiny dataset, teacher and cache, built once per session) and its offline settings;
the helpers that build them are in helpers.py."""

import os

# Tests never reach the hub: a failed lookup must be immediate, not 30 s of retries.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import pytest
from helpers import make_dataset_dict, save_vit_teacher


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A DatasetDict saved with save_to_disk: train 24, validation 12, test 12 rows."""
    path = tmp_path_factory.mktemp("data") / "tiny"
    make_dataset_dict().save_to_disk(str(path))
    return path


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    return save_vit_teacher(tmp_path_factory.mktemp("models") / "teacher")


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    """A complete cache of the tiny dataset by the tiny teacher (read-only for the tests that share it)."""
    from kdcache.teacher.run import teacher_logits

    output = tmp_path_factory.mktemp("caches") / "tiny-cache"
    return teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, batch_size=8, progress=False)


@pytest.fixture(scope="session")
def row_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    """The tiny cache computed one row at a time, for the tests that compare training from it with the teacher run
    online one row at a time (helpers.teacher_one_row_at_a_time says why)."""
    from kdcache.teacher.run import teacher_logits

    output = tmp_path_factory.mktemp("caches") / "row-cache"
    return teacher_logits(str(tiny_dataset), str(tiny_teacher), output=output, batch_size=1, progress=False)


@pytest.fixture
def teacher_row_by_row(monkeypatch):
    from helpers import teacher_one_row_at_a_time

    teacher_one_row_at_a_time(monkeypatch)


@pytest.fixture(scope="session")
def compact_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    """The tiny cache's inputs stored compact: float16, the top logit of 3 and the tail's (read-only)."""
    from kdcache.teacher.run import teacher_logits

    output = tmp_path_factory.mktemp("caches") / "compact-cache"
    return teacher_logits(
        str(tiny_dataset), str(tiny_teacher), output=output, batch_size=8, top_k=1, logits_dtype="fp16", progress=False
    )
