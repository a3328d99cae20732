"""Second read of round 38: images' budget for data Pillow decodes in Python refused a 16-bit colour PPM; the CLI's
default --model skipped the working folder's models/model.pt inside a project."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from PIL import Image

from faceage.cli import main
from faceage.images import load_image
from tests.unit.test_cli_r26 import blank_photo, repo_like

FIXTURES = (blank_photo, repo_like)


def _pnm(magic: bytes, maxval: int, samples: np.ndarray) -> bytes:
    height, width = samples.shape[:2]
    dtype = ">u2" if maxval > 255 else np.uint8
    return b"%s\n%d %d\n%d\n" % (magic, width, height, maxval) + samples.astype(dtype).tobytes()


@pytest.mark.parametrize("magic, maxval, bands", [(b"P6", 65535, 3), (b"P5", 4095, 1), (b"P6", 1023, 3),
                                                  (b"P5", 254, 1)])
def test_a_16_bit_colour_ppm_or_a_12_bit_pgm_over_2_mib_decodes_to_pillows_values(tmp_path, magic, maxval, bands):
    """A 16-bit colour PPM (dcraw -4 / -6, ImageMagick's -depth 16; maxval 65535, which Pillow decodes in Python,
    unlike a 16-bit PGM) or a 12-bit camera's PGM over 2 MiB was refused ("PPM data of ... bytes is over 2097152"),
    though the docs say only a maxval other than 255 or 65535 is. Decoded in numpy, it is read, in the values
    Pillow's own decoder gives (checked on the same file), and quickly."""
    rng = np.random.default_rng(7)
    shape = (600, 800, 3) if bands == 3 else (1200, 1000) if maxval > 255 else (1600, 1500)
    samples = rng.integers(0, maxval + 1, shape)
    samples.flat[:8] = [0, maxval, maxval // 2, maxval // 2 + 1, 1, maxval - 1, min(257, maxval), 128]  # the edges and halves
    path = tmp_path / "photo.pnm"
    path.write_bytes(_pnm(magic, maxval, samples))
    assert path.stat().st_size > 2 * 1024 * 1024
    started = time.monotonic()
    image = load_image(path)
    took = time.monotonic() - started
    # Pillow's values (mode RGB, or I for a PGM of maxval > 255, 0..65535), as load_image scales them to 8 bits
    expected = (samples / maxval * (65535 if magic == b"P5" and maxval > 255 else 255)).round()
    if magic == b"P5":
        expected = (expected * 255 / 65535).round() if maxval > 255 else expected
        expected = np.repeat(expected[..., None], 3, axis=2)
    assert image.shape == (shape[0], shape[1], 3)
    assert np.array_equal(image, expected.astype(np.uint8))
    assert took < 10, f"{took:.1f} s"


def test_the_vectorised_ppm_decoder_gives_pillows_exact_values(tmp_path):
    """The decoder against Pillow's Python loop on the same bytes, sample for sample (a small file, every value of a
    10-bit and a 16-bit range), a truncated file failing as before."""
    from PIL import PpmImagePlugin

    for maxval, magic, shape in ((1023, b"P6", (1, 1024, 3)), (65535, b"P6", (300, 1024, 3)),
                                 (1000, b"P5", (1, 1001)), (254, b"P5", (1, 255))):
        samples = np.arange(int(np.prod(shape))).reshape(shape) % (maxval + 1)
        data = _pnm(magic, maxval, samples)
        path = tmp_path / "p.pnm"
        path.write_bytes(data)
        with Image.open(path) as ours:
            ours.load()
            got = np.asarray(ours)
        got_error, got = _decoded(path, Image.DECODERS["ppm"])
        want_error, want = _decoded(path, PpmImagePlugin.PpmDecoder)
        assert got_error is want_error is None
        assert got.dtype == want.dtype and np.array_equal(got, want), (maxval, magic)
    path.write_bytes(_pnm(b"P6", 1023, np.zeros((10, 10, 3)))[:-31])  # cut short: both fail alike
    got_error, _ = _decoded(path, Image.DECODERS["ppm"])
    want_error, _ = _decoded(path, PpmImagePlugin.PpmDecoder)
    assert got_error is not None and got_error == want_error


def _decoded(path, decoder) -> tuple[str | None, np.ndarray | None]:
    """The file decoded with ``decoder`` registered for "ppm": (None, pixels), or (the error, None)."""
    registered = Image.DECODERS["ppm"]
    Image.DECODERS["ppm"] = decoder
    try:
        with Image.open(path) as img:
            img.load()
            return None, np.asarray(img)
    except Exception as e:
        return f"{type(e).__name__}: {e}", None
    finally:
        Image.DECODERS["ppm"] = registered


def test_a_models_folder_in_the_working_folder_is_still_the_default_inside_a_project(repo_like, blank_photo,
                                                                                     tmp_path, monkeypatch, capsys):
    """Round 38 made the default ``--model`` the project root's ``models/model.pt``. A working folder inside a
    project that holds its own ``models/model.pt`` (a packaged export kept in the tree, a ``dvc exp run --temp``
    copy's) was the default before; it became "checkpoint ../models/model.pt not found" (or another model's ages).
    The working folder's checkpoint, where there is one, comes first; the project's where there is none."""
    import shutil

    project = tmp_path / "project"
    (project / "exports").mkdir(parents=True)
    (project / "params.yaml").write_text("{}\n")
    shutil.copytree(repo_like["root"] / "models", project / "exports" / "models")
    monkeypatch.chdir(project / "exports")
    assert main(["predict", "--json", str(blank_photo)]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert json.loads(out.out) == [{"file": str(blank_photo), "width": 48, "height": 48, "faces": []}], out.err
