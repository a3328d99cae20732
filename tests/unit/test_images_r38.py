"""Round 38: image decoding read again (FITS, float and 32-bit grey images).

FITS (astronomy data) was decoded whatever its content. Pillow reads its 16-bit, 32-bit and float samples as
little-endian, where FITS stores them big-endian (Pillow issue #9574), and ignores BZERO/BSCALE, so those images came
out as noise; and it decodes a gzip-compressed FITS in a Python loop over every pixel: an 84 kB upload declaring
20 MP took 3.7 s and 25 bytes a pixel (about 1 GB and 7 s at the service's 40 MP cap). No photo comes as FITS: refused.

A float (mode F) or 32-bit integer (mode I) grey image, e.g. a deflate-compressed float TIFF of 93 kB, was scaled to
8 bits on the whole image at once, in float64 and int64 temporaries: 28 and 16 bytes a pixel (1.1 GB for 40 MP).
Measured in a fresh process, as tests/unit/test_images_memory.py does, but by its own peak RSS (VmHWM).
"""

from __future__ import annotations

import gzip
import io
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceage.images import ImageDecodeError, load_image
from tests.conftest import PEAK_KB
from tests.unit.test_serving_r24 import detector, locator, routes

FIXTURES = (detector, locator, routes)  # the service routes of test_serving_r24, used here


def _card(key: str, value: str | int | None = None) -> bytes:
    text = key.ljust(8) + (f"= {str(value).rjust(20)}" if value is not None else "")
    return text.ljust(80).encode()


def _fits_header(cards: list[bytes]) -> bytes:
    block = b"".join(cards) + _card("END")
    return block + b" " * (-len(block) % 2880)


def _fits_gzip(values: np.ndarray) -> bytes:
    """A tile-compressed (GZIP_1) 16-bit FITS image, as Pillow's FitsImagePlugin reads one."""
    height, width = values.shape
    primary = _fits_header([_card("SIMPLE", "T"), _card("BITPIX", 8), _card("NAXIS", 0)])
    table = _fits_header([_card("XTENSION", "'BINTABLE'"), _card("BITPIX", 8), _card("NAXIS", 2),
                          _card("NAXIS1", 0), _card("NAXIS2", 0), _card("ZIMAGE", "T"),
                          _card("ZCMPTYPE", "'GZIP_1  '"), _card("ZBITPIX", 16), _card("ZNAXIS", 2),
                          _card("ZNAXIS1", width), _card("ZNAXIS2", height)])
    return primary + table + gzip.compress(values.astype(">i4").tobytes())


def _fits_raw(values: np.ndarray) -> bytes:
    """A plain 16-bit FITS image (big-endian samples, bottom row first)."""
    height, width = values.shape
    data = _fits_header([_card("SIMPLE", "T"), _card("BITPIX", 16), _card("NAXIS", 2), _card("NAXIS1", width),
                         _card("NAXIS2", height)]) + values[::-1].astype(">i2").tobytes()
    return data + b"\0" * (-len(data) % 2880)


def test_pillow_reads_a_16_bit_fits_byte_swapped():
    """Guard on the reason: if a Pillow upgrade reads FITS big-endian (Pillow PR #9575), FITS may be let in again."""
    values = np.array([[0x0102, 1000], [30000, 5]])
    with Image.open(io.BytesIO(_fits_raw(values))) as img:
        assert img.format == "FITS"
        assert np.asarray(img).tolist() == [[0x0201, 0xE803], [0x3075, 0x0500]]


@pytest.mark.parametrize("kind", ["raw", "gzip"])
def test_a_fits_file_is_refused_with_a_message_naming_it(kind):
    """A FITS upload gets one line saying FITS is not accepted, not noise (raw) or seconds of CPU and a gigabyte
    (gzip: 3000x3000 here; 20 MP took 3.7 s and 25 bytes a pixel)."""
    values = np.zeros((3000, 3000), np.int32) if kind == "gzip" else np.arange(64 * 48).reshape(48, 64) * 13
    data = _fits_gzip(values) if kind == "gzip" else _fits_raw(values)
    with pytest.raises(ImageDecodeError, match=r"^FITS images are not accepted .*: the uploaded file$"):
        load_image(data)


# The peak RSS of this process alone (conftest's PEAK_KB): ru_maxrss carried pytest's over exec (28 B/px read as 12)
MEASURE = PEAK_KB + """
import sys
from faceage.images import load_image

data = open(sys.argv[1], "rb").read()
before = peak_kb()
image = load_image(data)
after = peak_kb()
print((after - before) * 1024 / (image.shape[0] * image.shape[1]))
"""
SIDE = 4000


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the peak RSS from /proc (Linux)")
@pytest.mark.parametrize("dtype", [np.float32, np.int32])
def test_a_float_or_32_bit_grey_tiff_decodes_in_a_few_bytes_a_pixel(dtype, tmp_path):
    """A deflate-compressed 16 MP float (mode F) or int32 (mode I) TIFF of 93 kB: 28 and 16 bytes a pixel before
    (float64 / int64 temporaries of the whole image); now 7.5: Pillow's image is 4, the result 3."""
    path = tmp_path / "grey.tif"
    Image.fromarray(np.zeros((SIDE, SIDE), dtype)).save(path, compression="tiff_adobe_deflate")
    out = subprocess.run([sys.executable, "-c", MEASURE, str(path)], capture_output=True, text=True, check=True)
    bytes_per_pixel = float(out.stdout.strip())
    assert bytes_per_pixel < 10, f"decoding a {SIDE}x{SIDE} {np.dtype(dtype)} TIFF took {bytes_per_pixel:.1f} B/px"


