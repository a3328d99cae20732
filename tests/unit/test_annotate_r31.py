"""Round-31 review of annotation: each label names its face's number (the tables' ``face`` column), and labels stay
legible on a big photo shown on a phone's screen (about 400 px wide)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import ImageDraw

from faceage.annotate import PALETTE, annotate, face_label
from faceage.predict import FaceAge

GREY = 40


@pytest.fixture
def drawn_texts(monkeypatch) -> list[str]:
    """The texts annotate() draws (PIL's own ImageDraw.text still draws them)."""
    texts: list[str] = []
    real = ImageDraw.ImageDraw.text

    def text(self, xy, text, *args, **kwargs):
        texts.append(text)
        return real(self, xy, text, *args, **kwargs)

    monkeypatch.setattr(ImageDraw.ImageDraw, "text", text)
    return texts


def _face(box, age=34.4, std=5.6) -> FaceAge:
    return FaceAge(box=box, age=age, age_std=std, score=1.0)


def test_each_label_starts_with_its_face_number(drawn_texts):
    """The labels said only "34 ± 5": in a group photo several faces had alike labels, in an order (largest first)
    that is not reading order, and nothing tied a label to its row of the UI's or the CLI's table (column ``face``)."""
    image = np.full((400, 600, 3), GREY, np.uint8)
    faces = [_face((300, 150, 450, 300), 34.4, 5.6), _face((50, 150, 180, 280), 34.2, 5.4),
             _face((200, 200, 280, 280), 61.0, 9.0)]
    out = annotate(image, faces)
    assert drawn_texts == ["#1 34 \u00b1 6", "#2 34 \u00b1 5", "#3 61 \u00b1 9"]
    assert face_label(faces[0]) == "34 \u00b1 6" and face_label(faces[0], 1) == "#1 34 \u00b1 6"
    assert tuple(out[200, 300]) == PALETTE[0] and tuple(out[240, 200]) == PALETTE[2]  # boxes as before


def _label_text_rows(out: np.ndarray, colour, x: int, above_row: int) -> int:
    """Height (rows) of the black text inside the label filled with ``colour`` whose fill crosses column ``x``."""
    rows = np.nonzero((out[:above_row, x] == colour).all(axis=1))[0]
    top, bottom = rows.min(), rows.max() + 1
    cols = np.nonzero((out[top:bottom] == colour).all(axis=2).any(axis=0))[0]
    inside = out[top:bottom, cols.min():cols.max() + 1]
    text_rows = np.nonzero((inside.max(axis=2) < 110).any(axis=1))[0]  # black text, anti-aliased
    return int(text_rows.max() - text_rows.min() + 1)


@pytest.mark.parametrize("width", [2000, 4000])
def test_labels_stay_legible_when_a_big_photo_is_shown_400_px_wide(width, drawn_texts):
    """A crowd's labels shrank to 12 px text on the photo whatever its size: a 2000-px-wide group photo shown 400 px
    wide on a phone had digits under 2 px tall. Where the whole label no longer fits its face, the face's number
    alone (the table has its age) is drawn at a legible size."""
    height = width * 3 // 4
    image = np.full((height, width, 3), GREY, np.uint8)
    side = width // 25  # 80 px faces on 2000 px: a crowd
    row = [_face((side + 2 * side * k, height // 2, 2 * side + 2 * side * k, height // 2 + side)) for k in range(4)]
    out = annotate(image, row)
    shown = 400 / width  # the photo on a phone
    for k, face in enumerate(row):
        digits = _label_text_rows(out, PALETTE[k], face.box[0] + 2, face.box[1])
        assert digits * shown >= 6, (k, digits, digits * shown)  # 6 px digits on the phone's screen at least
    assert drawn_texts == ["#1", "#2", "#3", "#4"]  # too narrow for "#1 34 ± 6" at that size: the number
    big = annotate(image, [_face((width // 4, height // 3, width // 4 + width // 6, height // 3 + width // 6))])
    assert _label_text_rows(big, PALETTE[0], width // 4 + 2, height // 3) * shown >= 6
    assert drawn_texts[-1] == "#1 34 \u00b1 6"  # a large face keeps its whole label


def test_a_small_photo_keeps_the_12_px_minimum():
    image = np.full((200, 300, 3), GREY, np.uint8)
    out = annotate(image, [_face((100, 100, 120, 120))])  # a 20 px face
    assert _label_text_rows(out, PALETTE[0], 102, 100) >= 8  # 12 px text: its digits about 9 px tall


def test_a_panorama_s_labels_stay_within_reason():
    """Legible at 400 px wide, but no taller than a twelfth of the photo's height: a 8000 x 1000 panorama's labels
    would otherwise be 200 px text, a fifth of its height."""
    image = np.full((1000, 8000, 3), GREY, np.uint8)
    out = annotate(image, [_face((4000, 400, 4600, 1000))])
    assert 40 <= _label_text_rows(out, PALETTE[0], 4002, 400) <= 1000 // 12
