"""Decoding any image a user may send into an upright 8-bit RGB array.

Input: a path or raw bytes. Output: ``numpy.ndarray`` of shape (H, W, 3), dtype uint8.

One decoder for the pipeline and the service, so training crops and served crops see
the same pixels: EXIF orientation is applied before anything else, the first frame of
an animation is used, CMYK / greyscale / palette images become RGB, 16-bit images are
scaled (not clipped) to 8 bits, and transparency is composited onto white.

Whatever Pillow raises on bytes it cannot decode becomes :class:`ImageDecodeError` (the
client's fault, never the server's); malformed EXIF metadata never fails a photo whose pixels
decode.
"""

from __future__ import annotations

import io
import logging
import os
import stat
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6000x6000; larger uploads are refused before decoding
# A pipe or device given as a path is read whole, up to this per allowed pixel: 16-bit RGBA, uncompressed.
STREAM_BYTES_PER_PIXEL = 8
# Formats whose Pillow plugin decodes the (largest) embedded image while opening, before its size
# can be checked: a 690 kB icon holding a 13000x13000 PNG took 650 MB. Icons are not photos: refused.
_DECODED_AT_OPEN = {"ICO": b"\x00\x00\x01\x00", "ICNS": b"icns"}

_ORIENTATION = 0x0112  # the EXIF tag
# Orientation value -> the transpose that makes the image upright (as ImageOps.exif_transpose).
_UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}


class ImageDecodeError(FaceAgeError, ValueError):
    """The input is not a decodable image (empty, truncated, unknown format, too large)."""


def _to_rgb(img: Image.Image) -> np.ndarray:
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        arr = np.asarray(img, dtype=np.float64)
        # 16-bit data: scale 0..65535 to 0..255 rather than letting convert() clip it.
        peak = 65535.0 if arr.max(initial=0) > 255 else 255.0
        grey = np.clip(np.rint(arr * (255.0 / peak)), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    if img.mode == "F":
        arr = np.asarray(img, dtype=np.float64)
        grey = np.clip(np.rint(arr if arr.max(initial=0) > 1.0 else arr * 255), 0, 255).astype(np.uint8)
        return np.repeat(grey[..., None], 3, axis=2)
    # A tRNS chunk makes one colour transparent in P, L and RGB PNGs (optimisers write binary-alpha RGBA so).
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "L", "RGB") and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def _error_name(e: BaseException) -> str:
    """``IndexError``, ``struct.error``: the exception's type, as a reader would look it up."""
    kind = type(e)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


def _upright(img: Image.Image) -> Image.Image:
    """The decoded image turned upright by its EXIF orientation, whatever else its EXIF holds.

    ``ImageOps.exif_transpose`` also rewrites the EXIF block without the orientation, and
    that fails (``struct.error``, ``TypeError``, ...) on malformed entries, e.g. an ASCII
    value under a tag Pillow writes as LONG. The pixels are fine then: apply the Orientation
    tag alone if it can be read, else keep the image as stored.
    """
    try:
        return ImageOps.exif_transpose(img)
    except MemoryError:
        raise
    except Exception as e:
        try:
            orientation = img.getexif().get(_ORIENTATION)
        except MemoryError:
            raise
        except Exception:
            orientation = None
        log.warning("malformed EXIF metadata (%s: %s); applying orientation %s alone", _error_name(e), e,
                    orientation)
        method = _UPRIGHT.get(orientation) if isinstance(orientation, int) else None
        return img.transpose(method) if method is not None else img


def _safe_formats() -> list[str]:
    """Every format Pillow opens here but those it decodes while opening (:data:`_DECODED_AT_OPEN`)."""
    Image.init()
    return [fmt for fmt in Image.OPEN if fmt not in _DECODED_AT_OPEN]


