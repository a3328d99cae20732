"""Round 30 review of the build files as a fresh clone meets them: pyproject's package data, `make help`, and the
dvc.yaml checks tests/unit/test_dvc_deps.py does not make (imports by name, top-level metrics and plots)."""

from __future__ import annotations

import ast
import os
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.unit.test_dvc_deps import import_closure, python_stages

DVC = yaml.safe_load((REPO / "dvc.yaml").read_text())


def tracked(folder: str) -> list[str]:
    """The files git tracks under ``folder`` (repo-relative, POSIX)."""
    if shutil.which("git") is None or not (REPO / ".git").exists():
        pytest.skip("needs the git checkout")
    done = subprocess.run(["git", "ls-files", "-z", folder], cwd=REPO, capture_output=True, text=True, check=True)
    return [p for p in done.stdout.split("\0") if p]


def test_the_wheel_holds_the_packages_data_files(tmp_path):
    """faceage/ui.py serves the photos in faceage/examples/ (Path(__file__).parent / "examples"): a wheel
    (`pip install .`, `pip install git+...`) held only the .py files, so its UI had no examples. Only the
    editable install of `make setup` and the bento (bentofile's include) had them."""
    data = sorted(p for p in tracked("faceage") if not p.endswith(".py"))
    assert data, "faceage/ has no data files any more: drop this test"
    src = tmp_path / "src"
    shutil.copytree(REPO / "faceage", src / "faceage", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    env = {**os.environ, "PIP_NO_INDEX": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
                           str(src), "-w", str(tmp_path / "dist")], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = (tmp_path / "dist").glob("faceage-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    missing = [p for p in data if p not in names]
    assert not missing, (f"the wheel lacks {missing}: list them under [tool.setuptools.package-data] in "
                         "pyproject.toml")


def makefile_phony_targets() -> list[str]:
    text = (REPO / "Makefile").read_text()
    (line,) = re.findall(r"^\.PHONY:(.*)$", text, flags=re.M)
    return line.split()


@pytest.mark.skipif(shutil.which("make") is None, reason="needs make")
def test_make_help_names_every_target():
    """`make help` on a fresh clone: "No rule to make target 'help'", with 17 targets to find in the Makefile."""
    done = subprocess.run(["make", "-s", "-C", str(REPO), "help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    listed = {line.split()[0] for line in done.stdout.splitlines() if line.strip() and not line.startswith(" ")}
    missing = [t for t in makefile_phony_targets() if t not in listed]
    assert not missing, f"`make help` does not list {missing}:\n{done.stdout}"
    unknown = sorted(listed - set(makefile_phony_targets()) - {"Targets", "Usage:"})
    assert not unknown, f"`make help` lists {unknown}, which the Makefile's .PHONY line does not name"


def test_make_help_runs_nothing_else():
    """`help` has no prerequisite: it must not start `make setup` (minutes of pip) on a fresh clone."""
    text = (REPO / "Makefile").read_text()
    (rule,) = re.findall(r"^help:(.*)$", text, flags=re.M)
    assert rule.strip() == ""


# Modules a stage imports by name (importlib.import_module("faceage.x")), which test_dvc_deps's walk of import
# statements cannot see, and that its deps leave out on purpose, each with why the stage's outputs cannot
# depend on the module's code.
NAMED_IMPORTS_NOT_DEPS = {
    ("faceage/config.py", "faceage/model.py"):
        "check_train_backbone: load_params checks train.backbone against torchvision's models in every stage; "
        "the check decides whether a stage starts, never what it writes (listing model.py would rerun "
        "fetch_data, preprocess and embed on every model edit)",
}


def named_imports(path: Path) -> set[str]:
    """``faceage/x.py`` paths named by ``importlib.import_module("faceage.x")`` or a ``"faceage.x"`` string
    constant (a table of modules to import, as faceage.predict.RUNTIMES) in ``path``."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and re.fullmatch(r"faceage(\.\w+)+",
                                                                                          node.value):
            file = Path(*node.value.split(".")).with_suffix(".py")
            if (REPO / file).is_file():
                found.add(file.as_posix())
    return found


@pytest.mark.parametrize("stage", sorted(python_stages()))
def test_modules_a_stage_imports_by_name_are_deps_or_known_to_change_no_output(stage):
    script, spec = python_stages()[stage]
    deps = set(spec.get("deps", []))
    unlisted = sorted((module, named) for module in [script, *import_closure(script)]
                      for named in named_imports(REPO / module)
                      if named not in deps and (module, named) not in NAMED_IMPORTS_NOT_DEPS)
    assert not unlisted, (f"dvc.yaml: stage {stage!r} imports by name {unlisted} (module, imported) but its deps "
                          "do not list them: add them (and their import closure), or to NAMED_IMPORTS_NOT_DEPS "
                          "with why no output depends on them")


def test_the_named_import_exemptions_are_still_there():
    """A stale exemption would let the same import back in silently under a new reason."""
    for module, named in NAMED_IMPORTS_NOT_DEPS:
        assert named in named_imports(REPO / module), (module, named)


def stage_outs() -> set[str]:
    # Stage-level metrics and plots are outputs too (the metrics files are, so that DVC's run cache saves the stage)
    return {next(iter(o)) if isinstance(o, dict) else o for s in DVC["stages"].values()
            for key in ("outs", "metrics", "plots") for o in s.get(key, [])}


def test_top_level_metrics_and_plots_are_stage_outputs():
    """`dvc metrics show` / `dvc plots show` read files a stage writes: a renamed output left a declared path no
    run writes (an empty table, no error)."""
    files = list(DVC.get("metrics", []))
    for plot in DVC.get("plots", []):
        if isinstance(plot, str):
            files.append(plot)
        else:
            (spec,) = plot.values()
            files.extend(spec["y"] if isinstance(spec["y"], dict) else [])
    assert files
    outs = stage_outs()
    assert not [f for f in files if f not in outs], sorted(set(files) - outs)


def test_every_faceage_data_file_is_in_the_bento():
    """The bento carries faceage/ by bentofile include globs: a data file the code reads beside its module must
    match one (faceage/examples/*.jpg for the UI)."""
    import fnmatch

    include = yaml.safe_load((REPO / "bentofile.yaml").read_text())["include"]
    data = [p for p in tracked("faceage") if not p.endswith(".py")]
    missing = [p for p in data if not any(fnmatch.fnmatch(p, g.lstrip("/")) for g in include)]
    assert not missing, f"bentofile.yaml's include misses {missing}"
