"""Stage two's own view caches, shared by its test files: four views of each training image (tests/conftest.py's
view_cache has three; another name, so that no lookup by name can take one for the other), and two mixed views."""

import pytest


@pytest.fixture(scope="session")
def four_view_cache(make_cache):
    return make_cache(views=4)


@pytest.fixture(scope="session")
def mixed_train_cache(make_cache):
    return make_cache(views=2, mix_alpha=1.0)


@pytest.fixture
def add_loss(monkeypatch, request):
    """Adds a throwaway loss the way kdcache's own are added (docs/recipes.md, "Adding a loss"): its declaration to
    kdcache.losses, its function registered by @implements; both taken back after the test."""
    from kdcache.losses import LOSS_SPECS
    from kdcache.student.loss import LOSSES, implements

    def add(declaration, function):
        monkeypatch.setitem(LOSS_SPECS, declaration.name, declaration)
        request.addfinalizer(lambda: LOSSES.pop(declaration.name, None))
        return implements(declaration.name)(function)

    return add
