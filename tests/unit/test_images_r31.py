"""Round 31: a HEIC photo colour-tagged by an nclx box alone (colour primaries and transfer, no ICC profile), as
libheif, Android phones and image editors write them, is converted to sRGB like one tagged with the ICC profile
of the same colour space; the colours expected are computed here in numpy from ITU-T H.273's primaries and
transfer functions, not by lcms.

The HEIC files are written with pillow-heif's encoder (the test extras), lossless 4:4:4; the expected colours
are computed from the codec's own pixels (read without any colour conversion), so only the conversion is
compared.
"""

import io
import logging

import numpy as np
import pytest
from PIL import Image

import faceage.images
from faceage.images import load_image

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (the test extras) writes the HEIC files")


@pytest.fixture(autouse=True)
def heic_writer():
    """pillow-heif's registration takes HEIF's opener too: faceage's (pi-heif's) is put back."""
    pillow_heif.register_heif_opener()
    faceage.images._register_heif()
    yield


# H.273 chromaticities (x, y) of red, green, blue; all three spaces have D65's white.
BT709 = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06))
DISPLAY_P3 = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
BT2020 = ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046))
D65 = (0.3127, 0.3290)


def rgb_to_xyz(primaries, white=D65) -> np.ndarray:
    """The matrix taking linear RGB (rows: pixels) to XYZ, white at Y = 1."""
    xyz = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in primaries])  # rows: R, G, B
    wx, wy = white
    w = np.array([wx / wy, 1.0, (1 - wx - wy) / wy])
    return xyz * np.linalg.solve(xyz.T, w)[:, None]


def srgb_decode(v):
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(y):
    y = np.clip(y, 0, 1)
    return np.where(y <= 0.0031308, y * 12.92, 1.055 * y ** (1 / 2.4) - 0.055)


def bt709_decode(v):
    """The inverse of BT.709's (and BT.2020's) opto-electronic transfer function."""
    return np.where(v < 0.081, v / 4.5, ((v + 0.099) / 1.099) ** (1 / 0.45))


def to_srgb(raw: np.ndarray, primaries, decode) -> np.ndarray:
    linear = decode(raw.astype(np.float64) / 255)
    return 255 * srgb_encode(linear @ rgb_to_xyz(primaries) @ np.linalg.inv(rgb_to_xyz(BT709)))


def heic_with(arr: np.ndarray, primaries: int, transfer: int, matrix: int = 1) -> bytes:
    buf = io.BytesIO()
    nclx = {"color_primaries": primaries, "transfer_characteristics": transfer, "matrix_coefficients": matrix,
            "full_range_flag": 1}
    Image.fromarray(arr).save(buf, format="HEIF", quality=-1, chroma=444, nclx_profile=nclx)
    return buf.getvalue()


def raw_pixels(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        assert "icc_profile" not in img.info or not img.info["icc_profile"]
        return np.asarray(img.convert("RGB"))


def photo() -> np.ndarray:
    """A real face (public domain) and a saturated red and green: skin and the colours a gamut changes most."""
    from skimage import data

    arr = np.asarray(Image.fromarray(data.astronaut()).resize((96, 64), Image.Resampling.BILINEAR)).copy()
    arr[:8, :16] = (230, 20, 20)
    arr[:8, 16:32] = (20, 200, 30)
    return arr


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "faceage.images" and r.levelno >= logging.WARNING]


@pytest.mark.parametrize(("code", "primaries", "transfer", "decode"), [
    (12, DISPLAY_P3, 13, srgb_decode),  # Display P3: iPhone/Android wide-colour photos
    (12, DISPLAY_P3, 2, srgb_decode),  # transfer unspecified: sRGB's, as for an untagged photo
    (9, BT2020, 1, bt709_decode),  # BT.2020 SDR, as BT.709's transfer
    (9, BT2020, 14, bt709_decode),  # BT.2020 10-bit's transfer: the same function
], ids=["display-p3", "p3-transfer-unspecified", "bt2020-bt709-transfer", "bt2020-10bit-transfer"])
def test_a_heic_tagged_by_nclx_alone_is_converted_to_srgb(code, primaries, transfer, decode, caplog):
    """Such a photo came out with its raw values: P3's skin a few levels off, its saturated colours tens."""
    data = heic_with(photo(), code, transfer)
    raw = raw_pixels(data)
    want = to_srgb(raw, primaries, decode)
    assert np.abs(want - raw).max() > 20  # the conversion does change the colours
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    diff = np.abs(out.astype(float) - want)
    assert diff.max() <= 2.0 and diff.mean() < 0.6, (diff.max(), diff.mean())
    assert not warnings_of(caplog)


@pytest.mark.parametrize(("code", "transfer"), [(1, 13), (1, 1), (2, 2), (1, 2)],
                         ids=["bt709-srgb", "bt709-bt709", "unspecified", "bt709-transfer-unspecified"])
def test_a_heic_tagged_bt709_or_unspecified_keeps_its_values(code, transfer, caplog):
    """sRGB's primaries (what every camera JPEG is taken as): the codec's pixels as they are."""
    data = heic_with(photo(), code, transfer)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(data), raw_pixels(data))
    assert not warnings_of(caplog)


