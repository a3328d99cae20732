"""Round 34, second read of the narrow-range and HDR decoding (:func:`faceage.images._decode_signal`).

A 16-bit RGB PNG tagged narrow range (ffmpeg's ``-color_range tv`` frame grab of a 10-bit video) took 40 bytes a
pixel to decode (0.8 GB for 20 MP, 1.6 GB at the service's 40 MP cap, in each detection worker) where the same PNG
untagged takes 10: its 16-bit codes were looked up whole, numpy turning the uint16 index into int64 (24 bytes a
pixel), next to full-size copies of the high bytes, the low bytes and the codes. An HDR one took 23, a grey HDR one 17
(its codes repeated to three channels first). Measured in a fresh process: its peak RSS (reset after the imports and a
first decode) less its RSS before one decode, per pixel, against the same PNG untagged and the budget of
tests/unit/test_images_memory.py.

The other cases checked here decoded right already and are kept as regressions: interlaced (Adam7) and RGBA 16-bit
PNGs read their low bytes in the same places, a palette or grey+alpha PNG keeps its transparency, an APNG gives its
first frame, a truncated PNG is the client's ImageDecodeError, a grey HLG PNG is neutral, the EXIF orientation of a
16-bit one applies.
"""

from __future__ import annotations

import io
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceage.images import ImageDecodeError, load_image

ROOT = Path(__file__).resolve().parents[2]
SIDE = 4000  # 16 MP, as test_images_memory.py
BUDGET = 12  # bytes a pixel, as test_images_memory.py

def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


# Adam7's 7 passes: (x start, y start, x step, y step)
ADAM7 = [(0, 0, 8, 8), (4, 0, 8, 8), (0, 4, 4, 8), (2, 0, 4, 4), (0, 2, 2, 4), (1, 0, 2, 2), (0, 1, 1, 2)]


def png16(arr: np.ndarray, *chunks: bytes, interlace: bool = False) -> bytes:
    """A 16-bit grey (H, W), RGB (H, W, 3) or RGBA (H, W, 4) PNG of ``arr``, written by hand (Pillow writes no
    16-bit RGB), ``chunks`` after its IHDR; Adam7-interlaced where asked."""
    height, width = arr.shape[:2]
    colour_type = 0 if arr.ndim == 2 else {3: 2, 4: 6}[arr.shape[2]]
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, int(interlace))
    big = arr.astype(">u2")

    def rows(sub: np.ndarray) -> bytes:
        return b"".join(b"\0" + row.tobytes() for row in sub.reshape(sub.shape[0], -1).view(np.uint8))

    passes = [big[ys::dy, xs::dx] for xs, ys, dx, dy in ADAM7] if interlace else [big]
    raw = b"".join(rows(sub) for sub in passes if sub.size)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + b"".join(chunks)
            + chunk(b"IDAT", zlib.compress(raw, 1)) + chunk(b"IEND", b""))



MEASURE = f"""
import sys
from faceage.images import load_image

def status(key):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(key))

load_image(sys.argv[2])  # the same kind, 1x1: whatever a first decode sets up is not counted
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # the peak (VmHWM) starts again from here: importing peaks higher than some decoding
before = status("VmRSS:")
image = load_image(sys.argv[1])
assert image.shape == ({SIDE}, {SIDE}, 3)
print((status("VmHWM:") - before) / {SIDE ** 2})
"""


def _bytes_a_pixel(arr: np.ndarray, tag: list[bytes], tmp_path: Path) -> float:
    """What load_image takes to decode a 16-bit PNG of ``arr`` with the chunks ``tag``, per pixel. The PNG is written
    here, so that the measuring process holds no freed memory of its own making that decoding could reuse."""
    path, small = tmp_path / "photo.png", tmp_path / "small.png"
    path.write_bytes(png16(arr, *tag))
    small.write_bytes(png16(arr[:1, :1], *tag))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(small)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    return float(out.stdout.strip())


CICP = {"narrow": (1, 13, 0, 0), "rgba_narrow": (1, 13, 0, 0), "pq": (9, 16, 0, 1), "hlg_grey": (9, 18, 0, 1)}


@pytest.mark.parametrize("kind", list(CICP))
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="resets the peak by /proc/self/clear_refs (Linux)")
def test_a_large_narrow_range_or_hdr_16_bit_png_takes_what_an_untagged_one_takes(kind, tmp_path):
    """Before: 40 (RGB, narrow range), 41 (RGBA, narrow range), 23 (RGB, PQ) and 17 (grey, HLG) bytes a pixel,
    where the same PNGs untagged take 10 (RGB, grey) and, for RGBA, what its compositing onto white takes (7
    since round 34; 22 before)."""
    shape = (SIDE, SIDE) if kind == "hlg_grey" else (SIDE, SIDE, 4 if kind == "rgba_narrow" else 3)
    arr = np.full(shape, 30000, np.uint16)
    untagged = _bytes_a_pixel(arr, [], tmp_path)
    tagged = _bytes_a_pixel(arr, [chunk(b"cICP", bytes(CICP[kind]))], tmp_path)
    assert tagged < untagged + 2, f"a 16-bit {kind} PNG: {tagged:.1f} bytes a pixel, untagged {untagged:.1f}"
    if kind != "rgba_narrow":
        assert tagged < BUDGET, f"a {SIDE}x{SIDE} 16-bit {kind} PNG took {tagged:.1f} bytes a pixel"


