"""load_image converts a photo tagged with an ICC profile other than sRGB (Adobe RGB, Display P3, a CMYK
print profile, a grey gamma) to sRGB; untagged and sRGB-tagged photos keep their pixels, and a profile
that cannot be used keeps the raw values with one log line.

The profiles are written here (ICC.1 v2: a matrix/curve RGB or grey profile, a lut8 CMYK one), and the
expected colours come from the ICC equations in numpy, not from lcms.
"""

import io
import logging
import struct

import numpy as np
import pytest
from PIL import Image, ImageCms

import faceage.images as images
from faceage.images import icc_profile_bytes, load_image
from tests.unit.test_images import exif_jpeg

D50 = (0.9642, 1.0, 0.8249)
SRGB = ((0.4361, 0.2225, 0.0139), (0.3851, 0.7169, 0.0971), (0.1431, 0.0606, 0.7141))  # rXYZ, gXYZ, bXYZ (D50)
ADOBE_RGB = ((0.6097, 0.3111, 0.0195), (0.2053, 0.6257, 0.0609), (0.1492, 0.0632, 0.7446))
DISPLAY_P3 = ((0.5151, 0.2412, -0.0011), (0.2920, 0.6922, 0.0419), (0.1571, 0.0666, 0.7841))
ADOBE_GAMMA = 563 / 256  # 2.19921875, as Adobe RGB (1998) profiles store it


# --- ICC profiles, byte by byte ----------------------------------------------------------------------

def _s15(*values: float) -> bytes:
    return struct.pack(f">{len(values)}i", *(round(v * 65536) for v in values))


def _desc(text: str) -> bytes:
    ascii_ = text.encode() + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(ascii_)) + ascii_ + b"\0" * (4 + 4 + 2 + 1 + 67)


def _xyz(xyz) -> bytes:
    return b"XYZ \0\0\0\0" + _s15(*xyz)


def _gamma(g: float) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">IH", 1, round(g * 256)) + b"\0\0"


def _table(values: np.ndarray) -> bytes:
    return b"curv\0\0\0\0" + struct.pack(">I", len(values)) + np.rint(values * 65535).astype(">u2").tobytes()


def srgb_decode(v):
    v = np.asarray(v, dtype=np.float64)
    return np.where(v <= 0.04045, v / 12.92, ((v + 0.055) / 1.055) ** 2.4)


def srgb_encode(y):
    y = np.clip(np.asarray(y, dtype=np.float64), 0, 1)
    return np.where(y <= 0.0031308, y * 12.92, 1.055 * y ** (1 / 2.4) - 0.055)


SRGB_TABLE = _table(srgb_decode(np.linspace(0, 1, 1024)))  # as HP's sRGB IEC61966-2.1 profile stores it
SRGB_PARA = b"para\0\0\0\0" + struct.pack(">HH", 3, 0) + _s15(2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)
# The 26 points of a compact sRGB profile (Facebook's "c2", fitted to sRGB: the curve through them is within
# 0.4 of a level of it; sRGB's own values at 26 points are 0.6 off between them).
C2_POINTS = [0, 203, 457, 867, 1426, 2155, 3062, 4159, 5457, 6964, 8689, 10640, 12824, 15250, 17925, 20855,
             24045, 27504, 31237, 35249, 39548, 44137, 49021, 54211, 59696, 65535]
SRGB_SHORT = _table(np.array(C2_POINTS) / 65535)


def icc_profile(space: bytes, tags: dict[bytes, bytes], *, cls: bytes = b"mntr", pcs: bytes = b"XYZ ") -> bytes:
    return icc_profile_bytes({b"desc": _desc("test profile"), b"wtpt": _xyz(D50), **tags}, space, cls, pcs)


def rgb_profile(colorants, curve: bytes) -> bytes:
    r, g, b = colorants
    return icc_profile(b"RGB ", {b"rXYZ": _xyz(r), b"gXYZ": _xyz(g), b"bXYZ": _xyz(b),
                                 b"rTRC": curve, b"gTRC": curve, b"bTRC": curve})


