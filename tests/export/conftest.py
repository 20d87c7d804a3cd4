"""The export stage's fixtures: a tiny named student (MobileNetV2, the tiny teacher's labels and image processor), one
with a training record, and its fp32 export, made once per session and shared (read-only)."""

import json

import pytest
from helpers import save_student

from kdcache.format.manifest import Manifest
from kdcache.outputs import TRAINING_RECORD


@pytest.fixture(scope="session")
def student(tmp_path_factory, tiny_teacher):
    """A student folder without a training record (as a hub model would be)."""
    return save_student(tmp_path_factory.mktemp("students") / "student", tiny_teacher)


@pytest.fixture
def recorded_student(tmp_path, tiny_teacher, tiny_cache):
    """`recorded_student(name, **entries)`: a student folder whose kdcache_training.json names the tiny cache as the
    one it was trained from (as train-student records it), plus `entries` (a quantization-aware student's)."""

    def make(name, **entries):
        path = save_student(tmp_path / name, tiny_teacher)
        recipe = {"cache": str(tiny_cache), "cache_fingerprint": Manifest.read(tiny_cache).fingerprint}
        (path / TRAINING_RECORD).write_text(json.dumps({"recipe": recipe, **entries}))
        return path

    return make


@pytest.fixture(scope="session")
def exported(tmp_path_factory, student, tiny_cache):
    """The student exported fp32, checked on the tiny cache's validation split."""
    from kdcache.export.run import export

    output = tmp_path_factory.mktemp("exports") / "fp32"
    export(student, output, check_cache=tiny_cache, progress=False)
    return output
