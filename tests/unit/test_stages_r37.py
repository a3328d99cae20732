"""Round 37: SIGTERM (`kill`, `timeout`, a cancelled CI job, `docker stop`) stops every stage as Ctrl-C does.

Only train and package cleaned up on SIGTERM; the other stages died of it at once: preprocess and embed left their
worker pool's semaphores to multiprocessing's resource tracker ("There appear to be 5 leaked semaphore objects")
and a staging folder beside the output. Real stage scripts, as dvc.yaml runs them, on real faces; real signals.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO, make_subset
from tests.unit.test_preprocess_r31 import _group_gone
from tests.unit.test_stages_r31 import SITECUSTOMIZE, STAGES

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

N_PHOTOS = 240  # seconds of cropping on 2 workers: the signal lands mid-work, well before the end


def _params(path: Path, **sections) -> Path:
    """The repo's params.yaml with ``sections``' keys overridden (``preprocess={"workers": 2}``), at ``path``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path.write_text(yaml.safe_dump(params))
    return path


class _Stage:
    """A stage script run as dvc.yaml runs it, in a session of its own (its workers in its process group), its
    stderr read as it comes (tqdm's bars end in ``\\r``, not a newline)."""

    def __init__(self, stage: str, args: list[str], cwd: Path, env: dict | None = None):
        self.proc = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=cwd,
                                     env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
        self.err = ""
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        while chunk := os.read(self.proc.stderr.fileno(), 4096):
            self.err += chunk.decode(errors="replace")

    def wait_for(self, pattern: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while not re.search(pattern, self.err):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                code = self.proc.poll()
                self._kill()
                pytest.fail(f"no {pattern!r} ({'ended ' + str(code) if code is not None else f'{seconds} s'}):\n"
                            f"{self.err[-3000:]}")
            time.sleep(0.02)

    def _kill(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()

    def stop(self, group: bool) -> int:
        """SIGTERM as `kill PID` sends it (``group=False``), or as `timeout` does (to the whole group, workers too);
        the exit status."""
        (os.killpg if group else os.kill)(self.proc.pid, signal.SIGTERM)
        return self.finish(120)

    def finish(self, seconds: float = 600) -> int:
        """The exit status once it ends (its whole group killed if it has not within ``seconds``)."""
        try:
            code = self.proc.wait(timeout=seconds)
        finally:
            self._kill()
        self._reader.join(timeout=10)
        return code


def _assert_stopped_cleanly(stage: _Stage, code: int) -> None:
    assert code == -signal.SIGTERM, stage.err[-3000:]
    assert "stopped by SIGTERM" in stage.err, stage.err[-3000:]
    assert "leaked semaphore" not in stage.err, stage.err[-3000:]
    assert "Traceback" not in stage.err, stage.err[-3000:]
    assert _group_gone(stage.proc.pid, 15), "a worker outlived the stopped stage"


def _progress(desc: str) -> str:
    """A tqdm bar of ``desc`` with at least one item done: the stage is at work."""
    return rf"{desc}:\s+\d+%\|[^|]*\|\s*[1-9]\d*/"


# --- 1. every stage: SIGTERM runs its clean-up and ends it in one line --------------------------------------------

@pytest.mark.parametrize("stage", sorted(STAGES))
def test_sigterm_while_a_stage_starts_runs_its_clean_up_and_ends_in_one_line(tmp_path, stage):
    """Held at its first heavy import (as round 31's Ctrl-C test holds it), a stage gets SIGTERM: each now ends
    with "stopped by SIGTERM", by the signal; six of the eight (all but train and package) died of it at once."""
    args, held = STAGES[stage]
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = {"PYTHONPATH": os.pathsep.join([str(site), str(REPO)]), "R31_PAUSE_AT": held}
    proc = subprocess.Popen([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=tmp_path,
                            env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        if line == "importing":
            os.kill(proc.pid, signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line == "importing", (proc.returncode, err[-3000:])
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert "stopped by SIGTERM" in err, err[-3000:]
    assert "Traceback" not in err, err[-3000:]


# --- 2. preprocess and embed, stopped at work -------------------------------------------------------------------

@pytest.fixture(scope="module")
def release(sample_dir, tmp_path_factory) -> Path:
    """A fetch_data output of 240 real faces (200 train, 20 valid, 20 test)."""
    from faceage.appa_real import fetch_appa_real

    root = tmp_path_factory.mktemp("release")
    source = make_subset(sample_dir, root / "source", {"train": 200, "valid": 20, "test": 20})
    fetch_appa_real(str(source), root / "data", md5="")
    return root / "data"


def _preprocess(tmp_path: Path, release: Path, detector_dir: Path) -> _Stage:
    params = _params(tmp_path / "params.yaml", preprocess={"workers": 2})
    return _Stage("preprocess", ["--params", str(params), "--data", str(release), "--detector", str(detector_dir),
                                 "--out", "faces", "--metrics", "preprocess.json"], tmp_path)


@pytest.mark.parametrize("group", [False, True], ids=["kill", "timeout"])
def test_preprocess_stopped_by_sigterm_at_work_leaks_nothing_and_keeps_its_work_for_the_rerun(
        tmp_path, release, detector_dir, group):
    """`kill` (or `timeout`, which signals the whole group) while preprocess crops: it died at once, and the
    resource tracker warned of 5 leaked semaphores (its pool's), the staging folder and the workers' in-flight
    notes left behind. Now it stops its workers, removes its staging folder, keeps the crops done so far in
    .faces.partial for the rerun (which goes on from them), writes no output, and dies of SIGTERM in one line."""
    stage = _preprocess(tmp_path, release, detector_dir)
    stage.wait_for(_progress("crop"))
    _assert_stopped_cleanly(stage, stage.stop(group))
    assert not (tmp_path / "faces").exists() and not (tmp_path / "preprocess.json").exists()
    beside = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".faces"))
    assert beside == [".faces.partial"], beside  # no staging folder, only the work kept for the rerun
    assert not (tmp_path / ".faces.partial" / ".crop-inflight").exists()
    if group:
        return
    rerun = _preprocess(tmp_path, release, detector_dir)
    assert rerun.finish() == 0, rerun.err[-3000:]
    assert re.search(r"resuming preprocess from \S+: reusing [1-9]\d* of 240 photos", rerun.err), rerun.err[-3000:]
    assert len((tmp_path / "faces" / "manifest.csv").read_text().splitlines()) == 1 + N_PHOTOS
    assert not (tmp_path / ".faces.partial").exists()


@pytest.fixture(scope="module")
def faces(release, detector_dir, tmp_path_factory) -> Path:
    """preprocess's output of :func:`release` (whole: run to its end)."""
    from dataclasses import replace

    from faceage.config import Params
    from faceage.preprocess import preprocess_dataset

    out = tmp_path_factory.mktemp("faces") / "faces"
    preprocess_dataset(release, detector_dir, out, replace(Params().preprocess, workers=2))
    return out


def test_embed_stopped_by_sigterm_at_work_leaks_nothing_and_writes_no_features(tmp_path, faces, detector_dir):
    """`kill` while embed computes the dlib face descriptors on its workers: it died at once, with the resource
    tracker's leaked-semaphore warning. Now it stops its workers and dies of SIGTERM in one line, no .npz written."""
    params = _params(tmp_path / "params.yaml", train={"backbone": "dlib_face"}, embed={"workers": 2})
    stage = _Stage("embed", ["--params", str(params), "--faces", str(faces), "--detector", str(detector_dir),
                             "--out", "features/embeddings.npz"], tmp_path)
    stage.wait_for(_progress("embed"))
    _assert_stopped_cleanly(stage, stage.stop(group=False))
    features = tmp_path / "features"
    assert not features.exists() or not list(features.iterdir()), list(features.iterdir())


# --- 3. a signal that lands inside a worker pool's own code ---------------------------------------------------

HOLDING_A_QUEUE = """
import multiprocessing, sys, time
from faceage.logs import run_stage, setup_logging

def wait_holding(queue):  # the signal lands while this frame holds the queue, as a pool's own frames hold theirs
    print("holding", flush=True)
    time.sleep(60)

def main():
    wait_holding(multiprocessing.get_context("spawn").Queue())

setup_logging()
run_stage(main, interrupt_on_sigterm=True)
"""


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_a_signal_inside_a_frame_holding_a_queue_leaks_no_semaphore(tmp_path, signum):
    """SIGTERM as preprocess's workers start lands in concurrent.futures' own frames (``_spawn_process``, which hold
    the pool): the traceback kept the pool's queues alive, and a stage that dies of the signal runs no exit handlers,
    so the resource tracker warned of "5 leaked semaphore objects" under the one line. The frames the exception
    passed through are now cleared, and their objects finalized, before the process dies."""
    script = tmp_path / "stage.py"
    script.write_text(HOLDING_A_QUEUE)
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        line = proc.stdout.readline().strip()
        if line == "holding":
            os.kill(proc.pid, signum)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert line == "holding", err[-3000:]
    assert proc.returncode == -signum, err[-3000:]
    assert ("stopped by SIGTERM" if signum == signal.SIGTERM else "interrupted (Ctrl-C)") in err, err[-3000:]
    assert "leaked semaphore" not in err and "Traceback" not in err, err[-3000:]


# --- 4. evaluate, stopped while it crops an external set ---------------------------------------------------------

def test_evaluate_stopped_by_sigterm_while_cropping_an_external_set_leaks_nothing_and_writes_no_metrics(
        tmp_path, tiny_run, external_dir):
    """`kill` while evaluate crops an evaluate.external set on its workers: it died at once, with the resource
    tracker's leaked-semaphore warning and the set's staging folder left in the cache. Now it stops its workers,
    removes the staging folder (the crops done so far kept for the rerun), writes no metrics, leaves train's MLflow
    run FINISHED, and dies of SIGTERM in one line."""
    from mlflow.tracking import MlflowClient

    from faceage.tracking import read_run_file

    external = make_subset(external_dir, tmp_path / "utk-300", {"test": 300})
    params = _params(tmp_path / "params.yaml", evaluate={"external": [str(external)]})
    root = tiny_run["root"]
    stage = _Stage("evaluate", [
        "--params", str(params), "--model", str(tiny_run["model"]), "--faces", str(tiny_run["faces"]),
        "--embeddings", str(tmp_path / "unused.npz"), "--run-file", str(tiny_run["run"]),
        "--history", str(root / "reports" / "history.csv"), "--data", str(tiny_run["data"]),
        "--preprocess-metrics", str(root / "preprocess.json"), "--detector", str(tiny_run["detector"]),
        "--card", "model_card.md", "--out", "eval"], tmp_path, env={"MLFLOW_TRACKING_URI": tiny_run["tracking_uri"]})
    stage.wait_for(_progress("crop"))
    _assert_stopped_cleanly(stage, stage.stop(group=False))
    assert not (tmp_path / "eval" / "metrics.json").exists() and not (tmp_path / "model_card.md").exists()
    cache = tmp_path / ".cache" / "external"
    left = sorted(str(p.relative_to(cache)) for p in cache.iterdir())
    # the crops done so far (for the rerun) and the entry's lock file (faceage.atomic.locked keeps it): no staging
    # folder, no entry as if complete
    assert left and all(name.endswith((".partial", ".lock")) for name in left), left
    assert not list(cache.rglob("manifest.csv")), left
    run_id = read_run_file(tiny_run["run"])["run_id"]
    assert MlflowClient(tiny_run["tracking_uri"]).get_run(run_id).info.status == "FINISHED"


# --- 5. preprocess's counts file, stopped as it is written -------------------------------------------------------

SLOW_COUNTS_WRITE = r'''
import builtins, io, os, sys, time

_open = builtins.open


def _slow_open(file, mode="r", *args, **kwargs):
    """Writes to the counts file, counts.json (or a file staged for it), stop half-way, as on a slow or full disk."""
    f = _open(file, mode, *args, **kwargs)
    name = os.path.basename(str(file))
    if "w" in mode and (name == "counts.json" or name.startswith(".counts.json-")):
        write = f.write

        def half_then_wait(text):
            write(text[: len(text) // 2])
            f.flush()
            sys.stderr.write("R37 writing the counts\n")
            sys.stderr.flush()
            time.sleep(60)
            return write(text[len(text) // 2:])

        f.write = half_then_wait
    return f


builtins.open = io.open = _slow_open
'''


def test_preprocess_stopped_while_it_writes_its_counts_leaves_no_cut_short_file(tmp_path, release, detector_dir):
    """The counts file (--metrics, which evaluate quotes in the model card) was written in place: a SIGTERM (or a
    full disk) as it was written left half a JSON file under its name. Now it is written whole or not at all."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SLOW_COUNTS_WRITE)
    params = _params(tmp_path / "params.yaml", preprocess={"workers": 1})
    stage = _Stage("preprocess", ["--params", str(params), "--data", str(release), "--detector", str(detector_dir),
                                  "--out", "faces", "--metrics", "counts.json"], tmp_path,
                   env={"PYTHONPATH": os.pathsep.join([str(site), str(REPO)])})
    stage.wait_for("R37 writing the counts", seconds=600)
    code = stage.stop(group=False)
    assert code == -signal.SIGTERM and "stopped by SIGTERM" in stage.err, stage.err[-3000:]
    assert "Traceback" not in stage.err, stage.err[-3000:]
    assert (tmp_path / "faces" / "manifest.csv").is_file()  # the crops were placed: the counts were next
    assert not (tmp_path / "counts.json").exists(), (tmp_path / "counts.json").read_text()
    assert not [p.name for p in tmp_path.glob(".counts.json*")]  # no staged copy left either
