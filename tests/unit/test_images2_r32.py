"""Round 32, a second read of round 31's changes to decoding, the server's pixel cap, the CLI's Ctrl-C and dlib's
ONNX reader: the pixel cap is a typed error (the server names its setting without reading the message's words), a
colour transform that fails is blamed on the tag it came from, an unsupported nclx transfer is described as it
is, an AVIF's colour tag is found after its image data and is the colour image's (not its alpha's), Ctrl-C leaves
annotated copies for the printed photos only and says when printing failed, and running out of memory while
reading an ONNX file is not "fetch it again"."""

from __future__ import annotations

import io
import json
import logging
import os
import pickle
import signal
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, features

import faceage.images
from faceage.images import ImageDecodeError, load_image
from tests.unit.test_images_r31 import avif_with

REPO = Path(__file__).resolve().parents[2]


def _warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "faceage.images" and r.levelno >= logging.WARNING]


def _photo(shape=(48, 64)) -> np.ndarray:
    """Smooth colours (an AV1 encoder keeps them) with a saturated red and green corner."""
    h, w = shape
    y, x = np.mgrid[0:h, 0:w]
    arr = np.stack([60 + 150 * x / w, 40 + 120 * y / h, 200 - 100 * x / w], axis=2).astype(np.uint8)
    arr[:8, :16] = (230, 20, 20)
    arr[:8, 16:32] = (20, 200, 30)
    return arr


# --- 1. The pixel cap is a typed error -----------------------------------------------------------------------


def test_too_many_pixels_is_an_image_too_large_error_with_its_numbers_and_survives_pickling():
    """The server read the numbers back out of the message's words ("image too large:", "the limit is N") to add
    its setting's name: a rewording in images.py would silently drop it. The error carries them."""
    from faceage.images import ImageTooLarge

    buf = io.BytesIO()
    Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageTooLarge) as e:
        load_image(buf.getvalue(), max_pixels=50)
    assert isinstance(e.value, ImageDecodeError)
    assert str(e.value) == "image too large: 10x10 = 100 pixels, the limit is 50"
    assert (e.value.pixels, e.value.limit) == (100, 50)
    again = pickle.loads(pickle.dumps(e.value))  # as a detection worker sends it back
    assert type(again) is ImageTooLarge and str(again) == str(e.value)
    assert (again.pixels, again.limit) == (100, 50)


class _Locator:
    max_pixels = 500


def test_the_server_names_its_setting_from_the_error_not_from_its_words(monkeypatch):
    from faceage import serving
    from faceage.images import ImageTooLarge

    def reworded(data, *, max_pixels):
        raise ImageTooLarge(f"photo has 768 pixels, over {max_pixels}", pixels=768, limit=max_pixels)

    monkeypatch.setattr(serving, "load_image", reworded)
    with pytest.raises(ImageTooLarge) as e:
        serving._decode_and_locate(_Locator(), b"x", False, False, False)
    assert str(e.value) == "photo has 768 pixels, over 500 (FACEAGE_MAX_PIXELS)"
    assert (e.value.pixels, e.value.limit) == (768, 500)


def test_the_servers_message_is_unchanged_and_pillows_own_cap_gets_no_setting(monkeypatch):
    from faceage import serving
    from faceage.images import ImageTooLarge

    buf = io.BytesIO()
    Image.fromarray(np.zeros((24, 32, 3), np.uint8)).save(buf, "PNG")
    with pytest.raises(ImageTooLarge) as e:
        serving._decode_and_locate(_Locator(), buf.getvalue(), False, False, False)
    assert str(e.value) == "image too large: 32x24 = 768 pixels, the limit is 500 (FACEAGE_MAX_PIXELS)"
    # Pillow's own cap, lower than the server's: raising the setting would not help, so it is not named.
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(ImageTooLarge) as e:
        serving._decode_and_locate(_Locator(), buf.getvalue(), False, False, False)
    assert str(e.value) == "image too large: more than 200 pixels, the limit is 200 (Pillow decodes no more)"


# --- 2. A failed transform names the tag it came from --------------------------------------------------------


def _avif(arr: np.ndarray, primaries: int = 12, transfer: int = 13) -> bytes:
    """An AVIF written by Pillow (libavif), its one nclx box retagged (Display P3 by default)."""
    if not features.check("avif"):
        pytest.skip("this Pillow decodes no AVIF")
    return avif_with(arr, primaries, transfer)


