"""The crop path's bookkeeping: a dying crop worker, a release crop that cannot be read."""

import contextlib
import logging
import os
import shutil
import signal
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faceage.preprocess as preprocess
from faceage.appa_real import Sample
from faceage.config import PreprocessParams
from faceage.errors import FaceAgeError

_real_process = preprocess._process


def _dying_process(task):
    """``_process``, but the worker handling ``dies.jpg`` is killed, as the kernel's OOM killer does."""
    if task.file_name == "dies.jpg":
        os.kill(os.getpid(), signal.SIGKILL)
    return _real_process(task)


@contextlib.contextmanager
def _deadline(seconds):
    def expire(*_):
        raise TimeoutError(f"still waiting after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def test_a_crop_worker_that_dies_fails_preprocess_instead_of_hanging(tmp_path, sample_dir, detector_dir, monkeypatch):
    """multiprocessing.Pool waited for ever for the results of a worker the OOM killer took."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    names = ["a.jpg", "dies.jpg", "b.jpg", "c.jpg"]
    for name, src in zip(names, ["001800.jpg", "001801.jpg", "001802.jpg", "001803.jpg"]):
        shutil.copyfile(sample_dir / "test" / src, data / "test" / name)
    out = tmp_path / "faces"
    out.mkdir()
    monkeypatch.setattr(preprocess, "_process", _dying_process)
    with _deadline(60), pytest.raises(FaceAgeError, match=r"worker process died .*lower preprocess\.workers") as e:
        preprocess.crop_samples({"test": [Sample("test", n, 30.0, 0.0, 30.0) for n in names]}, data, detector_dir,
                                out, PreprocessParams(workers=2, cnn_retry_side=0))
    assert type(e.value).__name__ == "WorkerDiedError"


def test_a_photo_without_a_face_whose_release_crop_cannot_be_read_is_logged(tmp_path, detector_dir, caplog):
    """It was counted as no_face with its error kept in the row only: nothing told the user the crop was broken."""
    data = tmp_path / "data"
    (data / "train").mkdir(parents=True)
    y, x = np.mgrid[0:120, 0:160]
    Image.fromarray(np.stack([x, y, x + y], axis=2).astype(np.uint8)).save(data / "train" / "plain.png")  # no face
    (data / "train" / "plain.png_face.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a whole jpeg")
    out = tmp_path / "faces"
    out.mkdir()
    with caplog.at_level(logging.WARNING, logger="faceage.preprocess"):
        rows = preprocess.crop_samples({"train": [Sample("train", "plain.png", 30.0, 0.0, 30.0)]}, data, detector_dir,
                                       out, PreprocessParams(workers=1, cnn_retry_side=0))
    assert [r["status"] for r in rows] == ["no_face"]
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("train/plain.png" in m and "release crop" in m and "plain.png_face.jpg" in m for m in warned), warned


def test_a_photo_over_the_detection_cap_is_cut_by_preprocess_as_the_service_cuts_it(tmp_path, detector_dir):
    """Preprocess (and so evaluate.external) detected a 12 MP photo at full size, the service on a copy downscaled
    to 3840 x 2160: other boxes, another subject, crops the service never produced. One detect serves both now."""
    from skimage.data import astronaut

    from faceage.faces import MAX_DETECT_PIXELS
    from faceage.predict import FaceLocator

    # The astronaut at 8x (4096 x 4096): 2x the detection cap, her face ~900 px.
    big = np.asarray(Image.fromarray(astronaut()).resize((4096, 4096), Image.Resampling.BICUBIC))
    assert big.shape[0] * big.shape[1] > MAX_DETECT_PIXELS
    cut = preprocess_crop(tmp_path, detector_dir, "big.png", lambda path: Image.fromarray(big).save(path), upsample=0)
    served = FaceLocator(detector_dir, kind="hog", upsample=0, margin=PreprocessParams().margin, crop_size=64).locate(big)
    assert np.array_equal(cut, served.crops[0])


def preprocess_crop(tmp_path: Path, detector_dir: Path, name: str, save, upsample: int) -> np.ndarray:
    """The crop ``preprocess`` stores for one photo, written by ``save(path)`` as the test split's only image
    (HOG at ``upsample``, no second look, 64 px crops); it must find a face."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    save(data / "test" / name)
    out = tmp_path / "faces"
    out.mkdir()
    params = PreprocessParams(workers=1, upsample=upsample, retry_pad=0.0, cnn_retry_side=0, size=64)
    [row] = preprocess.crop_samples({"test": [Sample("test", name, 53.0, 0.0, 53.0)]}, data, detector_dir, out,
                                    params)
    assert row["status"] == "face"
    return np.asarray(Image.open(out / row["crop"]))


def _slow_item(x):
    import time

    time.sleep(0.25)
    return x


def _no_setup():
    pass


def _interrupt(*_):
    raise KeyboardInterrupt


def interrupted_map(delay: float) -> tuple[bool, float, set]:
    """A map of 64 slow items on 2 workers, interrupted (KeyboardInterrupt, as Ctrl-C) after ``delay`` seconds:
    whether the interrupt reached the caller, the seconds the map took, and the children it left running
    (stopped here once counted; children of earlier tests in this process are not the map's)."""
    import multiprocessing

    from faceage.chips import map_in_processes

    before = set(multiprocessing.active_children())
    previous = signal.signal(signal.SIGALRM, _interrupt)
    signal.setitimer(signal.ITIMER_REAL, delay)
    start = time.monotonic()
    interrupted = False
    try:
        map_in_processes(_slow_item, list(range(64)), 2, _no_setup, (), desc=None, unit="item")
    except KeyboardInterrupt:
        interrupted = True
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    seconds = time.monotonic() - start
    left = set(multiprocessing.active_children()) - before
    for process in left:
        process.terminate()
        process.join()
    return interrupted, seconds, left


def test_an_interrupted_process_map_stops_its_workers_at_once():
    """Ctrl-C in preprocess waited for the workers to finish the chunks already handed to them (16 photos each,
    minutes with the CNN detector); multiprocessing.Pool, before it, stopped them at once."""
    interrupted, seconds, left = interrupted_map(0.5)
    assert interrupted
    assert seconds < 2.5  # waiting for the two 16-item chunks: ~4 s
    assert left == set()
