"""Round-37 review of annotation: a face box that is a sliver (a face the detector's second look found mostly past
the photo's edge, clipped to 2 px) once the UI scales a panorama down must still be drawn, not crash the request."""

from __future__ import annotations

import numpy as np

from faceage.annotate import PALETTE, annotate
from faceage.predict import FaceAge
from faceage.ui import annotate_for_ui

GREY = 40


def _face(box) -> FaceAge:
    return FaceAge(box=box, age=34.4, age_std=5.6, score=1.0)


def test_a_box_of_no_width_or_height_is_drawn_as_a_line_not_a_pil_error():
    """A box whose sides meet (x2 == x1 or y2 == y1) stopped annotate() with PIL's "x1 must be greater than or
    equal to x0": the user got an error instead of the photo with its other faces drawn."""
    image = np.full((200, 300, 3), GREY, np.uint8)
    faces = [_face((50, 60, 150, 160)), _face((200, 100, 200, 140)), _face((220, 180, 260, 180))]
    out = annotate(image, faces)
    assert out.shape == image.shape
    assert tuple(out[110, 50]) == PALETTE[0]  # the whole face's box is there
    assert tuple(out[120, 200]) == PALETTE[1]  # the zero-width box: a line at its x
    assert tuple(out[180, 240]) == PALETTE[2]  # the zero-height box: a line at its y (inside the photo)


def test_the_ui_draws_a_panorama_whose_face_box_shrinks_to_no_height():
    """The UI scales an 8000 x 998 panorama by 0.256 and rounds the boxes: a 2-px box clipped at the bottom edge
    (996..998) became 255..255, and the UI showed an error instead of the photo."""
    image = np.full((998, 8000, 3), GREY, np.uint8)
    faces = [_face((1000, 200, 1400, 600)), _face((3000, 996, 3080, 998))]
    out = annotate_for_ui(image, faces)
    assert out.shape == (255, 2048, 3)
    assert tuple(out[100, 256]) == PALETTE[0]  # the first face's left edge
    assert (out[250:, 768:789] == PALETTE[1]).all(axis=-1).any()  # the sliver is drawn at the bottom


def test_a_label_inside_a_box_near_the_bottom_of_a_short_photo_stays_on_the_photo():
    """A 16-px-high strip: the label (12 px with its padding) fits neither above its face's box (its top at row 6)
    nor below row 6, and was drawn from row 6 down, its last rows past the photo's bottom edge."""
    image = np.full((16, 200, 3), GREY, np.uint8)
    out = annotate(image, [_face((5, 6, 195, 16))])
    label_rows = [y for y in range(16) if (out[y, 8:60] == PALETTE[0]).all(axis=-1).sum() > 20]
    assert label_rows and min(label_rows) < 6  # raised to fit
    assert max(label_rows) == 15  # down to the last row: its bottom padding is on the photo
