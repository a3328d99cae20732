"""Drawing boxes and "age ± std" labels: a new image, boxes where the faces are, labels readable."""

import io

import numpy as np
import pytest
from PIL import Image

from faceage.annotate import PALETTE, annotate, face_label, to_png
from faceage.predict import FaceAge


def test_label_is_age_plus_minus_std_in_whole_years():
    assert face_label(FaceAge(box=(0, 0, 1, 1), age=34.4, age_std=5.6, score=1.0)) == "34 \u00b1 6"


def test_boxes_are_drawn_on_a_copy():
    image = np.full((300, 400, 3), 40, np.uint8)
    face = FaceAge(box=(100, 120, 200, 220), age=30.0, age_std=4.0, score=1.0)
    out = annotate(image, [face])
    assert out.shape == image.shape and out.dtype == np.uint8
    assert (image == 40).all()  # input untouched
    assert tuple(out[170, 100]) == PALETTE[0] and tuple(out[219, 150]) == PALETTE[0]  # left and bottom edges
    assert (out[150:200, 130:170] == 40).all()  # inside the box stays clear
    assert (out[290:, :50] == 40).all()  # far from the face nothing changes


def test_label_goes_inside_when_the_box_touches_the_top():
    image = np.zeros((200, 200, 3), np.uint8)
    out = annotate(image, [FaceAge(box=(20, 0, 120, 100), age=50.0, age_std=3.0, score=1.0)])
    assert (out[2:12, 22:40] != 0).any()  # label drawn at the top edge, inside the picture


def test_no_faces_gives_the_same_pixels():
    image = np.random.default_rng(0).integers(0, 255, (50, 60, 3), dtype=np.uint8)
    assert np.array_equal(annotate(image, []), image)


def test_rejects_non_rgb():
    with pytest.raises(ValueError, match=r"\(H, W, 3\) uint8 array, got float64 \(4, 4\)"):
        annotate(np.zeros((4, 4)), [])


def test_png_is_lossless():
    image = np.random.default_rng(1).integers(0, 255, (30, 20, 3), dtype=np.uint8)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(to_png(image)))), image)
