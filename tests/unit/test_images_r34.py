"""Round 34, photos whose colour coding was read but not applied: a narrow-range PNG (cICP's full-range flag 0, what
ffmpeg writes for a frame grabbed from video with ``-color_range tv``), a CIELab TIFF whose WhitePoint tag says
D65, and HDR photos (PQ or HLG: a PNG tagged by cICP, an AVIF or HEIC by its nclx box), which are tone mapped to
sRGB.

Expected values are computed here with numpy from the published definitions (ITU-T H.273, SMPTE ST 2084,
ARIB STD-B67 / BT.2100, CIE Lab), not by the code under test. The last test checks that none of the 51 real photos of
the shared data decode any differently than before this round."""

from __future__ import annotations

import hashlib
import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags

from faceage.images import load_image
from tests.unit.test_images_r31 import (BT709, BT2020, DISPLAY_P3, avif_with, heic_with, heic_writer, photo,
                                        rgb_to_xyz, srgb_decode, srgb_encode, warnings_of)
from tests.unit.test_images_r33 import _chunk, _png

__all__ = ["heic_writer"]  # the fixture, imported for the HEIC test


def _cicp(primaries: int, transfer: int, matrix: int = 0, full_range: int = 1) -> bytes:
    return _chunk(b"cICP", bytes([primaries, transfer, matrix, full_range]))


def _png16(arr: np.ndarray, *chunks: bytes) -> bytes:
    """A 16-bit RGB (H, W, 3) or grey (H, W) PNG of ``arr`` (uint16), written by hand (Pillow writes no 16-bit
    RGB), ``chunks`` after its IHDR."""
    height, width = arr.shape[:2]
    colour_type = 2 if arr.ndim == 3 else 0
    ihdr = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    rows = arr.astype(">u2").reshape(height, -1).view(np.uint8)
    raw = b"".join(b"\0" + row.tobytes() for row in rows)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + b"".join(chunks) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def test_the_16_bit_png_writer_writes_what_pillow_reads():
    arr = np.array([[0, 257 * 3, 65535, 4096]], np.uint16)
    with Image.open(io.BytesIO(_png16(arr))) as img:
        np.testing.assert_array_equal(np.asarray(img), arr)
    rgb = np.array([[[0, 60160, 65535]]], np.uint16)
    with Image.open(io.BytesIO(_png16(rgb))) as img:  # Pillow keeps the high bytes
        np.testing.assert_array_equal(np.asarray(img), rgb >> 8)


# --- 1. cICP's full-range flag: narrow (video) range --------------------------------------------------------------

NARROW_8 = np.array([[[16, 16, 16], [235, 235, 235], [126, 126, 126], [5, 120, 250]]], np.uint8)
FULL_8 = np.array([[[0, 0, 0], [255, 255, 255], [128, 128, 128], [0, 121, 255]]], np.uint8)


def test_a_narrow_range_png_is_expanded_to_full_range(caplog):
    """16 is black and 235 white: the frame came out washed out, its black a 16 grey. Foot and head room clip."""
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(_png(NARROW_8, _cicp(1, 13, full_range=0))), FULL_8)
        np.testing.assert_array_equal(load_image(_png(NARROW_8, _cicp(1, 1, full_range=0))), FULL_8)
    assert not warnings_of(caplog)
    np.testing.assert_array_equal(load_image(_png(NARROW_8, _cicp(1, 13, full_range=1))), NARROW_8)  # as before


def test_a_16_bit_narrow_range_png_is_expanded_from_all_16_bits():
    """10-bit narrow range scaled to 16 bits, as PNG stores it: 64..940 << 6 = 4096..60160. 15309 is 20 % of the
    range: 51 from all 16 bits, 50 from the high byte alone (what Pillow decodes a 16-bit RGB PNG to)."""
    arr = np.array([[[4096] * 3, [60160] * 3, [126 * 256] * 3, [15309, 0, 65535]]], np.uint16)
    want = np.array([[[0] * 3, [255] * 3, [128] * 3, [51, 0, 255]]], np.uint8)
    np.testing.assert_array_equal(load_image(_png16(arr, _cicp(1, 13, full_range=0))), want)


def test_a_grey_narrow_range_png_is_expanded():
    grey = NARROW_8[..., 0]
    np.testing.assert_array_equal(load_image(_png(grey, _cicp(1, 13, full_range=0))), FULL_8[..., :1].repeat(3, 2))
    grey16 = np.array([[4096, 60160, 15309]], np.uint16)
    np.testing.assert_array_equal(load_image(_png16(grey16, _cicp(1, 13, full_range=0)))[0, :, 0], [0, 255, 51])


