"""Round 34, third read: compositing transparency onto white (:func:`faceage.images._to_rgb`) in bounded memory.

A photo with alpha took ~22 bytes a pixel to decode (0.9 GB for 40 MP, the service's cap, in each detection worker)
where its twin without alpha takes 10: Pillow's ``alpha_composite`` ran on the whole image, next to full-size copies
of it (``convert("RGBA")`` copies even an RGBA image), a white background, the composite and its RGB conversion; 23
with an ICC profile (the transform's copies too). A 16-bit grey PNG with a tRNS value took 18 (its transparent
pixels set through a boolean index: numpy made int64 indices of them). Measured as tests/unit/test_images_r34b.py
measures (its script, imported): the peak RSS of a fresh process, reset after a first decode, less its RSS before,
per pixel, against the budget of tests/unit/test_images_memory.py.

Before (16 MP): RGBA 16-bit 21.9, RGBA 8-bit 21.9, LA 21.9, palette + tRNS 18.9, 16-bit grey + tRNS 17.9, RGBA with
an ICC profile 23.0; their twins without alpha 9.9 to 10.9.

The output must stay what it was, pixel for pixel: :func:`_reference` is the compositing as it was (whole image),
compared on 8 and 16-bit images, with and without an ICC profile, partially transparent, decoded in blocks of a few
rows (the block size shrunk) so that block edges fall inside them.
"""

from __future__ import annotations

import io
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageCms

from faceage import images
from faceage.images import _D65, _NCLX_TRANSFERS, _P3, _matrix_icc, load_image
from tests.unit.test_images_r34b import BUDGET, MEASURE, ROOT, SIDE, chunk, png16

P3_ICC = _matrix_icc((*_P3, _D65), _NCLX_TRANSFERS[13], "Display P3")  # not sRGB: converted


def iccp(icc: bytes) -> bytes:
    return chunk(b"iCCP", b"P3\0\0" + zlib.compress(icc))


def pil_png(img: Image.Image, **params) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "PNG", compress_level=1, **params)
    return buffer.getvalue()


def alpha_ramp(height: int, width: int) -> np.ndarray:
    """Every alpha level, row after row: transparent, partially and fully opaque rows."""
    return (np.arange(height) % 256).astype(np.uint8)[:, None].repeat(width, 1)


def photo(kind: str, side: int) -> bytes:
    """A ``side`` x ``side`` PNG of ``kind`` with alpha (or a transparent colour)."""
    alpha = alpha_ramp(side, side)
    if kind.startswith("rgba16"):
        arr = np.full((side, side, 4), 30000, np.uint16)
        arr[..., 3] = alpha.astype(np.uint16) * 257
        return png16(arr, *([iccp(P3_ICC)] if kind == "rgba16_icc" else []))
    if kind == "grey16_trns":
        arr = np.full((side, side), 30000, np.uint16)
        arr[::2] = 1234
        return png16(arr, chunk(b"tRNS", (1234).to_bytes(2, "big")))
    colour = np.empty((side, side, 3), np.uint8)
    colour[...] = (120, 80, 60)
    if kind.startswith("rgba8"):
        return pil_png(Image.fromarray(np.dstack([colour, alpha])),
                       **({"icc_profile": P3_ICC} if kind == "rgba8_icc" else {}))
    if kind == "la8":
        return pil_png(Image.fromarray(np.dstack([colour[..., 0], alpha]), "LA"))
    if kind == "p_trns":
        img = Image.fromarray((np.arange(side) % 4).astype(np.uint8)[:, None].repeat(side, 1), "P")
        img.putpalette([10, 20, 30, 200, 100, 50, 0, 0, 0, 255, 255, 255])
        return pil_png(img, transparency=bytes([0, 128, 255, 60]))
    raise ValueError(kind)


KINDS = ["rgba16", "rgba16_icc", "rgba8", "rgba8_icc", "la8", "p_trns", "grey16_trns"]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(),
                    reason="resets the peak by /proc/self/clear_refs (Linux)")
def test_a_large_photo_with_alpha_decodes_within_the_memory_budget(kind, tmp_path):
    path, small = tmp_path / "photo.png", tmp_path / "small.png"
    path.write_bytes(photo(kind, SIDE))
    small.write_bytes(photo(kind, 1))
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path), str(small)], capture_output=True, text=True,
                         check=True, cwd=ROOT)
    bytes_per_pixel = float(out.stdout.strip())
    assert bytes_per_pixel < BUDGET, f"a {SIDE}x{SIDE} {kind} PNG took {bytes_per_pixel:.1f} bytes a pixel"


def _reference(data: bytes) -> np.ndarray:
    """What load_image gave before, compositing the whole image at once (round 33's ``_to_rgb``): for the images
    of this file, whose alpha branch it is (upright, no cICP)."""
    with Image.open(io.BytesIO(data)) as img:
        img.load()
        transform, _ = images._srgb_transform(img, "reference")
        if img.mode in images._SIXTEEN_BIT:
            grey = images._grey8(img)
            if transform is None:
                rgb = np.repeat(grey[..., None], 3, axis=2)
            else:
                rgb = np.array(ImageCms.applyTransform(Image.fromarray(grey, "L").convert(transform.inputMode),
                                                       transform))
            rgb[np.asarray(img) == img.info["transparency"]] = 255
            return rgb
        rgba = img.convert("RGBA")
        if transform is not None:
            source = img.convert("L") if transform.inputMode == "L" else rgba
            colour = ImageCms.applyTransform(source.convert(transform.inputMode), transform)
            colour.putalpha(rgba.getchannel("A"))
            rgba = colour
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))


