"""Decoding any image a user may send into an upright 8-bit RGB array.

Input: a path or raw bytes. Output: ``numpy.ndarray`` of shape (H, W, 3), dtype uint8.

One decoder for the pipeline and the service, so training crops and served crops see
the same pixels: EXIF orientation is applied before anything else, the first frame of
an animation is used, CMYK / greyscale / palette images become RGB, 16-bit images are
scaled (not clipped) to 8 bits, and transparency is composited onto white.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from faceage.errors import FaceAgeError

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6000x6000; larger uploads are refused before decoding


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
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
    return np.asarray(img.convert("RGB"))


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an image file or bytes into an upright RGB uint8 array.

    Args:
        source: A file path, or the encoded bytes.
        max_pixels: Refuse images with more pixels than this (decompression bombs).

    Returns:
        Array of shape (H, W, 3), dtype uint8, with EXIF orientation applied.

    Raises:
        ImageDecodeError: Empty input, unknown format, truncated data, or too many pixels.
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty image: 0 bytes")
        stream: io.BytesIO | str | Path = io.BytesIO(source)
        name = "upload"
    else:
        stream, name = source, str(source)
        if Path(source).stat().st_size == 0:
            raise ImageDecodeError(f"empty image file: {name} has 0 bytes")
    try:
        with warnings.catch_warnings():
            # Pillow warns (then errors at 2x) past its own limit; we apply ours instead.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(stream) as img:
                pixels = img.width * img.height
                if pixels > max_pixels:
                    raise ImageDecodeError(
                        f"image too large: {img.width}x{img.height} = {pixels} pixels, "
                        f"the limit is {max_pixels}"
                    )
                img.seek(0)  # first frame of GIF/WebP animations
                img.load()
                upright = ImageOps.exif_transpose(img)
                return _to_rgb(upright)
    except ImageDecodeError:
        raise
    except UnidentifiedImageError as e:
        raise ImageDecodeError(f"not an image (unknown format): {name}") from e
    except Image.DecompressionBombError as e:
        raise ImageDecodeError(f"image too large: {e}") from e
    except (OSError, SyntaxError, ValueError, EOFError) as e:
        raise ImageDecodeError(f"cannot decode {name}: {e}") from e