def test_a_narrow_range_png_keeps_its_transparency():
    rgba = np.dstack([NARROW_8, np.array([[255, 0, 255, 255]], np.uint8)])
    out = load_image(_png(rgba, _cicp(1, 13, full_range=0)))
    np.testing.assert_array_equal(out[0, [0, 2, 3]], FULL_8[0, [0, 2, 3]])
    np.testing.assert_array_equal(out[0, 1], [255, 255, 255])  # transparent: white


def test_a_narrow_range_wide_gamut_png_is_expanded_before_its_colours_are_converted():
    """Display P3 narrow range: the expansion comes first, then the primaries (the other order is wrong)."""
    arr = photo()
    narrow = np.rint(16 + arr * (219 / 255)).astype(np.uint8)
    out = load_image(_png(narrow, _cicp(12, 13, full_range=0)))
    full = np.clip(np.rint((narrow.astype(float) - 16) * 255 / 219), 0, 255)
    want = 255 * srgb_encode(srgb_decode(full / 255) @ rgb_to_xyz(DISPLAY_P3) @ np.linalg.inv(rgb_to_xyz(BT709)))
    diff = np.abs(out - want)
    assert diff.max() <= 2 and diff.mean() < 0.6, (diff.max(), diff.mean())


@pytest.mark.parametrize(("matrix", "full_range"), [(1, 1), (9, 0), (0, 2)], ids=["matrix-1", "matrix-9", "range-2"])
def test_an_invalid_cicp_chunk_is_ignored_with_one_warning(matrix, full_range, caplog):
    """PNG 3rd edition: an RGB PNG's matrix coefficients must be 0 (PNG holds no YCbCr), the range flag 0 or 1. Such
    a chunk says nothing reliable: ignored (naming why), the file read as without it; it was used as if valid."""
    data = _png(photo(), _cicp(12, 13, matrix=matrix, full_range=full_range))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), photo())
    [warned] = warnings_of(caplog)
    assert "cICP" in warned and ("matrix" in warned or "range" in warned), warned


# --- 2. CIELab TIFF's WhitePoint -----------------------------------------------------------------------------------

D65_XYZ = np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])


def _lab_tiff(arr: np.ndarray, white_xy=None) -> bytes:
    """An 8-bit CIELab TIFF (Pillow's writer) of the sRGB ``arr``, its Lab relative to sRGB's own white, D65 (no
    adaptation: that white is L* 100, a* b* 0), with a WhitePoint tag ``white_xy`` if given."""
    xyz = srgb_decode(arr / 255.0) @ rgb_to_xyz(BT709)
    t = xyz / D65_XYZ
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    lab = np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)
    # TIFF 6.0's CIELab, which Pillow's LAB mode shows numpy as it is: L* 0..100 as 0..255, a* and b* signed bytes
    codes = np.stack([np.clip(np.rint(lab[..., 0] * 255 / 100), 0, 255), np.rint(lab[..., 1]), np.rint(lab[..., 2])],
                     axis=-1)
    img = Image.fromarray(np.clip(codes, -128, 255).astype(np.int16).astype(np.uint8), "LAB")
    info = TiffImagePlugin.ImageFileDirectory_v2()
    if white_xy is not None:
        info[318] = white_xy
        info.tagtype[318] = TiffTags.RATIONAL
    buf = io.BytesIO()
    img.save(buf, format="TIFF", tiffinfo=info)
    return buf.getvalue()


def _patches() -> np.ndarray:
    """Skin, a saturated red, green, blue, yellow, cyan and neutrals: what a white point shifts most and least."""
    colours = [(224, 172, 150), (141, 85, 36), (230, 20, 20), (20, 200, 30), (30, 40, 210), (240, 220, 30),
               (30, 200, 210), (255, 255, 255), (128, 128, 128), (0, 0, 0)]
    return np.array(colours, np.uint8)[None].repeat(4, 0)


def test_a_d65_lab_tiff_comes_out_in_its_colours(caplog):
    """Lab was always taken as D50: a D65 Lab TIFF (its WhitePoint tag says so) came out with its colours shifted."""
    arr = _patches()
    data = _lab_tiff(arr, (0.3127, 0.3290))
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "LAB" and img.tag_v2[318] == pytest.approx((0.3127, 0.3290))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    assert not warnings_of(caplog)
    np.testing.assert_array_equal(out[:, 7], 255)  # its white is sRGB's white
    np.testing.assert_array_equal(out[:, 9], 0)
    diff = np.abs(out.astype(float) - arr)
    assert diff.max() <= 4 and diff.mean() < 1.0, (diff.max(), diff.mean(), out[0])  # 8-bit Lab's quantisation


