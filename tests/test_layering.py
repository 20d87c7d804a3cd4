"""The package's plan, checked from the code's own imports: shared infrastructure at the bottom, the cache format
over it, the stages over the format (never over each other), and the front over everything. Nothing imports upward,
so a stage can be read, tested and replaced alone.

The plan is declared here, once, by the name under kdcache/ of each module or package: STAGES and FRONT below, the
format, and everything else shared. A new stage (as the export stage was) is one more name in STAGES; a module that
drives several stages (the sweep trains students; the demo runs them all) is front."""

import ast
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "kdcache"
STAGES = ("teacher", "student", "evaluation", "export")
FRONT = ("__init__", "__main__", "cli", "demo", "sweeps")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def name_under_package(module: str) -> str:
    """'kdcache.student.train' -> 'student'; the package itself, 'kdcache' -> '__init__'."""
    return module.split(".")[1] if "." in module else "__init__"


def layer(module: str) -> tuple[int, str]:
    """(height, group): the front 3, a stage 2, the format 1, shared infrastructure 0."""
    group = name_under_package(module)
    if group in FRONT:
        return 3, "front"
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


def test_every_module_has_a_layer_and_every_declared_name_a_module():
    assert {layer(module_name(path))[1] for path in MODULES} == {"front", "format", "shared", *STAGES}
    names = {name_under_package(module_name(path)) for path in MODULES}
    assert set(FRONT) <= names, f"FRONT names what kdcache/ does not hold: {sorted(set(FRONT) - names)}"


@pytest.mark.parametrize("path", MODULES, ids=lambda path: module_name(path))
def test_no_module_imports_upward_or_across_stages(path):
    importer = module_name(path)
    height, group = layer(importer)
    wrong = []
    for line, imported in imported_modules(path):
        their_height, their_group = layer(imported)
        if their_height > height or (their_height == height == 2 and their_group != group):
            wrong.append(f"{path.relative_to(PACKAGE.parent)}:{line} imports {imported} ({their_group})")
    assert not wrong, (
        f"{importer} ({group}) imports upward or across stages (a new stage or front module: declare it in "
        "tests/test_layering.py):\n" + "\n".join(sorted(set(wrong)))
    )


def test_the_checker_sees_an_upward_import(tmp_path):
    # the rule itself: a format module importing a stage, and a stage importing another, are both refused
    assert layer("kdcache.format.reader") < layer("kdcache.teacher.run")
    assert layer("kdcache.student.rows")[1] != layer("kdcache.teacher.run")[1]
    source = tmp_path / "probe.py"
    source.write_text("def f():\n    from kdcache.student.loss import LOSSES\nimport kdcache.teacher.run\n")
    assert sorted(module for _, module in imported_modules(source)) == ["kdcache.student.loss", "kdcache.teacher.run"]


def test_a_new_stage_is_one_more_name(monkeypatch):
    # kdcache/serve.py (or kdcache/serve/) undeclared is shared, and importing a stage would fail it; declared, it
    # is a stage of its own, which may import the format but no other stage
    assert layer("kdcache.serve") == (0, "shared")
    monkeypatch.setattr(sys.modules[__name__], "STAGES", (*STAGES, "serve"))
    assert layer("kdcache.serve") == layer("kdcache.serve.http") == (2, "serve")
    assert layer("kdcache.format.reader") < layer("kdcache.serve") < layer("kdcache.cli")
    assert layer("kdcache.student.train")[1] != layer("kdcache.serve")[1] != layer("kdcache.export.run")[1]