def grey_profile(curve: bytes) -> bytes:
    return icc_profile(b"GRAY", {b"kTRC": curve})


def lab(rgb) -> np.ndarray:
    """CIE L*a*b* (D50) of sRGB values 0..255: what a profile's table holds."""
    xyz = srgb_decode(np.asarray(rgb) / 255.0) @ np.array(SRGB)
    f = np.cbrt(xyz / D50)
    f = np.where(xyz / D50 > (6 / 29) ** 3, f, xyz / D50 / (3 * (6 / 29) ** 2) + 4 / 29)
    return np.stack([116 * f[..., 1] - 16, 500 * (f[..., 0] - f[..., 1]), 200 * (f[..., 1] - f[..., 2])], -1)


# How much of the red, green and blue light each ink takes away: real inks are not pure (cyan takes some
# green, magenta some blue), where Pillow's CMYK -> RGB (the values without their profile) takes them as pure.
INKS = np.array([[0.95, 0.30, 0.10], [0.15, 0.90, 0.40], [0.05, 0.10, 0.90], [1.0, 1.0, 1.0]])


def ink_rgb(cmyk) -> np.ndarray:
    """The test print's colours (0..255 sRGB), multiplying what each ink lets through."""
    amounts = np.asarray(cmyk, dtype=np.float64)[..., :, None] / 255
    return 255 * np.prod(1 - amounts * INKS, axis=-2)


def cmyk_profile(grid: int = 9) -> bytes:
    """A CMYK output profile whose A2B0 (lut8, Lab PCS) holds :func:`ink_rgb`'s colours on a grid."""
    axis = np.linspace(0, 255, grid)
    corners = np.stack(np.meshgrid(axis, axis, axis, axis, indexing="ij"), -1).reshape(-1, 4)  # C slowest
    values = lab(ink_rgb(corners))
    clut = np.clip(np.rint(np.stack([values[:, 0] * 255 / 100, values[:, 1] + 128, values[:, 2] + 128], -1)),
                   0, 255).astype(np.uint8)
    ramp = bytes(range(256))
    mft1 = (b"mft1\0\0\0\0" + bytes([4, 3, grid, 0]) + _s15(1, 0, 0, 0, 1, 0, 0, 0, 1)
            + ramp * 4 + clut.tobytes() + ramp * 3)
    return icc_profile(b"CMYK", {b"A2B0": mft1}, cls=b"prtr", pcs=b"Lab ")


def matrix_to_srgb(rgb, colorants, gamma: float) -> np.ndarray:
    """ICC.1 F.3: a matrix/curve profile's values to sRGB, 0..255 floats."""
    linear = (np.asarray(rgb, dtype=np.float64) / 255) ** gamma
    return 255 * srgb_encode(linear @ np.array(colorants) @ np.linalg.inv(np.array(SRGB)))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


# A skin tone, a shadow, a highlight and a saturated red (outside sRGB in Adobe RGB: clipped).
COLOURS = np.array([[[200, 150, 120], [60, 40, 30]], [[240, 230, 225], [230, 20, 20]]], dtype=np.uint8)


def patches(colours: np.ndarray = COLOURS, size: int = 16) -> np.ndarray:
    return np.kron(colours, np.ones((size, size, 1), dtype=np.uint8))


def patch_means(out: np.ndarray, size: int = 16) -> np.ndarray:
    h, w = out.shape[0] // size, out.shape[1] // size
    return out.reshape(h, size, w, size, 3)[:, 4:-4, :, 4:-4].mean(axis=(1, 3))


def warnings_of(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "faceage.images" and r.levelno >= logging.WARNING]


# --- conversions ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("colorants", "curve", "gamma"), [(ADOBE_RGB, _gamma(ADOBE_GAMMA), ADOBE_GAMMA),
                                                           (DISPLAY_P3, _gamma(2.2), 2.2)],
                         ids=["adobe-rgb", "wide-gamut-gamma-2.2"])
