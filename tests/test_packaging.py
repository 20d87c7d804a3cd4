"""The built package holds every subpackage: pyproject.toml's package list is found, not written by hand (a list
of "kdcache" alone left kdcache.format, the options and every stage out of a wheel)."""

import tomllib
from pathlib import Path

from setuptools import find_packages

REPO = Path(__file__).resolve().parents[1]


def test_every_subpackage_goes_into_the_wheel():
    settings = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert "packages" not in settings or isinstance(settings["packages"], dict)
    found = set(find_packages(str(REPO), **settings["packages"]["find"]))
    on_disk = {".".join(path.parent.relative_to(REPO).parts) for path in (REPO / "kdcache").rglob("__init__.py")}
    assert on_disk and found == on_disk
