"""Round 36: image decoding and annotation, read again.

An IPTC/NAA file (Pillow's ``IptcImagePlugin``, tried on any bytes no other plugin claims) declares its size in a
header field, which is all :func:`faceage.images.load_image` checks against ``max_pixels``; its ``load()`` then
opens the embedded data with a bare ``Image.open`` (every format, no size check but Pillow's own bomb limit) and
decodes it whole. A 97 kB upload declaring 1x1 pixels came back as a 10000x10000 array (1.1 GB peak) under
``max_pixels=1_000_000``: the pixel cap applied to a size that was never decoded.

A photo stored sideways (EXIF orientation 5 to 8: nearly every portrait taken with a phone) took 10 bytes a pixel
to decode where the same photo stored upright takes 6 (160 MB more for a 40 MP photo, the service's cap, in each
detection worker): the decoded pixels, as stored, stayed alive next to their turned copy until the result was made
from it. Now 7: turning needs both at once, the result the copy alone.
Measured as tests/unit/test_images_memory.py measures: the peak RSS of a fresh process, per pixel.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from faceage.images import ImageDecodeError, _safe_formats, load_image
from tests.conftest import PEAK_KB


def _iptc_field(record: int, dataset: int, data: bytes) -> bytes:
    return bytes([0x1C, record, dataset]) + struct.pack(">H", len(data)) + data


def iptc_wrapping(payload: bytes, width: int = 1, height: int = 1) -> bytes:
    """An IPTC/NAA file declaring a ``width`` x ``height`` grey image, "JPEG" compressed (compression 5), whose
    image data records (8:10) hold ``payload``: whatever image file Pillow's bare ``Image.open`` recognises."""
    out = _iptc_field(3, 60, bytes([1, 0]))  # one layer, no component: mode L
    out += _iptc_field(3, 20, struct.pack(">I", width)) + _iptc_field(3, 30, struct.pack(">I", height))
    out += _iptc_field(3, 120, bytes([5]))
    for start in range(0, len(payload), 30000):  # a field's length is 15 bits
        out += _iptc_field(8, 10, payload[start:start + 30000])
    return out + b"\0" * 8


def _png(mode: str, size: tuple[int, int]) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size).save(buf, "PNG")
    return buf.getvalue()


def test_an_iptc_file_cannot_smuggle_a_larger_image_past_the_pixel_cap():
    """The file opens in Pillow as a 1x1 IPTC image (the premise), yet holds a 1000x1000 PNG: refused, as a format
    no photo comes in, never decoded into an array of 100 times ``max_pixels``."""
    data = iptc_wrapping(_png("L", (1000, 1000)))
    with Image.open(io.BytesIO(data)) as img:
        assert (img.format, img.size) == ("IPTC", (1, 1))
    with pytest.raises(ImageDecodeError, match=r"^not an image \(unknown format\): the uploaded file$"):
        load_image(data, max_pixels=10_000)
    assert "IPTC" not in _safe_formats()


def test_pngs_and_jpegs_still_decode_with_iptc_refused():
    """The formats photos come in are untouched by refusing IPTC (which is tried last, on unclaimed bytes)."""
    assert load_image(_png("RGB", (4, 3))).shape == (3, 4, 3)
    buf = io.BytesIO()
    Image.new("RGB", (5, 2), (200, 10, 10)).save(buf, "JPEG", quality=95)
    out = load_image(buf.getvalue())
    assert out.shape == (2, 5, 3) and np.abs(out.astype(int) - (200, 10, 10)).max() < 8


SIDE = 4000  # 16 MP, as test_images_memory.py
MEASURE = f"""
import io
{PEAK_KB}
from PIL import Image
from faceage.images import load_image

orientation = {{orientation}}
exif = Image.Exif()
if orientation:
    exif[0x0112] = orientation
buffer = io.BytesIO()
Image.new("RGB", ({SIDE}, {SIDE} // 2), (120, 80, 60)).save(buffer, "JPEG", exif=exif)
data = buffer.getvalue()
before = peak_kb()
image = load_image(data)
after = peak_kb()
assert image.shape == (({SIDE}, {SIDE} // 2, 3) if orientation in (5, 6, 7, 8) else ({SIDE} // 2, {SIDE}, 3))
print((after - before) * 1024 / ({SIDE} * ({SIDE} // 2)))
"""


def _bytes_per_pixel(orientation: int) -> float:
    out = subprocess.run([sys.executable, "-c", MEASURE.format(orientation=orientation)], capture_output=True,
                         text=True, check=True)
    return float(out.stdout.strip())


def test_a_photo_stored_sideways_decodes_in_the_memory_of_one_stored_upright():
    """Turning needs the stored pixels and their turned copy at once (Pillow's 4 bytes a pixel each), but the result
    is made from the copy alone: 7 bytes a pixel against the upright photo's 6; before, 10."""
    upright, sideways = _bytes_per_pixel(0), _bytes_per_pixel(6)
    assert sideways < upright + 2, f"turned upright: {sideways:.1f} bytes a pixel, stored upright: {upright:.1f}"