def _raw(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as img:
        return np.asarray(img.convert("RGB"))


def test_a_failed_transform_of_an_nclx_tagged_photo_names_the_nclx_tag(monkeypatch, caplog):
    """The warning said "ignored the ICC colour profile" of a photo that has none (its nclx box made the
    transform): a user looked for a profile that is not there."""
    from PIL import ImageCms

    data = _avif(_photo())

    def fails(*args, **kwargs):
        raise ImageCms.PyCMSError("cannot apply")

    monkeypatch.setattr(faceage.images.ImageCms, "applyTransform", fails)
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        out = load_image(data)
    np.testing.assert_array_equal(out, _raw(data))  # the raw values, the photo not failed
    [warned] = _warnings(caplog)
    assert "nclx colour tag" in warned and "ICC" not in warned, warned


# --- 3. An unsupported nclx transfer, as it is -----------------------------------------------------------------


@pytest.mark.parametrize(("transfer", "said"), [
    (16, "PQ, HDR"), (18, "HLG, HDR"), (7, "SMPTE 240M"), (11, "IEC 61966-2-4"), (12, "BT.1361"),
    (17, "SMPTE ST 428-1"), (9, "logarithmic"), (0, "reserved"), (3, "reserved"), (40, "reserved")])
def test_an_unsupported_nclx_transfer_is_described_as_it_is(transfer, said):
    """Every transfer code not converted was said to "have no SDR conversion", true of PQ and HLG alone."""
    with pytest.raises(ValueError) as e:
        faceage.images._nclx_icc({"color_primaries": 12, "transfer_characteristics": transfer})
    message = str(e.value)
    assert said in message, message
    assert ("no SDR conversion" in message) == (transfer in (16, 18)), message


# --- 4. An AVIF's nclx box: after the image data, and the colour image's ----------------------------------------


def _children(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, bytes]]:
    """(type, payload) of each box in ``data[start:end]`` (32-bit sizes, as Pillow's AVIF files have)."""
    end = len(data) if end is None else end
    out = []
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        assert size >= 8
        out.append((kind, data[start + 8:start + size]))
        start += size
    return out


