"""Review r29 of faceage.images: 16-bit grey is scaled by its bit depth, whatever its content; low-bit grey PNGs
with a tRNS chunk are composited onto white like every other transparent image."""

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from faceage.images import load_image


def encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def grey_png(samples: np.ndarray, bit_depth: int, transparent: int | None = None) -> bytes:
    """A greyscale PNG of ``bit_depth`` bits holding the raw ``samples`` (Pillow writes only 1, 8 and 16-bit grey)."""
    rows = []
    for row in np.asarray(samples):
        bits = "".join(format(int(v), f"0{bit_depth}b") for v in row)
        bits += "0" * (-len(bits) % 8)
        rows.append(b"\x00" + int(bits, 2).to_bytes(len(bits) // 8, "big"))
    h, w = np.shape(samples)
    trns = _chunk(b"tRNS", struct.pack(">H", transparent)) if transparent is not None else b""
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, bit_depth, 0, 0, 0, 0)) + trns
            + _chunk(b"IDAT", zlib.compress(b"".join(rows))) + _chunk(b"IEND", b""))


DARK = np.array([[0, 100, 128, 200], [255, 129, 1, 255]], np.uint16)  # a dark 16-bit photo: nothing over 255


def _dark_sixteen_bit(mode: str) -> bytes:
    if mode == "I;16":  # 16-bit grey PNG
        return encode(Image.fromarray(DARK), "PNG")
    if mode == "I;16B":  # big-endian 16-bit TIFF
        return encode(Image.frombytes("I;16B", DARK.shape[::-1], DARK.astype(">u2").tobytes()), "TIFF")
    h, w = DARK.shape  # "I": Pillow's mode for a 16-bit PGM (maxval 65535)
    return b"P5 %d %d 65535\n" % (w, h) + DARK.astype(">u2").tobytes()


@pytest.mark.parametrize("mode", ["I;16", "I;16B", "I"])
def test_a_dark_sixteen_bit_grey_image_is_scaled_by_its_bit_depth(mode):
    """A 16-bit image whose values were all <= 255 was read as 8-bit: values up to 255 / 65535 of white came out
    as up to white (200 -> 200, not 1), and the scaling of one pixel depended on the others'."""
    data = _dark_sixteen_bit(mode)
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == mode
    out = load_image(data)
    want = np.floor(DARK / 257 + 0.5).astype(np.uint8)  # 65535 -> 255, rounded
    np.testing.assert_array_equal(out, np.repeat(want[..., None], 3, axis=2))
    assert out.max() <= 1


def test_the_same_sixteen_bit_value_gives_the_same_grey_whatever_else_the_image_holds():
    bright = DARK.copy()
    bright[0, 0] = 65535
    assert (load_image(encode(Image.fromarray(DARK), "PNG"))[0, 1:]
            == load_image(encode(Image.fromarray(bright), "PNG"))[0, 1:]).all()


def test_an_eight_bit_grey_stored_in_sixteen_bits_keeps_its_values():
    """What a 16-bit PNG converted from an 8-bit one holds (v * 257, as the wild set's derived_gray16_astronaut.png)."""
    grey = np.arange(256, dtype=np.uint16).reshape(16, 16)
    out = load_image(encode(Image.fromarray(grey * 257), "PNG"))
    np.testing.assert_array_equal(out[..., 0], grey.astype(np.uint8))


# (bit depth, raw samples, the tRNS value, what Pillow decodes the samples as in 8 bits)
LOW_BIT = {
    "1-bit, black transparent": (1, [[0, 1, 0, 1]], 0, [[0, 255, 0, 255]]),
    "2-bit": (2, [[0, 1, 2, 3]], 1, [[0, 85, 170, 255]]),
    "2-bit, black transparent": (2, [[0, 1, 2, 3]], 0, [[0, 85, 170, 255]]),
    "4-bit": (4, [[0, 5, 15, 3]], 5, [[0, 85, 255, 51]]),
    "4-bit, mid-grey transparent": (4, [[0, 8, 15, 8]], 8, [[0, 136, 255, 136]]),
    "8-bit": (8, [[0, 100, 200, 255]], 100, [[0, 100, 200, 255]]),
}


