"""The package's plan, checked from the code's own imports: shared infrastructure at the bottom, the cache format
over it, the three stages over the format (never over each other), and the front (cli, demo, sweep, the package's
__init__) over everything. Nothing imports upward, so a stage can be read, tested and replaced alone."""

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"
STAGES = ("teacher", "student", "evaluation")
FRONT = ("kdcache", "kdcache.__main__", "kdcache.cli", "kdcache.demo", "kdcache.sweep")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def layer(module: str) -> tuple[int, str]:
    """(height, group): the front 3, a stage 2, the format 1, shared infrastructure 0."""
    if module in FRONT or module.startswith("kdcache.sweep."):
        return 3, "front"
    group = module.split(".")[1] if module.count(".") >= 1 else ""
    if group in STAGES:
        return 2, group
    if group == "format":
        return 1, "format"
    return 0, "shared"


def imported_modules(path: Path) -> list[tuple[int, str]]:
    """Every kdcache module a file imports (at the top or inside a function), with its line."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names if alias.name.split(".")[0] == "kdcache"]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module.split(".")[0] != "kdcache":
                continue
            for alias in node.names:  # `from kdcache import outputs` imports the module kdcache.outputs
                submodule = f"{node.module}.{alias.name}"
                is_module = (PACKAGE.parent / submodule.replace(".", "/")).with_suffix(".py").exists() or (
                    PACKAGE.parent / submodule.replace(".", "/") / "__init__.py"
                ).exists()
                found.append((node.lineno, submodule if is_module else node.module))
    return found


MODULES = sorted(PACKAGE.rglob("*.py"))


def test_every_module_has_a_layer():
    assert {layer(module_name(path))[1] for path in MODULES} == {"front", "format", "shared", *STAGES}


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_no_module_imports_upward_or_across_stages(path):
    importer = module_name(path)
    height, group = layer(importer)
    wrong = []
    for line, imported in imported_modules(path):
        their_height, their_group = layer(imported)
        if their_height > height or (their_height == height == 2 and their_group != group):
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} ({their_group})")
    assert not wrong, f"{importer} ({group}) imports upward or across stages:\n" + "\n".join(sorted(set(wrong)))


def test_the_checker_sees_an_upward_import(tmp_path):
    # the rule itself: a format module importing a stage, and a stage importing another, are both refused
    assert layer("kdcache.format.reader") < layer("kdcache.teacher.run")
    assert layer("kdcache.student.rows")[1] != layer("kdcache.teacher.run")[1]
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from kdcache.student.loss import LOSSES\nimport kdcache.teacher.run\n")
    assert sorted(module for _, module in imported_modules(source)) == ["kdcache.student.loss", "kdcache.teacher.run"]