def test_an_hdr_heic_with_primaries_not_converted_is_decoded_with_one_warning_not_failed(caplog, tmp_path):
    """A PQ (HDR) photo is tone mapped (tests/unit/test_images_r34.py); one whose primaries are not converted here
    (10, CIE XYZ) cannot be: the raw values, with one log line naming the file, as for an ICC profile that cannot
    be used."""
    path = tmp_path / "hdr.heic"
    path.write_bytes(heic_with(photo(), 10, 16, 9))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(path)
    np.testing.assert_array_equal(out, raw_pixels(path.read_bytes()))
    warned = warnings_of(caplog)
    assert len(warned) == 1 and str(path) in warned[0] and "primaries" in warned[0], warned


def test_an_icc_profile_wins_over_the_nclx_box():
    """A file with both (iPhones write an ICC profile): the ICC profile describes the pixels, as libheif says."""
    arr = photo()
    buf = io.BytesIO()
    srgb = faceage.images.ImageCms.ImageCmsProfile(faceage.images.ImageCms.createProfile("sRGB")).tobytes()
    nclx = {"color_primaries": 12, "transfer_characteristics": 13, "matrix_coefficients": 1, "full_range_flag": 1}
    Image.fromarray(arr).save(buf, format="HEIF", quality=-1, chroma=444, icc_profile=srgb, nclx_profile=nclx)
    data = buf.getvalue()
    with Image.open(io.BytesIO(data)) as img:
        if not img.info.get("icc_profile"):
            pytest.skip("this libheif keeps one colour box only")
        raw = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_image(data), raw)


# --- Photoshop files ---------------------------------------------------------------------------------------

def psd(arr: np.ndarray) -> bytes:
    """A Photoshop file as Photoshop writes one without layers: header, empty colour-mode, resource and layer
    sections, then the merged image, raw, one channel after the other (Adobe's PSD specification)."""
    import struct

    h, w, channels = arr.shape
    header = b"8BPS" + struct.pack(">H6xHIIHH", 1, channels, h, w, 8, 3)  # version 1, 8 bits, RGB
    planes = b"".join(np.ascontiguousarray(arr[..., c]).tobytes() for c in range(channels))
    return header + struct.pack(">III", 0, 0, 0) + struct.pack(">H", 0) + planes


def test_a_photoshop_file_decodes_to_its_merged_image():
    """Every PSD failed: "cannot decode ...: EOFError: attempt to seek outside sequence" (Pillow opens a PSD on
    its merged image, numbered 1, and seeking to 0 is refused)."""
    arr = photo()
    data = psd(arr)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PSD" and img.size == (96, 64)
    np.testing.assert_array_equal(load_image(data), arr)


# --- the ICC conversion, in place ----------------------------------------------------------------------------

def test_an_rgb_photo_converted_in_place_has_lcms_own_pixels():
    """An RGB photo's colours are converted in its own decoded copy (a 20 MP photo: 60 MB and a copy less):
    the very pixels lcms gives into a new image, and the photo's raw values are not what comes out."""
    from PIL import ImageCms

    from tests.unit.test_images_r26 import ADOBE_GAMMA, ADOBE_RGB, _gamma, rgb_profile

    arr = photo()
    icc = rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG", icc_profile=icc)
    transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), faceage.images._srgb_profile(),
                                        "RGB", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                        flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)
    want = np.asarray(ImageCms.applyTransform(Image.fromarray(arr), transform))
    out = load_image(buf.getvalue())
    np.testing.assert_array_equal(out, want)
    assert np.abs(out.astype(int) - arr).max() > 20


# --- AVIF: Pillow's own plugin reads no nclx box -------------------------------------------------------------

def avif_with(arr: np.ndarray, primaries: int, transfer: int) -> bytes:
    """An AVIF written by Pillow (libavif), its nclx colour box then retagged: the pixels coded are the same,
    only the colour space they are said to be in changes."""
    import struct

    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="AVIF", quality=95)
    data = bytearray(buf.getvalue())
    at = data.find(b"colrnclx")
    assert at > 0 and data.find(b"colrnclx", at + 1) < 0
    struct.pack_into(">HH", data, at + 8, primaries, transfer)
    return bytes(data)


@pytest.mark.parametrize(("code", "primaries", "transfer", "decode"), [
    (12, DISPLAY_P3, 13, srgb_decode), (9, BT2020, 1, bt709_decode)], ids=["display-p3", "bt2020"])
def test_an_avif_tagged_by_nclx_is_converted_to_srgb(code, primaries, transfer, decode, caplog):
    """AVIF photos are tagged so as a rule (Android, browsers' exports): they came out with their raw values."""
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow decodes no AVIF")
    data = avif_with(photo(), code, transfer)
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "AVIF" and not img.info.get("icc_profile")
        raw = np.asarray(img.convert("RGB"))
    want = to_srgb(raw, primaries, decode)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    diff = np.abs(out.astype(float) - want)
    assert diff.max() <= 2.0 and diff.mean() < 0.6, (diff.max(), diff.mean())
    assert not warnings_of(caplog)


def test_an_avif_tagged_bt709_keeps_its_values():
    from PIL import features

    if not features.check("avif"):
        pytest.skip("this Pillow decodes no AVIF")
    data = avif_with(photo(), 1, 13)
    with Image.open(io.BytesIO(data)) as img:
        raw = np.asarray(img.convert("RGB"))
    np.testing.assert_array_equal(load_image(data), raw)