def test_an_rgb_photo_tagged_with_a_wide_gamut_profile_is_converted_to_srgb(colorants, curve, gamma, caplog):
    """skimage_rocket.jpg (Adobe RGB) came out with its raw values, 5.7 levels off on average (up to 55)."""
    arr = patches()
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(encode(Image.fromarray(arr), "PNG", icc_profile=rgb_profile(colorants, curve)))
    want = matrix_to_srgb(COLOURS, colorants, gamma)
    np.testing.assert_allclose(patch_means(out), want, atol=1.01)
    assert np.abs(want - COLOURS).max() > 20  # the raw values are far off
    assert not warnings_of(caplog)


def test_rgba_and_palette_photos_are_converted_and_composited_onto_srgb_white():
    icc = rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))
    arr = patches()
    rgb = load_image(encode(Image.fromarray(arr), "PNG", icc_profile=icc))
    rgba = np.dstack([arr, np.full(arr.shape[:2], 255, np.uint8)])
    rgba[:8, :8] = (10, 200, 30, 0)  # transparent: white, whatever the colour under it
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG", icc_profile=icc))
    assert (out[:8, :8] == 255).all()
    np.testing.assert_array_equal(out[8:], rgb[8:])
    palette = load_image(encode(Image.fromarray(arr).quantize(8), "PNG", icc_profile=icc))
    np.testing.assert_array_equal(palette, rgb)


@pytest.mark.parametrize("sixteen_bit", [False, True])
def test_a_grey_photo_with_a_grey_profile_is_converted(sixteen_bit):
    """A gamma 1.8 grey (old Mac) profile: 128 is sRGB's 146, not 128."""
    levels = np.array([0, 64, 128, 192, 255])
    grey = np.repeat(levels, 8)[None].repeat(8, axis=0)
    img = Image.fromarray((grey * 257).astype(np.uint16)) if sixteen_bit else Image.fromarray(grey.astype(np.uint8))
    out = load_image(encode(img, "PNG", icc_profile=grey_profile(_gamma(1.8))))
    want = 255 * srgb_encode((levels / 255) ** 1.8)
    assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()
    np.testing.assert_allclose(out[0, 4::8, 0], want, atol=1.01)
    assert out[0, 20, 0] in (146, 147)  # not 128


def test_transparent_grey_photos_with_a_grey_profile_are_converted_then_composited():
    profile = grey_profile(_gamma(1.8))
    la = Image.new("LA", (8, 8), (128, 255))
    la.putpixel((0, 0), (10, 0))
    trns = Image.new("L", (8, 8), 128)
    trns.putpixel((0, 0), 10)
    for img, kw in ((la, {}), (trns, {"transparency": 10})):
        out = load_image(encode(img, "PNG", icc_profile=profile, **kw))
        assert tuple(out[0, 0]) == (255, 255, 255)
        assert tuple(out[4, 4]) in ((146, 146, 146), (147, 147, 147))


@pytest.mark.parametrize("tagged", [False, True])
def test_a_trns_transparent_value_in_a_sixteen_bit_grey_png_becomes_white(tagged):
    """The tRNS of a 16-bit grey PNG was ignored: its transparent background came out near black (4, 4, 4)."""
    grey = np.full((8, 8), 1000, np.uint16)
    grey[4, 4] = 40000
    kw = {"icc_profile": grey_profile(_gamma(1.8))} if tagged else {}
    out = load_image(encode(Image.fromarray(grey), "PNG", transparency=1000, **kw))
    assert (out[0, 0] == 255).all() and (out[7, 7] == 255).all()
    want = 255 * srgb_encode((40000 / 65535) ** 1.8) if tagged else 40000 * 255 / 65535
    assert abs(int(out[4, 4, 0]) - want) <= 1 and (out[4, 4] == out[4, 4, 0]).all()


def test_a_conversion_that_fails_keeps_the_raw_values_with_one_log_line(monkeypatch, caplog):
    def broken(*_a, **_k):
        raise ImageCms.PyCMSError("cannot apply")

    monkeypatch.setattr(ImageCms, "applyTransform", broken)
    img = Image.fromarray(patches())
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(encode(img, "PNG", icc_profile=rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))))
    np.testing.assert_array_equal(out, patches())
    warned = warnings_of(caplog)
    assert len(warned) == 1 and "upload" in warned[0] and "cannot apply" in warned[0], warned


