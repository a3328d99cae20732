"""load_image's memory: a large photo is decoded without full-size copies it does not need.

A 40 MP photo (the service's pixel cap) took 1.1 GB to decode as a 78 kB 16-bit grey PNG (float64
temporaries) and 0.72 GB as an 8-bit JPEG (exif_transpose's copy of an upright photo, convert()'s copy
of an RGB one), in each detection worker. Measured in a fresh process: its own peak RSS (VmHWM, conftest's PEAK_KB)
before and after one decode, per pixel.
"""

import subprocess
import sys

import pytest

from tests.conftest import PEAK_KB

SIDE = 4000  # 16 MP: large enough that the copies dominate, small enough for a unit test
MEASURE = f"""
import io
{PEAK_KB}
import numpy as np
from PIL import Image
from faceage.images import load_image

kind = {{kind!r}}
buffer = io.BytesIO()
if kind == "grey16":
    Image.fromarray(np.zeros(({SIDE}, {SIDE}), np.uint16)).save(buffer, "PNG")
else:
    Image.new("RGB", ({SIDE}, {SIDE}), (120, 80, 60)).save(buffer, "JPEG")
data = buffer.getvalue()
before = peak_kb()
image = load_image(data)
after = peak_kb()
assert image.shape == ({SIDE}, {SIDE}, 3)
print((after - before) * 1024 / {SIDE ** 2})
"""


@pytest.mark.parametrize("kind", ["grey16", "rgb_jpeg"])
def test_decoding_a_large_photo_takes_a_few_bytes_a_pixel(kind):
    """The result is 3 bytes a pixel and Pillow's decoded image 2-4; before, 28 (16-bit grey) and 14.5 (JPEG)."""
    out = subprocess.run([sys.executable, "-c", MEASURE.format(kind=kind)], capture_output=True, text=True,
                         check=True)
    bytes_per_pixel = float(out.stdout.strip())
    assert bytes_per_pixel < 12, f"decoding a {SIDE}x{SIDE} {kind} took {bytes_per_pixel:.1f} bytes a pixel"
