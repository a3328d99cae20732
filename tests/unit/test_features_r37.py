"""Round 37: the frozen face networks' inputs (faceage.inputs, faceage.face_encoder); each test failed before its fix.

Real faces: APPA-REAL-layout release crops of ``appa-real-sample`` (skipped without the shared data).
"""

from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from faceage.inputs import IMAGE, input_preparer, resize_crop
from tests.conftest import REPO, make_subset

IMAGE_META = {"input": IMAGE, "image_size": 64, "mean": [0.5, 0.5, 0.5], "std": [0.25, 0.25, 0.25]}


@pytest.fixture(scope="module")
def face_crop(sample_dir) -> np.ndarray:
    """A real face: the release crop of the test split's first photo, RGB uint8."""
    path = sorted((sample_dir / "test").glob("*_face.jpg"))[0]
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("kind", ["float [0, 1]", "float [0, 255]", "int64"])
def test_an_image_input_of_another_dtype_than_uint8_is_refused_not_cast(face_crop, kind):
    # np.asarray(crop, dtype=np.uint8) cast it: a float crop in [0, 1] (skimage's img_as_float, a model's
    # normalised tensor) became a black face and the network gave it a confident age; the descriptor and chip
    # inputs refuse such crops already.
    crop = {"float [0, 1]": face_crop / 255.0, "float [0, 255]": face_crop.astype(np.float32),
            "int64": face_crop.astype(np.int64)}[kind]
    prepare = input_preparer(IMAGE_META)
    with pytest.raises(ValueError, match=r"uint8.*got shape \(\d+, \d+, 3\) of (float64|float32|int64)"):
        prepare([crop])
    assert prepare([face_crop]).shape == (1, 3, 64, 64)  # the uint8 crop itself is prepared


@pytest.mark.parametrize("channels", [None, 1, 4])
def test_an_image_input_that_is_not_rgb_is_refused_in_one_line(face_crop, channels):
    # A grey (H, W) crop failed in numpy's transpose ("axes don't match array"), and an RGBA one went through as a
    # (4, S, S) input that the network refused later (or, already at the network's side, was stacked as is).
    for side in (face_crop.shape[0], 64):  # resized, and already at the network's side
        rgb = np.asarray(Image.fromarray(face_crop).resize((side, side)))
        crop = rgb[..., 0] if channels is None else np.concatenate([rgb, rgb[..., :1]], axis=2)[..., :channels]
        with pytest.raises(ValueError, match=r"RGB uint8 face crop \(H, W, 3\).*got shape"):
            resize_crop(crop, 64)


def test_an_empty_image_input_is_refused_in_one_line():
    with pytest.raises(ValueError, match=r"non-empty.*got shape \(0, 0, 3\)"):
        resize_crop(np.zeros((0, 0, 3), np.uint8), 64)


@pytest.fixture(scope="module")
def faces(sample_dir, detector_dir, tmp_path_factory) -> Path:
    """preprocess's output of 8 real photos (4 train, 2 valid, 2 test)."""
    from dataclasses import replace

    from faceage.appa_real import fetch_appa_real
    from faceage.config import Params
    from faceage.preprocess import preprocess_dataset

    root = tmp_path_factory.mktemp("faces")
    source = make_subset(sample_dir, root / "source", {"train": 4, "valid": 2, "test": 2})
    fetch_appa_real(str(source), root / "data", md5="")
    out = root / "faces"
    preprocess_dataset(root / "data", detector_dir, out, replace(Params().preprocess, workers=1))
    return out


def _embed(tmp_path: Path, faces: Path, detector_dir: Path) -> subprocess.CompletedProcess:
    """The embed stage as dvc.yaml runs it (train.backbone=dlib_face, one worker), in ``tmp_path``."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"]["backbone"] = "dlib_face"
    params["embed"]["workers"] = 1
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    return subprocess.run([sys.executable, str(REPO / "stages" / "embed.py"), "--faces", str(faces), "--detector",
                           str(detector_dir), "--out", "data/embeddings.npz"], cwd=tmp_path, capture_output=True,
                          text=True, env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=600)


def test_embed_of_a_faces_folder_missing_a_crop_says_which_in_one_line_before_embedding(tmp_path, faces,
                                                                                          detector_dir):
    # A crop file the manifest lists but the folder lacks (deleted by hand as "not a face", a partial copy) failed
    # with PIL's FileNotFoundError traceback, and only when the workers reached it: after minutes of descriptors.
    broken = shutil.copytree(faces, tmp_path / "faces")
    with open(broken / "manifest.csv", newline="") as f:
        crops = [r["crop"] for r in csv.DictReader(f) if r["crop"]]
    (broken / crops[-1]).unlink()
    run = _embed(tmp_path, broken, detector_dir)
    assert run.returncode == 1, run.stderr[-3000:]
    assert "Traceback" not in run.stderr, run.stderr[-3000:]
    assert f"1 crop(s) its manifest.csv lists (first: {crops[-1]})" in run.stderr, run.stderr[-3000:]
    assert "dvc repro -f preprocess" in run.stderr, run.stderr[-3000:]
    assert "embedding" not in run.stderr, run.stderr[-3000:]  # said before any descriptor was computed
    assert not (tmp_path / "data" / "embeddings.npz").exists()
    whole = _embed(tmp_path, faces, detector_dir)  # the whole folder embeds
    assert whole.returncode == 0, whole.stderr[-3000:]
    with np.load(tmp_path / "data" / "embeddings.npz") as z:
        assert z["crops"].tolist() == crops and z["embeddings"].shape == (len(crops), 2, 128)
