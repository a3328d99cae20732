"""Round 33, photos whose colours were decoded wrongly: CIELab TIFFs (a profile that came with one was "ignored"
while its pixels were converted, and the variants Pillow cannot read were called "not an image"), and PNGs tagged
by their colour chunks alone: cICP (PNG 3rd edition: Display P3, BT.2020, HDR) and cHRM/gAMA with no ICC profile
and no sRGB chunk, all decoded as sRGB.

Every file is written here byte by byte (PNG chunks with their CRCs, TIFF directories), the expected colours
computed with numpy from the published colour-space definitions, not by the code under test."""

from __future__ import annotations

import io
import logging
import struct
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms

from faceage.images import ImageDecodeError, load_image
from tests.unit.test_images_r31 import (BT709, BT2020, DISPLAY_P3, photo, rgb_to_xyz, srgb_decode, srgb_encode,
                                        warnings_of)

ADOBE_RGB = ((0.64, 0.33), (0.21, 0.71), (0.15, 0.06))


def _srgb_from(raw: np.ndarray, primaries, decode, white=(0.3127, 0.3290)) -> np.ndarray:
    """What ``raw`` (values in the colour space of ``primaries`` and transfer ``decode``) is in sRGB, 0..255 floats:
    relative colorimetric, the white of the one mapped onto sRGB's (von Kries in XYZ is enough for a D65 white)."""
    linear = decode(raw.astype(np.float64) / 255)
    return 255 * srgb_encode(linear @ rgb_to_xyz(primaries, white) @ np.linalg.inv(rgb_to_xyz(BT709)))


# --- PNG files and their chunks ---------------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(arr: np.ndarray, *chunks: bytes, **save) -> bytes:
    """A PNG of ``arr`` (Pillow's encoder), ``chunks`` put right after its IHDR, where colour chunks go."""
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", **save)
    data = buf.getvalue()
    assert data[12:16] == b"IHDR"
    return data[:33] + b"".join(chunks) + data[33:]


def _gama(gamma: float) -> bytes:
    return _chunk(b"gAMA", struct.pack(">I", round(gamma * 100000)))


def _chrm(primaries, white=(0.3127, 0.3290)) -> bytes:
    values = [white, *primaries]
    return _chunk(b"cHRM", struct.pack(">8I", *(round(v * 100000) for xy in values for v in xy)))


def _cicp(primaries: int, transfer: int, full_range: int = 1) -> bytes:
    return _chunk(b"cICP", bytes([primaries, transfer, 0, full_range]))


def test_the_chunk_writer_makes_pngs_pillow_reads_with_their_chunks():
    data = _png(photo(), _gama(1.0), _chrm(ADOBE_RGB))
    with Image.open(io.BytesIO(data)) as img:
        img.load()  # Pillow checks each chunk's CRC
        assert img.info["gamma"] == 1.0 and img.info["chromaticity"][2:4] == (0.64, 0.33)
        np.testing.assert_array_equal(np.asarray(img), photo())


def _raw(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def _assert_close(out: np.ndarray, want: np.ndarray, max_levels: float = 2.0, mean_levels: float = 0.6) -> None:
    diff = np.abs(out.astype(float) - want)
    assert diff.max() <= max_levels and diff.mean() < mean_levels, (diff.max(), diff.mean())


@pytest.mark.parametrize(("code", "primaries"), [(12, DISPLAY_P3), (9, BT2020)], ids=["display-p3", "bt2020"])
def test_a_png_tagged_by_cicp_is_converted_to_srgb(code, primaries, caplog):
    """A cICP chunk (PNG 3rd edition: Chrome, Photoshop and libpng 1.6.45 write it) was not read at all: a Display
    P3 or BT.2020 screenshot came out with its raw values, saturated colours tens of levels off."""
    data = _png(photo(), _cicp(code, 13))
    raw = _raw(data)
    want = _srgb_from(raw, primaries, srgb_decode)
    assert np.abs(want - raw).max() > 20
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        _assert_close(load_image(data), want)
    assert not warnings_of(caplog)


@pytest.mark.parametrize(("code", "transfer"), [(1, 13), (1, 1), (2, 2)], ids=["srgb", "bt709", "unspecified"])
def test_a_png_tagged_srgb_by_cicp_keeps_its_values(code, transfer, caplog):
    data = _png(photo(), _cicp(code, transfer))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), photo())
    assert not warnings_of(caplog)


