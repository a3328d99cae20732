"""Round 38: ``stages/evaluate.py`` killed with SIGKILL while its outputs are staged, then run again.

The stage is a real subprocess on the session's tiny trained checkpoint (``tiny_run``), killed for real; the rerun
must remove the dead run's staging folder (a copy of every output) and leave a live run's alone.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from tests.conftest import REPO, own_run_file


def _stage_args(tiny_run, tmp_path: Path) -> list[str]:
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["evaluate"]["external"] = []  # the test split is what is staged; no crop cache in the repo
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    root = tiny_run["root"]
    return [sys.executable, str(REPO / "stages" / "evaluate.py"), "--params", str(params),
            "--model", str(tiny_run["model"]), "--faces", str(tiny_run["faces"]), "--embeddings", str(root / "none.npz"),
            "--run-file", str(own_run_file(tiny_run, tmp_path)), "--detector", str(tiny_run["detector"]),
            "--history", str(root / "reports" / "history.csv"), "--data", str(tiny_run["data"]),
            "--preprocess-metrics", str(root / "preprocess.json"), "--card", str(tmp_path / "reports" / "card.md"),
            "--out", str(tmp_path / "eval")]


def _env(tiny_run) -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": tiny_run["tracking_uri"],
            "PYTHONWARNINGS": "ignore"}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".")) if folder.is_dir() else []


def test_a_rerun_removes_the_staging_folder_of_an_evaluate_killed_with_sigkill(tiny_run, tmp_path):
    from faceage.atomic import scratch_name

    out = tmp_path / "eval"
    args, env = _stage_args(tiny_run, tmp_path), _env(tiny_run)
    proc = subprocess.Popen(args, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 240
        staged = []
        while not staged and proc.poll() is None and time.monotonic() < deadline:
            staged = [p for p in _hidden(out) if p.startswith(f".metrics.json-{proc.pid}@")]
            time.sleep(0.01)
        assert staged, f"evaluate ended (rc {proc.returncode}) before its staging folder was seen"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    # kill -9 runs no cleanup: left behind (with an output's staging file, where it was killed while copying)
    assert set(staged) <= set(_hidden(out))
    # A live run's staging folder (this test process stands for it): never removed
    live = scratch_name(out / "metrics.json", "new")
    live.mkdir()
    (live / "metrics.json").write_text("{}")
    rerun = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert _hidden(out) == [live.name] and (live / "metrics.json").read_text() == "{}"
    assert json.loads((out / "metrics.json").read_text())["n_test_faces"] > 0
    assert _hidden(tmp_path / "reports") == []
