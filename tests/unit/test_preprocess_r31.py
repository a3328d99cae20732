"""Round 31 review of preprocess: its scratch notes, its reads of the detector manifest, and Ctrl-C while its
worker processes start."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest

from faceage.appa_real import Sample
from faceage.config import PreprocessParams
from tests.conftest import REPO, make_subset


def _photos(sample_dir: Path, dest: Path, n: int) -> list[str]:
    """Copies the first ``n`` photos of the sample's test split into ``dest/test``; their names."""
    names = sorted(p.name for p in (sample_dir / "test").glob("*.jpg") if not p.name.endswith("_face.jpg"))[:n]
    (dest / "test").mkdir(parents=True)
    for name in names:
        shutil.copyfile(sample_dir / "test" / name, dest / "test" / name)
    return names


# --- 1. the workers' in-progress notes -------------------------------------------------------------------------

def test_crop_workers_run_where_the_temp_dir_is_unusable(tmp_path, sample_dir, detector_dir, monkeypatch):
    """The workers' in-progress notes lived in a folder under the temp dir (/tmp): a full or unusable /tmp stopped
    preprocess (a full one as "no space left" about the output folder, which had room). They now live beside
    the crops (since round 33 the resumable run's partial folder, ``data/.faces.partial``), and are gone once the
    crops are done."""
    from faceage.preprocess import crop_samples

    names = _photos(sample_dir, tmp_path / "data", 3)
    out = tmp_path / "faces"
    out.mkdir()
    not_a_dir = tmp_path / "tmp-is-a-file"
    not_a_dir.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", str(not_a_dir))  # no folder can be made there
    monkeypatch.setenv("TMPDIR", str(not_a_dir))
    rows = crop_samples({"test": [Sample("test", n, 30.0, 0.0, 30.0) for n in names]}, tmp_path / "data",
                        detector_dir, out, PreprocessParams(workers=2, cnn_retry_side=0, size=32))
    assert [r["status"] for r in rows] == ["face"] * 3
    assert sorted(p.name for p in out.iterdir()) == ["chips.npz", "manifest.csv", "test"]  # no notes left behind
    assert len(list((out / "test").iterdir())) == 3


