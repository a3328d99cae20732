"""`faceage predict FOLDER | head -5`: once the reader had left, the run went on through every remaining photo
(minutes to hours of detection for a folder of thousands) with nowhere to print. It now stops there (exit 0, as
any command piped into ``head``); a full disk stops it too (exit 1, one line). With ``--annotate`` the run goes
on: the annotated copies are still wanted."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO

# A predictor that counts the photos it is given (the detection work the run does) into a file.
_DRIVER = """
import sys
from faceage import cli

class P:
    locator = type("L", (), {"max_pixels": 10**8})
    def predict_many(self, images):
        with open(sys.argv[2], "a") as f:
            f.write("x" * len(images))
        return [[] for _ in images]

cli.load_predictor = lambda args: P()
sys.exit(cli.main(["predict", "--csv", sys.argv[1], *sys.argv[3:]]))
"""


def _run(tmp_path, stdout, *extra):
    photos = tmp_path / "photos"
    photos.mkdir(exist_ok=True)
    for i in range(40):
        Image.fromarray(np.full((24, 24, 3), i, np.uint8)).save(photos / f"{i:02d}.png")
    driver, seen = tmp_path / "driver.py", tmp_path / "seen.txt"
    driver.write_text(textwrap.dedent(_DRIVER))
    seen.write_text("")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, str(driver), str(photos), str(seen), *extra], stdout=stdout,
                            stderr=subprocess.PIPE, text=True, env=env)
    try:
        if stdout is subprocess.PIPE:
            proc.stdout.close()  # the reader leaves before anything is written (`| head -0`)
        err = proc.stderr.read()
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return rc, err, len(seen.read_text())


def test_a_reader_that_left_stops_the_run_without_an_error(tmp_path):
    rc, err, seen = _run(tmp_path, subprocess.PIPE)
    assert rc == 0 and "Traceback" not in err, err
    assert seen < 40, f"the run detected all {seen} photos for a reader that had left"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full to make writes fail")
def test_a_full_disk_stops_the_run_with_one_line(tmp_path):
    with open("/dev/full", "w") as full:
        rc, err, seen = _run(tmp_path, full)
    assert rc == 1 and "Traceback" not in err and "No space left on device" in err, err
    assert seen < 40, f"the run detected all {seen} photos with nowhere to print their results"


def test_with_annotate_the_run_goes_on_for_the_copies(tmp_path):
    rc, err, seen = _run(tmp_path, subprocess.PIPE, "--annotate", str(tmp_path / "annotated"))
    assert rc == 0 and "Traceback" not in err, err
    assert seen == 40
    assert len(os.listdir(tmp_path / "annotated")) == 40
