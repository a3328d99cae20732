"""load_image decodes HEIC/HEIF (iPhone photos, through pi-heif, pillow-heif's decode-only build) like every other format: the same
pixels as a lossless PNG of the same image (within the codec's rounding), upright by the file's orientation
(as the JPEG path turns one by its EXIF tag), the primary image of a multi-image file, an embedded ICC
profile converted to sRGB, 10-bit samples scaled to 8 bits, the pixel limit checked before decoding, and a
truncated file an ImageDecodeError (HTTP 400). AVIF comes with Pillow itself (its own plugin).

The HEIC files are written here with pillow-heif's encoder (a test-only dependency: its wheels bundle x265,
GPLv2, which the served image must not ship) (x265, lossless 4:4:4 where pixels are compared,
so that only the RGB <-> YCbCr rounding separates them), from scikit-image's astronaut photo and, where the
shared data is present, a real phone photo tagged with EXIF orientation 6.
"""

import io

import numpy as np
import pytest
from PIL import Image, features

import faceage.images
from faceage.images import ImageDecodeError, load_image
from tests.unit.test_images_r26 import DISPLAY_P3, _gamma, rgb_profile

pillow_heif = pytest.importorskip("pillow_heif", reason="pillow-heif (the test extras) writes the HEIC files")


@pytest.fixture(autouse=True)
def heic_writer():
    """Pillow saves HEIF through pillow-heif's encoder, while it opens HEIF through pi-heif, as
    faceage.images registered it: pillow-heif's registration takes both, so the opener is put back."""
    pillow_heif.register_heif_opener()
    faceage.images._register_heif()
    import pi_heif

    assert Image.OPEN["HEIF"][0] is pi_heif.HeifImageFile
    yield

ORIENTATION = 0x0112
TOLERANCE = 2  # levels: lossless HEVC of YCbCr 4:4:4, each way converted from/to 8-bit RGB


def astronaut(w: int = 128, h: int = 96) -> np.ndarray:
    """A real face (public domain), small and not square, so that a wrong turn changes the shape."""
    from skimage import data

    return np.asarray(Image.fromarray(data.astronaut()).resize((w, h), Image.Resampling.BILINEAR))


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def heic(img: Image.Image, **kw) -> bytes:
    return encode(img, "HEIF", quality=-1, chroma=444, **kw)  # lossless