def _narrow_expanded(arr: np.ndarray) -> np.ndarray:
    """H.273's narrow range of 16-bit codes (black 4096, white 60160) as full-range 8-bit, clipped."""
    return np.clip(np.rint((arr.astype(float) - 4096) / (219 * 256) * 255), 0, 255).astype(np.uint8)


NARROW = chunk(b"cICP", bytes([1, 13, 0, 0]))


def test_a_narrow_range_16_bit_png_decodes_alike_interlaced_and_with_alpha():
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 65536, (13, 17, 3)).astype(np.uint16)
    want = _narrow_expanded(arr)
    np.testing.assert_array_equal(load_image(png16(arr, NARROW)), want)
    np.testing.assert_array_equal(load_image(png16(arr, NARROW, interlace=True)), want)
    rgba = np.concatenate([arr, np.full((13, 17, 1), 65535, np.uint16)], axis=2)
    rgba[0, 0, 3] = 0
    for interlace in (False, True):
        out = load_image(png16(rgba, NARROW, interlace=interlace))
        np.testing.assert_array_equal(out[1:], want[1:])
        np.testing.assert_array_equal(out[0, 0], [255, 255, 255])  # transparent: white


def test_a_narrow_range_palette_or_grey_alpha_png_keeps_its_transparency():
    palette = Image.new("P", (3, 1))
    palette.putpalette([16, 16, 16, 235, 235, 235, 126, 126, 126] + [0] * 759)
    palette.putpixel((1, 0), 1)
    palette.putpixel((2, 0), 2)
    grey = np.array([[[16, 255], [126, 0], [235, 255]]], np.uint8)
    for img, save in ((palette, {"transparency": 2}), (Image.fromarray(grey, "LA"), {})):
        buf = io.BytesIO()
        img.save(buf, "PNG", **save)
        data = buf.getvalue()
        out = load_image(data[:33] + NARROW + data[33:])
        assert out[0, :, 0].tolist() == [0, 255, 255], img.mode  # 16 -> black, 235 -> white, transparent -> white


def test_a_narrow_range_apng_gives_its_first_frame():
    buf = io.BytesIO()
    Image.new("RGB", (4, 4), (16, 16, 16)).save(buf, "PNG", save_all=True,
                                                 append_images=[Image.new("RGB", (4, 4), (235, 235, 235))])
    data = buf.getvalue()
    assert (load_image(data[:33] + NARROW + data[33:]) == 0).all()


def test_a_truncated_narrow_range_or_hdr_16_bit_png_is_the_clients_error():
    arr = np.full((64, 64, 3), 30000, np.uint16)
    for cicp in (NARROW, chunk(b"cICP", bytes([9, 16, 0, 1]))):
        data = png16(arr, cicp)
        with pytest.raises(ImageDecodeError, match="truncated"):
            load_image(data[:len(data) // 2])


def test_a_grey_hlg_png_is_neutral_and_as_its_rgb_twin():
    codes = np.linspace(0, 65535, 40).astype(np.uint16)[None].repeat(3, 0)
    hlg = chunk(b"cICP", bytes([9, 18, 0, 1]))
    grey = load_image(png16(codes, hlg))
    rgb = load_image(png16(np.repeat(codes[..., None], 3, axis=2), hlg))
    assert (np.ptp(grey, axis=2) == 0).all()
    np.testing.assert_array_equal(grey, rgb)
    assert grey[0, 0, 0] == 0 and grey[0, -1, 0] == 255 and (np.diff(grey[0, :, 0].astype(int)) >= 0).all()


@pytest.mark.parametrize("after_idat", [False, True])
def test_a_narrow_range_16_bit_png_is_turned_upright_by_its_exif_orientation(after_idat):
    """The decoded image is built on the low bytes' decoding of the file: the EXIF orientation of the photo (an eXIf
    chunk before or after the pixels) still applies."""
    exif = Image.Exif()
    exif[0x0112] = 6  # turned 90 degrees
    arr = np.full((2, 4, 3), 4096, np.uint16)
    arr[0, 0] = 60160
    exif_chunk = chunk(b"eXIf", exif.tobytes())
    data = png16(arr, NARROW, *([] if after_idat else [exif_chunk]))
    if after_idat:
        data = data[:-12] + exif_chunk + data[-12:]  # before IEND
    out = load_image(data)
    assert out.shape == (4, 2, 3) and (out[0, 1] == 255).all() and out.sum() == 3 * 255
