"""Drawing predictions on photos: each face box with an "age ± std" label.

Input: an RGB uint8 image (H, W, 3) and its :class:`faceage.predict.FaceAge` list.
Output: a new RGB uint8 image of the same size (the input is not modified), or PNG bytes.
Used by the service's ``/annotate`` route, the Gradio UI and ``faceage predict --annotate``.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from faceage.predict import FaceAge

# Colour-blind-safe palette (Okabe-Ito), cycled over faces in order (largest first).
PALETTE = ((230, 159, 0), (86, 180, 233), (0, 158, 115), (240, 228, 66), (0, 114, 178), (213, 94, 0),
           (204, 121, 167))


def face_label(face: FaceAge) -> str:
    """``"34 ± 5"``: the predicted age and its std, in whole years."""
    return f"{face.age:.0f} \u00b1 {face.age_std:.0f}"


def annotate(image: np.ndarray, faces: Sequence[FaceAge]) -> np.ndarray:
    """Draws each face's box and its :func:`face_label` onto a copy of ``image``.

    Line width and text size scale with the image, so labels stay readable on small and
    large photos alike. A label sits above its box, or inside it at the top edge.

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
    font = ImageFont.load_default(size=max(12, round(min(h, w) / 28)))
    for i, face in enumerate(faces):
        colour = PALETTE[i % len(PALETTE)]
        x1, y1, x2, y2 = face.box
        draw.rectangle((x1, y1, x2 - 1, y2 - 1), outline=colour, width=line)
        text = face_label(face)
        left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
        tw, th = right - left, bottom - top
        pad = max(2, th // 5)
        box_h = th + 2 * pad
        ty = y1 - box_h if y1 - box_h >= 0 else y1  # above the box, else inside its top edge
        tx = min(max(x1, 0), max(w - tw - 2 * pad, 0))
        draw.rectangle((tx, ty, tx + tw + 2 * pad, ty + box_h), fill=colour)
        draw.text((tx + pad - left, ty + pad - top), text, fill=(0, 0, 0), font=font)
    return np.asarray(canvas)


def to_png(image: np.ndarray, text: dict[str, str] | None = None) -> bytes:
    """Encodes an RGB uint8 array as PNG bytes (lossless; fast compression), with ``text`` as tEXt chunks."""
    from PIL.PngImagePlugin import PngInfo

    info = PngInfo()
    for key, value in (text or {}).items():
        info.add_text(key, value)
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG", compress_level=1, pnginfo=info)
    return buf.getvalue()