def exif_with(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return exif.tobytes()


def assert_close(out: np.ndarray, want: np.ndarray, tolerance: int = TOLERANCE) -> None:
    assert out.shape == want.shape and out.dtype == np.uint8
    diff = np.abs(out.astype(int) - want.astype(int))
    assert diff.max() <= tolerance, f"max difference {diff.max()} levels, mean {diff.mean():.3f}"


def test_heif_is_a_format_load_image_opens_and_the_cli_scans():
    from faceage.cli import photo_suffixes

    assert "HEIF" in faceage.images._safe_formats()
    assert {".heic", ".heif"} <= photo_suffixes()


def test_a_heic_photo_decodes_to_the_pixels_of_the_same_png(tmp_path):
    arr = astronaut()
    data = heic(Image.fromarray(arr))
    want = load_image(encode(Image.fromarray(arr), "PNG"))
    assert_close(load_image(data), want)
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(data)
    assert_close(load_image(path), want)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_heic_photo_is_turned_upright_as_a_png_with_the_same_exif_orientation(orientation):
    """pillow-heif writes the EXIF orientation as the file's irot/imir boxes (as iPhones do), which libheif
    applies; the decoded EXIF then says 1, so the photo is turned once, not twice."""
    arr = astronaut()
    out = load_image(heic(Image.fromarray(arr), exif=exif_with(orientation)))
    want = load_image(encode(Image.fromarray(arr), "PNG", exif=exif_with(orientation)))
    assert want.shape[:2] == ((128, 96) if orientation >= 5 else (96, 128))  # the PNG path did turn it
    assert_close(out, want)


def test_a_real_phone_photo_tagged_orientation_6_decodes_as_its_jpeg(wild_dir):
    """The stored (sideways) pixels of a real photo, with its own EXIF, re-encoded as HEIC."""
    path = wild_dir / "derived_exif6_two_people.jpg"
    with Image.open(path) as jpeg:
        assert jpeg.getexif().get(ORIENTATION) == 6
        stored, exif = jpeg.convert("RGB"), jpeg.info["exif"]
    want = load_image(path)
    assert want.shape[:2] == stored.size  # upright: width and height swapped
    assert_close(load_image(heic(stored, exif=exif)), want)


def test_the_primary_image_of_a_multi_image_heic_is_decoded():
    """A HEIF file's primary image need not be its first (burst, edited copies): frame 0 is not the photo."""
    arr = astronaut()
    data = heic(Image.fromarray(255 - arr), save_all=True, append_images=[Image.fromarray(arr)], primary_index=1)
    with Image.open(io.BytesIO(data)) as img:
        assert img.n_frames == 2 and img.tell() == 1  # what pillow-heif opens: the primary
    assert_close(load_image(data), load_image(encode(Image.fromarray(arr), "PNG")))


def test_a_heic_photo_with_a_display_p3_profile_is_converted_to_srgb_as_a_png():
    """iPhones tag their photos Display P3: converted to sRGB, as for a PNG with the same profile."""
    arr = astronaut()
    icc = rgb_profile(DISPLAY_P3, _gamma(2.2))
    data = heic(Image.fromarray(arr), icc_profile=icc)
    with Image.open(io.BytesIO(data)) as img:
        assert img.info.get("icc_profile") == icc
        raw = np.asarray(img.convert("RGB"))  # the codec's pixels, before any colour conversion
    assert_close(raw, arr)
    want = load_image(encode(Image.fromarray(raw), "PNG", icc_profile=icc))
    assert np.abs(want.astype(int) - raw.astype(int)).max() > 10  # the conversion does change the colours
    np.testing.assert_array_equal(load_image(data), want)


def test_a_ten_bit_heic_is_scaled_to_eight_bits_as_a_sixteen_bit_png():
    arr16 = (astronaut().astype(np.uint16) * 257)[..., 0]  # grey, full 16-bit range
    img16 = Image.fromarray(arr16)
    assert img16.mode == "I;16"
    data = heic(img16)
    with Image.open(io.BytesIO(data)) as img:
        assert img.info.get("bit_depth", 8) > 8
    # 10 bits keep 1/4 of an 8-bit level: the 8-bit result is the PNG's within the codec's rounding
    assert_close(load_image(data), load_image(encode(img16, "PNG")))


def test_the_pixel_limit_is_checked_before_a_heic_is_decoded(monkeypatch):
    from pi_heif import HeifImageFile

    data = heic(Image.fromarray(astronaut()))

    def no_decoding(self):
        raise AssertionError("decoded before the size check")

    monkeypatch.setattr(HeifImageFile, "load", no_decoding)
    with pytest.raises(ImageDecodeError, match=r"^image too large: 128x96 = 12288 pixels, the limit is 12287$"):
        load_image(data, max_pixels=12287)


def test_pillows_own_bomb_limit_holds_for_heic(monkeypatch):
    data = heic(Image.fromarray(astronaut()))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 5000)  # refused past 2x, while opening
    with pytest.raises(ImageDecodeError, match=r"^image too large: more than 10000 pixels"):
        load_image(data)


def test_a_truncated_heic_is_an_image_decode_error(tmp_path):
    data = heic(Image.fromarray(astronaut()))
    with pytest.raises(ImageDecodeError) as cut_in_data:
        load_image(data[:len(data) // 2])
    message = str(cut_in_data.value)
    assert message.startswith("cannot decode the uploaded file: ValueError: ") and message == message.strip()
    with pytest.raises(ImageDecodeError, match=r"^not an image \(unknown format\): the uploaded file$"):
        load_image(data[:40])  # cut inside the header: no format recognises it
    path = tmp_path / "cut.heic"
    path.write_bytes(data[:len(data) // 2])
    with pytest.raises(ImageDecodeError, match=f"^cannot decode {path}: ValueError: "):
        load_image(path)


def test_every_cut_of_a_small_heic_decodes_or_raises_image_decode_error():
    """Like the other formats (tests/unit/test_images.py): a cut file at any length is either an image or an
    ImageDecodeError (HTTP 400), never another exception (a 500)."""
    noise = np.random.default_rng(1).integers(0, 255, (12, 16, 3), dtype=np.uint8)
    data = heic(Image.fromarray(noise))
    for n in range(1, len(data) + 1):
        try:
            out = load_image(data[:n])
        except ImageDecodeError:
            continue
        assert out.shape == (12, 16, 3) and out.dtype == np.uint8, n


@pytest.mark.skipif(not features.check("avif"), reason="this Pillow was built without AVIF")
def test_an_avif_photo_decodes_close_to_the_same_png():
    """AVIF is Pillow's own plugin (not pillow-heif's): lossy at its best quality, so a looser tolerance."""
    arr = astronaut()
    data = encode(Image.fromarray(arr), "AVIF", quality=100, subsampling="4:4:4")
    out = load_image(data)
    assert out.shape == arr.shape
    assert np.abs(out.astype(int) - arr.astype(int)).mean() < 2