def test_a_lab_tiff_tagged_d50_or_untagged_decodes_as_before():
    arr = _patches()
    untagged = load_image(_lab_tiff(arr))
    np.testing.assert_array_equal(load_image(_lab_tiff(arr, (0.3457, 0.3585))), untagged)


# --- 3. HDR: PQ and HLG tone mapped to sRGB --------------------------------------------------------------------------

REFERENCE_WHITE = 203.0  # cd/m2: BT.2408's HDR reference (diffuse) white
M1, M2 = 2610 / 16384, 2523 / 4096 * 128
C1, C2, C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32


def pq_signal(nits) -> np.ndarray:
    """SMPTE ST 2084's inverse EOTF: display light (cd/m2) -> signal 0..1."""
    y = (np.asarray(nits, float) / 10000) ** M1
    return ((C1 + C2 * y) / (1 + C3 * y)) ** M2


def hlg_signal(nits) -> np.ndarray:
    """BT.2100 HLG of BT.2020 RGB display light (cd/m2, (..., 3)) on a 1000 cd/m2 display: the inverse of its OOTF
    (Fd = 1000 Ys^0.2 Es, Ys the scene luminance) -> scene light -> ARIB STD-B67's OETF."""
    nits = np.asarray(nits, float)
    ys = np.maximum(nits @ [0.2627, 0.6780, 0.0593] / 1000, 1e-12) ** (1 / 1.2)
    e = nits / (1000 * ys[..., None] ** 0.2)
    a = 0.17883277
    b, c = 1 - 4 * a, 0.5 - a * np.log(4 * a)
    return np.where(e <= 1 / 12, np.sqrt(3 * e), a * np.log(np.maximum(12 * e - b, 1e-12)) + c)


GREY_NITS = 0.18 * REFERENCE_WHITE  # an 18 % grey card under the reference white's light
# black, mid grey, reference white, 406 and 1000 cd/m2 highlights, PQ's 10000 peak
LEVELS_NITS = np.array([0.0, GREY_NITS, REFERENCE_WHITE, 2 * REFERENCE_WHITE, 1000.0, 10000.0])
MID_GREY = 255 * srgb_encode(0.18)  # 117.7


def _bt2020_of_srgb(linear_srgb) -> np.ndarray:
    return np.asarray(linear_srgb, float) @ rgb_to_xyz(BT709) @ np.linalg.inv(rgb_to_xyz(BT2020))


SKIN = np.array([0.5, 0.25, 0.15])  # linear sRGB, of the reference white: inside sRGB's gamut, below any roll-off


def _hdr_pixels(signal, bits: int) -> np.ndarray:
    """The grey levels of ``LEVELS_NITS`` and the skin colour at the reference white's light, as (1, 7, 3) codes."""
    grey = signal(np.repeat(LEVELS_NITS[:, None], 3, 1))
    skin = signal(_bt2020_of_srgb(SKIN) * REFERENCE_WHITE)[None]
    scale = 255 if bits == 8 else 65535  # HLG's signal reaches 1 at its 1000 cd/m2 peak: brighter is clipped
    codes = np.rint(np.clip(np.concatenate([grey, skin])[None], 0, 1) * scale)
    return codes.astype(np.uint8 if bits == 8 else np.uint16)


def _assert_tone_mapped(out: np.ndarray, tolerance: float) -> None:
    """Black black, an 18 % grey at sRGB's mid grey, the reference white near white (not clipped dark), highlights
    rolled off in order up to white, and a skin colour's hue and level as in sRGB."""
    grey = out[0, :6].astype(float)
    assert np.ptp(grey, axis=1).max() <= 1, grey  # neutral stays neutral
    black, mid, white, brighter, peak, top = grey[:, 1]
    assert black == 0 and abs(mid - MID_GREY) <= tolerance, grey[:, 1]
    assert 245 <= white <= 253 and white < brighter <= peak <= top == 255 and peak >= 254, grey[:, 1]
    want_skin = 255 * srgb_encode(SKIN)
    assert np.abs(out[0, 6] - want_skin).max() <= tolerance, (out[0, 6], want_skin)