@pytest.mark.parametrize(("code", "transfer"), [(9, 16), (9, 18), (1, 16)], ids=["bt2020-pq", "bt2020-hlg", "bt709-pq"])
def test_an_hdr_png_is_tone_mapped_without_a_warning(code, transfer, caplog):
    """HDR is tone mapped to sRGB (tests/unit/test_images_r34.py checks its levels): not the raw values, which a
    PQ photo tagged with sRGB's primaries (BT.709) once gave, silently."""
    data = _png(photo(), _cicp(code, transfer))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    assert out.shape == photo().shape and (out.astype(int) - photo()).any()
    assert not warnings_of(caplog)


def test_an_hdr_png_with_primaries_not_converted_is_decoded_with_one_warning_naming_its_cicp_chunk(caplog):
    """Primaries that name no colour space here (3 is reserved in H.273): the raw values, with one warning naming
    the chunk, as for an ICC profile that cannot be used."""
    data = _png(photo(), _cicp(3, 16))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), photo())
    [warned] = warnings_of(caplog)
    assert "cICP" in warned and "primaries 3" in warned, warned


def test_cicp_wins_over_an_icc_profile_as_png_3rd_edition_says():
    """PNG 3rd edition, 4.3: cICP first, then iCCP; a browser shows such a file by its cICP."""
    from tests.unit.test_images_r26 import ADOBE_GAMMA, _gamma, rgb_profile
    from tests.unit.test_images_r26 import ADOBE_RGB as ADOBE_COLORANTS

    icc = rgb_profile(ADOBE_COLORANTS, _gamma(ADOBE_GAMMA))
    data = _png(photo(), _cicp(12, 13), icc_profile=icc)
    with Image.open(io.BytesIO(data)) as img:
        assert img.info["icc_profile"] == icc
    _assert_close(load_image(data), _srgb_from(photo(), DISPLAY_P3, srgb_decode))


def _gamma_decode(exponent: float):
    return lambda v: v ** exponent


@pytest.mark.parametrize(("gamma", "exponent"), [(1.0, 1.0), (1 / 1.8, 1.8)], ids=["linear", "mac-1.8"])
def test_a_png_with_a_gama_chunk_alone_is_decoded_by_its_gamma(gamma, exponent, caplog):
    """gAMA 1.0 (linear values, as some renderers and scientific tools write) or 1/1.8 (old Mac) with no profile
    and no sRGB chunk: browsers decode by it; here they were taken for sRGB, a mid grey 60 levels too dark."""
    arr = photo()
    data = _png(arr, _gama(gamma))
    want = _srgb_from(arr, BT709, _gamma_decode(exponent))
    assert np.abs(want - arr).max() > 15
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        _assert_close(load_image(data), want)
    assert not warnings_of(caplog)


def test_a_grey_png_with_a_gama_chunk_alone_is_decoded_by_its_gamma():
    ramp = np.tile(np.arange(256, dtype=np.uint8), (4, 1))
    data = _png(ramp, _gama(1.0))
    want = 255 * srgb_encode(ramp / 255.0)
    out = load_image(data)
    assert out.shape == (4, 256, 3)
    _assert_close(out, want[..., None].repeat(3, axis=2))


def test_a_png_with_chrm_and_gama_of_adobe_rgb_is_converted_to_srgb(caplog):
    """A converter that writes the colour space as cHRM + gAMA, not as an ICC profile (the PNG 1.2 way)."""
    arr = photo()
    data = _png(arr, _gama(1 / 2.2), _chrm(ADOBE_RGB))
    want = _srgb_from(arr, ADOBE_RGB, _gamma_decode(2.2))
    assert np.abs(want - arr).max() > 20
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        _assert_close(load_image(data), want)
    assert not warnings_of(caplog)


@pytest.mark.parametrize("chunks", [
    [_gama(1 / 2.2)], [_gama(0.45454)], [_gama(1 / 2.2), _chrm(BT709)], [_chrm(BT709)],
    [_chunk(b"sRGB", b"\0"), _gama(1.0), _chrm(ADOBE_RGB)],  # sRGB wins over cHRM and gAMA
], ids=["gama-2.2", "gama-45454", "srgb-chrm-and-gama", "srgb-chrm", "srgb-chunk"])
def test_a_png_whose_chunks_say_srgb_keeps_its_values(chunks, caplog):
    """gAMA 1/2.2 is what libpng writes for sRGB: no conversion (the 2.2 curve and sRGB's differ by a few
    levels in the shadows, which no viewer shows)."""
    data = _png(photo(), *chunks)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), photo())
    assert not warnings_of(caplog)