@pytest.mark.parametrize("case", LOW_BIT)
def test_a_low_bit_grey_png_with_trns_is_composited_onto_white(case):
    """The tRNS of a 1, 2 or 4-bit grey PNG was ignored (mode "1" was not composited; a 2 or 4-bit one's tRNS
    holds the raw sample, which Pillow leaves unscaled while it scales the pixels to 8 bits): its transparent
    background kept its grey instead of white, as RGBA, palette, 8 and 16-bit grey transparency become."""
    bit_depth, samples, transparent, decoded = LOW_BIT[case]
    data = grey_png(np.array(samples), bit_depth, transparent)
    out = load_image(data)
    want = np.where(np.array(samples) == transparent, 255, np.array(decoded)).astype(np.uint8)
    np.testing.assert_array_equal(out, np.repeat(want[..., None], 3, axis=2))
    np.testing.assert_array_equal(load_image(grey_png(np.array(samples), bit_depth)),  # without tRNS: as decoded
                                  np.repeat(np.array(decoded, np.uint8)[..., None], 3, axis=2))


@pytest.mark.parametrize("mode", ["1", "L"])
def test_a_grey_png_pillow_writes_with_transparency_is_composited(mode):
    """The same through Pillow's own writer (1 and 8-bit grey), rotated by EXIF as well."""
    grey = 255 if mode == "1" else 128
    img = Image.fromarray(np.array([[0, grey], [0, 0]], np.uint8)).convert(mode)
    exif = Image.Exif()
    exif[0x0112] = 3  # upside down
    out = load_image(encode(img, "PNG", transparency=0, exif=exif))
    np.testing.assert_array_equal(out, np.repeat(np.array([[255, 255], [grey, 255]], np.uint8)[..., None], 3, axis=2))


def rgb16_png(pixels: np.ndarray, transparent: tuple[int, int, int]) -> bytes:
    """A 16-bit RGB PNG whose tRNS names ``transparent`` (Pillow cannot write one)."""
    pixels = np.asarray(pixels, ">u2")
    h, w, _ = pixels.shape
    raw = b"".join(b"\x00" + row.tobytes() for row in pixels)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
            + _chunk(b"tRNS", struct.pack(">3H", *transparent)) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


@pytest.mark.parametrize("key", [(1000, 20000, 300), (0, 0, 0)])
def test_the_trns_colour_of_a_sixteen_bit_rgb_png_and_only_it_becomes_white(key):
    """Pillow decodes a 16-bit RGB PNG to 8 bits but keeps its 16-bit tRNS colour: no pixel matched (1000, 20000,
    300), so the transparent background kept its colour, while (0, 0, 0) made every pixel under 256 in each
    channel white, dark ones that are not transparent too."""
    near = tuple(v + 1 if v % 256 < 255 else v - 1 for v in key)  # same 8-bit value, not the transparent colour
    pixels = np.array([[key, near], [(65535, 0, 30000), key]], np.uint16)
    out = load_image(rgb16_png(pixels, key))
    assert (out[0, 0] == 255).all() and (out[1, 1] == 255).all()
    assert tuple(out[0, 1]) == tuple(v >> 8 for v in near)  # as Pillow decodes 16-bit RGB: the high byte
    assert tuple(out[1, 0]) == (255, 0, 117)


def test_an_undecodable_upload_is_named_in_words_not_by_a_placeholder():
    """The API's and the UI's message read "not an image (unknown format): upload", as if telling the user to
    upload: the bytes' stand-in name was the bare word."""
    import pytest

    from faceage.images import ImageDecodeError, load_image

    with pytest.raises(ImageDecodeError) as e:
        load_image(b"this is not an image")
    assert str(e.value) == "not an image (unknown format): the uploaded file"
