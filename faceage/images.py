"""Decoding any image a user may send into an upright 8-bit RGB array.

Input: a path or raw bytes. Output: ``numpy.ndarray`` of shape (H, W, 3), dtype uint8.

One decoder for the pipeline and the service, so training crops and served crops see
the same pixels: EXIF orientation is applied before anything else, the first frame of
an animation (the primary image of a HEIF file) is used, CMYK / greyscale / palette images
become RGB, 16-bit images are scaled (not clipped) to 8 bits (10 and 12-bit HEIF by libheif),
transparency is composited onto white, and a photo with an embedded ICC colour profile
other than sRGB (Adobe RGB, Display P3, a CMYK print or a grey profile) is converted to
sRGB, what the model was trained on (:func:`_srgb_transform`), and so is a HEIC or AVIF photo tagged by its nclx box
alone (Display P3, BT.2020 primaries; :func:`_nclx_icc`), a PNG by its cICP chunk (the same codes; narrow "video"
range expanded first, :func:`_decode_signal`) or by its cHRM and gAMA chunks (:func:`_png_chunks_icc`), and a CIELab
image (a Lab TIFF, Photoshop's Lab mode: D50, the white of the TIFF's WhitePoint tag, or its profile). HDR photos (PQ,
HLG: a PNG's cICP, a HEIC's or AVIF's nclx) are tone mapped to sRGB (:func:`_tone_map`).

Whatever Pillow raises on bytes it cannot decode becomes :class:`ImageDecodeError` (the
client's fault, never the server's); malformed EXIF metadata never fails a photo whose pixels
decode, and neither does an ICC profile that cannot be used (the raw values are kept, with one
log line).

Formats: whatever this Pillow opens (AVIF with its own plugin), less icons (:data:`_DECODED_AT_OPEN`), EPS
(:data:`_RUNS_A_PROGRAM`), IPTC/NAA (:data:`_OPENS_ANOTHER_FILE`) and FITS (:data:`_NOT_PHOTOS`),
plus HEIC/HEIF (iPhone photos) through pi-heif's plugin, registered on import. Data that Pillow decodes in Python (QOI,
plain PPM, RLE BMP, ...) is refused over :data:`PYTHON_DECODED_MAX_BYTES`.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import stat
import struct
import threading
import warnings
from collections import OrderedDict
from contextlib import ExitStack
from functools import lru_cache
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image, ImageCms, ImageOps, PpmImagePlugin, TiffImagePlugin, UnidentifiedImageError
import pi_heif

from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 40_000_000  # ~ 6000x6000; larger uploads are refused before decoding
# A pipe or device given as a path is read whole, up to this per allowed pixel: 16-bit RGBA, uncompressed.
STREAM_BYTES_PER_PIXEL = 8
# Encoded bytes taken where Pillow decodes in Python (its ``Image.DECODERS``: QOI, plain PPM, RLE BMP, DDS, SGI 16-bit,
# XPM, MSP, BLP; not binary PPM/PGM, whose decoder this module replaces, :class:`_PpmDecoder`), an op or a sample at a
# time: about 2 s a MB (QOI 2.4, RLE BMP 0.5, on a loaded 2-core machine). A 20 MiB upload, the service's body cap,
# took a worker 50 s; these 2 MiB take 5 s at most. Every other format is decoded in C (a 20 MP JPEG: 0.3 s).
PYTHON_DECODED_MAX_BYTES = 2 * 1024 * 1024
# Formats whose Pillow plugin decodes the (largest) embedded image while opening, before its size
# can be checked: a 690 kB icon holding a 13000x13000 PNG took 650 MB. Icons are not photos: refused.
_DECODED_AT_OPEN = {"ICO": b"\x00\x00\x01\x00", "ICNS": b"icns"}

# HEIC/HEIF through libheif: only the primary image is decoded, so its thumbnails, depth maps and auxiliary
# images (an iPhone portrait carries several) are not even listed. The plugin opens on the primary image, turned
# and mirrored by the file's irot/imir boxes, its EXIF orientation then reset to 1 (not turned twice); 10 and
# 12-bit images are decoded to 8 bits; libheif's own security limits stay on (pillow-heif's default).
# pi-heif is pillow-heif's decode-only build (libheif + libde265, LGPL; BSD binding): pillow-heif's own wheels
# bundle the x265 encoder, GPLv2, which the served image would then ship.


def _register_heif() -> None:
    pi_heif.register_heif_opener(thumbnails=False, depth_images=False, aux_images=False)


_register_heif()
# Formats whose plugin opens on the image to use, which is not frame 0: a HEIF file's primary image need not be
# its first (a burst, an edited copy); a Photoshop file opens on its merged image, numbered 1 (its layers follow),
# and seeking it to 0 raises (every PSD failed with "EOFError: attempt to seek outside sequence").
_OPENS_PRIMARY = frozenset({"HEIF", "PSD"})

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


class ImageTooLarge(ImageDecodeError):
    """An image over a pixel cap: ``pixels`` it has (None where only "more than" is known) and ``limit``, the cap
    named in the message: the caller's ``max_pixels``, or Pillow's own where that is the lower one. A caller that
    names its setting in the message (the server's ``FACEAGE_MAX_PIXELS``) reads these, never the words."""

    def __init__(self, message: str, pixels: int | None = None, limit: int | None = None):
        super().__init__(message)  # args: the message alone (str(e)); pickled with the attributes (a worker's)
        self.pixels, self.limit = pixels, limit


_SIXTEEN_BIT = ("I;16", "I;16B", "I;16L", "I;16N", "I")
# Pillow mode -> the colour space of its values, the one an embedded profile must describe ("L": grey).
_COLOUR_SPACE = {**dict.fromkeys(_SIXTEEN_BIT + ("F", "1", "L", "LA", "La"), "L"),
                 **dict.fromkeys(("P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "YCbCr"), "RGB"), "CMYK": "CMYK",
                 "LAB": "LAB"}
_PROFILE_SPACE = {b"GRAY": "L", b"RGB ": "RGB", b"CMYK": "CMYK", b"Lab ": "LAB"}  # ICC header, bytes 16-19
_SPACE_NAMES = {"L": "grey", "RGB": "RGB", "CMYK": "CMYK", "LAB": "CIELab"}


def _grey8(img: Image.Image) -> np.ndarray:
    """A 16-bit or 32-bit (integer or float) grey image as uint8: scaled, not clipped as convert() would.

    32-bit images (modes I and F) a block of rows at a time (:func:`_row_blocks`): on the whole image, their float64
    and int64 temporaries took 28 bytes a pixel (float) and 16 (integer): a 93 kB deflate TIFF of 40 MP, 1.1 GB.
    16-bit ones whole: 10 bytes a pixel, what a tagged 16-bit PNG's decoding takes too (:func:`_decode_signal`)."""
    if img.mode != "I" and img.mode != "F":
        return _scale16(np.asarray(img))
    out = np.empty((img.height, img.width), np.uint8)
    if img.mode == "I":
        for row, box in _row_blocks(img):
            out[row:box[3]] = _scale16(np.asarray(img.crop(box)))
        return out
    # Values above 1 are 0..255 levels, else 0..1 fractions: decided on the whole image, its NaN pixels (masked
    # values) left out, as a NaN maximum is never above 1 (levels of 0..255 were multiplied by 255: all white).
    top = 0.0
    for _, box in _row_blocks(img):
        top = max(top, float(np.fmax.reduce(np.asarray(img.crop(box)), axis=None, initial=0.0)))
    for row, box in _row_blocks(img):
        arr = np.asarray(img.crop(box), dtype=np.float64)
        if top <= 1.0:
            arr *= 255
        np.rint(arr, out=arr)
        arr[np.isnan(arr)] = 0  # black: cast to uint8, a NaN is whatever the CPU makes of it
        out[row:box[3]] = np.clip(arr, 0, 255, out=arr)
    return out


def _scale16(arr: np.ndarray) -> np.ndarray:
    """16-bit grey values (32-bit ones clipped to 0..65535) as uint8.

    Scaled 0..65535 to 0..255 rather than clipped as convert() does, by the bit depth and never by the content (a
    dark photo, all values <= 255, was once read as 8-bit: 200 / 65535 of white came out as 200). In integers:
    float64 and its temporaries took ~28 bytes a pixel (a 78 kB, 40 MP grey PNG: 1.1 GB to decode, in a service
    worker too). Rounding half up is rint's rounding here: x * 255 / 65535 = x / 257 is never a half."""
    scaled = np.clip(arr, 0, 65535).astype(np.uint32)
    scaled *= 255
    scaled += 32767
    scaled //= 65535
    return scaled.astype(np.uint8)


def _row_blocks(img: Image.Image):
    """(top, box) of each block of whole rows of ``img``, of about :data:`_DECODE_BLOCK_PIXELS` pixels, top down."""
    rows = max(1, _DECODE_BLOCK_PIXELS // max(1, img.width))
    for top in range(0, img.height, rows):
        yield top, (0, top, img.width, min(top + rows, img.height))


def _to_rgb(img: Image.Image, transform: ImageCms.ImageCmsTransform | None = None,
            lab_white: np.ndarray | None = None) -> np.ndarray:
    """``img`` as RGB uint8; ``transform`` (from :func:`_srgb_transform`, for ``img``'s colour space) turns
    its colours into sRGB. Alpha is kept out of the transform and composited onto white afterwards. A Lab image
    with no transform is CIELab D50, or relative to ``lab_white`` (XYZ, Y = 1) where given (:func:`_tiff_white`)."""

    def managed(colour: Image.Image) -> Image.Image:
        return ImageCms.applyTransform(colour.convert(transform.inputMode), transform)

    if transform is None and img.mode == "LAB":
        if lab_white is not None:
            return _lab_to_srgb(np.asarray(img), lab_white)
        transform = _lab_transform()  # Lab values are colours, not RGB: always converted

    if img.mode in _SIXTEEN_BIT or img.mode == "F":
        grey = _grey8(img)
        if transform is None:
            rgb = np.repeat(grey[..., None], 3, axis=2)
        else:
            rgb = np.array(managed(Image.fromarray(grey, "L")))
        # A 16-bit grey PNG's tRNS names one 16-bit value transparent: white, as for 8-bit ones. A block of rows
        # at a time, through a mask: a boolean index of the whole image took int64 indices of its transparent
        # pixels (8 bytes a pixel more) and a full-size copy of the 16-bit values.
        transparent = img.info.get("transparency")
        if isinstance(transparent, int) and img.mode != "F":
            for top, box in _row_blocks(img):
                keyed = np.asarray(img.crop(box)) == transparent
                np.copyto(rgb[top:box[3]], np.uint8(255), where=keyed[..., None])
        return rgb
    # A tRNS chunk makes one colour transparent in P, 1, L and RGB PNGs (optimisers write binary-alpha RGBA so).
    if img.mode in ("RGBA", "LA", "PA") or (img.mode in ("P", "1", "L", "RGB") and "transparency" in img.info):
        # A block of rows at a time, into the result: on the whole image, the RGBA copy (convert() copies even an
        # RGBA image), the white background, the composite and its RGB copy took ~22 bytes a pixel (0.9 GB for
        # 40 MP, in each detection worker), 23 with a profile. Each step is per pixel: the same pixels.
        rgb = np.empty((img.height, img.width, 3), np.uint8)
        background = None
        for top, box in _row_blocks(img):
            part = img.crop(box)
            rgba = part.convert("RGBA")
            if transform is not None:  # a grey LA's values are its L, a palette's its RGB
                colour = managed(part.convert("L") if transform.inputMode == "L" else rgba)
                colour.putalpha(rgba.getchannel("A"))
                rgba = colour
            if background is None or background.size != rgba.size:  # the last block may be shorter
                background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            rgb[top:box[3]] = np.asarray(Image.alpha_composite(background, rgba).convert("RGB"))
        return rgb
    if transform is not None:
        if img.mode == "RGB" and transform.inputMode == "RGB":
            # In place: ``img`` is load_image's own decoded copy, and convert() would copy it first (on a
            # 20 MP photo a tenth of the conversion's time, and 60 MB more memory): the same pixels.
            ImageCms.applyTransform(img, transform, inPlace=True)
            return np.asarray(img)
        return np.asarray(managed(img))
    return np.asarray(img if img.mode == "RGB" else img.convert("RGB"))  # convert() copies even an RGB image


# sRGB's colorants as ICC profiles hold them (adapted to the D50 PCS), and its transfer function.
_SRGB_COLORANTS = {b"rXYZ": (0.4361, 0.2225, 0.0139), b"gXYZ": (0.3851, 0.7169, 0.0971),
                   b"bXYZ": (0.1431, 0.0606, 0.7141)}
_COLORANT_TOLERANCE = 0.001  # what profiles of sRGB from different vendors differ by (s15Fixed16 rounding)
_LEVELS = np.arange(256) / 255.0


def _srgb_encode(y: np.ndarray) -> np.ndarray:
    y = np.clip(y, 0.0, 1.0)
    return np.where(y <= 0.0031308, y * 12.92, 1.055 * y ** (1 / 2.4) - 0.055)


def _icc_tags(icc: bytes) -> dict[bytes, bytes]:
    count = struct.unpack_from(">I", icc, 128)[0]
    tags = {}
    for i in range(min(count, 256)):
        sig, offset, size = struct.unpack_from(">4sII", icc, 132 + 12 * i)
        tags[sig] = icc[offset:offset + size]
    return tags


def _curve(tag: bytes) -> np.ndarray:
    """An ICC ``curv`` or ``para`` tone curve evaluated at the 256 8-bit levels (ValueError if neither)."""
    kind = tag[:4]
    if kind == b"curv":
        n = struct.unpack_from(">I", tag, 8)[0]
        if n == 0:
            return _LEVELS.copy()
        if n == 1:
            return _LEVELS ** (struct.unpack_from(">H", tag, 12)[0] / 256.0)
        table = np.frombuffer(tag, dtype=">u2", count=n, offset=12) / 65535.0
        return np.interp(_LEVELS * (n - 1), np.arange(n), table)
    if kind == b"para":  # ICC.1 10.18: g, then a, b, c, d, e, f as the function type needs them
        function = struct.unpack_from(">H", tag, 8)[0]
        count = {0: 1, 1: 3, 2: 4, 3: 5, 4: 7}[function]
        g, a, b, c, d, e, f = [v / 65536.0 for v in struct.unpack_from(f">{count}i", tag, 12)] + [0.0] * (7 - count)
        if function == 0:
            return _LEVELS ** g
        if function in (1, 2):
            d, f, c = -b / a, (c if function == 2 else 0.0), 0.0  # below -b/a: 0 (1) or c (2)
            e = f
        with np.errstate(all="ignore"):  # a nonsense curve (g < 0): inf/nan, which no check passes
            return np.where(_LEVELS >= d, np.maximum(a * _LEVELS + b, 0.0) ** g + e, c * _LEVELS + f)
    raise ValueError(f"tone curve of type {kind!r}")


def _is_srgb(icc: bytes) -> bool:
    """Whether converting from this profile to sRGB would leave every 8-bit value as it is (within half a
    level): an RGB profile with sRGB's colorants and tone curves, or a grey one with sRGB's tone curve.
    Read from the profile's own tags, as no transform needs to be built for the photos most profiles tag."""
    try:
        if icc[36:40] != b"acsp":
            return False
        space = icc[16:20]
        tags = _icc_tags(icc)
        if any(sig in tags for sig in (b"A2B0", b"A2B1", b"A2B2")):
            return False  # table-based: what it does is not in its matrix
        if space == b"GRAY":
            channels = [b"kTRC"]
        elif space == b"RGB ":
            for sig, want in _SRGB_COLORANTS.items():
                xyz = np.array(struct.unpack_from(">3i", tags[sig], 8)) / 65536.0
                if tags[sig][:4] != b"XYZ " or np.abs(xyz - want).max() > _COLORANT_TOLERANCE:
                    return False
            channels = [b"rTRC", b"gTRC", b"bTRC"]
        else:
            return False
        return all(np.abs(_srgb_encode(_curve(tags[sig])) * 255 - _LEVELS * 255).max() < 0.5 for sig in channels)
    except (KeyError, ValueError, IndexError, struct.error, ZeroDivisionError):
        return False  # not readable as a plain matrix/curve profile: lcms decides


# Transforms built, by the profile's SHA-256 (not its bytes: a profile may be megabytes) and colour space;
# None for the sRGB ones. A few are kept: photos from one camera or phone share one profile.
_TRANSFORMS: OrderedDict[tuple[bytes, str], ImageCms.ImageCmsTransform | None] = OrderedDict()
_TRANSFORMS_KEPT = 16
_transforms_lock = threading.Lock()


def _profile_transform(icc: bytes, space: str) -> ImageCms.ImageCmsTransform | None:
    """None for sRGB (and for what matches it), else a transform from ``icc`` to sRGB for ``space``'s
    values, built once per profile. Raises ValueError (or whatever lcms raises) for a profile that
    cannot be used.

    Relative colorimetric intent, with black point compensation: Photoshop's default conversion. Colours
    inside sRGB (skin) keep their measured values and only those outside it are clipped, where a perceptual
    table (print profiles have one) compresses the whole gamut as each vendor chose; the two intents give
    the same pixels for matrix profiles (Adobe RGB, Display P3). Compensation maps a print profile's
    deepest black to sRGB's black, not to a dark grey (a no-op for matrix profiles, whose black is 0).
    """
    key = (hashlib.sha256(icc).digest(), space)
    with _transforms_lock:
        if key in _TRANSFORMS:
            _TRANSFORMS.move_to_end(key)
            return _TRANSFORMS[key]
    transform = None
    if not _is_srgb(icc):
        if _PROFILE_SPACE.get(icc[16:20]) != space:
            raise ValueError(f"a {icc[16:20].decode('latin-1').strip()!r} profile for {_SPACE_NAMES[space]} pixels")
        transform = ImageCms.buildTransform(ImageCms.ImageCmsProfile(io.BytesIO(icc)), _srgb_profile(), space, "RGB",
                                            renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                            flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)
    with _transforms_lock:
        _TRANSFORMS[key] = transform
        while len(_TRANSFORMS) > _TRANSFORMS_KEPT:
            _TRANSFORMS.popitem(last=False)
    return transform


@lru_cache(maxsize=1)
def _srgb_profile() -> ImageCms.ImageCmsProfile:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))


@lru_cache(maxsize=1)
def _lab_transform() -> ImageCms.ImageCmsTransform:
    """CIELab (D50: TIFF's CIELab and Photoshop's Lab mode, as Pillow decodes both, with no profile) to sRGB, as
    :func:`_profile_transform` converts: relative colorimetric, so Lab's white is sRGB's white, and colours outside
    sRGB are clipped. Pillow's own ``convert("RGB")`` of a Lab image is not relied on."""
    return ImageCms.buildTransform(ImageCms.ImageCmsProfile(ImageCms.createProfile("LAB")), _srgb_profile(),
                                   "LAB", "RGB", renderingIntent=ImageCms.Intent.RELATIVE_COLORIMETRIC,
                                   flags=ImageCms.Flags.BLACKPOINTCOMPENSATION)


def _xyz_matrix(xy) -> np.ndarray:
    """The matrix taking linear RGB (columns) of the colour space whose red, green, blue and white have the
    chromaticities ``xy`` to XYZ, its white at Y = 1."""
    columns = np.array([[x / y, 1.0, (1 - x - y) / y] for x, y in xy[:3]]).T
    return columns * np.linalg.solve(columns, _white_xyz(xy[3]))


def _white_xyz(xy) -> np.ndarray:
    x, y = xy
    return np.array([x / y, 1.0, (1 - x - y) / y])


def _bradford(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Bradford's chromatic adaptation from the white ``source`` to ``target`` (XYZ each), as ICC profiles adapt."""
    return np.linalg.inv(_BRADFORD) @ np.diag((_BRADFORD @ target) / (_BRADFORD @ source)) @ _BRADFORD


def _to_srgb_linear(xy) -> np.ndarray:
    """Linear RGB of the colour space ``xy`` -> linear sRGB, its white adapted to D65 by Bradford (relative
    colorimetric, as :func:`_profile_transform` converts: its white is sRGB's white)."""
    d65 = _white_xyz(_D65)
    return np.linalg.inv(_xyz_matrix(_BT709)) @ _bradford(_white_xyz(xy[3]), d65) @ _xyz_matrix(xy)


_SRGB_ENCODED = np.rint(_srgb_encode(np.arange(65536) / 65535.0) * 255).astype(np.uint8)  # linear 16-bit -> 8-bit


def _encode_srgb8(linear: np.ndarray) -> np.ndarray:
    """Linear sRGB (float32, clipped to 0..1 here, in place) as 8-bit sRGB: by a table of 65536 linear steps, a
    twentieth of a level at most (in the shadows), not a power per value."""
    np.clip(linear, 0.0, 1.0, out=linear)
    linear *= 65535
    linear += 0.5
    return _SRGB_ENCODED[linear.astype(np.uint16)]


# TIFF's WhitePoint tag (318: x, y) of a CIELab image (TIFF 6.0 section 23: "the default is D50" where absent).
_TIFF_WHITE_POINT = 318
_D50_XY = (0.3457, 0.3585)
_WHITE_POINT_TOLERANCE = 0.001  # writers round D50's (0.34567, 0.35850) to 4 decimals, or as RATIONALs


def _tiff_white(img: Image.Image) -> np.ndarray | None:
    """The white (XYZ, Y = 1) of a CIELab TIFF's WhitePoint tag, or None where it has none, D50's (what
    :func:`_lab_transform` converts from), or one that names no white (logged)."""
    tags = getattr(img, "tag_v2", None)
    white = tags.get(_TIFF_WHITE_POINT) if tags is not None else None
    if white is None:
        return None
    try:
        x, y = (float(v) for v in white)
        if not (0 < x < 1 and 0 < y < 1 and x + y < 1):
            raise ValueError(f"WhitePoint {white} names no white (x, y with x + y < 1)")
    except (TypeError, ValueError) as e:
        log.warning("ignored the WhitePoint tag of a CIELab TIFF (%s); its colours are converted from CIELab D50", e)
        return None
    if abs(x - _D50_XY[0]) <= _WHITE_POINT_TOLERANCE and abs(y - _D50_XY[1]) <= _WHITE_POINT_TOLERANCE:
        return None
    return _white_xyz((x, y))


def _lab_to_srgb(lab: np.ndarray, white: np.ndarray) -> np.ndarray:
    """8-bit CIELab relative to ``white`` (XYZ, Y = 1), as Pillow's LAB mode holds it (L* 0..100 as 0..255, a* and
    b* signed bytes), in sRGB: CIE's Lab to XYZ, Bradford from ``white`` to D65, relative colorimetric as
    :func:`_lab_transform` (its white is sRGB's white, colours outside sRGB clipped)."""
    lightness = lab[..., 0].astype(np.float32) * np.float32(100 / 255)
    a, b = (lab[..., i].view(np.int8).astype(np.float32) for i in (1, 2))
    fy = (lightness + 16) / 116
    f = np.stack([fy + a / 500, fy, fy - b / 200], axis=-1)
    xyz = np.where(f > 6 / 29, f ** 3, 3 * (6 / 29) ** 2 * (f - 4 / 29))
    matrix = (np.linalg.inv(_xyz_matrix(_BT709)) @ _bradford(white, _white_xyz(_D65)) * white).astype(np.float32)
    return _encode_srgb8(xyz @ matrix.T)


# ITU-T H.273 transfer characteristics -> the ICC parametric curve (type, g, a, b, c, d) that decodes them.
# BT.709's (also BT.601's and BT.2020's) is the inverse of its camera curve, as browsers decode it; an unspecified
# one is sRGB's, as for an untagged photo. PQ and HLG (HDR) have no SDR curve: they are tone mapped before any
# profile is looked for (:func:`_decode_signal`), and refused here; the other defined ones
# (:data:`_NCLX_TRANSFER_NAMES`) are not converted; the rest are reserved codes, which name no curve: all refused, the
# raw values used.
_NCLX_TRANSFERS = {
    **dict.fromkeys((1, 6, 14, 15), (3, 1 / 0.45, 1 / 1.099, 0.099 / 1.099, 1 / 4.5, 0.081)),
    **dict.fromkeys((2, 13), (3, 2.4, 1 / 1.055, 0.055 / 1.055, 1 / 12.92, 0.04045)),
    4: (0, 2.2), 5: (0, 2.8), 8: (0, 1.0),
}
_NCLX_HDR_TRANSFERS = {16: "PQ, HDR", 18: "HLG, HDR"}
_NCLX_TRANSFER_NAMES = {7: "SMPTE 240M", 9: "logarithmic, 100:1", 10: "logarithmic, 316:1",
                        11: "xvYCC, IEC 61966-2-4", 12: "BT.1361 extended gamut", 17: "SMPTE ST 428-1, D-Cinema"}
# Colour primaries that are sRGB's (BT.709) or unspecified: the values are used as they are, as for a JPEG, unless
# the transfer is one a viewer visibly decodes otherwise (:data:`_NCLX_NOT_SRGB_TRANSFERS`) or HDR (refused).
_NCLX_SRGB_PRIMARIES = frozenset({1, 2})
# Linear and gamma 2.8: with sRGB's primaries too, a mid grey 60 and 22 levels off if taken for sRGB. BT.709's
# curve (1, 6, 14, 15) and gamma 2.2 (4) are taken as sRGB's there, as every untagged video frame is.
_NCLX_NOT_SRGB_TRANSFERS = frozenset({5, 8})
# The chromaticities (x, y) of red, green, blue and white of the others (ITU-T H.273 table 2).
_D65, _C = (0.3127, 0.3290), (0.310, 0.316)
_BT709 = ((0.64, 0.33), (0.30, 0.60), (0.15, 0.06), _D65)  # sRGB's
_SMPTE_C = ((0.630, 0.340), (0.310, 0.595), (0.155, 0.070), _D65)
_P3 = ((0.680, 0.320), (0.265, 0.690), (0.150, 0.060))
_NCLX_PRIMARIES = {
    4: ((0.67, 0.33), (0.21, 0.71), (0.14, 0.08), _C),  # BT.470 System M
    5: ((0.64, 0.33), (0.29, 0.60), (0.15, 0.06), _D65),  # BT.601 625 lines (PAL)
    6: _SMPTE_C, 7: _SMPTE_C,  # BT.601 525 lines, SMPTE 240M
    8: ((0.681, 0.319), (0.243, 0.692), (0.145, 0.049), _C),  # generic film
    9: ((0.708, 0.292), (0.170, 0.797), (0.131, 0.046), _D65),  # BT.2020, BT.2100
    11: (*_P3, (0.314, 0.351)),  # DCI-P3 (SMPTE RP 431-2)
    12: (*_P3, _D65),  # Display P3 (SMPTE EG 432-1)
    22: ((0.630, 0.340), (0.295, 0.605), (0.155, 0.077), _D65),  # EBU Tech. 3213
}
_BRADFORD = np.array([[0.8951, 0.2664, -0.1614], [-0.7502, 1.7135, 0.0367], [0.0389, -0.0685, 1.0296]])
_D50 = np.array([0.9642, 1.0, 0.8249])


def _s15(values) -> bytes:
    return struct.pack(f">{len(values)}i", *(round(v * 65536) for v in values))


def _nclx_icc(nclx: dict) -> bytes | None:
    """The ICC profile (v2 matrix/curve) of the colour space an nclx box (or a PNG's cICP chunk) names, or None for
    sRGB's primaries (BT.709) or unspecified ones with an SDR transfer but linear and gamma 2.8. Raises ValueError
    for primaries or a transfer that has no such profile (HDR: PQ, HLG, which :func:`_tone_map` converts)."""
    primaries, transfer = nclx.get("color_primaries"), nclx.get("transfer_characteristics")
    if transfer in _NCLX_HDR_TRANSFERS:  # whatever the primaries: a PQ photo with BT.709's is no sRGB photo
        raise ValueError(f"transfer characteristics {transfer} ({_NCLX_HDR_TRANSFERS[transfer]}) have no SDR "
                         f"conversion without tone mapping")
    if primaries in _NCLX_SRGB_PRIMARIES:
        if transfer not in _NCLX_NOT_SRGB_TRANSFERS:
            return None
        return _matrix_icc(_BT709, _NCLX_TRANSFERS[transfer], f"nclx {primaries}/{transfer}")
    if primaries not in _NCLX_PRIMARIES:
        raise ValueError(f"colour primaries {primaries} (ITU-T H.273) are not converted")
    if transfer in _NCLX_TRANSFER_NAMES:
        raise ValueError(f"transfer characteristics {transfer} ({_NCLX_TRANSFER_NAMES[transfer]}) are not converted")
    if transfer not in _NCLX_TRANSFERS:
        raise ValueError(f"transfer characteristics {transfer} are reserved in ITU-T H.273: they name no curve")
    return _matrix_icc(_NCLX_PRIMARIES[primaries], _NCLX_TRANSFERS[transfer], f"nclx {primaries}/{transfer}")


def _matrix_icc(xy, curve: tuple, description: str) -> bytes:
    """The ICC profile (v2 matrix/curve) of the RGB colour space whose red, green, blue and white have the
    chromaticities ``xy`` ((x, y) each), its tone curve ``curve`` (an ICC parametric curve: type, g, a, b, ...)."""
    # Adapted to the profile connection space's D50 (Bradford), as ICC profiles hold their colorants.
    colorants = (_bradford(_white_xyz(xy[3]), _D50) @ _xyz_matrix(xy)).T  # rows: rXYZ, gXYZ, bXYZ
    tone = _para(curve)
    return icc_profile_bytes({
        b"desc": _desc(description), b"wtpt": b"XYZ \0\0\0\0" + _s15(_D50),
        b"rXYZ": b"XYZ \0\0\0\0" + _s15(colorants[0]), b"gXYZ": b"XYZ \0\0\0\0" + _s15(colorants[1]),
        b"bXYZ": b"XYZ \0\0\0\0" + _s15(colorants[2]), b"rTRC": tone, b"gTRC": tone, b"bTRC": tone})


def _para(curve: tuple) -> bytes:
    kind, *params = curve
    return b"para\0\0\0\0" + struct.pack(">HH", kind, 0) + _s15(params)


def _desc(description: str) -> bytes:
    text = description.encode() + b"\0"
    return b"desc\0\0\0\0" + struct.pack(">I", len(text)) + text + b"\0" * 79


# PNG colour chunks (PNG 3rd edition, 4.3): cICP wins over iCCP, which wins over sRGB, which wins over cHRM and gAMA.
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_CHUNKS_READ = 256  # cICP comes before the image data, after a handful of chunks; no file is read chunk by chunk
_SRGB_GAMMA = 2.2  # what a gAMA chunk of an sRGB image holds (45455, libpng's), and what an untagged PNG is shown as
# A gAMA within this many 8-bit levels (anywhere on the curve) of gamma 2.2 is taken as sRGB: 2.15 to 2.25. The
# others are what a browser decodes differently: gamma 1.0 (linear values), 1.8 (old Mac), 2.0, 2.5.
_GAMMA_TOLERANCE_LEVELS = 2.0
_CHROMATICITY_TOLERANCE = 0.01  # cHRM's (x, y) this close to sRGB's: taken as sRGB (writers round them)
# x + y of a cHRM colour may reach 1 (no Z: BT.2020's red, ProPhoto's), plus the rounding of its two 1/100000 values.
_CHROMATICITY_SUM_MAX = 1 + 2e-5
# ffmpeg's gAMA for BT.709-family video (H.273 transfer 1, 6, 14, 15: its approximate gamma 1.961, after Apple's
# TN2257, written as lrint(100000 / 1.961) = 50994), what it writes for every such frame, alone before it wrote
# cICP too (2023). Decoded as the same frame tagged by cICP is (:func:`_nclx_icc`): as sRGB with sRGB's primaries,
# by BT.709's curve with others; as gamma 1.961 a mid grey came out 11 levels lighter, unlike its cICP twin.
_FFMPEG_VIDEO_GAMMA = 50994 / 100000
_FFMPEG_VIDEO_GAMMA_TOLERANCE = 1.5e-5  # one unit of gAMA's 1/100000 either side


def _png_cicp(stream: BinaryIO) -> tuple[int, int, int, int] | None:
    """The cICP chunk of a PNG (colour primaries, transfer, matrix, full range: ITU-T H.273 codes), which
    Pillow does not read, from the chunks before the image data; None if it has none."""
    stream.seek(len(_PNG_MAGIC))
    for _ in range(_PNG_CHUNKS_READ):
        header = stream.read(8)
        if len(header) < 8:
            return None
        length, kind = struct.unpack(">I4s", header)
        if kind == b"cICP":
            payload = stream.read(length)
            return tuple(payload) if length == 4 and len(payload) == 4 else None
        if kind in (b"IDAT", b"IEND"):  # cICP must come before these
            return None
        stream.seek(length + 4, os.SEEK_CUR)  # the payload and its CRC
    return None


def _cicp_error(cicp: tuple[int, int, int, int]) -> str | None:
    """Why a PNG's cICP chunk is invalid (PNG 3rd edition: matrix coefficients 0, as PNG holds RGB and never YCbCr;
    a full-range flag of 0 or 1), or None for a valid one."""
    if cicp[2] != 0:
        return f"matrix coefficients {cicp[2]}, where an RGB PNG has 0"
    if cicp[3] > 1:
        return f"video full range flag {cicp[3]}, where 0 (narrow) or 1 (full) are defined"
    return None


# HDR (PQ, HLG) tone mapped to SDR sRGB. The HDR light is read relative to BT.2408's reference ("graphics") white,
# 203 cd/m2, which becomes sRGB's white: an 18 % grey card lit as that white (36.5 cd/m2) comes out sRGB's mid grey
# (118), as Chrome, libplacebo and ffmpeg's tonemap filters place SDR in HDR. Above _TONE_KNEE of white (linear
# light) the brightest of a pixel's components is rolled off by a tanh shoulder, k + (1 - k) tanh((m - k) / (1 - k)),
# with slope 1 at the knee and white only as m goes to infinity, the pixel scaled by it (its hue and saturation kept):
# the reference white at ~0.95 (level 249), twice it at ~1.0, every highlight below white in the order it had.
# Colours outside sRGB after the primaries' conversion (BT.2020 -> sRGB) are clipped, as lcms does for profiles.
_REFERENCE_WHITE_NITS = 203.0
_TONE_KNEE = 0.8
# SMPTE ST 2084 (PQ) constants.
_PQ_M1, _PQ_M2 = 2610 / 16384, 2523 / 4096 * 128
_PQ_C1, _PQ_C2, _PQ_C3 = 3424 / 4096, 2413 / 4096 * 32, 2392 / 4096 * 32
_PQ_PEAK_NITS = 10000.0
# ARIB STD-B67 (HLG) constants, and BT.2100's reference OOTF for a 1000 cd/m2 display (its nominal peak): system
# gamma 1.2, black level 0.
_HLG_A = 0.17883277
_HLG_B, _HLG_C = 1 - 4 * _HLG_A, 0.5 - _HLG_A * float(np.log(4 * _HLG_A))
_HLG_PEAK_NITS, _HLG_GAMMA = 1000.0, 1.2


def _pq_nits(signal: np.ndarray) -> np.ndarray:
    """SMPTE ST 2084's EOTF: signal 0..1 -> display light, cd/m2."""
    p = np.power(np.clip(signal, 0.0, 1.0), 1 / _PQ_M2)
    return _PQ_PEAK_NITS * np.power(np.maximum(p - _PQ_C1, 0.0) / (_PQ_C2 - _PQ_C3 * p), 1 / _PQ_M1)


def _hlg_scene(signal: np.ndarray) -> np.ndarray:
    """ARIB STD-B67's inverse OETF: signal 0..1 -> scene light 0..1."""
    signal = np.clip(signal, 0.0, 1.0)
    with np.errstate(over="ignore"):
        return np.where(signal <= 0.5, signal ** 2 / 3, (np.exp((signal - _HLG_C) / _HLG_A) + _HLG_B) / 12)


def _hdr_primaries(primaries: int):
    if primaries in _NCLX_SRGB_PRIMARIES:  # BT.709 or unspecified: sRGB's, as for SDR (:func:`_nclx_icc`)
        return _BT709
    if primaries not in _NCLX_PRIMARIES:
        raise ValueError(f"colour primaries {primaries} (ITU-T H.273) are not converted")
    return _NCLX_PRIMARIES[primaries]


def _tone_table(bits: int, narrow: bool, transfer: int) -> np.ndarray:
    """The light (float32) of every code of ``bits`` (8 or 16, narrow or full range) of PQ (16) or HLG (18), as
    :func:`_tone_map` reads it: relative to the reference white for PQ, HLG's scene light."""
    signal = _code_signal(bits, narrow)
    if transfer == 16:
        return (_pq_nits(signal) / _REFERENCE_WHITE_NITS).astype(np.float32)
    return _hlg_scene(signal).astype(np.float32)


# Pixels decoded (:func:`_decode_signal`) or composited onto white (:func:`_to_rgb`) at a time: a float32 plane of
# them (1 MB) stays in the CPU's cache through the dozen numpy operations of :func:`_tone_map` (whole 20 MP planes went
# to memory and back each time: twice as slow), and no full-size temporary is made (a 16-bit photo's codes looked up
# whole took 24 bytes a pixel: numpy indexes by int64).
_DECODE_BLOCK_PIXELS = 1 << 18


def _tone_map(codes: np.ndarray, table: np.ndarray, xy, transfer: int) -> np.ndarray:
    """HDR codes (h, W, 3, or 1 for grey) of PQ (16) or HLG (18) as SDR sRGB (h, W, 3), uint8: decoded to light by
    ``table`` (:func:`_tone_table`), ``xy`` the image's primaries (:func:`_hdr_primaries`), then as
    :data:`_REFERENCE_WHITE_NITS` says. float32, one plane at a time (numpy's (N, 3) @ (3, 3) and reductions over
    a last axis of 3 are several times slower); a block of rows at a time (:data:`_DECODE_BLOCK_PIXELS`)."""
    last = codes.shape[2] - 1
    planes = [table.take(codes[..., min(i, last)]) for i in range(3)]
    if transfer == 18:  # BT.2100's OOTF: Fd = Lw Ys^(gamma - 1) E, Ys the scene luminance in the image's primaries
        luma = _xyz_matrix(xy)[1]
        gain = _weighted(planes, luma)
        np.maximum(gain, np.float32(1e-12), out=gain)
        np.power(gain, np.float32(_HLG_GAMMA - 1), out=gain)
        gain *= np.float32(_HLG_PEAK_NITS / _REFERENCE_WHITE_NITS)
        for plane in planes:
            plane *= gain
        del gain
    if xy is not _BT709:
        matrix = _to_srgb_linear(xy)
        planes = [_weighted(planes, row) for row in matrix]
        for plane in planes:
            np.maximum(plane, 0.0, out=plane)  # outside sRGB: clipped
    brightest = np.maximum(np.maximum(planes[0], planes[1]), planes[2])
    over = brightest > _TONE_KNEE
    if over.any():
        m = brightest[over]
        scale = np.float32(_TONE_KNEE) + np.float32(1 - _TONE_KNEE) * np.tanh((m - np.float32(_TONE_KNEE))
                                                                             / np.float32(1 - _TONE_KNEE))
        scale /= m
        for plane in planes:
            plane[over] *= scale
    out = np.empty(codes.shape[:2] + (3,), np.uint8)
    for i, plane in enumerate(planes):
        out[..., i] = _encode_srgb8(plane)
    return out


def _weighted(planes: list[np.ndarray], weights) -> np.ndarray:
    """sum(w * plane), float32, a plane at a time."""
    total = planes[0] * np.float32(weights[0])
    for plane, weight in zip(planes[1:], weights[1:]):
        total += plane * np.float32(weight)
    return total


def _code_signal(bits: int, narrow: bool) -> np.ndarray:
    """The signal (0..1, float64) of every code of ``bits`` (8 or 16): H.273's narrow range puts black at 16 and
    white at 235 (times 2^(bits - 8): 4096 and 60160 in 16 bits, 10-bit 64 and 940 as PNG scales them), clipped."""
    codes = np.arange(2 ** bits, dtype=np.float64)
    if not narrow:
        return codes / (2 ** bits - 1)
    scale = 2 ** (bits - 8)
    return np.clip((codes - 16 * scale) / (219 * scale), 0.0, 1.0)


def _png_chunks(info: dict) -> str:
    """"cHRM and gAMA colour chunks", or the one a PNG has, for messages."""
    names = [name for name, key in (("cHRM", "chromaticity"), ("gAMA", "gamma")) if key in info]
    return f"{' and '.join(names)} colour chunk{'s' if len(names) > 1 else ''}"


def _png_chunks_icc(info: dict, space: str) -> bytes | None:
    """The RGB ICC profile of what a PNG's cHRM and gAMA chunks say (Pillow reads them into ``info``), or None where
    they say sRGB, within what a viewer shows (:data:`_GAMMA_TOLERANCE_LEVELS`, :data:`_CHROMATICITY_TOLERANCE`).
    Without gAMA the curve is sRGB's; without cHRM (and for grey pixels, which have no primaries) the primaries are.
    ffmpeg's gAMA of BT.709 video is that transfer (:data:`_FFMPEG_VIDEO_GAMMA`). Raises ValueError for values that
    name no colour space."""
    gamma, chromaticity = info.get("gamma"), info.get("chromaticity")
    curve, srgb_curve = _NCLX_TRANSFERS[13], True  # sRGB's
    if gamma is not None:
        if not 0 < gamma <= 10:
            raise ValueError(f"gAMA {gamma} is no gamma")
        if abs(gamma - _FFMPEG_VIDEO_GAMMA) <= _FFMPEG_VIDEO_GAMMA_TOLERANCE:
            curve = _NCLX_TRANSFERS[1]  # BT.709's (sRGB's with sRGB's primaries, as :func:`_nclx_icc` takes it)
        else:
            curve = (0, 1 / gamma)  # as it says, where it is converted: gamma 2.2 is not quite sRGB's curve
            srgb_curve = np.abs(_LEVELS ** (curve[1] / _SRGB_GAMMA) - _LEVELS).max() * 255 <= _GAMMA_TOLERANCE_LEVELS
    xy = None
    if chromaticity is not None and space == "RGB":
        values = tuple(chromaticity)
        if len(values) != 8 or any(not (0 <= x < 1 and 0 < y <= 1 and x + y <= _CHROMATICITY_SUM_MAX)
                                   for x, y in zip(values[::2], values[1::2])):
            raise ValueError(f"cHRM {values} names no colour space (white, red, green, blue (x, y) each, with "
                             f"x >= 0, y > 0, x + y <= 1)")
        white, *rgb = [values[i:i + 2] for i in range(0, 8, 2)]
        xy = (*rgb, white)
        if np.abs(np.array(xy) - np.array(_BT709)).max() <= _CHROMATICITY_TOLERANCE:
            xy = None
    if srgb_curve and xy is None or space not in ("L", "RGB"):
        return None
    # An RGB profile for grey pixels too (their values replicated, a neutral grey in it): lcms's 8-bit grey to RGB
    # transform interpolates a linear curve's shadows ~10 levels dark, its RGB matrix/curve one is exact.
    return _matrix_icc(xy or _BT709, curve, f"PNG {_png_chunks(info)}")


def icc_profile_bytes(tags: dict[bytes, bytes], space: bytes = b"RGB ", cls: bytes = b"mntr",
                      pcs: bytes = b"XYZ ") -> bytes:
    """An ICC v2.1 profile holding ``tags`` (signature -> the tag's bytes), each 4-byte aligned after a table of
    them; ``space`` the colour space of its pixels, ``cls`` its class, ``pcs`` its connection space (D50)."""
    offset = 128 + 4 + 12 * len(tags)
    table, data = b"", b""
    for sig, body in tags.items():
        data += b"\0" * (-(offset + len(data)) % 4)
        table += struct.pack(">4sII", sig, offset + len(data), len(body))
        data += body
    header = (struct.pack(">I4sI4s4s4s", offset + len(data), b"lcms", 0x02100000, cls, space, pcs)
              + b"\0" * 12 + b"acsp" + b"\0" * 28 + _s15(_D50) + b"\0" * 48)
    return header + struct.pack(">I", len(tags)) + table + data


def _boxes(data: bytes, start: int = 0, end: int | None = None):
    """(type, payload start, payload end) of each ISO BMFF box in ``data[start:end]``."""
    end = len(data) if end is None else end
    while start + 8 <= end:
        size, kind = struct.unpack_from(">I4s", data, start)
        header = 8
        if size == 1 and start + 16 <= end:
            size, header = struct.unpack_from(">Q", data, start + 8)[0], 16
        elif size == 0:
            size = end - start
        if size < header or start + size > end:
            return
        yield kind, start + header, start + size
        start += size


# Top-level boxes looked through for the meta box: a photo has a handful (ftyp, meta, mdat, perhaps free); a file of
# millions of empty ones is not read box by box.
_TOP_BOXES_READ = 1024


def _top_box(stream: BinaryIO, wanted: bytes) -> bytes | None:
    """The payload of the first top-level ISO BMFF box of type ``wanted`` in ``stream``, found by seeking past the
    others' headers (an AVIF's image data, ``mdat``, may come first and is not read); None if there is none."""
    stream.seek(0, os.SEEK_END)
    total, at = stream.tell(), 0
    for _ in range(_TOP_BOXES_READ):
        if at + 8 > total:
            break
        stream.seek(at)
        header = stream.read(16)
        size, kind = struct.unpack_from(">I4s", header)
        length = 8
        if size == 1 and len(header) == 16:
            size, length = struct.unpack_from(">Q", header, 8)[0], 16
        elif size == 0:
            size = total - at
        if size < length:
            return None
        if kind == wanted:
            stream.seek(at + length)
            return stream.read(min(size, total - at) - length)
        at += size
    return None


def _primary_properties(meta: bytes) -> set[int] | None:
    """The 1-based indices, in ``meta/iprp/ipco``, of the properties of the primary item (``pitm``), from the
    ``ipma`` boxes; None where the boxes that say so are missing or malformed."""
    primary, props = None, {}
    try:
        for kind, start, end in _boxes(meta, 4):  # a full box: version and flags first
            if kind == b"pitm":
                primary = struct.unpack_from(">H" if meta[start] == 0 else ">I", meta, start + 4)[0]
            if kind != b"iprp":
                continue
            for kind, start, _ in _boxes(meta, start, end):
                if kind != b"ipma":
                    continue
                version, wide = meta[start], meta[start + 3] & 1
                at = start + 8
                for _ in range(struct.unpack_from(">I", meta, start + 4)[0]):
                    item = struct.unpack_from(">H" if version < 1 else ">I", meta, at)[0]
                    at += 2 if version < 1 else 4
                    count = meta[at]
                    at += 1
                    mask, fmt = (0x7FFF, ">H") if wide else (0x7F, ">B")
                    indices = [struct.unpack_from(fmt, meta, at + i * (1 + wide))[0] & mask for i in range(count)]
                    at += count * (1 + wide)
                    props.setdefault(item, set()).update(indices)
    except (struct.error, IndexError):
        return None
    return props.get(primary) if primary is not None else None


def _avif_nclx(stream: BinaryIO) -> dict | None:
    """The nclx colour box of an AVIF file's primary image (``meta/iprp/ipco/colr``, the one ``ipma`` gives the
    ``pitm`` item: an alpha image may have its own), as pi-heif reports a HEIC's; the ``meta`` box wherever it is
    (after the image data too). None when it has none; where the item's properties cannot be read, the one nclx
    box of the file (None if several differ)."""
    meta = _top_box(stream, b"meta")
    if meta is None:
        return None
    primary = _primary_properties(meta)
    found = set()
    for kind, start, end in _boxes(meta, 4):
        if kind != b"iprp":
            continue
        for kind, start, end in _boxes(meta, start, end):
            if kind != b"ipco":
                continue
            for index, (kind, start, end) in enumerate(_boxes(meta, start, end), 1):
                if (kind == b"colr" and end - start >= 11 and meta[start:start + 4] == b"nclx"
                        and (primary is None or index in primary)):
                    found.add(struct.unpack_from(">HH", meta, start + 4))
    if len(found) != 1:
        return None
    primaries, transfer = found.pop()
    return {"color_primaries": primaries, "transfer_characteristics": transfer}


def _srgb_transform(img: Image.Image, name: str) -> tuple[ImageCms.ImageCmsTransform | None, str]:
    """The transform that turns ``img``'s colours into sRGB, from a PNG's cICP chunk (which wins over all else,
    as PNG says), else the ICC profile it embeds, else the colour space its nclx box names (a HEIC photo may be
    tagged so alone), or a PNG's cHRM and gAMA chunks (without an sRGB chunk): None when it has none of them,
    or an sRGB one (no transform is built for those), or one that cannot be used (logged once: corrupt, or for
    another colour space than the pixels', or an HDR transfer; the raw values are used, the photo is not
    failed). With it, what it came from ("ICC colour profile", "nclx colour tag", ...), for a failure to name.
    A Lab image with none is converted from CIELab D50 by :func:`_to_rgb`."""
    icc = img.info.get("icc_profile")
    what = "ICC colour profile"
    space = _COLOUR_SPACE.get(img.mode)
    try:
        cicp = img.info.get("cicp")
        if cicp is not None:
            what = "cICP colour chunk"
            if space != "RGB":  # grey pixels: primaries do not apply
                return None, what
            icc = _nclx_icc({"color_primaries": cicp[0], "transfer_characteristics": cicp[1]})
            if icc is None:
                return None, what
        elif not icc or not isinstance(icc, bytes):
            if img.format == "PNG" and "srgb" not in img.info and ("gamma" in img.info or "chromaticity" in img.info):
                what = _png_chunks(img.info)
                icc = _png_chunks_icc(img.info, space)
                if icc is None:
                    return None, what
                return _profile_transform(icc, "RGB"), what  # grey pixels too: :func:`_to_rgb` makes them RGB
            nclx = img.info.get("nclx_profile")
            if not isinstance(nclx, dict) or space != "RGB":  # grey pixels: primaries do not apply
                return None, what
            what = "nclx colour tag"
            icc = _nclx_icc(nclx)
            if icc is None:
                return None, what
        if space is None:
            raise ValueError(f"no colour management for {img.mode} images")
        return _profile_transform(icc, space), what
    except MemoryError:
        raise
    except Exception as e:
        _ignored_profile(name, e, what, img.mode)
        return None, what


def _ignored_profile(name: str, e: BaseException, what: str, mode: str) -> None:
    log.warning("ignored the %s of %s (%s: %s); %s", what, name, _error_name(e), e,
                "its colours are converted from CIELab D50" if mode == "LAB"
                else "its colours are not converted to sRGB")


def _error_name(e: BaseException) -> str:
    """``IndexError``, ``struct.error``: the exception's type, as a reader would look it up."""
    kind = type(e)
    return kind.__qualname__ if kind.__module__ == "builtins" else f"{kind.__module__}.{kind.__qualname__}"


# Pillow decodes a 2 or 4-bit grey PNG's samples to 8 bits (times 85 or 17) but leaves its tRNS value raw.
_LOW_BIT_GREY = {"L;2": 85, "L;4": 17}


def _low_bit_scale(img: Image.Image) -> int:
    """What Pillow multiplies a 2 or 4-bit grey PNG's samples by to decode them as mode L (1 for other images);
    read from the raw mode of its tile, which ``load()`` empties."""
    tile = img.tile[0] if img.format == "PNG" and img.mode == "L" and len(img.tile) == 1 else None
    return _LOW_BIT_GREY.get(tile.args, 1) if tile is not None and isinstance(tile.args, str) else 1


def _scale_transparency(img: Image.Image, scale: int) -> None:
    """Puts the tRNS value of a low-bit grey PNG (:func:`_low_bit_scale`) on its decoded pixels' 8-bit scale,
    so that its transparent pixels are composited; one out of the bit depth's range names no pixel."""
    transparent = img.info.get("transparency")
    if scale == 1 or not isinstance(transparent, int):
        return
    if transparent * scale > 255:
        del img.info["transparency"]
    else:
        img.info["transparency"] = transparent * scale


def _sixteen_bit_key(img: Image.Image) -> tuple[int, int, int] | None:
    """The tRNS colour of a 16-bit RGB PNG, read before ``load()`` (which empties the tile), else None.

    Pillow decodes such a PNG to 8 bits (the high bytes) but keeps the colour in 16 bits, so its own
    conversion made no pixel transparent, or (a colour under 256) every pixel of the same high bytes."""
    key = img.info.get("transparency")
    tile = img.tile[0] if img.format == "PNG" and img.mode == "RGB" and len(img.tile) == 1 else None
    return key if tile is not None and tile.args == "RGB;16B" and isinstance(key, tuple) and len(key) == 3 else None


def _key_out(img: Image.Image, key: tuple[int, int, int], stream: BinaryIO) -> None:
    """Makes the pixels of a decoded 16-bit RGB PNG (:func:`_sixteen_bit_key`) that hold ``key`` transparent,
    in place (mode RGBA): their low bytes come from decoding ``stream`` again, as little-endian."""
    low = np.asarray(_low_bytes(stream, "RGB;16B"))
    high = np.asarray(img)
    wanted = np.array(key, np.int64)
    transparent = ((high == wanted >> 8) & (low == wanted & 0xFF)).all(axis=2)
    del img.info["transparency"]
    img.putalpha(Image.fromarray(np.where(transparent, 0, 255).astype(np.uint8), "L"))


def _sixteen_bit_rgb(img: Image.Image) -> str | None:
    """The raw mode of a 16-bit RGB or RGBA PNG ("RGB;16B", "RGBA;16B"), read before ``load()`` empties the tile:
    Pillow decodes such a PNG to its high bytes (:func:`_low_bytes` reads the rest); None for any other image."""
    tile = img.tile[0] if img.format == "PNG" and len(img.tile) == 1 else None
    return tile.args if tile is not None and tile.args in ("RGB;16B", "RGBA;16B") else None


def _low_bytes(stream: BinaryIO, rawmode: str) -> Image.Image:
    """The low bytes of a 16-bit RGB or RGBA PNG's samples (``rawmode`` its tile's, :func:`_sixteen_bit_rgb`), as an
    RGB or RGBA image, decoding ``stream`` again as little-endian: what Pillow's 8-bit decoding of it drops."""
    stream.seek(0)
    with Image.open(stream, formats=["PNG"]) as again:
        again.tile = [again.tile[0]._replace(args=rawmode.replace("16B", "16L"))]
        again.load()
        return again


def _signal_coding(img: Image.Image) -> tuple[int, int, bool] | None:
    """(primaries, transfer, narrow range) of an image whose values need decoding before any colour conversion: a
    PNG whose cICP chunk says narrow range or HDR (PQ, HLG), a HEIF or AVIF photo whose nclx box (with no ICC
    profile, which wins) says HDR (libheif and libavif apply its range themselves); None for the others."""
    cicp = img.info.get("cicp")
    if cicp is not None:
        return (cicp[0], cicp[1], cicp[3] == 0) if cicp[3] == 0 or cicp[1] in _NCLX_HDR_TRANSFERS else None
    nclx = img.info.get("nclx_profile")
    icc = img.info.get("icc_profile")
    if isinstance(nclx, dict) and not (icc and isinstance(icc, bytes)):
        transfer = nclx.get("transfer_characteristics")
        if transfer in _NCLX_HDR_TRANSFERS:
            return nclx.get("color_primaries"), transfer, False
    return None


def _decode_signal(img: Image.Image, stream: BinaryIO, wide: str | None,
                   coding: tuple[int, int, bool]) -> Image.Image:
    """``img`` (decoded, not yet upright) with its values decoded as ``coding`` (:func:`_signal_coding`) says: narrow
    range expanded to full (then converted as its primaries and transfer say, like any other), HDR tone mapped to
    sRGB (:func:`_tone_map`); alpha kept. From all 16 bits of a 16-bit PNG (``wide``, :func:`_sixteen_bit_rgb`).
    A new image, ``img`` left as it was; a block of rows at a time (:data:`_DECODE_BLOCK_PIXELS`), into the low
    bytes' image where there is one: no full-size temporary. Raises ValueError for primaries that are not
    converted, before any work."""
    primaries, transfer, narrow = coding
    hdr = transfer in _NCLX_HDR_TRANSFERS
    xy = _hdr_primaries(primaries) if hdr else None
    transparent = img.info.get("transparency")
    if not hdr and wide is None and img.mode in ("L", "RGB") and transparent is None:
        # Pillow's own table lookup: in C, 10x faster
        decoded = img.point(list(np.rint(_code_signal(8, True) * 255).astype(int)) * len(img.getbands()))
        decoded.info = dict(img.info)
        decoded.info["cicp"] = (primaries, transfer, 0, 1)
        return decoded
    width = img.width
    if wide is not None and img.mode in ("RGB", "RGBA"):
        bits, channels, keyed = 16, 3, img.mode == "RGBA"  # RGBA: its own alpha, or a tRNS colour's (:func:`_key_out`)
        decoded = _low_bytes(stream, wide)  # its blocks are overwritten by the decoded ones, once read

        def block(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
            high = np.asarray(img.crop(box))
            codes = high[..., :3].astype(np.uint16)
            codes <<= 8
            codes |= np.asarray(decoded.crop(box))[..., :3]
            return codes, (high[..., 3] if keyed else None)
    elif img.mode in _SIXTEEN_BIT:
        bits, channels, keyed = 16, 1, isinstance(transparent, int)
        decoded = None

        def block(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
            grey = np.asarray(img.crop(box))
            codes = np.clip(grey, 0, 65535).astype(np.uint16)[..., None]
            return codes, (np.where(grey == transparent, 0, 255).astype(np.uint8) if keyed else None)
    else:
        grey = img.mode in ("L", "LA", "La", "1")
        keyed = transparent is not None or img.mode in ("PA", "LA", "La", "RGBA", "RGBa")
        bits, channels, decoded = 8, 1 if grey else 3, None
        mode = ("LA" if keyed else "L") if grey else ("RGBA" if keyed else "RGB")
        source = img if img.mode == mode else img.convert(mode)

        def block(box: tuple[int, int, int, int]) -> tuple[np.ndarray, np.ndarray | None]:
            arr = np.asarray(source.crop(box))
            if arr.ndim == 2:
                arr = arr[..., None]
            return (arr[..., :-1], arr[..., -1]) if keyed else (arr, None)
    colours = 3 if hdr else channels
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[colours + keyed]
    if decoded is None:
        decoded = Image.new(mode, img.size)
    elif decoded.mode != mode:  # a 16-bit RGB PNG with a tRNS colour: RGBA now
        decoded = decoded.convert(mode)
    table = _tone_table(bits, narrow, transfer) if hdr else np.rint(_code_signal(bits, narrow) * 255).astype(np.uint8)
    rows = max(1, _DECODE_BLOCK_PIXELS // max(1, width))
    for top in range(0, img.height, rows):
        box = (0, top, width, min(top + rows, img.height))
        codes, alpha = block(box)
        colour = _tone_map(codes, table, xy, transfer) if hdr else table.take(codes)
        if alpha is not None:
            colour = np.concatenate([colour, alpha[..., None]], axis=2)
        decoded.paste(Image.fromarray(colour[..., 0] if mode == "L" else colour), box[:2])
    decoded.info = {key: value for key, value in img.info.items() if key != "transparency"}
    if hdr:  # sRGB now: nothing else in the file describes these values
        for key in ("icc_profile", "nclx_profile", "gamma", "chromaticity"):
            decoded.info.pop(key, None)
        decoded.info["cicp"] = (1, 13, 0, 1)
    else:
        decoded.info["cicp"] = (primaries, transfer, 0, 1)
    return decoded


def _upright(img: Image.Image) -> Image.Image:
    """The decoded image turned upright by its EXIF orientation, whatever else its EXIF holds.

    ``ImageOps.exif_transpose`` also rewrites the EXIF block without the orientation, and
    that fails (``struct.error``, ``TypeError``, ...) on malformed entries, e.g. an ASCII
    value under a tag Pillow writes as LONG. The pixels are fine then: apply the Orientation
    tag alone if it can be read, else keep the image as stored.
    """
    try:
        if img.getexif().get(_ORIENTATION) not in _UPRIGHT:  # upright already: exif_transpose would copy it
            return img
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


# Formats Pillow decodes by running another program on the file: EPS runs Ghostscript (``gs``), a PostScript
# interpreter, on whatever was uploaded, wherever one is installed. No photo comes as EPS: refused.
_RUNS_A_PROGRAM = frozenset({"EPS"})
# Formats whose plugin decodes another image file embedded in them: IPTC/NAA (tried on any bytes no other plugin
# claims) declares its size in a header field, the one checked against ``max_pixels``, then opens its image data
# with a bare ``Image.open`` (any format, no size check but Pillow's own) and decodes it whole: a 97 kB file
# declaring 1x1 pixels came back as a 10000x10000 array (1.1 GB). No photo comes as IPTC/NAA: refused.
_OPENS_ANOTHER_FILE = frozenset({"IPTC"})
# FITS (astronomy data, never a photo): Pillow reads its 16-bit, 32-bit and float samples little-endian, where FITS
# stores them big-endian (Pillow issue #9574), and ignores BZERO/BSCALE: those images came out as noise. Its
# gzip-compressed variant is decoded by a Python loop over every pixel: an 84 kB upload of 20 MP took 3.7 s and 25
# bytes a pixel. Refused, named by its first header card (SIMPLE = T), which every FITS file opens with.
_NOT_PHOTOS = frozenset({"FITS"})
_FITS_MAGIC = b"SIMPLE  ="


def _safe_formats() -> list[str]:
    """Every format Pillow opens here but those it decodes while opening (:data:`_DECODED_AT_OPEN`), those it
    decodes with another program (:data:`_RUNS_A_PROGRAM`) and those holding another image file
    (:data:`_OPENS_ANOTHER_FILE`), and FITS (:data:`_NOT_PHOTOS`)."""
    Image.init()
    return [fmt for fmt in Image.OPEN
            if fmt not in _DECODED_AT_OPEN and fmt not in _RUNS_A_PROGRAM and fmt not in _OPENS_ANOTHER_FILE
            and fmt not in _NOT_PHOTOS]


def _starts_with(source: str | Path | bytes, magic: bytes) -> bool:
    if isinstance(source, (bytes, bytearray)):
        return bytes(source[:len(magic)]) == magic
    try:
        with open(source, "rb") as f:
            return f.read(len(magic)) == magic
    except OSError:
        return False


# TIFF photometric interpretations of Lab (TIFF 6.0 section 23; TIFF Technical Note 3): Pillow reads 8-bit CIELab
# with 3 samples alone, and fails to identify the rest, which were then called "not an image (unknown format)".
_TIFF_LABS = {8: "CIELab", 9: "ICCLab", 10: "ITULab"}


def _lab_tiff(source: str | Path | bytes) -> str | None:
    """"a CIELab TIFF (16 bits per sample, 3 samples)" for a TIFF whose first image is in a Lab colour space,
    read from its first directory; None for any other file, or one whose directory cannot be read."""
    try:
        with io.BytesIO(source) if isinstance(source, (bytes, bytearray)) else open(source, "rb") as f:
            header = f.read(8)
            if header[:4] not in (b"II*\0", b"MM\0*"):
                return None
            ifd = TiffImagePlugin.ImageFileDirectory_v2(header)
            f.seek(ifd.next)
            ifd.load(f)
        lab = _TIFF_LABS.get(ifd.get(262))
        if lab is None:
            return None
        bits = ifd.get(258, (1,))
        bits = bits if isinstance(bits, tuple) else (bits,)
        depth = "/".join(str(b) for b in sorted(set(bits)))
        return f"a {lab} TIFF ({depth} bits per sample, {ifd.get(277, 1)} samples)"
    except MemoryError:
        raise
    except Exception:
        return None


class _PpmDecoder(PpmImagePlugin.PpmDecoder):
    """Pillow's binary PPM/PGM decoder (maxval other than 255, or 65535 in colour: 16-bit RGB, what dcraw -4 and
    ImageMagick's -depth 16 write), in numpy: the same values (``round(value / maxval * out_max)``, the same float64
    operations, half to even as Python's round), a block of samples at a time. Pillow's loop over every sample took
    about 0.3 s a MB: a 16-bit colour PPM over :data:`PYTHON_DECODED_MAX_BYTES` (800x600) was refused for it."""

    def decode(self, buffer):
        maxval = self.args[-1]
        size = 1 if maxval < 256 else 2
        out_max = 65535 if self.mode == "I" else 255
        bands = Image.getmodebands(self.mode)
        total = self.state.xsize * self.state.ysize * bands
        out = np.empty(total, "<u4" if self.mode == "I" else np.uint8)  # Pillow's "I;32" (o32), or 8-bit bands
        count = 0  # samples decoded
        while count < total:  # a block of whole pixels at a time: the file read whole was 240 MB more (40 MP, 16-bit)
            wanted = min(_DECODE_BLOCK_PIXELS * bands, total - count) * size
            raw = self.fd.read(wanted)
            usable = len(raw) // (size * bands) * bands  # whole pixels, as Pillow's loop stops at a short one (EOF)
            block = np.frombuffer(raw, ">u2" if size == 2 else np.uint8, count=usable) / maxval
            block *= out_max
            np.rint(block, out=block)
            out[count:count + usable] = np.minimum(block, out_max, out=block)
            count += usable
            if len(raw) < wanted:  # the end of the file
                break
        self.set_as_raw(out[:count].tobytes(), "I;32" if self.mode == "I" else self.mode)
        return -1, 0


Image.register_decoder("ppm", _PpmDecoder)
# Decoders of Image.DECODERS this module replaced by numpy ones: not slow, not under the budget
_FAST_DECODERS = frozenset({"ppm"})


def _check_python_decoded(img: Image.Image, stream: BinaryIO, name: str) -> None:
    """Raises ImageDecodeError for an image Pillow would decode in Python (:data:`PYTHON_DECODED_MAX_BYTES`) whose
    encoded data is over that budget, before any of it is decoded."""
    codec = next((tile.codec_name for tile in img.tile
                  if tile.codec_name in Image.DECODERS and tile.codec_name not in _FAST_DECODERS), None)
    if codec is None:
        return
    size = stream.getbuffer().nbytes if isinstance(stream, io.BytesIO) else os.fstat(stream.fileno()).st_size
    if size > PYTHON_DECODED_MAX_BYTES:
        raise ImageDecodeError(f"cannot decode {name}: {img.format} data of {size} bytes is over "
                               f"{PYTHON_DECODED_MAX_BYTES}, the most taken where Pillow decodes in Python (its "
                               f"{codec!r} decoder, about 2 s a MB); save it as PNG or JPEG")


def _read_stream(path: str | Path, name: str, max_pixels: int) -> bytes:
    """The bytes a pipe or device gives, at most :data:`STREAM_BYTES_PER_PIXEL` per allowed pixel
    (plus 1 MiB): more than any image within ``max_pixels`` takes (``/dev/zero`` would never end)."""
    limit = STREAM_BYTES_PER_PIXEL * max_pixels + 2**20
    with open(path, "rb") as f:
        data = f.read(limit + 1)
    if not data:
        raise ImageDecodeError(f"empty image: {name} gave 0 bytes")
    if len(data) > limit:
        raise ImageTooLarge(f"image too large: {name} gives more than {limit} bytes, more than an image of "
                            f"{max_pixels} pixels takes", limit=max_pixels)
    return data


def load_image(source: str | Path | bytes, *, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Decodes an image file or bytes into an upright RGB uint8 array.

    Args:
        source: A file path (a pipe or a device, e.g. ``/dev/stdin``, is read whole first), or the
            encoded bytes.
        max_pixels: Refuse images with more pixels than this (decompression bombs).

    Returns:
        Array of shape (H, W, 3), dtype uint8, with EXIF orientation applied, in sRGB (an embedded
        ICC profile of another colour space is converted from).

    Raises:
        ImageDecodeError: Empty input, unknown format, truncated or corrupt data, a refused format (icons, EPS,
            IPTC/NAA, FITS), more than :data:`PYTHON_DECODED_MAX_BYTES` of data Pillow decodes in Python, or too
            many pixels (:class:`ImageTooLarge`, with the numbers).
    """
    if isinstance(source, (bytes, bytearray)):
        if not source:
            raise ImageDecodeError("empty image: 0 bytes")
        stream: io.BytesIO | str | Path | BinaryIO = io.BytesIO(source)
        name = "the uploaded file"  # in messages: "not an image (unknown format): the uploaded file"
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
                    raise ImageTooLarge(
                        f"image too large: {img.width}x{img.height} = {pixels} pixels, "
                        f"the limit is {max_pixels}", pixels, max_pixels
                    )
                if img.format not in _OPENS_PRIMARY:
                    img.seek(0)  # first frame of GIF/WebP animations
                _check_python_decoded(img, stream, name)
                low_bit_scale, key, wide = _low_bit_scale(img), _sixteen_bit_key(img), _sixteen_bit_rgb(img)
                img.load()
                _scale_transparency(img, low_bit_scale)
                if img.format == "AVIF" and not img.info.get("icc_profile"):  # Pillow's plugin reads no nclx box
                    img.info["nclx_profile"] = _avif_nclx(stream)
                if img.format == "PNG" and (cicp := _png_cicp(stream)) is not None:
                    if (invalid := _cicp_error(cicp)) is None:
                        img.info["cicp"] = cicp
                    else:  # says nothing reliable: the file is read as without it
                        log.warning("ignored the cICP colour chunk of %s (%s): read as without it", name, invalid)
                if key is not None:
                    _key_out(img, key, stream)
                if (coding := _signal_coding(img)) is not None:
                    try:
                        decoded = _decode_signal(img, stream, wide, coding)
                    except MemoryError:
                        raise
                    except Exception as e:  # the tag is at fault: its raw values, as for a profile not used
                        what = "cICP colour chunk" if "cicp" in img.info else "nclx colour tag"
                        _ignored_profile(name, e, what, img.mode)
                        img.info.pop("cicp", None)
                        img.info.pop("nclx_profile", None)
                    else:
                        # The raw pixels' memory goes now, not when the `with` ends (the base class's close(): the
                        # pixels alone, the stream left open): a full-size copy less while the result is made.
                        Image.Image.close(img)
                        img = decoded
                # Read from the image as decoded (a transpose keeps no promise about info); the colours
                # are converted after the transpose, whichever way it goes (a per-pixel map: the same pixels).
                transform, source = _srgb_transform(img, name)
                lab_white = _tiff_white(img) if img.mode == "LAB" and transform is None else None
                upright = _upright(img)
                if upright is not img:
                    # The pixels as stored go now, not when the `with` ends: a photo stored sideways (a phone's
                    # portrait) took 10 bytes a pixel, its turned copy next to them, where one stored upright takes 6.
                    Image.Image.close(img)
                if transform is not None:
                    try:
                        return _to_rgb(upright, transform)
                    except MemoryError:
                        raise
                    except Exception as e:  # the profile is at fault, not the pixels: never a failed photo
                        _ignored_profile(name, e, source, upright.mode)
                return _to_rgb(upright, lab_white=lab_white)
    except (ImageDecodeError, MemoryError):
        raise  # our own size limit has its message; out of memory is the server's problem
    except UnidentifiedImageError as e:
        icon = next((fmt for fmt, magic in _DECODED_AT_OPEN.items() if _starts_with(source, magic)), None)
        if icon is not None:
            raise ImageDecodeError(f"{icon} icons are not accepted (decoded whole before their size can be "
                                   f"checked): {name}") from e
        if _starts_with(source, _FITS_MAGIC):
            raise ImageDecodeError(f"FITS images are not accepted (astronomy data, which this decoder reads wrong; "
                                   f"no photo format): {name}") from e
        lab = _lab_tiff(source)
        if lab is not None:
            raise ImageDecodeError(f"cannot decode {name}: {lab} is not supported (only 8-bit CIELab without "
                                   f"extra channels is); save it as RGB") from e
        raise ImageDecodeError(f"not an image (unknown format): {name}") from e
    except Image.DecompressionBombError as e:
        # Pillow refuses over twice its MAX_IMAGE_PIXELS while opening, before our check: its own wording
        # ("could be decompression bomb DOS attack") named neither our limit nor that it cannot be raised past it.
        bomb = 2 * Image.MAX_IMAGE_PIXELS if Image.MAX_IMAGE_PIXELS else max_pixels
        limit = min(max_pixels, bomb)
        raise ImageTooLarge(f"image too large: more than {bomb} pixels, the limit is {limit}"
                            + (" (Pillow decodes no more)" if max_pixels > bomb else ""), limit=limit) from e
    except Exception as e:
        # Pillow's plugins raise whatever their parser trips on for corrupt data (OSError,
        # SyntaxError, EOFError, but also IndexError, struct.error, ...): the bytes are at
        # fault, not the server.
        # libheif's messages end in a newline.
        raise ImageDecodeError(f"cannot decode {name}: {_error_name(e)}: {str(e).strip()}") from e
