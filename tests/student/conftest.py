"""Stage two's own view caches, shared by its test files: four views of each training image (the whole tiny cache's
view_cache has three), and two mixed views."""

import pytest


@pytest.fixture(scope="session")
def view_cache(make_cache):
    return make_cache(views=4)


@pytest.fixture(scope="session")
def mixed_train_cache(make_cache):
    return make_cache(views=2, mix_alpha=1.0)