def test_an_icc_profile_wins_over_gama_and_chrm():
    from tests.unit.test_images_r26 import ADOBE_GAMMA, _gamma, rgb_profile
    from tests.unit.test_images_r26 import ADOBE_RGB as ADOBE_COLORANTS

    icc = rgb_profile(ADOBE_COLORANTS, _gamma(ADOBE_GAMMA))
    plain = _png(photo(), icc_profile=icc)
    tagged = _png(photo(), _gama(1.0), _chrm(DISPLAY_P3), icc_profile=icc)
    np.testing.assert_array_equal(load_image(tagged), load_image(plain))


def test_a_nonsense_chrm_chunk_is_ignored_with_one_warning(caplog):
    data = _png(photo(), _chunk(b"cHRM", bytes(32)))  # all zero: no colour space
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), photo())
    [warned] = warnings_of(caplog)
    assert "cHRM" in warned, warned


# --- CIELab TIFFs -------------------------------------------------------------------------------------------------

_D50 = (0.3457, 0.3585)


def _lab_d50(arr: np.ndarray) -> np.ndarray:
    """CIE L*a*b* (D50, as TIFF and Photoshop hold it) of sRGB values: XYZ adapted to D50 by Bradford."""
    bradford = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
    d65 = np.array([0.3127 / 0.3290, 1.0, (1 - 0.3127 - 0.3290) / 0.3290])
    d50 = np.array([0.9642, 1.0, 0.8249])
    adapt = np.linalg.inv(bradford) @ np.diag((bradford @ d50) / (bradford @ d65)) @ bradford
    xyz = srgb_decode(arr / 255.0) @ rgb_to_xyz(BT709) @ adapt.T
    t = xyz / d50
    f = np.where(t > (6 / 29) ** 3, np.cbrt(t), t / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], axis=-1)


def _tiff(data: bytes, width: int, height: int, photometric: int, bits=(8, 8, 8), extra=()) -> bytes:
    """A little-endian, uncompressed, one-strip TIFF (TIFF 6.0), its pixels ``data``."""
    tags = {256: (4, [width]), 257: (4, [height]), 258: (3, list(bits)), 259: (3, [1]), 262: (3, [photometric]),
            273: (4, [0]), 277: (3, [len(bits)]), 278: (4, [height]), 279: (4, [len(data)]), 284: (3, [1])}
    if extra:
        tags[338] = (3, list(extra))
    ifd_end = 8 + 2 + 12 * len(tags) + 4
    blobs = b""
    entries = []
    for tag, (kind, values) in sorted(tags.items()):
        packed = struct.pack(f"<{len(values)}{'H' if kind == 3 else 'I'}", *values)
        if len(packed) > 4:
            entries.append((tag, kind, len(values), struct.pack("<I", ifd_end + len(blobs))))
            blobs += packed
        else:
            entries.append((tag, kind, len(values), packed.ljust(4, b"\0")))
    strip = ifd_end + len(blobs)
    ifd = struct.pack("<H", len(entries)) + b"".join(
        struct.pack("<HHI", tag, kind, count) + (struct.pack("<I", strip) if tag == 273 else value)
        for tag, kind, count, value in entries) + b"\0\0\0\0"
    return b"II*\0" + struct.pack("<I", 8) + ifd + blobs + data


def _cielab_tiff(arr: np.ndarray) -> bytes:
    """CIELab as TIFF 6.0 section 23 stores it: L* 0..100 as 0..255, a* and b* signed bytes."""
    lab = _lab_d50(arr)
    codes = np.stack([np.rint(lab[..., 0] * 255 / 100), np.rint(lab[..., 1]), np.rint(lab[..., 2])], axis=-1)
    return _tiff(np.clip(codes, -128, 255).astype(np.int16).astype(np.uint8).tobytes(), arr.shape[1], arr.shape[0], 8)


