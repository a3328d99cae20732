"""Round-36 review of `faceage predict` as a new user runs it over a folder of many labelled photos: the photos of
a folder are read and detected on every usable core (it was one photo at a time, however many cores), with the
ages of the one-at-a-time predictor."""

from __future__ import annotations

import json
import os
import threading

import pytest
from PIL import Image

from faceage.cli import main
from faceage.predict import AgePredictor, FaceLocator, available_cores
from tests.unit.test_predict import model_files

# A declared test dependency (pyproject's test extra).
from skimage import data as skimage_data


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    return model_files(tmp_path_factory.mktemp("cli_r36"))


def _photos(folder, n):
    """``n`` distinct files (hard links, so not one photo reached twice) of one 512x512 face photo."""
    folder.mkdir()
    first = folder / "p00.png"
    Image.fromarray(skimage_data.astronaut()).save(first)
    for i in range(1, n):
        os.link(first, folder / f"p{i:02d}.png")
    return folder


@pytest.mark.skipif(available_cores() < 2, reason="needs two usable cores")
def test_a_folder_s_photos_are_detected_on_several_cores_with_the_same_ages(made, tmp_path, monkeypatch, capsys):
    """`faceage predict` over a folder of 1,743 photos took minutes on a 16-core machine while one or two cores
    worked: it decoded and detected one photo after another (detection is most of the time). The service and
    `evaluate` detect on every core. Now the photos of a batch are read and detected on a thread each, with their
    own detector (dlib's is not thread-safe), and the ages are the one-at-a-time predictor's."""
    photos = _photos(tmp_path / "photos", 8)
    lock, active, most = threading.Lock(), [0], [0]
    locate = FaceLocator.locate

    def counted(self, *args, **kwargs):  # the real locate, counting how many run at once
        with lock:
            active[0] += 1
            most[0] = max(most[0], active[0])
        try:
            return locate(self, *args, **kwargs)
        finally:
            with lock:
                active[0] -= 1

    monkeypatch.setattr(FaceLocator, "locate", counted)
    code = main(["predict", "--json", "--model", str(made["checkpoint"]), "--detector", str(made["detector"]),
                 str(photos)])
    out = json.loads(capsys.readouterr().out)
    assert code == 0 and len(out) == 8
    assert most[0] >= 2, "the photos were detected one at a time"
    monkeypatch.setattr(FaceLocator, "locate", locate)
    alone = AgePredictor(made["checkpoint"], made["detector"], threads=1)
    image = skimage_data.astronaut()
    expected = [f.as_dict() for f in alone.predict(image)]
    assert expected and all(entry["faces"] == expected for entry in out)


def test_sigterm_in_a_large_folder_prints_the_photos_done_like_ctrl_c(made, tmp_path):
    """`timeout 600 faceage predict --json big/ > ages.json` (or a CI job cancelled, `kill PID`) left an empty
    ages.json and no word on stderr: SIGTERM ended the process at once, every photo already predicted lost, where
    Ctrl-C prints them. Now SIGTERM does what Ctrl-C does (the photos done printed as valid JSON, one line naming
    the signal and how many photos were done), and the process still dies of SIGTERM."""
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    photos = _photos(tmp_path / "photos", 60)
    for i in range(60, 400):
        os.link(photos / "p00.png", photos / f"p{i:03d}.png")
    out, err = tmp_path / "out.json", tmp_path / "err.txt"
    with open(out, "w") as stdout, open(err, "w") as stderr:
        proc = subprocess.Popen([sys.executable, "-m", "faceage.cli", "predict", "--json", "-v", "--model",
                                 str(made["checkpoint"]), "--detector", str(made["detector"]),
                                 "--annotate", str(tmp_path / "annotated"), str(photos)],
                                stdout=stdout, stderr=stderr, cwd=Path(__file__).resolve().parents[2])
        try:
            deadline = time.monotonic() + 120
            while "p08.png ->" not in err.read_text() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)  # the first chunk of 8 is done
            assert proc.poll() is None, err.read_text()[-2000:]
            proc.send_signal(signal.SIGTERM)
            rc = proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    log = err.read_text()
    assert rc == -signal.SIGTERM, log[-2000:]
    assert "Traceback" not in log
    last = log.strip().splitlines()[-1]
    assert "stopped by SIGTERM" in last
    done = json.loads(out.read_text())  # valid JSON: the photos done, each complete
    assert 8 <= len(done) < 400
    assert all(e["faces"] and e["annotated"] for e in done)
    assert f"{len(done)} of 400" in last


def test_predict_help_gives_the_json_fields_and_every_default(capsys):
    """`faceage predict --help` said "--json  print JSON (one object per photo)" and no more: a new user scripting
    over the output had to run it to learn the keys (and that a photo that could not be read has no "faces"), and
    "--max-pixels  refuse larger images" gave no number, where every other limit gives its default."""
    from faceage.cli import build_parser
    from faceage.images import DEFAULT_MAX_PIXELS

    with pytest.raises(SystemExit):
        build_parser().parse_args(["predict", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for words in ('"file"', '"width"', '"height"', '"faces"', '"box"', '"age"', '"age_std"', '"score"', '"error"',
                  "largest first", "sorted by name", f"(default: {DEFAULT_MAX_PIXELS})", "143 (SIGTERM)"):
        assert words in text, words
