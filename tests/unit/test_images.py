"""load_image: every odd-but-valid format becomes upright RGB uint8; broken input raises ImageDecodeError."""

import io
import struct

import numpy as np
import pytest
from PIL import Image, ImageOps

from faceage.images import ImageDecodeError, load_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def rgb_array(h=30, w=40):
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[:, : w // 2] = (255, 0, 0)
    arr[:, w // 2 :] = (0, 0, 255)
    return arr


def test_png_roundtrip_is_exact(tmp_path):
    arr = rgb_array()
    path = tmp_path / "a.png"
    Image.fromarray(arr).save(path)
    np.testing.assert_array_equal(load_image(path), arr)
    np.testing.assert_array_equal(load_image(path.read_bytes()), arr)


def quadrants(h=32, w=64) -> np.ndarray:
    """Four flat colours, one per quadrant (red, green / blue, white): where each corner went is visible.
    Quadrant edges fall on JPEG's 16-px blocks, so each colour survives encoding in its quadrant's middle."""
    arr = np.zeros((h, w, 3), dtype=np.uint8)
    arr[: h // 2, : w // 2] = (255, 0, 0)
    arr[: h // 2, w // 2 :] = (0, 255, 0)
    arr[h // 2 :, : w // 2] = (0, 0, 255)
    arr[h // 2 :, w // 2 :] = (255, 255, 255)
    return arr


# The EXIF (TIFF 6.0) Orientation tag says where the stored 0th row and 0th column belong on screen;
# the upright image, written independently of Pillow's transposes (np.rot90 with k=-1 turns clockwise).
DISPLAYED = {
    1: lambda a: a,                          # 0th row top, 0th column left: as stored
    2: lambda a: a[:, ::-1],                 # row top, column right: mirrored left-right
    3: lambda a: a[::-1, ::-1],              # row bottom, column right: turned 180 degrees
    4: lambda a: a[::-1],                    # row bottom, column left: mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),       # row left, column top: transposed
    6: lambda a: np.rot90(a, -1),            # row right, column top: turned 90 degrees clockwise
    7: lambda a: np.rot90(a, -1)[::-1],      # row right, column bottom: transverse
    8: lambda a: np.rot90(a, 1),             # row left, column bottom: turned 90 degrees anticlockwise
}


def quadrant_colours(img: np.ndarray) -> np.ndarray:
    """The mean colour of each quadrant's middle (4 px off its edges, clear of JPEG's colour bleeding)."""
    h, w = img.shape[:2]
    return np.array([[img[y + 4 : y + h // 2 - 4, x + 4 : x + w // 2 - 4].reshape(-1, 3).mean(0)
                      for x in (0, w // 2)] for y in (0, h // 2)])


def assert_upright(out: np.ndarray, stored: np.ndarray, orientation: int) -> None:
    want = DISPLAYED[orientation](stored)
    assert out.shape == want.shape and out.dtype == np.uint8
    np.testing.assert_allclose(quadrant_colours(out), quadrant_colours(want), atol=10)


def test_the_expected_orientations_are_distinct():
    """Each orientation puts the four corners somewhere else, so a wrong transpose cannot look right."""
    arr = quadrants()
    looks = {o: quadrant_colours(f(arr)).round().tobytes() + bytes(f(arr).shape[:2]) for o, f in DISPLAYED.items()}
    assert len(set(looks.values())) == 8


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_is_applied(orientation):
    arr = quadrants()
    img = Image.fromarray(arr)
    exif = img.getexif()
    exif[0x0112] = orientation
    out = load_image(encode(img, "JPEG", exif=exif, quality=95))
    assert_upright(out, arr, orientation)


def test_sixteen_bit_grey_is_scaled_not_clipped():
    arr = (np.linspace(0, 65535, 64 * 64).reshape(64, 64)).astype(np.uint16)
    out = load_image(encode(Image.fromarray(arr), "PNG"))
    assert out.shape == (64, 64, 3) and out.dtype == np.uint8
    assert out[0, 0, 0] == 0 and out[-1, -1, 0] == 255
    assert 100 < out[32, 32, 0] < 155  # mid-grey, not saturated white


def test_cmyk_grey_palette_and_rgba_become_rgb():
    base = Image.fromarray(rgb_array())
    for img, fmt in [(base.convert("CMYK"), "JPEG"), (base.convert("L"), "PNG"), (base.convert("P"), "GIF")]:
        out = load_image(encode(img, fmt))
        assert out.shape == (30, 40, 3) and out.dtype == np.uint8
    rgba = np.zeros((10, 10, 4), dtype=np.uint8)  # fully transparent -> white
    out = load_image(encode(Image.fromarray(rgba, "RGBA"), "PNG"))
    assert (out == 255).all()


def test_animated_gif_uses_first_frame():
    frames = [Image.new("RGB", (8, 8), c) for c in ((255, 0, 0), (0, 255, 0))]
    data = encode(frames[0], "GIF", save_all=True, append_images=frames[1:])
    out = load_image(data)
    assert out[4, 4, 0] > 200 and out[4, 4, 1] < 50


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "empty image"),
        (b"this is not an image at all", "not an image"),
    ],
)
def test_bad_bytes_raise_clear_errors(data, message):
    with pytest.raises(ImageDecodeError, match=message):
        load_image(data)


def test_truncated_jpeg_raises():
    data = encode(Image.fromarray(np.random.default_rng(0).integers(0, 255, (200, 200, 3), dtype=np.uint8)), "JPEG")
    with pytest.raises(ImageDecodeError, match="cannot decode"):
        load_image(data[: len(data) // 2])


def test_pixel_cap_refuses_large_images():
    data = encode(Image.new("RGB", (300, 200)), "PNG")
    with pytest.raises(ImageDecodeError, match="60000 pixels, the limit is 50000"):
        load_image(data, max_pixels=50_000)


def test_empty_file_on_disk(tmp_path):
    (tmp_path / "e.jpg").write_bytes(b"")
    with pytest.raises(ImageDecodeError, match="0 bytes"):
        load_image(tmp_path / "e.jpg")


def exif_jpeg(arr: np.ndarray, orientation: int, *, malformed: bool = False) -> bytes:
    """A JPEG with EXIF Make="cam" and this Orientation.

    ``malformed``: the Make entry (ASCII) is relabelled StripOffsets (0x0111), a tag Pillow
    writes as LONG: reading the EXIF works, writing it back (as exif_transpose does) fails.
    """
    exif = Image.Exif()
    exif[0x010F] = "cam"  # Make
    exif[0x0112] = orientation
    data = encode(Image.fromarray(arr), "JPEG", exif=exif.tobytes(), quality=95)
    if not malformed:
        return data
    big_endian = data[data.index(b"Exif\x00\x00") + 6:][:2] == b"MM"
    make, strip_offsets = ((b"\x01\x0f", b"\x01\x11") if big_endian else (b"\x0f\x01", b"\x11\x01"))
    ascii_type = b"\x00\x02" if big_endian else b"\x02\x00"
    assert data.count(make + ascii_type) == 1
    return data.replace(make + ascii_type, strip_offsets + ascii_type)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_malformed_exif_keeps_the_photo_and_its_orientation(orientation):
    """Bad metadata is not a bad photo: the pixels decode and the orientation is still applied."""
    arr = quadrants()
    bad = exif_jpeg(arr, orientation, malformed=True)
    if orientation != 1:  # (with nothing to turn, exif_transpose leaves the EXIF alone)
        with pytest.raises(struct.error):  # what load_image used to meet (HTTP 500)
            ImageOps.exif_transpose(Image.open(io.BytesIO(bad)))
    out = load_image(bad)
    assert_upright(out, arr, orientation)  # as the Orientation tag asks, by the EXIF spec
    np.testing.assert_array_equal(out, load_image(exif_jpeg(arr, orientation)))  # the pixels of sound EXIF


def _noise(w=16, h=12) -> Image.Image:
    return Image.fromarray(np.random.default_rng(1).integers(0, 255, (h, w, 3), dtype=np.uint8))


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's "Truncated File Read" and the like
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "GIF", "WEBP", "TIFF", "QOI"])
def test_truncated_files_of_every_format_decode_or_raise_image_decode_error(fmt):
    """Pillow's plugins raise assorted exception types on corrupt data (QOI: IndexError); a cut
    file at any length is either an image or an ImageDecodeError (HTTP 400), never a 500."""
    try:
        data = encode(_noise(), fmt)
    except (KeyError, OSError) as e:  # a Pillow built without this writer
        pytest.skip(f"this Pillow cannot write {fmt}: {e}")
    for n in range(len(data) + 1):
        try:
            out = load_image(data[:n])
        except ImageDecodeError:
            continue
        assert out.shape == (12, 16, 3) and out.dtype == np.uint8, (fmt, n)


def test_a_qoi_file_cut_after_its_header_is_a_decode_error():
    data = encode(_noise(), "QOI")[:14]  # the header alone: Pillow's QOI decoder raises IndexError
    with pytest.raises(ImageDecodeError, match="cannot decode the uploaded file: IndexError"):
        load_image(data)


@pytest.mark.parametrize("mode,background", [("RGB", (0, 0, 0)), ("L", 0)])
def test_a_trns_transparent_colour_in_grey_and_rgb_pngs_becomes_white(mode, background):
    """PNG optimisers write binary-alpha RGBA as RGB (or L) with a tRNS colour: its background came out
    black, where the same picture as RGBA came out white."""
    img = Image.new(mode, (8, 8), background)
    img.putpixel((4, 4), (200, 10, 10) if mode == "RGB" else 200)
    out = load_image(encode(img, "PNG", transparency=background))
    assert (out[0, 0] == 255).all() and (out[7, 7] == 255).all()
    assert tuple(out[4, 4]) == ((200, 10, 10) if mode == "RGB" else (200, 200, 200))  # opaque pixels kept


def test_an_icon_is_refused_before_pillow_decodes_its_embedded_image(tmp_path):
    """Pillow's ICO plugin decodes the largest embedded PNG inside Image.open, before the pixel limit
    is checked: a 690 kB icon holding a 13000x13000 PNG took 650 MB before its 400."""
    import io
    import struct

    from PIL import Image

    from faceage.images import ImageDecodeError, load_image

    buf = io.BytesIO()
    Image.new("RGBA", (3000, 3000)).save(buf, "PNG")
    png = buf.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(png), 22) + png
    opened = []
    real_open = Image.open
    Image.open = lambda *a, **k: opened.append(k.get("formats")) or real_open(*a, **k)
    try:
        with pytest.raises(ImageDecodeError, match="ICO icons are not accepted"):
            load_image(icon, max_pixels=1000)
        (tmp_path / "a.ico").write_bytes(icon)
        with pytest.raises(ImageDecodeError, match=r"ICO icons are not accepted .*a\.ico"):
            load_image(tmp_path / "a.ico")
    finally:
        Image.open = real_open
    assert opened and all(formats is not None and "ICO" not in formats and "PNG" in formats for formats in opened)
    assert load_image(png, max_pixels=10**7).shape == (3000, 3000, 3)  # the same pixels as a PNG: read