def _random_photo(kind: str, rng: np.random.Generator, height: int = 37, width: int = 23) -> bytes:
    """Random colours and alpha (every level, 0 and 255 included), of ``kind``."""
    alpha = rng.integers(0, 256, (height, width)).astype(np.uint8)
    alpha[0, :2] = (0, 255)
    if kind.startswith("rgba16"):
        arr = rng.integers(0, 65536, (height, width, 4)).astype(np.uint16)
        arr[0, :2, 3] = (0, 65535)
        return png16(arr, *([iccp(P3_ICC)] if kind == "rgba16_icc" else []))
    if kind.startswith("grey16_trns"):
        arr = rng.integers(0, 65536, (height, width)).astype(np.uint16)
        arr[rng.random((height, width)) < 0.3] = 4321
        return png16(arr, *([iccp(GREY_ICC)] if kind == "grey16_trns_icc" else []),
                     chunk(b"tRNS", (4321).to_bytes(2, "big")))
    colour = rng.integers(0, 256, (height, width, 3)).astype(np.uint8)
    icc = {"icc_profile": P3_ICC} if kind.endswith("_icc") else {}
    if kind.startswith("rgba8"):
        return pil_png(Image.fromarray(np.dstack([colour, alpha])), **icc)
    if kind.startswith("la8"):
        return pil_png(Image.fromarray(np.dstack([colour[..., 0], alpha]), "LA"),
                       **({"icc_profile": GREY_ICC} if icc else {}))
    if kind.startswith("p_trns"):
        img = Image.fromarray(rng.integers(0, 16, (height, width)).astype(np.uint8), "P")
        img.putpalette(rng.integers(0, 256, 48).astype(np.uint8).tolist())
        return pil_png(img, transparency=bytes(rng.integers(0, 256, 16).astype(np.uint8)), **icc)
    if kind in ("l8_trns", "rgb8_trns"):
        img = Image.fromarray(colour[..., 0] if kind == "l8_trns" else colour)
        key = int(colour[3, 4, 0]) if kind == "l8_trns" else tuple(int(v) for v in colour[3, 4])
        return pil_png(img, transparency=key)
    raise ValueError(kind)


def _grey_icc() -> bytes:
    """A grey profile of gamma 1.8: not sRGB's curve, so converted."""
    curve = b"curv\0\0\0\0" + (1).to_bytes(4, "big") + int(1.8 * 256).to_bytes(2, "big") + b"\0\0"
    return images.icc_profile_bytes({b"wtpt": b"XYZ \0\0\0\0" + images._s15(images._D50), b"kTRC": curve},
                                    space=b"GRAY")


GREY_ICC = _grey_icc()
IDENTITY_KINDS = ["rgba16", "rgba16_icc", "rgba8", "rgba8_icc", "la8", "la8_icc", "p_trns", "p_trns_icc",
                  "l8_trns", "rgb8_trns", "grey16_trns", "grey16_trns_icc"]


@pytest.mark.parametrize("block_pixels", [1, 50, 1 << 18])  # a row, a few rows, the whole image
@pytest.mark.parametrize("kind", IDENTITY_KINDS)
def test_compositing_onto_white_gives_the_pixels_it_gave(kind, block_pixels, monkeypatch):
    monkeypatch.setattr(images, "_DECODE_BLOCK_PIXELS", block_pixels)
    rng = np.random.default_rng(sum(map(ord, kind)))
    for _ in range(3):
        data = _random_photo(kind, rng)
        want = _reference(data)
        got = load_image(data)
        assert got.shape == want.shape and got.dtype == np.uint8
        np.testing.assert_array_equal(got, want)


def test_the_icc_profiles_here_are_converted():
    """The identity test above would prove nothing of the ICC path if its profiles were taken for sRGB."""
    for kind, plain in (("rgba8_icc", "rgba8"), ("la8_icc", "la8"), ("grey16_trns_icc", "grey16_trns")):
        assert not (_reference(_random_photo(kind, np.random.default_rng(1)))
                    == _reference(_random_photo(plain, np.random.default_rng(1)))).all(), kind


def test_an_upright_turned_photo_with_alpha_composites_as_before():
    """EXIF orientation 6 on an RGBA PNG: turned first, then composited, as before."""
    rng = np.random.default_rng(7)
    arr = rng.integers(0, 256, (9, 14, 4)).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6
    data = pil_png(Image.fromarray(arr), exif=exif.tobytes())
    want = _reference(pil_png(Image.fromarray(arr).transpose(Image.Transpose.ROTATE_270)))
    np.testing.assert_array_equal(load_image(data), want)