@pytest.mark.parametrize("fmt", ["TIFF", "JPEG"])
def test_a_cmyk_photo_with_a_print_profile_gets_the_profiles_colours(fmt):
    inks = np.array([[[0, 0, 0, 0], [128, 0, 0, 128]], [[0, 96, 160, 32], [255, 255, 0, 0]]], dtype=np.uint8)
    img = Image.fromarray(np.kron(inks, np.ones((16, 16, 1), dtype=np.uint8)), "CMYK")
    out = load_image(encode(img, fmt, icc_profile=cmyk_profile(), **({"quality": 95} if fmt == "JPEG" else {})))
    want = ink_rgb(inks)
    np.testing.assert_allclose(patch_means(out), want, atol=4)
    naive = patch_means(np.asarray(img.convert("RGB")))  # what the old decoder gave
    assert np.abs(naive - want).max() > 40


# --- no-ops ---------------------------------------------------------------------------------------------

SRGB_PROFILES = {
    "srgb-1024-point-table": rgb_profile(SRGB, SRGB_TABLE),
    "srgb-parametric": rgb_profile(SRGB, SRGB_PARA),
    "srgb-26-point-table": rgb_profile(SRGB, SRGB_SHORT),
}


def _forget_transforms() -> None:
    """Empties load_image's cache of transforms (built ones would not go through a patched buildTransform)."""
    getattr(images, "_TRANSFORMS", {}).clear()


@pytest.mark.parametrize("name", SRGB_PROFILES)
def test_an_srgb_profile_changes_no_pixel_and_builds_no_transform(name, monkeypatch, caplog):
    def refuse(*_a, **_k):
        raise AssertionError("a transform was built for an sRGB profile")

    monkeypatch.setattr(ImageCms, "buildTransform", refuse)
    _forget_transforms()
    noise = np.random.default_rng(3).integers(0, 256, (24, 24, 3), dtype=np.uint8)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        for img in (Image.fromarray(noise), Image.fromarray(noise[..., 0])):
            plain = load_image(encode(img, "PNG"))
            np.testing.assert_array_equal(load_image(encode(img, "PNG", icc_profile=SRGB_PROFILES[name])), plain)
        grey = Image.fromarray(noise[..., 0])
        for curve in (SRGB_TABLE, SRGB_PARA):
            tagged = encode(grey, "PNG", icc_profile=grey_profile(curve))
            np.testing.assert_array_equal(load_image(tagged), load_image(encode(grey, "PNG")))
    assert not warnings_of(caplog)


def test_the_transform_of_a_profile_is_built_once(monkeypatch):
    built = []
    real = ImageCms.buildTransform
    monkeypatch.setattr(ImageCms, "buildTransform", lambda *a, **k: built.append(a) or real(*a, **k))
    _forget_transforms()
    data = encode(Image.fromarray(patches()), "PNG", icc_profile=rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA)))
    first = load_image(data)
    np.testing.assert_array_equal(load_image(data), first)
    assert len(built) == 1


# --- orientation ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("malformed", [False, True], ids=["exif", "malformed-exif"])
def test_a_rotated_tagged_photo_is_the_upright_photo_converted(malformed):
    """The colours are converted once, whichever way (and whichever path) the photo is turned upright."""
    arr = np.kron(np.array([[[200, 150, 120], [40, 90, 200]], [[230, 20, 20], [250, 250, 250]]], np.uint8),
                  np.ones((16, 24, 1), np.uint8))
    icc = rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))

    def tagged(orientation: int) -> bytes:
        data = exif_jpeg(arr, orientation, malformed=malformed)
        app2 = b"ICC_PROFILE\0\x01\x01" + icc  # the profile as cameras write it, after the JPEG's SOI
        return data[:2] + b"\xff\xe2" + struct.pack(">H", len(app2) + 2) + app2 + data[2:]

    upright = load_image(tagged(1))
    np.testing.assert_array_equal(load_image(tagged(6)), np.rot90(upright, -1))
    np.testing.assert_array_equal(load_image(tagged(8)), np.rot90(upright, 1))
    np.testing.assert_allclose(upright[4:12, 4:20].reshape(-1, 3).mean(0),
                               matrix_to_srgb([200, 150, 120], ADOBE_RGB, ADOBE_GAMMA), atol=3)


