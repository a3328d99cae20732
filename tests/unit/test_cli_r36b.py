"""Round 36, second read of `faceage predict` over a folder of many photos: one photo that failed otherwise than
unreadable (out of memory while decoding it, which ``load_image`` lets through on purpose; a ``std::bad_alloc`` or a
``RuntimeError`` from dlib's detector) ended the whole run in a traceback, every result already computed lost. Such a
photo is now its own error row, the others are still reported, and the exit status is 1.

The failures are real: the command runs in a process whose address space is capped (``RLIMIT_AS``) a little above
what it holds once its libraries are loaded, on real photos, one of which needs more than that to be decoded (a
169-megapixel PNG of a few hundred kB) or detected (a 25-megapixel photo looked at upsampled, ``--max-detect-pixels
0``). Each runs on one core (the photos decoded, then detected by the batch's ``predict_many``: a failure there
failed the chunk's pass, whose photos are now run one by one) and on two (detected on a thread each)."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import zlib

import pytest
from PIL import Image

from faceage.predict import available_cores
from tests.unit.test_predict import model_files

# A declared test dependency (pyproject's test extra).
from skimage import data as skimage_data

# Loads what the command loads, caps the address space at what it then holds plus HEADROOM_MB, keeps the cores
# asked for (the CLI's detection threads follow them), and runs `faceage` (argv[3:]).
RUNNER = """
import os, re, resource, sys
os.sched_setaffinity(0, set(sorted(os.sched_getaffinity(0))[:int(sys.argv[2])]))
import dlib, numpy, torch
import faceage.cli
held = int(re.search(r"VmSize:\\s+(\\d+)", open("/proc/self/status").read())[1]) * 1024
cap = held + int(sys.argv[1]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
sys.exit(faceage.cli.main(sys.argv[3:]))
"""
CORES = [1] + ([2] if available_cores() >= 2 else [])


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return model_files(tmp_path_factory.mktemp("cli_r36b"))


def _png(path, side: int, channels: int, value: int) -> None:
    """A ``side`` x ``side`` PNG of one grey ``value`` (8-bit grey or RGB), written row by row: its pixels are
    never held here, and the file takes a few hundred kB."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    packer = zlib.compressobj(9)
    row = b"\0" + bytes([value]) * (side * channels)  # filter byte, then the row
    body = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, 8, {1: 0, 3: 2}[channels], 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", body) + chunk(b"IEND", b""))


def _folder(folder, bad_side: int, bad_channels: int):
    """Two face photos around one ``bad.png`` (hard links: not one photo reached twice)."""
    folder.mkdir()
    Image.fromarray(skimage_data.astronaut()).save(folder / "a.png")
    os.link(folder / "a.png", folder / "c.png")
    _png(folder / "b.png", bad_side, bad_channels, 128)
    return folder


def _run(made, tmp_path, headroom_mb: int, cores: int, *args: str):
    runner = tmp_path / "runner.py"
    runner.write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(runner), str(headroom_mb), str(cores), "predict", "--json",
                           "--model", str(made["checkpoint"]), "--detector", str(made["detector"]), *args],
                          capture_output=True, text=True, timeout=600)
    return proc


def _check(proc, folder, doing: str):
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert proc.returncode == 1, proc.stderr[-3000:]
    rows = json.loads(proc.stdout)
    assert [row["file"] for row in rows] == [str(folder / name) for name in ("a.png", "b.png", "c.png")]
    bad = rows[1]
    assert set(bad) == {"file", "error"} and doing in bad["error"] and "MemoryError" in bad["error"], bad
    for row in (rows[0], rows[2]):  # the others still read, their faces found
        assert "error" not in row and (row["width"], row["height"]) == (512, 512) and row["faces"], row
    assert rows[0]["faces"] == rows[2]["faces"]
    warned = [line for line in proc.stderr.splitlines() if "WARNING" in line and str(folder / "b.png") in line]
    assert len(warned) == 1, proc.stderr[-3000:]  # one line says why; the traceback only at debug level


@pytest.mark.parametrize("cores", CORES)
def test_a_photo_out_of_memory_while_decoded_is_its_own_error_row(made, tmp_path, cores):
    """A 13000 x 13000 PNG (--max-pixels lets it in) needs over 1 GB to become RGB; 600 MB are left. The MemoryError
    that load_image lets through ended the run: `Traceback ... MemoryError`, nothing printed, the other photos'
    ages lost."""
    folder = _folder(tmp_path / "photos", 13000, 1)
    proc = _run(made, tmp_path, 600, cores, "--max-pixels", "170000000", str(folder))
    _check(proc, folder, "reading it")


@pytest.mark.parametrize("cores", CORES)
def test_a_photo_out_of_memory_while_detected_is_its_own_error_row(made, tmp_path, cores):
    """A 5000 x 5000 photo decodes in the 1200 MB left, but dlib's detector, looking at it upsampled (the checkpoint's
    upsample 1, --max-detect-pixels 0), runs out of memory: a std::bad_alloc, raised as a MemoryError. On one core
    it is detected in the chunk's pass (predict_many), which failed for all three photos; now the photos of a
    failed pass run one by one, and only the one that fails alone gets an error row."""
    folder = _folder(tmp_path / "photos", 5000, 3)
    proc = _run(made, tmp_path, 1200, cores, "--max-detect-pixels", "0", str(folder))
    _check(proc, folder, "detecting its faces")