@pytest.mark.parametrize("bits", [8, 16])
@pytest.mark.parametrize(("transfer", "signal"), [(16, pq_signal), (18, hlg_signal)], ids=["pq", "hlg"])
def test_an_hdr_png_is_tone_mapped_to_srgb(transfer, signal, bits, caplog):
    """An HDR screenshot or export (cICP 9/16: BT.2020 PQ, 9/18: HLG) was decoded with its raw values and a warning:
    a face at the reference white came out at a third of its brightness (PQ 203 cd/m2 is code 148 of 255)."""
    pixels = _hdr_pixels(signal, bits)
    data = _png(pixels, _cicp(9, transfer)) if bits == 8 else _png16(pixels, _cicp(9, transfer))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    assert not warnings_of(caplog)
    _assert_tone_mapped(out, tolerance=2.5 if bits == 8 else 1.0)


def test_an_hdr_png_with_srgb_primaries_and_a_grey_one_are_tone_mapped():
    grey = _hdr_pixels(pq_signal, 16)[0, :6, 0]  # PQ is per channel: the same for grey
    out = load_image(_png16(grey[None], _cicp(9, 16)))
    np.testing.assert_array_equal(out[0, :, 0], out[0, :, 2])
    assert abs(out[0, 1, 0] - MID_GREY) <= 1 and out[0, 0, 0] == 0 and out[0, 2, 0] >= 245
    skin = np.rint(pq_signal(SKIN * REFERENCE_WHITE) * 255).astype(np.uint8)  # BT.709 primaries: sRGB's
    out = load_image(_png(skin[None, None], _cicp(1, 16)))
    assert np.abs(out[0, 0] - 255 * srgb_encode(SKIN)).max() <= 2.5, out[0, 0]


def test_a_narrow_range_hdr_png_is_expanded_then_tone_mapped():
    """ffmpeg's HDR frame grab: BT.2020 PQ, narrow range (10-bit 64..940 scaled to 16 bits)."""
    pixels = _hdr_pixels(pq_signal, 16).astype(float) / 65535
    narrow = np.rint((64 + pixels * 876) * 64).astype(np.uint16)
    _assert_tone_mapped(load_image(_png16(narrow, _cicp(9, 16, full_range=0))), tolerance=1.0)


def test_an_hdr_avif_is_tone_mapped_to_srgb(caplog):
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF support")
    pixels = np.repeat(np.repeat(_hdr_pixels(pq_signal, 8), 16, 0), 16, 1)  # flat 16x16 patches: lossy coding
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(avif_with(pixels, 9, 16))
    assert not warnings_of(caplog)
    _assert_tone_mapped(out[8::16, 8::16], tolerance=8)  # lossy, 4:2:0 YCbCr of 8-bit PQ: ~3 codes


def test_an_hdr_heic_is_tone_mapped_to_srgb(heic_writer, caplog):
    pixels = np.repeat(np.repeat(_hdr_pixels(hlg_signal, 8), 8, 0), 8, 1)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(heic_with(pixels, 9, 18))
    assert not warnings_of(caplog)
    _assert_tone_mapped(out[4::8, 4::8], tolerance=3)


# --- the real photos: not one pixel changed ------------------------------------------------------------------------

