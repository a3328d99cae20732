"""Round 26 review of face detection and the face encoder: arrays that are not RGB uint8 get one clear
error, detection on two threads works in a forked child, and a corrupt dlib model file is named."""

from __future__ import annotations

import multiprocessing as mp
import shutil

import numpy as np
import pytest

from faceage.detector import CNN_FILE, HOG_FILE, RECOGNITION_FILE, SHAPE5_FILE, DetectorFilesError
from faceage.face_encoder import DlibFaceEncoder
from faceage.faces import FaceBox, FaceDetector, margin_region


def astronaut() -> np.ndarray:
    from skimage.data import astronaut as load  # public domain (NASA), ships with scikit-image

    return load()


@pytest.fixture(scope="module")
def detector(detector_dir):
    return FaceDetector(detector_dir, "hog", 1, retry_pad=0.35)


@pytest.mark.parametrize("name", ["grey with a face", "grey without one", "RGBA", "16-bit grey", "float RGB",
                                  "one channel"])
def test_detect_refuses_what_is_not_rgb_uint8_in_one_clear_message(detector, name):
    """A 2-D grey array (np.asarray of a greyscale photo) gave numpy's broadcasting error when no face was
    found (the second look pads three axes) and boxes when one was (then the crop failed the same way);
    RGBA, 16-bit and float arrays gave dlib's 'Unsupported image type'."""
    face = astronaut()
    grey = np.ascontiguousarray(face.mean(axis=2).astype(np.uint8))
    image = {"grey with a face": grey,
             "grey without one": np.random.default_rng(0).integers(0, 256, (120, 160), dtype=np.uint8),
             "RGBA": np.dstack([face, np.full(face.shape[:2], 255, np.uint8)]),
             "16-bit grey": grey.astype(np.uint16) * 257,
             "float RGB": face.astype(np.float32),
             "one channel": grey[..., None]}[name]
    with pytest.raises(ValueError, match=r"RGB uint8 array \(H, W, 3\).*load_image"):
        detector.detect(image)
    with pytest.raises(ValueError, match=r"RGB uint8 array \(H, W, 3\).*load_image"):
        detector.detect(image, parallel=True)


def test_margin_region_refuses_a_grey_array():
    grey = np.zeros((50, 60), np.uint8)
    with pytest.raises(ValueError, match=r"RGB uint8 array \(H, W, 3\).*\(50, 60\)"):
        margin_region(grey, FaceBox(10, 10, 30, 30, 1.0), 0.4)


def _detect_in_child(detector, image, out):
    out.put([b.as_list() for b in detector.detect(image, parallel=True)])


def test_detection_on_two_threads_works_in_a_forked_child(detector_dir):
    """The split detector's thread does not survive a fork: a child inherited an executor whose thread
    was gone, and its first detect(parallel=True) waited for ever (a forked multiprocessing pool over an
    AgePredictor, which splits by default on two cores, hung so)."""
    detector = FaceDetector(detector_dir, "hog", 0)
    image = astronaut()
    expected = [b.as_list() for b in detector.detect(image, parallel=True)]  # the parent's thread runs
    assert expected
    ctx = mp.get_context("fork")
    out = ctx.Queue()
    child = ctx.Process(target=_detect_in_child, args=(detector, image, out))
    child.start()
    child.join(30)
    try:
        assert not child.is_alive(), "detect(parallel=True) hung in the forked child"
        assert child.exitcode == 0 and out.get(timeout=5) == expected
    finally:
        if child.is_alive():
            child.kill()
            child.join()


@pytest.fixture
def copied_detector_dir(detector_dir, tmp_path):
    out = tmp_path / "detector"
    shutil.copytree(detector_dir, out)
    return out


def _cut(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) // 2])


@pytest.mark.parametrize("filename, build", [
    (HOG_FILE, lambda d: FaceDetector(d, "hog", 1)),
    (CNN_FILE, lambda d: FaceDetector(d, "hog", 1, cnn_retry_side=400)),
    (CNN_FILE, lambda d: FaceDetector(d, "cnn", 0)),
    (SHAPE5_FILE, lambda d: DlibFaceEncoder(d, 0.4)),
    (RECOGNITION_FILE, lambda d: DlibFaceEncoder(d, 0.4)),
])
def test_a_cut_short_model_file_is_named_with_what_to_do(copied_detector_dir, filename, build):
    """dlib said only 'Error deserializing object of type int' for a cut-short HOG detector or shape
    predictor: no file, no remedy."""
    _cut(copied_detector_dir / filename)
    with pytest.raises(DetectorFilesError) as e:
        build(copied_detector_dir)
    assert str(copied_detector_dir / filename) in str(e.value) and "fetch_detector" in str(e.value)
    assert isinstance(e.value, RuntimeError)  # what dlib raised before: callers catching that still do


@pytest.mark.parametrize("shape", [(1, 5000), (5000, 1), (2, 3000), (40, 60)])
def test_a_strip_over_the_pixel_cap_is_looked_at_within_it(detector_dir, monkeypatch, shape):
    """The downscaled copy kept a side that rounds under 1 px at 1 and the other at its scaled length: a
    1 x 20000000 strip under the default cap (3840 x 2160) was looked at as 1 x 12880000."""
    detector = FaceDetector(detector_dir, "hog", 0, max_detect_pixels=1000)
    seen = []
    monkeypatch.setattr(detector, "_looks", lambda image, parallel: seen.append(image.shape) or [])
    assert detector.detect(np.zeros(shape + (3,), np.uint8)) == []
    (looked,) = seen
    assert looked[0] * looked[1] <= 1000 and looked[2] == 3
