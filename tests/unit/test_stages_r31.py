"""Round 31: Ctrl-C in a stage's first seconds, while it still imports dlib/torch/MLflow.

Real stage scripts as dvc.yaml runs them, real SIGINT. A ``sitecustomize`` (on the child's PYTHONPATH only) holds the
stage at the start of one import so the signal lands there deterministically: in Python's import machinery (as it
does in torch's or MLflow's many Python modules), or inside dlib's C start-up, which pybind11 turns into
``ImportError: initialization failed`` raised from the ``KeyboardInterrupt``.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

SITECUSTOMIZE = r'''
import importlib.abc, os, signal, sys, time

TARGET, MODE = os.environ["R31_PAUSE_AT"], os.environ.get("R31_MODE", "pause")


class _Hold(importlib.abc.MetaPathFinder):
    done = False

    def find_spec(self, name, path=None, target=None):
        if name != TARGET or _Hold.done:
            return None
        _Hold.done = True
        if MODE == "pause":  # the Ctrl-C lands while this import runs
            print("importing", flush=True)
            time.sleep(60)
            return None
        # MODE == "c-init": what pybind11's module start-up does with a KeyboardInterrupt raised inside it
        print("importing", flush=True)
        try:
            time.sleep(60)
        except KeyboardInterrupt as e:
            raise ImportError("initialization failed") from e
        return None


sys.meta_path.insert(0, _Hold())
'''

STAGES = {  # stage: (its arguments as dvc.yaml passes them, enough to reach its imports; the module to hold at)
    "preprocess": (["--data", "d", "--detector", "m", "--out", "o", "--metrics", "r.json"], "dlib"),
    "embed": (["--faces", "f", "--detector", "m", "--out", "e.npz"], "dlib"),
    "train": (["--faces", "f", "--embeddings", "e", "--model", "m.pt", "--reports", "r", "--run-file", "run.json",
               "--state", "s.pt", "--detector", "m"], "torch"),
    "evaluate": (["--model", "m", "--faces", "f", "--embeddings", "e", "--run-file", "r", "--history", "h",
                  "--data", "d", "--preprocess-metrics", "p", "--detector", "m", "--card", "c", "--out", "o"], "torch"),
    "package": ([], "torch"),
    "fetch_data": (["--out", "o"], "yaml"),
    "fetch_detector": (["--out", "o"], "yaml"),
    "check_sources": ([], "yaml"),
}


def _ctrl_c_while_importing(tmp_path: Path, stage: str, mode: str = "pause", target: str | None = None):
    args, held = STAGES[stage]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "R31_PAUSE_AT": target or held,
           "R31_MODE": mode}
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        if line == "importing":
            os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C, to the whole group
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line == "importing", (proc.returncode, err[-3000:])
    return proc.returncode, err


@pytest.mark.parametrize("stage", sorted(STAGES))
def test_ctrl_c_while_a_stage_imports_is_one_line_and_death_by_sigint(tmp_path, stage):
    """Ctrl-C in the first seconds of `dvc repro` (the stage still importing torch/dlib at module top, before
    run_stage) printed Python's KeyboardInterrupt traceback instead of run_stage's one line."""
    code, err = _ctrl_c_while_importing(tmp_path, stage)
    assert code == -signal.SIGINT, err[-3000:]
    assert "interrupted (Ctrl-C)" in err, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]


@pytest.mark.parametrize("stage", ["preprocess", "fetch_detector", "embed"])
def test_ctrl_c_inside_dlibs_start_up_is_one_line_not_import_error(tmp_path, stage):
    """A Ctrl-C inside dlib's C start-up surfaces as "ImportError: initialization failed" (raised from the
    KeyboardInterrupt): run_stage printed that ImportError's traceback before its line, as if dlib were broken."""
    code, err = _ctrl_c_while_importing(tmp_path, stage, mode="c-init", target="_dlib_pybind11")
    assert code == -signal.SIGINT, err[-3000:]
    assert "interrupted (Ctrl-C)" in err, err[-3000:]
    assert "Traceback" not in err and "initialization failed" not in err, err[-3000:]


def test_a_real_import_error_is_still_reported(tmp_path):
    """The conversion is for a Ctrl-C only: a broken dlib (no signal) still fails the stage with its error."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "dlib.py").write_text("raise ImportError('libdlib.so: cannot open shared object file')\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO)])}
    done = subprocess.run([sys.executable, str(REPO / "stages" / "preprocess.py"), *STAGES["preprocess"][0]],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "cannot open shared object file" in done.stderr and "interrupted" not in done.stderr