def _tiff(values: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(values).save(buffer, "TIFF")
    return buffer.getvalue()


@pytest.mark.parametrize("scale", [1.0, 255.0, 1000.0])
def test_float_and_32_bit_grey_values_are_scaled_as_before(scale):
    """Guard (passes before and after): a float image in 0..1 is scaled by 255, one above 1 is read as 0..255
    levels (clipped), an int32 one as 16-bit (clipped to 0..65535), rounded; over several row blocks."""
    rng = np.random.default_rng(38)
    floats = (rng.random((700, 900)) * scale).astype(np.float32)
    want = np.clip(np.rint(floats.astype(np.float64) * (255 if scale == 1.0 else 1)), 0, 255).astype(np.uint8)
    got = load_image(_tiff(floats))
    assert got.shape == (700, 900, 3)
    assert (got == want[..., None]).all()
    ints = rng.integers(-1000, int(70000 * scale / 1000) + 1000, (700, 900)).astype(np.int32)
    want = ((np.clip(ints, 0, 65535).astype(np.int64) * 255 + 32767) // 65535).astype(np.uint8)
    assert (load_image(_tiff(ints)) == want[..., None]).all()


def test_a_float_image_with_nan_pixels_keeps_its_scale():
    """A float image of 0..255 levels with a NaN pixel (a masked value) was taken for a 0..1 image (the NaN max is
    no ``> 1``) and multiplied by 255: every pixel above 1 came out white. NaN pixels are black."""
    values = np.array([[np.nan, 100.0], [50.0, 0.0]], np.float32)
    got = load_image(_tiff(values))
    assert got[..., 0].tolist() == [[0, 100], [50, 0]]


@pytest.mark.parametrize("meta, message", [
    ({"input": ["image"]}, r"^checkpoint input kind \['image'\] is unknown; known: dlib_age_chip, "),
    ({"input": {"kind": "image"}}, r"^checkpoint input kind \{'kind': 'image'\} is unknown; known: "),
    ({"backbone": ["resnet18"]}, r"^checkpoint backbone \['resnet18'\] is not a name; its input kind is unknown$"),
])
def test_a_checkpoint_input_kind_of_the_wrong_type_is_a_settings_error(meta, message):
    """A hand-edited checkpoint (or ONNX graph metadata) whose ``input`` or ``backbone`` is a list or an object
    raised ``TypeError: unhashable type`` (a traceback in the CLI) instead of the one-line settings error."""
    from faceage.errors import FaceAgeError
    from faceage.inputs import CheckpointSettingsError, input_kind

    with pytest.raises(CheckpointSettingsError, match=message) as caught:
        input_kind(meta)
    assert isinstance(caught.value, FaceAgeError)


def test_a_text_file_opening_with_the_word_simple_is_no_fits_file():
    """Only FITS's own first card (``SIMPLE  =``) names the file FITS in the message; other bytes stay unknown."""
    with pytest.raises(ImageDecodeError, match=r"^not an image \(unknown format\): the uploaded file$"):
        load_image(b"SIMPLE text, not an image\n" * 4)


def _qoi(width: int, height: int) -> bytes:
    """A QOI image of one-byte QOI_OP_DIFF chunks: a new pixel for every byte, as a photo's QOI mostly is."""
    return (b"qoif" + struct.pack(">IIBB", width, height, 3, 0) + bytes([0b01010101]) * (width * height)
            + b"\0" * 7 + b"\x01")


def _pgm254(width: int, height: int) -> bytes:
    """A binary PGM whose maxval is not 255: Pillow rescales it sample by sample in Python."""
    return b"P5 %d %d 254\n" % (width, height) + bytes(range(254)) * (width * height // 254) + b"\0" * (
        width * height % 254)


@pytest.mark.parametrize("kind, make", [("QOI", _qoi)])
def test_data_pillow_decodes_in_python_is_refused_over_its_size_budget(kind, make):
    """Pillow decodes QOI, RLE BMP (and a few rarer formats) in Python, an op at a time: about 2 s a megabyte. A 20
    MiB upload (the service's body cap) took a worker 50 s (QOI). Over 2 MiB it is refused, in no time, naming the
    format and the budget. (Binary PPM/PGM of another maxval, which took 33 s, is decoded in numpy since:
    test_review_r38b.py.)"""
    import time

    data = make(1500, 1500)  # 2.25 MB: 5 s and 3.5 s to decode before
    started = time.monotonic()
    with pytest.raises(ImageDecodeError, match=rf"^cannot decode the uploaded file: {kind} data of {len(data)} bytes "
                                               rf"is over 2097152, .*; save it as PNG or JPEG$"):
        load_image(data)
    assert time.monotonic() - started < 1


@pytest.mark.parametrize("make", [_qoi, _pgm254])
def test_a_small_image_pillow_decodes_in_python_still_decodes(make):
    """Guard (passes before and after): under the budget the same formats decode as they did."""
    image = load_image(make(300, 200))
    assert image.shape == (200, 300, 3) and image.dtype == np.uint8


def test_the_service_answers_a_fits_or_an_oversized_qoi_upload_with_a_400_naming_it(routes, locator):
    """Through the service's routes (FastAPI's TestClient, a real HOG locator in process): one-line 400s, no 500."""
    from faceage.serving import LocatorPool

    _, client = routes(LocatorPool(locator, 0))
    uploads = {"FITS images are not accepted": _fits_raw(np.arange(64 * 48).reshape(48, 64)),
               "QOI data of 2250022 bytes is over 2097152": _qoi(1500, 1500)}
    for words, data in uploads.items():
        answer = client.post("/predict", files={"image": ("photo", data, "application/octet-stream")})
        assert answer.status_code == 400, answer.text
        assert words in answer.json()["error"] and "\n" not in answer.json()["error"], answer.text
