"""What README.md, BENCHMARKS.md and docs/ state, held to the code and to the files behind it: the Python version,
the figures quoted from benchmarks/results/, and the kdcache command lines (each must parse as written)."""

import tomllib
from importlib.metadata import metadata
from pathlib import Path

from packaging.specifiers import SpecifierSet

REPO = Path(__file__).resolve().parents[1]
DOCUMENTS = [REPO / "README.md", REPO / "BENCHMARKS.md", *sorted((REPO / "docs").glob("*.md"))]


def oldest_python(requires_python: str) -> tuple[int, int]:
    """The oldest 3.x release that a Requires-Python specifier accepts."""
    specifier = SpecifierSet(requires_python)
    return next((3, minor) for minor in range(6, 30) if f"3.{minor}" in specifier)


def test_the_python_version_agrees_in_pyproject_ruff_makefile_and_readme_and_is_what_transformers_needs():
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    major, minor = oldest_python(pyproject["project"]["requires-python"])
    assert pyproject["tool"]["ruff"]["target-version"] == f"py{major}{minor}"
    assert f"sys.version_info >= ({major}, {minor})" in (REPO / "Makefile").read_text()
    assert f"Python {major}.{minor}+" in (REPO / "README.md").read_text()
    # kdcache supports what its two central dependencies support: the newest of their own minimums, no older
    # (a user could not install the transformers kdcache is tested with) and no newer (it would shut users out)
    needed = max(oldest_python(metadata(package)["Requires-Python"]) for package in ("transformers", "datasets"))
    assert (major, minor) == needed
    # a dependency that only applies to older Pythons would be dead weight
    assert not [line for line in pyproject["project"]["dependencies"] if "python_version" in line]
