"""Round-25 review of `faceage predict` and load_image: rotated greyscale TIFFs read from a path, pipes given
as a path, MPO photos in folder scans, control characters in the table, a stdout that cannot take the results."""

import io
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin

from faceage.cli import IMAGE_SUFFIXES, PhotoResult, collect_images, main, write_table
from faceage.images import ImageDecodeError, load_image
from tests.unit.test_predict import make_checkpoint, make_detector_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_r25")
    detector = make_detector_dir(root / "detector")
    return ["--model", str(make_checkpoint(root / "model.pt", detector)), "--detector", str(detector)]


def upright_grey(h=24, w=40) -> np.ndarray:
    """A landscape grey ramp with a bright top-left corner: a sideways or mirrored copy differs."""
    arr = np.tile(np.linspace(0, 200, w, dtype=np.uint8), (h, 1))
    arr[:4, :4] = 255
    return arr


@pytest.mark.parametrize("mode", ["L", "I;16", "P"])
def test_a_rotated_tiff_read_from_its_path_is_upright(tmp_path, mode):
    """Given a path, Pillow maps an uncompressed L / I;16 / P TIFF into memory and that load drops the
    Orientation tag: the photo came out sideways from the CLI and preprocess, upright from an upload."""
    grey = upright_grey()
    stored = Image.fromarray(grey).transpose(Image.Transpose.ROTATE_90)  # Orientation 6 turns it back
    stored = {"L": stored, "I;16": Image.fromarray(np.asarray(stored).astype(np.uint16) * 257),
              "P": stored.convert("P")}[mode]
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[274] = 6
    path = tmp_path / f"rotated_{mode.replace(';', '')}.tif"
    stored.save(path, tiffinfo=tags)
    from_bytes = load_image(path.read_bytes())
    from_path = load_image(path)
    assert from_bytes.shape == from_path.shape == (*grey.shape, 3)
    np.testing.assert_array_equal(from_path, from_bytes)
    if mode != "P":  # a palette holds the grey levels only approximately
        np.testing.assert_array_equal(from_path[..., 0], grey)


@pytest.mark.skipif(not os.path.isdir("/dev/fd"), reason="needs /dev/fd to name a pipe by a path")
def test_a_pipe_given_as_a_path_is_decoded(tmp_path):
    """`faceage predict <(curl ...)` or `cat a.jpg | faceage predict /dev/stdin`: the photo, not 'has 0 bytes'."""
    arr = np.dstack([upright_grey()] * 3)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    assert len(buf.getvalue()) < 16384  # fits the pipe's buffer: written before anyone reads
    read, write = os.pipe()
    try:
        os.write(write, buf.getvalue())
        os.close(write)
        write = None
        np.testing.assert_array_equal(load_image(f"/dev/fd/{read}"), arr)
    finally:
        os.close(read)
        if write is not None:
            os.close(write)


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="needs /dev/zero")
def test_an_endless_device_is_refused_not_read_for_ever():
    with pytest.raises(ImageDecodeError, match="too large|empty"):
        load_image("/dev/zero", max_pixels=1000)


def test_folder_scans_read_mpo_photos(tmp_path):
    """MPO (cameras' stereo and multi-picture JPEGs) is opened by Pillow's JPEG plugin, so it is no key of
    Image.OPEN: its .mpo suffix was left out of folder scans although a named .mpo decodes."""
    first = Image.fromarray(np.dstack([upright_grey()] * 3))
    first.save(tmp_path / "stereo.mpo", "MPO", save_all=True, append_images=[first])
    assert Image.open(tmp_path / "stereo.mpo").format == "MPO"
    assert ".mpo" in IMAGE_SUFFIXES
    assert collect_images([tmp_path]) == [tmp_path / "stereo.mpo"]
    assert load_image(tmp_path / "stereo.mpo").shape == (24, 40, 3)


def test_the_table_escapes_control_characters_in_file_names():
    """A newline in a file name split its table row in two, the second line looking like a row of its own."""
    weird = Path("photos") / "new\nline.jpg"
    cafe = os.fsdecode(b"caf\xe9")  # a Latin-1 name: its byte stays a surrogate (printed as the byte)
    undecodable = Path("photos") / f"{cafe}\tx.jpg"  # ... and its tab is escaped
    out = io.StringIO()
    write_table([PhotoResult(weird, error="not an image"), PhotoResult(undecodable, width=4, height=4)], out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 3  # the header and one row per photo
    assert lines[1].startswith("photos/new\\nline.jpg ") and lines[1].endswith("error: not an image")
    assert lines[2].startswith(f"photos/{cafe}\\tx.jpg ") and lines[2].endswith("no face")


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to make writes fail")
def test_a_stdout_that_cannot_take_the_results_is_one_error_line(model, tmp_path, monkeypatch, capsys):
    """`faceage predict ... > out.json` on a full disk: exit 1 with one line, not a traceback."""
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "blank.png")
    full = io.TextIOWrapper(open("/dev/full", "wb"), encoding="utf-8")
    monkeypatch.setattr(sys, "stdout", full)
    try:
        assert main(["predict", str(tmp_path / "blank.png"), "--json", *model]) == 1
    finally:
        monkeypatch.undo()
        full.close()  # main pointed its descriptor at /dev/null: closing it flushes nowhere
    err = capsys.readouterr().err
    assert "could not write the results to stdout: No space left on device" in err
    assert "Traceback" not in err