def test_a_crop_worker_that_dies_still_names_its_photo_from_the_notes_in_the_output(tmp_path, sample_dir,
                                                                                     detector_dir):
    """The notes moved into the output's staging folder still name the photo a killed worker was cropping (round
    28's test, reading the notes where they now are)."""
    import multiprocessing as mp
    import threading

    from faceage.chips import WorkerDiedError
    from faceage.preprocess import crop_samples

    names = _photos(sample_dir, tmp_path / "data", 48)
    out = tmp_path / "faces"
    out.mkdir()
    raised = []

    def run():
        try:
            crop_samples({"test": [Sample("test", n, 30.0, 0.0, 30.0) for n in names]}, tmp_path / "data",
                         detector_dir, out, PreprocessParams(workers=2, cnn_retry_side=0))
        except BaseException as e:  # noqa: BLE001 - handed to the test thread
            raised.append(e)

    thread = threading.Thread(target=run)
    thread.start()
    victim, photo, deadline = None, None, time.monotonic() + 120
    while photo is None and thread.is_alive() and time.monotonic() < deadline:
        for child in mp.active_children():
            marks = list(out.glob(f".*/{child.pid}"))
            if marks:
                os.kill(child.pid, signal.SIGSTOP)  # holds it on the photo it is cropping
                victim, photo = child.pid, marks[0].read_text() or None
                if photo is None:  # stopped while it wrote the name: let it finish
                    os.kill(child.pid, signal.SIGCONT)
                break
        time.sleep(0.01)
    assert photo is not None, "no worker was seen cropping a photo"
    os.kill(victim, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive()
    assert len(raised) == 1 and isinstance(raised[0], WorkerDiedError), raised
    assert photo in str(raised[0]) and photo[len("test/"):] in names, str(raised[0])


# --- 2. one read of the detector manifest ----------------------------------------------------------------------

def test_preprocess_reads_the_detector_manifest_once_and_records_that_read(tmp_path, sample_dir, detector_dir,
                                                                            monkeypatch):
    """preprocess read (and verified) the detector manifest, then crop_samples read it again, unverified, and built
    the crop settings a second time: preprocess.json recorded the first read, chips.npz the second. One read now,
    verified, and both files record it."""
    from faceage import preprocess
    from faceage.appa_real import fetch_appa_real
    from faceage.detector import SHAPE5_FILE, read_manifest

    source = make_subset(sample_dir, tmp_path / "source", {"train": 2, "valid": 1, "test": 1})
    fetch_appa_real(str(source), tmp_path / "data", md5="")
    reads = []

    def counted(model_dir, verify=False):
        reads.append(verify)
        return read_manifest(model_dir, verify=verify)

    monkeypatch.setattr(preprocess, "read_manifest", counted)
    preprocess.preprocess_dataset(tmp_path / "data", detector_dir, tmp_path / "faces",
                                  PreprocessParams(workers=1, size=32))
    assert reads == [True]
    files = read_manifest(detector_dir)["files"]
    settings = json.loads((tmp_path / "faces" / "preprocess.json").read_text())
    assert settings["detector_sha256"] == files[settings["detector_file"]]
    with np.load(tmp_path / "faces" / "chips.npz") as z:
        assert str(z["shape_predictor_sha256"]) == files[SHAPE5_FILE]


# --- 3. Ctrl-C while the workers start -------------------------------------------------------------------------

STAGE = """
import sys
from pathlib import Path
from faceage.appa_real import Sample
from faceage.config import PreprocessParams
from faceage.logs import run_stage, setup_logging
from faceage.preprocess import crop_samples

def main():
    data, detector, out = map(Path, sys.argv[1:4])
    names = sorted(p.name for p in (data / "test").iterdir())
    out.mkdir()
    crop_samples({"test": [Sample("test", n, 30.0, 0.0, 30.0) for n in names]}, data, detector, out,
                 PreprocessParams(workers=2, cnn_retry_side=0))

if __name__ == "__main__":
    setup_logging()
    run_stage(main)
"""


def _spawned_children(pid: int) -> list[int]:
    """The worker processes ``pid`` has spawned so far (multiprocessing's ``spawn_main``)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmdline = (entry / "cmdline").read_bytes()
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and b"spawn_main" in cmdline:
            found.append(int(entry.name))
    return found


def _group_gone(pgid: int, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.killpg(pgid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    return False


@pytest.mark.parametrize("after", [0.0, 0.4, 1.0])
def test_ctrl_c_while_the_crop_workers_start_prints_one_line(tmp_path, sample_dir, detector_dir, after):
    """A Ctrl-C (SIGINT to the whole foreground group, as a terminal sends it) while the spawned workers were still
    starting reached them too: each printed a traceback (KeyboardInterrupt in its imports, dlib's "ImportError:
    initialization failed", EOFError from the pipe of a parent gone) around the stage's one "interrupted (Ctrl-C)"
    line. The parent alone handles Ctrl-C now, and stops its workers."""
    # 240 photos: seconds of cropping, so the latest Ctrl-C still lands before the stage ends (24 were done in
    # under a second on an idle machine, and the stage exited 0 before the signal)
    _photos(sample_dir, tmp_path / "data", 240)
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path / "data"), str(detector_dir),
                             str(tmp_path / "faces")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, start_new_session=True)
    try:
        deadline = time.monotonic() + 60
        while not _spawned_children(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()
        time.sleep(after)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGINT, err
    assert "interrupted (Ctrl-C)" in err, err
    assert "Traceback" not in err and "Error" not in err.replace("ERROR faceage: interrupted", ""), err
    assert "leaked semaphore" not in err, err
    assert _group_gone(proc.pid, 15), "a worker outlived the interrupted stage"
    assert not (tmp_path / "faces").exists() or not any((tmp_path / "faces").glob(".*"))


def test_crop_samples_records_the_manifest_its_caller_read(tmp_path, detector_dir):
    """An external set's caller reads the manifest verified, then crop_samples read it again for chips.npz: it can
    now hand its read over, and chips.npz records that one."""
    from skimage.data import astronaut
    from PIL import Image

    from faceage.detector import SHAPE5_FILE, read_manifest
    from faceage.preprocess import crop_samples

    (tmp_path / "data" / "test").mkdir(parents=True)
    Image.fromarray(astronaut()).save(tmp_path / "data" / "test" / "astronaut.png")
    out = tmp_path / "faces"
    out.mkdir()
    manifest = read_manifest(detector_dir, verify=True)
    manifest["files"][SHAPE5_FILE] = "f" * 64  # marks this read apart from the file's own
    crop_samples({"test": [Sample("test", "astronaut.png", 30.0, 0.0, 30.0)]}, tmp_path / "data", detector_dir,
                 out, PreprocessParams(workers=1, cnn_retry_side=0, size=32), manifest=manifest)
    with np.load(out / "chips.npz") as z:
        assert str(z["shape_predictor_sha256"]) == "f" * 64


def _sleep_and_exit() -> None:
    time.sleep(1.0)


def test_a_ctrl_c_during_a_worker_start_waits_for_the_start_and_never_reaches_the_worker(monkeypatch):
    """A Ctrl-C landing while the parent wrote a new worker's start-up data interrupted the write: the worker read
    a cut-short pipe and printed EOFError, and the pool had no record of it to stop. Now the Ctrl-C is raised once
    the worker has started (so it can be stopped), and the worker itself never gets SIGINT."""
    from multiprocessing import popen_spawn_posix

    from faceage.chips import _WorkerContext

    launch = popen_spawn_posix.Popen._launch

    def ctrl_c_midway(self, process_obj):  # the terminal's Ctrl-C, to this process, in the middle of the start
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(0.05)
        launch(self, process_obj)

    monkeypatch.setattr(popen_spawn_posix.Popen, "_launch", ctrl_c_midway)
    context = _WorkerContext()
    process = context.Process(target=_sleep_and_exit)
    with pytest.raises(KeyboardInterrupt):
        process.start()
    monkeypatch.undo()
    assert context.started == [process] and process.pid is not None
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back
    time.sleep(0.3)
    os.kill(process.pid, signal.SIGINT)  # as the terminal sends it to the whole group
    process.join(30)
    assert process.exitcode == 0
