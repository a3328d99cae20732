"""Drawing predictions on photos: each face box with a "#n age ± std" label (n: the face's number in the tables).

Input: an RGB uint8 image (H, W, 3) and its :class:`faceage.predict.FaceAge` list.
Output: a new RGB uint8 image of the same size (the input is not modified), or PNG bytes.
Used by the service's ``/annotate`` route, the Gradio UI and ``faceage predict --annotate``.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from decimal import ROUND_HALF_UP, Decimal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from faceage.predict import FaceAge

# Colour-blind-safe palette (Okabe-Ito), cycled over faces in order (largest first, ties to the most central).
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167))
MIN_FONT_PX = 12  # the smallest label text, however small the photo or its face
# Labels stay legible with the photo shown PHONE_SHOWN_WIDTH_PX wide (on a phone): their text is LEGIBLE_FONT_PX
# there (digits about 7 px tall), unless that is wider than the face, when it shrinks to fit, but not below
# LEGIBLE_FONT_PX with the photo shown SHOWN_WIDTH_PX wide. At 12 px on the photo, a 2000-px-wide group photo shown on
# a phone had digits under 2 px tall. The UI shows the annotated photo 294 px wide on a 360-px-wide phone, the most
# common width (324 px on a 390-px iPhone; tests/integration/test_ui_r38.py): with labels sized for 400 px alone, their
# digits were under 5.5 px tall there, even a crowd's "#3" that had room to be larger.
SHOWN_WIDTH_PX = 400
PHONE_SHOWN_WIDTH_PX = 290
LEGIBLE_FONT_PX = 10


def face_label(face: FaceAge, number: int | None = None) -> str:
    """``"34 ± 5"``, or with ``number`` ``"#3 34 ± 5"``: the face's number (the ``face`` column of the UI's and
    the CLI's tables, from 1), the predicted age and its std, in whole years.

    Rounded half up, as a reader rounds the one-decimal figure the UI's and the CLI's tables show beside it:
    formatting with ``.0f`` rounds exact halves to even (34.5 was labelled "34", 35.5 "36", 2.5 "± 2"). The
    value itself is rounded, not its one-decimal figure (34.46, shown 34.5, is 34: no double rounding).
    """
    label = f"{_whole_years(face.age)} \u00b1 {_whole_years(face.age_std)}"
    return label if number is None else f"#{number} {label}"


def _whole_years(years: float) -> str:
    """``years`` rounded half up (away from zero) to whole years; ``+ 0`` turns ``-0`` into ``0``."""
    value = Decimal(float(years))  # the float's exact value: 34.49999 stays under the half
    return str(value.quantize(Decimal(1), rounding=ROUND_HALF_UP) + 0) if value.is_finite() else f"{years:.0f}"


def annotate(image: np.ndarray, faces: Sequence[FaceAge]) -> np.ndarray:
    """Draws each face's box and its :func:`face_label`, numbered (``"#3 34 ± 5"``), onto a copy of ``image``.

    The number is the face's place in ``faces`` from 1, as the ``face`` column of the UI's and the CLI's
    tables gives it: in a group photo, alike labels in largest-first order could not be told apart.
    Line width and text size scale with the image, so labels stay readable on small and
    large photos alike (:data:`LEGIBLE_FONT_PX` with the photo shown :data:`PHONE_SHOWN_WIDTH_PX` wide, a
    phone's view), but a label is no wider than its face's box, its text no smaller than :data:`MIN_FONT_PX` nor
    than :data:`LEGIBLE_FONT_PX` with the photo shown :data:`SHOWN_WIDTH_PX` wide: at the photo's text size, the
    labels of a crowd's small faces covered their neighbours' faces and labels. A face too narrow for its whole
    label at that size gets its number alone (``"#3"``; its age is in the table's row). A label sits above its
    box, or inside it at the top edge; the labels are drawn after all the boxes, so no box crosses a label.

    Args:
        image: RGB uint8 array (H, W, 3).
        faces: The predictions for this image.

    Returns:
        A new RGB uint8 array (H, W, 3).

    Raises:
        ValueError: ``image`` is not an (H, W, 3) uint8 array.
    """
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    canvas = Image.fromarray(image).copy()
    draw = ImageDraw.Draw(canvas)
    h, w = image.shape[:2]
    line = max(2, round(min(h, w) / 250))
    # Within reason: at most a twelfth of the short side (a wide panorama's labels would cover its height).
    legible = _legible_font_px(w, h, PHONE_SHOWN_WIDTH_PX)
    least = _legible_font_px(w, h, SHOWN_WIDTH_PX)  # the smallest a label shrinks to, to fit its face
    size = max(legible, round(min(h, w) / 28))
    fonts: dict[int, ImageFont.FreeTypeFont] = {}
    # Every box first, then every label: a box drawn after another face's label crossed its digits
    # (in a group photo, a neighbour's box edge ran through "12" of "38 ± 12").
    for i, face in enumerate(faces):
        draw.rectangle(_drawn_box(face.box, w, h), outline=PALETTE[i % len(PALETTE)], width=line)
    for i, face in enumerate(faces):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, _ = face.box
        text = face_label(face, i + 1)
        font, (left, top, right, bottom), pad, fits = _label_font(draw, text, size, x2 - x1, fonts, least)
        if not fits:  # the number alone, at a legible size (the table has the age)
            text = f"#{i + 1}"
            font, (left, top, right, bottom), pad, _ = _label_font(draw, text, size, x2 - x1, fonts, least)
        tw, th = right - left, bottom - top
        box_h = th + 2 * pad
        ty = y1 - box_h if y1 - box_h >= 0 else y1  # above the box, else inside its top edge
        ty = min(ty, max(h - box_h, 0))  # a photo shorter than that: its bottom edge, not past it
        tx = min(max(x1, 0), max(w - tw - 2 * pad, 0))
        draw.rectangle((tx, ty, tx + tw + 2 * pad - 1, ty + box_h - 1), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def _legible_font_px(w: int, h: int, shown_width_px: int) -> int:
    """The text size (px on the photo) that is :data:`LEGIBLE_FONT_PX` with a ``w`` x ``h`` photo shown
    ``shown_width_px`` wide; at least :data:`MIN_FONT_PX`, at most a twelfth of its short side."""
    return max(MIN_FONT_PX, min(math.ceil(LEGIBLE_FONT_PX * w / shown_width_px), round(min(h, w) / 12)))


def _drawn_box(box: tuple[int, int, int, int], w: int, h: int) -> tuple[int, int, int, int]:
    """The inclusive pixel rectangle PIL draws for the box ``[x1, y1, x2, y2)`` in a ``w`` x ``h`` image: at least
    one pixel each way, within the image. A box whose sides meet (a face clipped at the photo's edge to 2 px,
    scaled down by the UI to none) stopped the whole drawing with PIL's "x1 must be greater than or equal to x0";
    one lying on the edge (x1 == w) was drawn outside the photo, unseen."""
    x1, y1, x2, y2 = box
    left, top = min(max(x1, 0), w - 1), min(max(y1, 0), h - 1)
    return left, top, max(min(x2 - 1, w - 1), left), max(min(y2 - 1, h - 1), top)


def _label_font(draw: ImageDraw.ImageDraw, text: str, size: int, max_width: int,
                fonts: dict[int, ImageFont.FreeTypeFont], min_size: int = MIN_FONT_PX):
    """The font for ``text`` at ``size`` px, smaller (down to ``min_size``) until its label, padding
    included, is no wider than ``max_width`` (its face's box); with its text bbox, padding and whether it fits."""
    size = max(size, min_size)
    while True:
        font = fonts.get(size) or fonts.setdefault(size, ImageFont.load_default(size=size))
        bbox = draw.textbbox((0, 0), text, font=font)
        pad = max(2, (bbox[3] - bbox[1]) // 5)
        width = bbox[2] - bbox[0] + 2 * pad
        if width <= max_width or size <= min_size:
            return font, bbox, pad, width <= max_width
        size = max(min_size, min(size - 1, int(size * max_width / width)))


def to_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encodes an RGB uint8 array as PNG bytes (lossless; fast compression), with ``text`` as tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()
