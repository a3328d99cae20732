"""Images over Pillow's own pixel ceiling are refused in the service's words."""

import struct
import zlib

import pytest

from faceage.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` and holds no pixels: Pillow reads the size at open."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")


@pytest.mark.parametrize("max_pixels", [DEFAULT_MAX_PIXELS, 300_000_000])
def test_a_photo_over_pillows_ceiling_is_refused_with_the_limit_in_force(max_pixels):
    """A 20000x20000 upload answered "Image size (400000000 pixels) exceeds limit of 178956970 pixels, could be
    decompression bomb DOS attack": neither the service's 40,000,000, nor (for --max-pixels 300000000) that the
    limit cannot go past Pillow's."""
    with pytest.raises(ImageDecodeError) as e:
        load_image(_png_header(20000, 20000), max_pixels=max_pixels)
    message = str(e.value)
    assert message.startswith("image too large: more than 178956970 pixels, the limit is ")
    assert f"the limit is {min(max_pixels, 178956970)}" in message and "bomb" not in message
    assert ("Pillow decodes no more" in message) == (max_pixels > 178956970)
