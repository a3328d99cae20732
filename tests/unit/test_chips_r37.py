"""Round 37: the worker pools of faceage.chips under SIGTERM and worker deaths, and crops missing from a faces folder.

Real processes, real signals, real files: a stage script started as dvc.yaml starts one, a worker killed by SIGKILL,
a faces folder and an external set's cache entry with a crop deleted by hand.
"""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

# The end of a child script: a stage as stages/*.py runs one (run_stage with interrupt_on_sigterm), whose pool starts
# 2 workers; what comes before it sends the signals.
POOL_STAGE = """
def main():
    from faceage.chips import map_in_processes
    map_in_processes(time.sleep, [0.5] * 8, 2, os.getpid, (), desc=None, unit="item")
    print("finished", flush=True)

setup_logging()
run_stage(main, interrupt_on_sigterm=True)
"""

# --- 1. SIGTERM while a worker process is being launched -----------------------------------------------------------

# A stage as stages/*.py runs one (run_stage with interrupt_on_sigterm), whose pool starts 2 workers. The SIGTERM is
# sent to the process itself right after the first worker's process is spawned and before its start-up data is
# written down the pipe: the window a `kill` or `timeout` lands in ~3 times in 16 when it is sent as the first worker
# appears, here every time.
SIGTERM_AT_LAUNCH = """
import multiprocessing.util, os, signal, time
from faceage.logs import run_stage, setup_logging

_spawn = multiprocessing.util.spawnv_passfds
_sent = []

def spawn_then_sigterm(path, args, passfds):
    pid = _spawn(path, args, passfds)
    if not _sent and any("spawn_main" in str(a) for a in args):  # a worker, not the resource tracker
        _sent.append(pid)
        os.kill(os.getpid(), signal.SIGTERM)
    return pid

multiprocessing.util.spawnv_passfds = spawn_then_sigterm

""" + POOL_STAGE


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_sigterm_while_a_worker_is_launched_stops_the_stage_in_one_line_and_leaks_nothing(tmp_path):
    """Only SIGINT was held back while a worker started: SIGTERM (raised as an exception by the stages' handler) broke
    the launch between the spawn and the start-up data. The worker, never recorded as started (no pid), was not
    stopped, and printed "EOFError: Ran out of input" with its traceback under the stage's line; the pool's
    semaphores leaked. Now SIGTERM is held back as SIGINT is, and raised once the worker has started."""
    assert_stopped_by_sigterm(tmp_path, SIGTERM_AT_LAUNCH)


def assert_stopped_by_sigterm(tmp_path: Path, script_text: str) -> None:
    """Runs the stage script ``script_text`` (one that sends itself its signals, ending in :data:`POOL_STAGE`) and
    checks that it died of SIGTERM in one line, its pool stopped: no worker's traceback, no leaked semaphore."""
    script = tmp_path / "stage.py"
    script.write_text(script_text)
    proc = subprocess.Popen([sys.executable, str(script)], env={**os.environ, "PYTHONPATH": str(REPO)},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        # (communicate reads to the end: a worker left running holds the pipes open, and its output is read too)
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, err[-3000:])
    assert "finished" not in out
    assert "stopped by SIGTERM" in err, err[-3000:]
    assert "EOFError" not in err and "Traceback" not in err, err[-3000:]
    assert "leaked semaphore" not in err, err[-3000:]


# --- 2. a worker of map_crop_files that dies names embed.workers ---------------------------------------------------