def test_a_cielab_tiff_comes_out_in_its_srgb_colours(caplog):
    arr = photo()
    data = _cielab_tiff(arr)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "LAB"
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    # 8-bit Lab: a level of L* is 0.4, of a* and b* 1.0; a few sRGB levels in dark saturated colours
    _assert_close(out, arr, max_levels=6, mean_levels=1.0)
    assert not warnings_of(caplog)


def test_a_cielab_tiff_with_its_lab_profile_is_converted_without_a_false_warning(caplog):
    """A Lab TIFF written through lcms (Pillow's ImageCms, as the brief's user did) embeds its Lab profile: the
    log said "ignored the ICC colour profile ... (ValueError: no colour management for LAB images); its colours are
    not converted to sRGB", of a photo whose colours were converted."""
    arr = photo()
    to_lab = ImageCms.buildTransform(ImageCms.createProfile("sRGB"), ImageCms.createProfile("LAB"), "RGB", "LAB")
    lab = ImageCms.applyTransform(Image.fromarray(arr), to_lab)
    buf = io.BytesIO()
    lab.save(buf, format="TIFF")
    with Image.open(io.BytesIO(buf.getvalue())) as img:
        assert img.mode == "LAB" and img.info["icc_profile"][16:20] == b"Lab "
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(buf.getvalue())
    _assert_close(out, arr, max_levels=6, mean_levels=1.0)
    assert not warnings_of(caplog)


def test_a_photoshop_lab_file_comes_out_in_its_srgb_colours():
    """Photoshop's Lab mode (9): L* and a*, b* + 128 in unsigned bytes, one plane after the other."""
    arr = photo()
    lab = _lab_d50(arr)
    planes = [np.rint(lab[..., 0] * 255 / 100), np.rint(lab[..., 1]) + 128, np.rint(lab[..., 2]) + 128]
    h, w = arr.shape[:2]
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, 3, h, w, 8, 9)
    data = header + struct.pack(">IIIH", 0, 0, 0, 0) + b"".join(np.clip(p, 0, 255).astype(np.uint8).tobytes()
                                                                 for p in planes)
    _assert_close(load_image(data), arr, max_levels=6, mean_levels=1.0)


@pytest.mark.parametrize(("photometric", "bits", "extra", "said"), [
    (8, (16, 16, 16), (), "CIELab"),  # Photoshop's 16-bit Lab
    (8, (8, 8, 8, 8), (2,), "CIELab"),  # with alpha
    (9, (8, 8, 8), (), "ICCLab"),
    (10, (8, 8, 8), (), "ITULab"),
], ids=["16-bit", "alpha", "icclab", "itulab"])
def test_a_lab_tiff_pillow_cannot_read_is_refused_naming_its_colour_space(photometric, bits, extra, said):
    """They were refused as "not an image (unknown format)": a user took a valid Lab photo for a corrupt file."""
    size = 4 * 2 * len(bits) * bits[0] // 8
    data = _tiff(bytes(size), 4, 2, photometric, bits, extra)
    with pytest.raises(ImageDecodeError) as e:
        load_image(data)
    message = str(e.value)
    assert said in message and "unknown format" not in message and "\n" not in message, message
    assert "RGB" in message, message  # what to do instead


def test_a_png_tagged_linear_by_cicp_is_decoded_as_linear_from_a_path(tmp_path):
    """cICP 1/8: sRGB's primaries, linear values (a renderer's output); read from a file (the chunk is looked for
    in the opened file, as in uploaded bytes). An AVIF or HEIC tagged so by nclx is converted the same way."""
    path = tmp_path / "linear.png"
    path.write_bytes(_png(photo(), _cicp(1, 8)))
    _assert_close(load_image(path), _srgb_from(photo(), BT709, _gamma_decode(1.0)))


def test_a_16_bit_grey_png_with_a_gama_chunk_is_decoded_by_its_gamma():
    ramp = np.tile(np.arange(0, 65536, 257, dtype=np.uint16), (4, 1))
    buf = io.BytesIO()
    Image.fromarray(ramp).save(buf, format="PNG")
    data = buf.getvalue()
    data = data[:33] + _gama(1.0) + data[33:]
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode.startswith("I") and img.info["gamma"] == 1.0
    want = 255 * srgb_encode(np.arange(256) / 255.0)
    _assert_close(load_image(data)[0], want[:, None].repeat(3, axis=1))