# --- profiles that cannot be used ---------------------------------------------------------------------

BAD_PROFILES = {
    "garbage": b"this is not an ICC profile at all" * 8,
    "cut-short": rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))[:150],
    "grey-profile-on-rgb": grey_profile(_gamma(1.8)),
    "rgb-profile-on-cmyk": rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA)),
}


@pytest.mark.parametrize("name", BAD_PROFILES)
def test_a_profile_that_cannot_be_used_keeps_the_raw_values_with_one_log_line(name, caplog, tmp_path):
    arr = patches()
    img = Image.fromarray(arr).convert("CMYK") if name.endswith("cmyk") else Image.fromarray(arr)
    fmt = "TIFF" if img.mode == "CMYK" else "PNG"
    path = tmp_path / f"photo.{fmt.lower()}"
    path.write_bytes(encode(img, fmt, icc_profile=BAD_PROFILES[name]))
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(path)
    np.testing.assert_array_equal(out, load_image(encode(img, fmt)))
    warned = warnings_of(caplog)
    assert len(warned) == 1 and str(path) in warned[0] and "ICC" in warned[0], warned


# --- the shared photos ---------------------------------------------------------------------------------

def test_the_wild_photos_tagged_adobe_rgb_and_display_p3_are_converted_and_srgb_ones_kept(wild_dir):
    names = ("skimage_rocket.jpg", "fr_alex-lacamoire.png", "fr_biden.jpg", "dlib_Tom_Cruise_avp_2014_4.jpg")
    diff = {}
    for name in names:  # upright as stored; the PNGs are RGBA: composited onto white as load_image does
        with Image.open(wild_dir / name) as img:
            raw = Image.alpha_composite(Image.new("RGBA", img.size, "white"), img.convert("RGBA")).convert("RGB")
        diff[name] = np.abs(load_image(wild_dir / name).astype(int) - np.asarray(raw))
    assert diff["skimage_rocket.jpg"].mean() > 5 and diff["skimage_rocket.jpg"].max() > 40  # Adobe RGB (1998)
    assert diff["fr_alex-lacamoire.png"].max() > 5  # Display P3
    assert not diff["fr_biden.jpg"].any()  # sRGB IEC61966-2.1
    assert not diff["dlib_Tom_Cruise_avp_2014_4.jpg"].any()  # "c2", a compact sRGB profile


def test_preprocess_and_the_service_cut_the_same_crop_from_a_tagged_photo(tmp_path, detector_dir):
    """Both decode with load_image (preprocess from the path, the service from the uploaded bytes): the
    converted colours, so byte-identical crops, and not the raw values' crops."""
    from skimage.data import astronaut

    from faceage.config import PreprocessParams
    from faceage.predict import FaceLocator
    from tests.unit.test_crop_r24 import preprocess_crop

    photo = tmp_path / "data" / "test" / "a.jpg"
    cut = preprocess_crop(tmp_path, detector_dir, photo.name, lambda path: Image.fromarray(astronaut()).save(
        path, quality=95, icc_profile=rgb_profile(ADOBE_RGB, _gamma(ADOBE_GAMMA))), upsample=1)
    locator = FaceLocator(detector_dir, kind="hog", upsample=1, margin=PreprocessParams().margin, crop_size=64)
    served = locator.locate(load_image(photo.read_bytes()))
    assert np.array_equal(cut, served.crops[0])
    with Image.open(photo) as img:
        raw = locator.locate(np.asarray(img.convert("RGB")))
    assert raw.boxes[:1] != served.boxes[:1] or not np.array_equal(raw.crops[0], cut)