class _DiesInAWorker:
    """A stand-in for DlibFaceEncoder in map_crop_files (module level: the spawned workers unpickle it by name), whose
    every call kills its process as the kernel's out-of-memory killer would (SIGKILL)."""

    def __init__(self, model_dir: str, margin: float):
        self.margin = margin

    def embed_views(self, region: np.ndarray) -> np.ndarray:
        os.kill(os.getpid(), signal.SIGKILL)
        return region


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_dead_crop_worker_names_the_embed_workers_setting(tmp_path):
    """map_crop_files (the embed stage's descriptor loop) passed no ``workers_key``: a worker killed for lack of memory
    told the user to "lower the workers setting", which no params.yaml key is called. It names embed.workers now."""
    from faceage.chips import IN_PROCESS_BELOW, WorkerDiedError, map_crop_files

    crops = []
    for i in range(IN_PROCESS_BELOW):  # enough crops for worker processes (fewer are mapped in this process)
        Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(tmp_path / f"{i}.png")
        crops.append(f"{i}.png")
    with pytest.raises(WorkerDiedError) as caught:
        map_crop_files(_DiesInAWorker, "embed_views", tmp_path, crops, tmp_path, 0.4, workers=2, desc="embed")
    assert "lower embed.workers" in str(caught.value), str(caught.value)


# --- 3. a crop listed in the manifest but missing from the faces folder --------------------------------------------

def _faces_folder(root: Path, n: int = 3) -> Path:
    """A preprocess output's layout: manifest.csv and ``train/<i>.png`` crops."""
    (root / "train").mkdir(parents=True)
    with open(root / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "file_name", "crop", "status", "apparent_age", "apparent_age_std", "real_age"])
        for i in range(n):
            Image.fromarray(np.full((16, 16, 3), 40 * i, np.uint8)).save(root / "train" / f"{i}.png")
            w.writerow(["train", f"{i}.jpg", f"train/{i}.png", "face", 20 + i, 1.5, 21 + i])
    return root


def test_face_crops_missing_from_the_folder_are_one_line_naming_them_and_the_fix(tmp_path):
    """A crop deleted by hand ("not a face") or lost in a partial copy: train's data load died with PIL's
    FileNotFoundError traceback, after loading the crops before it. Now one FacesMissingError (a FaceAgeError, the
    stage's one line) naming the folder, how many are missing, the first one, and the command to run."""
    from faceage.data import FaceCrops
    from faceage.errors import FaceAgeError
    from faceage.preprocess import FacesMissingError

    faces = _faces_folder(tmp_path / "faces")
    assert len(FaceCrops(faces, "train", 8)) == 3  # whole: it loads
    (faces / "train" / "1.png").unlink()
    (faces / "train" / "2.png").unlink()
    with pytest.raises(FacesMissingError) as caught:
        FaceCrops(faces, "train", 8)
    message = str(caught.value)
    assert isinstance(caught.value, FaceAgeError) and isinstance(caught.value, FileNotFoundError)
    assert str(faces.absolute()) in message and "2 crop(s)" in message and "first: train/1.png" in message, message
    assert "dvc repro -f preprocess" in message and "\n" not in message, message


# --- 4. a crop missing from an external set's cache entry ----------------------------------------------------------

def test_a_cache_entry_missing_a_crop_is_cropped_again_with_a_warning(detector_dir, tmp_path, caplog):
    """A crop gone from an external set's cache entry (deleted by hand, a cache copied in part) was reused as it was:
    evaluate then died on it with the missing-crop error, whose fix (`dvc repro -f preprocess`) rebuilds
    nothing of the cache. The entry is now checked when reused: one lacking a crop is cropped again, with a warning."""
    from skimage.data import astronaut

    from faceage.data import FaceCrops
    from faceage.external import external_embeddings, external_faces
    from faceage.preprocess import read_faces_manifest
    from faceage.sources import resolve_external
    from tests.unit.test_external import checkpoint_crop, make_set

    folder = make_set(tmp_path / "set", {"astronaut.jpg": astronaut()}, {"astronaut.jpg": 53.0})
    [ext] = resolve_external([str(folder)], tmp_path)
    crop = checkpoint_crop(detector_dir)
    faces = external_faces(ext, crop, detector_dir, tmp_path / "cache", workers=1)
    [row] = read_faces_manifest(faces, "test")
    expected = (faces / row["crop"]).read_bytes()
    (faces / row["crop"]).unlink()

    with caplog.at_level(logging.WARNING, logger="faceage.external"):
        again = external_faces(ext, crop, detector_dir, tmp_path / "cache", workers=1)
    assert again == faces
    assert (faces / row["crop"]).read_bytes() == expected  # cropped again, the same crop
    assert any("cropping it again" in r.getMessage() and "1 crop(s)" in r.getMessage() for r in caplog.records), \
        caplog.text
    assert len(FaceCrops(faces, "test", 8)) == 1
    assert external_embeddings(faces, detector_dir, workers=1).is_file()


