"""The suite's shared fixtures (a tiny dataset and teacher, `make_cache` and the caches it builds once per session)
and its offline settings; the helpers that build them are in helpers.py. The test folders mirror the package's
(format/, teacher/, student/, evaluation/, sweep/; the shared modules' tests are here at the top); each folder has an
__init__.py so that test files of the same name in two folders are both collected."""

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
def make_cache(tmp_path_factory, tiny_dataset, tiny_teacher):
    """`make_cache(output=None, dataset=..., teacher=..., **options)`: a cache made by `teacher_logits`, of the tiny
    dataset by the tiny teacher unless `dataset` or `teacher` name others, in batches of 8 without a progress bar
    unless the options say otherwise. Without an output, the cache of those inputs and options is made once per
    session and shared by every test that asks for it, so it is read-only; with one, a new cache is made there."""
    from kdcache.teacher.run import teacher_logits

    shared = {}

    def make(output=None, dataset=tiny_dataset, teacher=tiny_teacher, **options):
        options = {"batch_size": 8, "progress": False, **options}
        if output is not None:
            return teacher_logits(str(dataset), str(teacher), output=output, **options)
        key = (str(dataset), str(teacher), repr(sorted(options.items())))
        if key not in shared:
            shared[key] = make(tmp_path_factory.mktemp("caches") / "cache", dataset, teacher, **options)
        return shared[key]

    return make


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory, make_cache):
    """A complete cache of the tiny dataset by the tiny teacher (read-only for the tests that share it)."""
    return make_cache(tmp_path_factory.mktemp("caches") / "tiny-cache")


@pytest.fixture(scope="session")
def row_cache(tmp_path_factory, make_cache):
    """The tiny cache computed one row at a time, for the tests that compare training from it with the teacher run
    online one row at a time (helpers.teacher_one_row_at_a_time says why)."""
    return make_cache(tmp_path_factory.mktemp("caches") / "row-cache", batch_size=1)


@pytest.fixture
def teacher_row_by_row(monkeypatch):
    from helpers import teacher_one_row_at_a_time

    teacher_one_row_at_a_time(monkeypatch)


@pytest.fixture(scope="session")
def compact_cache(tmp_path_factory, make_cache):
    """The tiny cache's inputs stored compact: float16, the top logit of 3 and the tail's (read-only)."""
    return make_cache(tmp_path_factory.mktemp("caches") / "compact-cache", top_k=1, logits_dtype="fp16")


@pytest.fixture(scope="session")
def view_cache(make_cache):
    """The tiny cache with 3 views of each training image, in chunks of 8 rows (read-only; stage two's tests have
    four_view_cache, in tests/student/conftest.py)."""
    return make_cache(views=3, chunk_size=8)