# SHA-256 (first 16 hex digits) of each decoded photo of shared/datasets/wild, before round 34's changes.
WILD_BEFORE = {
    "derived_alpha_obama.png": "480x854:391fb5a3a5e165ab",
    "derived_cmyk_pexels-834863.jpg": "640x960:84e5284f41e339fd",
    "derived_empty.jpg": "error:ImageDecodeError",
    "derived_exif6_two_people.jpg": "661x1126:e33a1e07bb1d7c80",
    "derived_exif8_obama.jpg": "480x853:45bac8b350870608",
    "derived_gray16_astronaut.png": "512x512:280a842fb3f0fef0",
    "derived_gray_pexels-2672979.jpg": "620x960:da4858650dc8d45b",
    "derived_large_6000x3375_pexels-214576.jpg": "3375x6000:83dd7c01ba6d4360",
    "derived_not_an_image.jpg": "error:ImageDecodeError",
    "derived_obama_small.webp": "240x320:b26a634ad5ff9634",
    "derived_truncated_obama-480p.jpg": "error:ImageDecodeError",
    "dlib_2007_007763.jpg": "375x500:b16b1ba918182a86",
    "dlib_2008_001009.jpg": "480x360:c49debd0174ebff6",
    "dlib_2008_001322.jpg": "375x500:5e7e4e75bc00f746",
    "dlib_2008_002079.jpg": "375x500:7632fc6e025c59bb",
    "dlib_2008_002470.jpg": "332x500:7375f998b97ecd7f",
    "dlib_2008_002506.jpg": "375x500:21ea68694d0c6686",
    "dlib_2008_004176.jpg": "438x480:bd353e13bc6e2338",
    "dlib_2008_007676.jpg": "334x500:78cc1da02da6fb05",
    "dlib_Tom_Cruise_avp_2014_4.jpg": "800x565:b106737b4031cb20",
    "dlib_bald_guys.jpg": "1545x1986:db644a1648c3076f",
    "dlib_dogs.jpg": "916x900:594e39d3ecee106f",
    "dlib_elon-musk-smoke.gif": "272x480:f689988f5e18288b",
    "fr_alex-lacamoire.png": "394x424:d8a59b02b3d38e72",
    "fr_biden.jpg": "2204x970:4fa33c4b39578062",
    "fr_johnsnow_test1.jpg": "1154x768:324c888b77f73ad5",
    "fr_lin-manuel-miranda.png": "612x704:45782e17c791ddc3",
    "fr_obama-1080p.jpg": "1080x1920:2c2a897cc8354252",
    "fr_obama-240p.jpg": "240x427:3655be27574ea5b6",
    "fr_obama.jpg": "1137x910:fc008c49b09a2c26",
    "fr_obama_and_biden.jpg": "1428x2000:f041c597c7be3c4c",
    "fr_obama_small.jpg": "240x320:53a174e2bb2d95c7",
    "fr_rose_leslie_img2.jpg": "880x577:21af06f6d731c43a",
    "fr_two_people.jpg": "661x1126:eb2eb96fef33a020",
    "pexels-andrea-piacquadio-2672979.jpg": "1241x1920:d23150f63fcc2c7e",
    "pexels-andrea-piacquadio-774909.jpg": "1920x1280:4b7e57f7b1dd0de8",
    "pexels-andrea-piacquadio-834863.jpg": "1279x1920:4da54d2349d6f37e",
    "pexels-mentatdgt-937416.jpg": "2878x1920:54351ce58d50f0d3",
    "pexels-sebastian-voortman-214576.jpg": "1080x1920:1b5502107df14906",
    "skimage_astronaut.png": "512x512:a8c429c18afa7b0f",
    "skimage_brick.png": "512x512:3501e216fb0968c3",
    "skimage_camera.png": "512x512:13e2b4aa92cb1649",
    "skimage_chelsea.png": "300x451:416b729128bfb2c3",
    "skimage_coffee.png": "400x600:0ce2b51640b9c95f",
    "skimage_coins.png": "303x384:aaecc2ad43bd43e2",
    "skimage_hubble_deep_field.jpg": "872x1000:9a3ea9548188f81e",
    "skimage_ihc.png": "512x512:c5b3ef509a92f16d",
    "skimage_logo.png": "500x500:17be4850288aa25b",
    "skimage_moon.png": "512x512:a641c47851a3252e",
    "skimage_retina.jpg": "1411x1411:3670e389d0dae9f7",
    "skimage_rocket.jpg": "427x640:3fb47bc912f5cb89",
}


def _decoded(path) -> str:
    from faceage.images import ImageDecodeError

    try:
        arr = load_image(path)
    except ImageDecodeError as e:
        return f"error:{type(e).__name__}"
    return f"{arr.shape[0]}x{arr.shape[1]}:{hashlib.sha256(arr.tobytes()).hexdigest()[:16]}"


def test_every_real_photo_decodes_to_the_same_pixels_as_before(wild_dir):
    now = {p.name: _decoded(p) for p in sorted(wild_dir.iterdir()) if p.name != "labels.csv"}
    assert len(now) == 51
    changed = {name: (WILD_BEFORE.get(name), got) for name, got in now.items() if WILD_BEFORE.get(name) != got}
    assert not changed, changed


def test_a_narrow_range_or_hdr_png_is_turned_upright_by_its_exif_orientation():
    """The decoded values replace the image Pillow decoded: its EXIF (orientation 6: turned 90 degrees) goes too."""
    exif = Image.Exif()
    exif[0x0112] = 6
    narrow = np.zeros((2, 4, 3), np.uint8) + 16
    narrow[0, 0] = 235
    out = load_image(_png(narrow, _cicp(1, 13, full_range=0), exif=exif.tobytes()))
    assert out.shape == (4, 2, 3) and (out[0, 1] == 255).all() and out.sum() == 3 * 255
    hdr = _hdr_pixels(pq_signal, 8)[:, :2].repeat(2, 0)  # black and mid grey
    out = load_image(_png(hdr, _cicp(9, 16), exif=exif.tobytes()))
    assert out.shape == (2, 2, 3) and (out[0] == 0).all() and (out[1] > 100).all(), out[..., 0]  # columns: rows