def _cache_entry(cache: Path, n: int) -> Path:
    """An external set's cache entry (``<set>-<16 hex>``) of ``n`` 64 px crops, as external_faces leaves one."""
    import json

    entry = cache / "set-0123456789abcdef"
    (entry / "test").mkdir(parents=True)
    with open(entry / "manifest.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["split", "file_name", "crop", "status", "apparent_age", "apparent_age_std", "real_age"])
        for i in range(n):
            Image.fromarray(np.full((64, 64, 3), 3 * i, np.uint8)).save(entry / "test" / f"{i}.png")
            w.writerow(["test", f"{i}.jpg", f"test/{i}.png", "face", 30, 0.0, 30])
    (entry / "preprocess.json").write_text(json.dumps({"margin": 0.4, "size": 64, "counts": {"face": n}}))
    return entry


def test_a_crop_gone_from_a_cache_entry_before_its_descriptors_names_the_entry_and_the_rerun(detector_dir, tmp_path):
    """A crop gone from an entry after external_faces handed it out: external_embeddings raised embed_dataset's
    error, whose fix (`dvc repro -f preprocess`) rebuilds nothing of the cache. It names the cache entry and the
    rerun (which crops the entry again) instead."""
    from faceage.external import external_embeddings
    from faceage.preprocess import FacesMissingError

    entry = _cache_entry(tmp_path / "cache", 2)
    (entry / "test" / "1.png").unlink()
    with pytest.raises(FacesMissingError) as caught:
        external_embeddings(entry, detector_dir, workers=1)
    message = str(caught.value)
    assert "crop-cache entry" in message and "first: test/1.png" in message and "rerun" in message, message
    assert "dvc repro -f preprocess" not in message, message


# Loaded by every process that the test below starts (its workers): DlibFaceEncoder's every call kills its process,
# as the out-of-memory killer does on a huge photo.
KILLING_ENCODER = """
import os, signal
if os.environ.get("R37_KILL_ENCODER"):
    import faceage.face_encoder

    def _killed(self, crop):
        os.kill(os.getpid(), signal.SIGKILL)

    faceage.face_encoder.DlibFaceEncoder.embed_views = _killed
"""


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_a_dead_descriptor_worker_of_an_external_set_names_what_evaluate_runs_on(detector_dir, tmp_path, monkeypatch):
    """evaluate computes a dlib_face model's descriptors of an external set with the embed loop: a worker killed for
    lack of memory there told the user to lower a setting evaluate does not read. It names evaluate's own."""
    from faceage.chips import IN_PROCESS_BELOW, WorkerDiedError
    from faceage.external import EXTERNAL_WORKERS, external_embeddings

    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(KILLING_ENCODER)
    entry = _cache_entry(tmp_path / "cache", IN_PROCESS_BELOW)  # enough crops for worker processes
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([str(site), str(REPO)]))  # the workers' (spawned) start-up
    monkeypatch.setenv("R37_KILL_ENCODER", "1")
    with pytest.raises(WorkerDiedError) as caught:
        external_embeddings(entry, detector_dir, workers=2)
    message = str(caught.value)
    assert f"lower {EXTERNAL_WORKERS}" in message and "embed.workers" not in message, message
    assert not list(entry.glob("*.npz")), "no descriptors file, nor its staging file, is left"