def _box(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I4s", 8 + len(payload), kind) + payload


def _moved_iloc(iloc: bytes, shift: int) -> bytes:
    """``iloc`` (version 0) with every extent's file offset moved by ``shift``."""
    assert iloc[0] == 0
    offset_size, length_size, base_size = iloc[4] >> 4, iloc[4] & 15, iloc[5] >> 4
    assert offset_size in (4, 8) and base_size == 0
    out, at = bytearray(iloc), 8
    for _ in range(struct.unpack_from(">H", iloc, 6)[0]):
        at += 4  # item_ID, data_reference_index
        extents = struct.unpack_from(">H", iloc, at)[0]
        at += 2
        for _ in range(extents):
            fmt = ">I" if offset_size == 4 else ">Q"
            struct.pack_into(fmt, out, at, struct.unpack_from(fmt, iloc, at)[0] + shift)
            at += offset_size + length_size
    return bytes(out)


def _ipma(payload: bytes) -> dict[int, list[int]]:
    assert payload[0] == 0 and not payload[3] & 1  # version 0: 16-bit item IDs; 8-bit indices
    items, at = {}, 8
    for _ in range(struct.unpack_from(">I", payload, 4)[0]):
        item, count = struct.unpack_from(">HB", payload, at)
        items[item] = list(payload[at + 3:at + 3 + count])
        at += 3 + count
    return items


def _ipma_bytes(items: dict[int, list[int]]) -> bytes:
    body = b"".join(struct.pack(">HB", item, len(props)) + bytes(props) for item, props in items.items())
    return b"\0\0\0\0" + struct.pack(">I", len(items)) + body


def _rebuilt(data: bytes, *, meta_last: bool = False, padding: int = 0, alpha_nclx: tuple | None = None) -> bytes:
    """``data`` (ftyp, meta, mdat) laid out again: the meta box after the image data and ``padding`` bytes of a
    free box, and/or the alpha image given an nclx colour box of its own (``(primaries, transfer)``), put first
    in the property container so that a reader taking the first one takes the alpha's."""
    top = dict(_children(data))
    assert list(top) == [b"ftyp", b"meta", b"mdat"], list(top)
    old_mdat = len(_box(b"ftyp", top[b"ftyp"])) + len(_box(b"meta", top[b"meta"])) + 8
    meta = top[b"meta"]
    parts = _children(meta, 4)
    if alpha_nclx is not None:
        [primary] = [struct.unpack_from(">H", p, 4)[0] for k, p in parts if k == b"pitm"]
        new_parts = []
        for kind, payload in parts:
            if kind == b"iprp":
                (ipco_kind, ipco), (ipma_kind, ipma) = _children(payload)
                assert (ipco_kind, ipma_kind) == (b"ipco", b"ipma")
                colr = _box(b"colr", b"nclx" + struct.pack(">HHHB", *alpha_nclx, 1, 0x80))
                items = {item: [(p & 0x80) | ((p & 0x7F) + 1) for p in props]
                         for item, props in _ipma(ipma).items()}  # every index moves by the one put first
                [alpha] = [item for item in items if item != primary]
                items[alpha].append(1)
                payload = _box(b"ipco", colr + ipco) + _box(b"ipma", _ipma_bytes(items))
            new_parts.append((kind, payload))
        parts = new_parts
    free = _box(b"free", b"\0" * padding) if padding else b""
    ftyp = _box(b"ftyp", top[b"ftyp"])

    def meta_box(shift: int) -> bytes:
        return _box(b"meta", meta[:4] + b"".join(_box(k, _moved_iloc(p, shift) if k == b"iloc" else p)
                                                   for k, p in parts))

    if meta_last:
        new_mdat = len(ftyp) + 8
        return ftyp + _box(b"mdat", top[b"mdat"]) + free + meta_box(new_mdat - old_mdat)
    size = len(meta_box(0))
    new_mdat = len(ftyp) + size + len(free) + 8
    return ftyp + meta_box(new_mdat - old_mdat) + free + _box(b"mdat", top[b"mdat"])


def test_the_avif_rebuilder_keeps_the_photo():
    """The test's own tool: the same layout rebuilt gives the same file, and a moved one the same pixels."""
    data = _avif(_photo())
    assert _rebuilt(data) == data
    np.testing.assert_array_equal(_raw(_rebuilt(data, meta_last=True, padding=1000)), _raw(data))


def test_an_avif_whose_colour_tag_follows_4_mib_of_image_data_is_converted(caplog):
    """Only the first 4 MiB were read for the nclx box: an AVIF with its meta box after its image data (a
    streaming writer's layout) and more than that before it came out with its raw colours, without a word."""
    data = _avif(_photo())
    want = load_image(data)
    assert np.abs(want.astype(int) - _raw(data)).max() > 20  # Display P3: the conversion changes the colours
    late = _rebuilt(data, meta_last=True, padding=2**22)
    assert late.find(b"meta") > 2**22
    with caplog.at_level(logging.INFO, logger="faceage.images"):
        np.testing.assert_array_equal(load_image(late), want)
    assert not _warnings(caplog)


def test_the_nclx_box_of_the_alpha_image_is_not_the_photos():
    """A photo with transparency whose alpha image carries its own nclx box: two different boxes, and the
    photo was not converted at all (or could be converted by the alpha's)."""
    alpha = np.full((48, 64), 255, np.uint8)
    alpha[-8:, -8:] = 0  # (all opaque, libavif writes no alpha image)
    arr = np.dstack([_photo(), alpha])
    data = _avif(arr)  # the colour image's box: Display P3
    with Image.open(io.BytesIO(data)) as img:
        assert img.mode == "RGBA"
    want = load_image(data)
    assert np.abs(want.astype(int) - _raw(data)).max() > 20
    for alpha in ((1, 13), (9, 1)):  # BT.709 (no conversion), BT.2020 (another one)
        both = _rebuilt(data, alpha_nclx=alpha)
        assert both.count(b"colrnclx") == 2
        np.testing.assert_array_equal(load_image(both), want)


# --- 5 and 6. Ctrl-C in `faceage predict` ------------------------------------------------------------------------


class _Predictor:
    """No model: every photo has no face (the annotated copy is the photo itself)."""

    locator = type("L", (), {"max_pixels": 10**8})

    def predict_many(self, images):
        return [[] for _ in images]


def _photos(folder: Path, n: int) -> Path:
    folder.mkdir(parents=True)
    for i in range(n):
        Image.fromarray(np.full((20, 20, 3), 10 * i, np.uint8)).save(folder / f"p{i:02d}.png")
    return folder


class _Died(Exception):
    pass


def test_ctrl_c_while_a_batch_is_annotated_leaves_copies_of_the_printed_photos_only(tmp_path, monkeypatch,
                                                                                     capsys):
    """Ctrl-C during the second batch said only the first batch's photos were done, but the copies already
    written for the second stayed in the --annotate folder, unnamed (and a rerun then wrote them again as
    ``-1.png``)."""
    from faceage import cli

    photos, out = _photos(tmp_path / "photos", 12), tmp_path / "annotated"
    real = cli.write_annotated
    calls = []

    def write_then_ctrl_c(*args):
        calls.append(args[1])
        if len(calls) == 11:  # the 3rd photo of the 2nd batch of 8
            raise KeyboardInterrupt
        return real(*args)

    def died(signum, message=None):
        raise _Died(message)

    monkeypatch.setattr(cli, "load_predictor", lambda args: _Predictor())
    monkeypatch.setattr(cli, "write_annotated", write_then_ctrl_c)
    monkeypatch.setattr(cli, "die_of_signal", died)
    with pytest.raises(_Died) as e:
        cli.main(["predict", "--json", "--annotate", str(out), str(photos)])
    printed = json.loads(capsys.readouterr().out)
    assert len(printed) == 8 and "after 8 of 12 photos: their results are printed" in str(e.value)
    assert sorted(os.listdir(out)) == sorted(Path(entry["annotated"]).name for entry in printed)


def test_a_predict_photos_closed_between_photos_removes_the_copies_it_did_not_hand_over(tmp_path):
    """Ctrl-C in the caller while it holds the 3rd photo of a batch: the copies of the other 5, written with it,
    are removed when the generator is closed; those handed over are kept."""
    from faceage.cli import predict_photos

    photos, out = _photos(tmp_path / "photos", 8), tmp_path / "annotated"
    out.mkdir()
    rows = predict_photos(_Predictor(), sorted(photos.iterdir()), out)
    handed = [next(rows) for _ in range(3)]
    assert len(os.listdir(out)) == 8
    rows.close()
    assert sorted(os.listdir(out)) == sorted(r.annotated.name for r in handed)


_DRIVER = """
import sys
from faceage import cli

class P:
    locator = type("L", (), {"max_pixels": 10**8})
    calls = 0
    def predict_many(self, images):
        P.calls += 1
        if P.calls == 2:
            raise KeyboardInterrupt
        return [[] for _ in images]

cli.load_predictor = lambda args: P()
sys.exit(cli.main(["predict", "--json", sys.argv[1], *sys.argv[2:]]))
"""


@pytest.mark.parametrize("where", ["full-disk", "closed-pipe"])
def test_ctrl_c_does_not_say_the_results_are_printed_when_printing_failed(tmp_path, where):
    """"their results are printed" was said after a full disk (``> /dev/full``) or a reader gone (``| head``) had
    stopped them."""
    photos = _photos(tmp_path / "photos", 12)
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(_DRIVER))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    # With --annotate: without it, a run whose output failed stops there (tests/unit/test_cli_head_r38.py) and
    # never reaches the Ctrl-C of its second batch.
    command = [sys.executable, str(driver), str(photos), "--annotate", str(tmp_path / "annotated")]
    if where == "full-disk":
        if not os.path.exists("/dev/full"):
            pytest.skip("no /dev/full here")
        with open("/dev/full", "w") as full:
            proc = subprocess.run(command, stdout=full, stderr=subprocess.PIPE, text=True, env=env, timeout=120)
        rc, err = proc.returncode, proc.stderr
    else:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        try:
            proc.stdout.close()  # the reader leaves before anything is written
            err = proc.stderr.read()
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:  # stopped by this test, whatever failed above
                proc.kill()
                proc.wait()
    last = err.strip().splitlines()[-1]
    assert rc == -signal.SIGINT, err
    assert "interrupted (Ctrl-C) after 8 of 12 photos" in last, err
    assert "are printed" not in last, last
    assert ("No space left on device" if where == "full-disk" else "broken pipe") in last, last
    assert "Traceback" not in err, err


# --- 7. Out of memory while reading an ONNX file -----------------------------------------------------------------


def test_out_of_memory_reading_the_onnx_file_is_not_called_an_unreadable_file(monkeypatch, tmp_path):
    """`except Exception` turned a MemoryError into "not a readable ONNX file ... fetch it again": the user
    fetched a good file again, and it failed the same."""
    import onnx

    from faceage.dlib_age import onnx_state_dict

    def no_memory(*args, **kwargs):
        raise MemoryError

    monkeypatch.setattr(onnx, "load", no_memory)
    with pytest.raises(MemoryError):
        onnx_state_dict(tmp_path / "age-v1.onnx")