def _starts_with(source: str | Path | bytes, magic: bytes) -> bool:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:len(magic)]) == magic
    try:
        with open(source, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


def _read_stream(path: str | Path, name: str, max_pixels: int) -> bytes:
    """The bytes a pipe or device gives, at most :data:`STREAM_BYTES_PER_PIXEL` per allowed pixel
    (plus 1 MiB): more than any image within ``max_pixels`` takes (``/dev/zero`` would never end)."""
    limit = STREAM_BYTES_PER_PIXEL * max_pixels + 2**20
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if not data:
        raise ImageDecodeError(f"empty image: {name} gave 0 bytes")
    if len(data) > limit:
        raise ImageDecodeError(f"image too large: {name} gives more than {limit} bytes, more than an image of "
                               f"{max_pixels} pixels takes")
    return data


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an image file or bytes into an upright RGB uint8 array.

    Args:
        source: A file path (a pipe or a device, e.g. ``/dev/stdin``, is read whole first), or the
            encoded bytes.
        max_pixels: Refuse images with more pixels than this (decompression bombs).

    Returns:
        Array of shape (H, W, 3), dtype uint8, with EXIF orientation applied.

    Raises:
        ImageDecodeError: Empty input, unknown format, truncated or corrupt data, or too many pixels.
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty image: 0 bytes")
        stream: io.BytesIO | str | Path | BinaryIO = io.BytesIO(source)
        name = "upload"
    else:
        stream, name = source, str(source)
        info = os.stat(source)  # a missing path raises FileNotFoundError, as opening it would
        if stat.S_ISREG(info.st_mode):
            if info.st_size == 0:
                raise ImageDecodeError(f"empty image file: {name} has 0 bytes")
        elif not stat.S_ISDIR(info.st_mode):  # a pipe (`<(curl ...)`, `cat a.jpg | ... /dev/stdin`) or a device
            source = _read_stream(source, name, max_pixels)  # Pillow seeks, a pipe cannot: read it whole
            stream = io.BytesIO(source)
    try:
        with warnings.catch_warnings(), ExitStack() as files:
            # Pillow warns (then errors at 2x) past its own limit; we apply ours instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            if not isinstance(stream, io.BytesIO):
                # A file object, not the path: given a path, Pillow maps an uncompressed greyscale,
                # palette or 16-bit TIFF into memory, and that path drops its EXIF orientation (the
                # photo came out sideways, upright from the same bytes uploaded).
                stream = files.enter_context(open(stream, "rb"))
            with Image.open(stream, formats=_safe_formats()) as img:
                pixels = img.width * img.height
                if pixels > max_pixels:
                    raise ImageDecodeError(
                        f"image too large: {img.width}x{img.height} = {pixels} pixels, "
                        f"the limit is {max_pixels}"
                    )
                img.seek(0)  # first frame of GIF/WebP animations
                img.load()
                return _to_rgb(_upright(img))
    except (ImageDecodeError, MemoryError):
        raise  # our own size limit has its message; out of memory is the server's problem
    except UnidentifiedImageError as e:
        icon = next((fmt for fmt, magic in _DECODED_AT_OPEN.items() if _starts_with(source, magic)), None)
        if icon is not None:
            raise ImageDecodeError(f"{icon} icons are not accepted (decoded whole before their size can be "
                                   f"checked): {name}") from e
        raise ImageDecodeError(f"not an image (unknown format): {name}") from e
    except Image.DecompressionBombError as e:
        # Pillow refuses over twice its MAX_IMAGE_PIXELS while opening, before our check: its own wording
        # ("could be decompression bomb DOS attack") named neither our limit nor that it cannot be raised past it.
        bomb = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
        raise ImageDecodeError(f"image too large: more than {bomb} pixels, the limit is {min(max_pixels, bomb)}"
                               + (" (Pillow decodes no more)" if max_pixels > bomb else "")) from e
    except Exception as e:
        # Pillow's plugins raise whatever their parser trips on for corrupt data (OSError,
        # SyntaxError, EOFError, but also IndexError, struct.error, ...): the bytes are at
        # fault, not the server.
        raise ImageDecodeError(f"cannot decode {name}: {_error_name(e)}: {e}") from e
