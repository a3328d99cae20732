"""dvc.yaml: every stage depends on its script and the whole ``faceage/`` import closure of it.

A stage that imports ``faceage.evaluation``, which imports ``faceage.training``, reads code in
``training.py``: if that file is not in the stage's ``deps``, editing it leaves ``dvc status``
silent and the outputs stale. The closure follows every import in the source (also imports
inside functions, whether or not a given run reaches them), so it errs on the side of rerunning.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
PACKAGE = "faceage"
# faceage/__init__.py holds only the package docstring: it cannot change a stage's outputs.
NOT_A_DEPENDENCY = {f"{PACKAGE}/__init__.py"}


def imported_modules(path: Path) -> set[str]:
    """``faceage/x.py`` paths imported anywhere in ``path`` (``import faceage.x``, ``from faceage.x import y``,
    ``from faceage import x``)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        for name in names:
            file = Path(*name.split(".")).with_suffix(".py")
            if name.split(".")[0] == PACKAGE and (REPO / file).is_file():
                found.add(file.as_posix())
    return found


def import_closure(script: str) -> dict[str, list[str]]:
    """Every ``faceage/`` module ``script`` reaches, each with one import chain that reaches it."""
    chains: dict[str, list[str]] = {}
    todo = [(script, [script])]
    while todo:
        path, chain = todo.pop()
        for module in sorted(imported_modules(REPO / path)):
            if module not in chains:
                chains[module] = chain + [module]
                todo.append((module, chains[module]))
    return {m: c for m, c in chains.items() if m not in NOT_A_DEPENDENCY}


def python_stages() -> dict[str, tuple[str, dict]]:
    """``{stage: (script, stage dict)}`` for the dvc.yaml stages that run ``python stages/<x>.py``."""
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    found = {}
    for name, stage in stages.items():
        match = re.search(r"python\s+(stages/\w+\.py)", stage["cmd"])
        if match:
            found[name] = (match.group(1), stage)
    return found


def test_every_pipeline_stage_runs_a_script():
    assert set(python_stages()) >= {"fetch_data", "fetch_detector", "preprocess", "train", "evaluate"}


def test_closure_follows_imports_of_imports():
    closure = import_closure("stages/evaluate.py")
    assert closure["faceage/training.py"][:2] == ["stages/evaluate.py", "faceage/evaluation.py"]
    assert "faceage/detector.py" in import_closure("stages/preprocess.py")


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_stage_deps_cover_the_import_closure_of_its_script(stage):
    script, spec = python_stages()[stage]
    deps = spec.get("deps", [])
    assert script in deps, f"dvc.yaml: stage {stage!r} runs {script} but does not list it: add `- {script}` to its deps"
    missing = {m: c for m, c in import_closure(script).items() if m not in deps}
    assert not missing, (
        f"dvc.yaml: stage {stage!r} imports {len(missing)} faceage module(s) missing from its deps; add to "
        f"stages.{stage}.deps:\n" + "\n".join(f"      - {m}    # via {' -> '.join(c)}" for m, c in sorted(missing.items())))


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_stage_lists_no_faceage_module_it_does_not_import(stage):
    script, spec = python_stages()[stage]
    closure = import_closure(script)
    extra = [d for d in spec.get("deps", []) if d.startswith(f"{PACKAGE}/") and d.endswith(".py") and d not in closure]
    assert not extra, (f"dvc.yaml: stage {stage!r} lists {extra} but {script} does not import them (directly or "
                       f"indirectly): remove them from stages.{stage}.deps (they rerun the stage for nothing)")
