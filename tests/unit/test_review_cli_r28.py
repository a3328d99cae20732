"""Review round 28 of ``faceage predict``: conflicting model flags and checkpoints from another version.

Real components throughout: a small random checkpoint and dlib's HOG detector (:mod:`tests.unit.test_predict`),
a real BentoML model store in a subprocess.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from PIL import Image

from faceage.cli import main
from tests.unit.test_predict import model_files

# A declared test dependency (pyproject's test extra): missing, the run fails rather than skipping these tests.
from skimage import data as skimage_data


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    made = model_files(tmp_path_factory.mktemp("review_cli_r28"))
    made["photo"] = made["root"] / "astronaut.png"
    Image.fromarray(skimage_data.astronaut()).save(made["photo"])
    return made


STORE_AND_PREDICT = """
import shutil, sys
from pathlib import Path

import bentoml
from faceage.cli import main

checkpoint, detector, other, photo = sys.argv[1:]
with bentoml.models.create("face_age") as model:
    shutil.copyfile(checkpoint, Path(model.path) / "model.pt")
    shutil.copytree(detector, Path(model.path) / "detector")
print("rc", main(["predict", photo, "--bento", str(model.tag), "--detector", other, "--threads", "1"]))
"""


def test_detector_with_bento_is_refused_not_ignored(setup, tmp_path):
    """``--bento TAG --detector DIR``: the packaged model brings its own detector, as a ``--model`` folder does.

    Before, ``--detector`` was silently ignored with ``--bento`` (exit 0, ages from the store's detector),
    while the same pair with a ``--model`` folder is refused."""
    other = tmp_path / "another detector"  # not even a detector folder: it was never looked at
    other.mkdir()
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", STORE_AND_PREDICT, str(setup["checkpoint"]), str(setup["detector"]),
                          str(other), str(setup["photo"])], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.split()[-2:] == ["rc", "1"], out.stdout[-2000:] + out.stderr[-2000:]
    assert f"--detector {other} with --bento face_age:" in out.stderr
    assert "brings its own detector/; leave --detector out" in out.stderr
    assert "Traceback" not in out.stderr


def _edited(setup, tmp_path, edit) -> str:
    payload = torch.load(setup["checkpoint"], map_location="cpu", weights_only=True)
    edit(payload)
    path = tmp_path / "edited.pt"
    torch.save(payload, path)
    return str(path)


def test_a_checkpoint_with_an_input_kind_of_a_newer_version_is_one_clear_error(setup, tmp_path, capsys):
    """A checkpoint from a newer FaceAge naming an input kind this one does not know: one line and exit 1,
    as for any other checkpoint this version cannot read; it was a ``ValueError`` traceback."""
    model = _edited(setup, tmp_path, lambda p: p.update(input="future_kind"))
    assert main(["predict", str(setup["photo"]), "--model", model, "--detector", str(setup["detector"])]) == 1
    err = capsys.readouterr().err
    assert "checkpoint input kind 'future_kind' is unknown; known: dlib_age_chip" in err
    assert "Traceback" not in err


@pytest.mark.parametrize("drop", ["crop", "crop.detector_sha256", "image_size", "mean"])
def test_a_checkpoint_without_a_setting_is_refused_before_any_photo(setup, tmp_path, capsys, drop):
    """A checkpoint that lacks a setting the predictor reads (an older or hand-made one): refused when it loads,
    naming the setting. Before, a missing ``crop`` (or key of it) was a ``KeyError`` traceback, and a missing
    ``image_size`` or ``mean`` passed the load and failed at the first photo with a face, after the others'
    detection."""
    def edit(payload):
        if "." in drop:
            section, key = drop.split(".")
            del payload[section][key]
        else:
            del payload[drop]

    model = _edited(setup, tmp_path, edit)
    assert main(["predict", str(setup["photo"]), "--model", model, "--detector", str(setup["detector"])]) == 1
    err = capsys.readouterr().err
    assert f"{model} lacks the setting {drop}" in err
    assert "Traceback" not in err and "KeyError" not in err
