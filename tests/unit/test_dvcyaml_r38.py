"""Round 38: what DVC itself makes of dvc.yaml's params lists, for the ``dvc exp run -S`` forms a user types.

``tests/unit/test_dvc_deps_r34.py`` checks the lists against the code that reads the keys; here real ``dvc status``
runs on this checkout's dvc.yaml and params.yaml (copied into a scratch DVC project, every output a placeholder
recorded by ``dvc commit``, so no stage runs), after each override is applied as ``dvc exp run -S`` applies it
(DVC's own ``apply_overrides``). The stages it reports changed, and those downstream of them, are the stages that
override reruns: exactly the expected ones, none for a key that only says how many processes do the work.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytest.importorskip("dvc")

DVC = str(Path(sys.executable).with_name("dvc"))
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
ALWAYS = "check_sources"  # always_changed: runs on every repro, reruns nothing when its records stay the same


def _paths(entries) -> list[str]:
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def _outputs(stage: dict) -> list[str]:
    """What a stage writes: its ``outs`` and its stage-level ``metrics`` and ``plots``."""
    return [*_paths(stage.get("outs")), *_paths(stage.get("metrics")), *_paths(stage.get("plots"))]


def _dvc(root: Path, *args: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1"}
    proc = subprocess.run([DVC, *args], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"dvc {' '.join(args)}:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}"
    return proc.stdout


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A DVC project (no git) holding this checkout's pipeline, every output a placeholder, all recorded in
    dvc.lock: ``dvc status`` reports nothing but check_sources."""
    if not Path(DVC).is_file():
        pytest.skip(f"no dvc executable beside {sys.executable}")
    root = tmp_path_factory.mktemp("dvcyaml")
    for item in ("faceage", "stages"):
        shutil.copytree(REPO / item, root / item, ignore=shutil.ignore_patterns("__pycache__"))
    for item in ("dvc.yaml", "params.yaml"):
        shutil.copyfile(REPO / item, root / item)
    for stage in STAGES.values():
        for out in _outputs(stage):
            path = root / out
            if path.suffix:  # a file output
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text("{}\n")
            else:  # a folder output (data/faces, models/detector, data/raw/appa-real)
                path.mkdir(parents=True, exist_ok=True)
                (path / "placeholder").write_text("x\n")
    _dvc(root, "init", "--no-scm", "-q")
    _dvc(root, "commit", "-f", "-q")
    shutil.copyfile(root / "params.yaml", root / "params.committed.yaml")
    return root


def _downstream(stages: set[str]) -> set[str]:
    """``stages`` and every stage that depends, directly or not, on an output of one of them."""
    made = {out: name for name, stage in STAGES.items() for out in _outputs(stage)}
    found = set(stages)
    while True:
        more = {name for name, stage in STAGES.items() if name not in found
                and any(made.get(dep) in found for dep in _paths(stage.get("deps")))}
        if not more:
            return found
        found |= more


def _rerun_by(project: Path, overrides: list[str]) -> set[str]:
    """The stages ``dvc exp run -S <overrides>`` reruns (check_sources, which always runs, aside)."""
    from dvc.utils.hydra import apply_overrides

    shutil.copyfile(project / "params.committed.yaml", project / "params.yaml")
    try:
        apply_overrides(project / "params.yaml", overrides)
        status = json.loads(_dvc(project, "status", "--json") or "{}")
    finally:
        shutil.copyfile(project / "params.committed.yaml", project / "params.yaml")
    changed = set(status) - {ALWAYS}
    return _downstream(changed) - {ALWAYS}


def test_the_placeholder_project_is_up_to_date_but_for_check_sources(project):
    status = json.loads(_dvc(project, "status", "--json"))
    assert set(status) == {ALWAYS}, status


@pytest.mark.parametrize("overrides,expected", [
    # the CPU profile's switch: embed computes dlib_age's features, train and evaluate follow; no re-crop
    (["train.backbone=dlib_age"], {"embed", "train", "evaluate"}),
    (["train.backbone=dlib_age", "train.epochs=12", "train.freeze_blocks=4", "train.layer_lr_decay=0.316",
      "train.distill_weight=1.0", "train.wise_ft=true"], {"embed", "train", "evaluate"}),
    # cross-dataset sets: the trained model is scored again, nothing before it reruns
    (["evaluate.external=[]"], {"evaluate"}),
    (["evaluate.external.0=/data/elsewhere"], {"evaluate"}),
    (["evaluate.low_res=[0.5]"], {"evaluate"}),
    (["train.epochs=3"], {"train", "evaluate"}),
    (["train.pretrained=none"], {"train", "evaluate"}),
    (["preprocess.margin=0.3"], {"preprocess", "embed", "train", "evaluate"}),
    (["fetch_data.md5="], {"fetch_data", "preprocess", "embed", "train", "evaluate"}),
    (["fetch_detector.source=dlib.net"], {"fetch_detector", "preprocess", "embed", "train", "evaluate"}),
    # how many processes do the work, not what they make (tests/unit/test_workers_r35.py): nothing reruns
    (["preprocess.workers=2", "embed.workers=2", "train.num_workers=2"], set()),
])
def test_an_override_reruns_exactly_the_stages_that_read_it(project, overrides, expected):
    assert _rerun_by(project, overrides) == expected, overrides


@pytest.mark.parametrize("name", ["preprocess", "embed", "train", "evaluate"])
def test_dvc_saves_each_slow_stage_to_its_run_cache(project, name, monkeypatch):
    """The test DVC 3.x applies after a stage runs (``dvc/stage/__init__.py``, ``no_cache_outs``; its run cache
    keys, ``dvc/stage/cache.py``): a `cache: false` file among a stage's plain ``outs`` (every report file of
    preprocess, train and evaluate was one) kept the stage out of the run cache, so going back to params already
    run re-cropped / retrained / re-evaluated for minutes instead of restoring
    (tests/integration/test_run_cache_r38.py runs it)."""
    from dvc.repo import Repo
    from dvc.stage.cache import _can_hash

    monkeypatch.chdir(project)  # DVC hashes a stage's deps relative to the working folder, as its CLI runs
    with Repo(str(project)) as repo:
        [stage] = repo.stage.collect(name)
        uncached = [str(out) for out in stage.outs if not out.use_cache and not (out.is_metric or out.is_plot)]
        assert not uncached, f"{name}: `cache: false` outs that disable its run cache: {uncached}"
        assert _can_hash(stage), f"{name}: DVC cannot key this stage in its run cache"
