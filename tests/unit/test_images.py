"""load_image: every odd-but-valid format becomes upright RGB uint8; broken input raises ImageDecodeError."""

import io

import numpy as np
import pytest
from PIL import Image

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


def test_exif_orientation_is_applied():
    img = Image.fromarray(rgb_array(30, 40))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 CW to display
    out = load_image(encode(img, "JPEG", exif=exif, quality=95))
    assert out.shape == (40, 30, 3)


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
