"""Datasets over preprocess output (round 25): a split with no face, or with one.

A split whose every image ``preprocess`` skipped (no face with ``no_face=skip``, or unreadable) is a
user-fixable error: the stages print it as one line and exit 1, like ``train``'s own check for a
single training face, instead of a ValueError traceback (which the stage runner keeps for bugs).
"""

import csv
import logging

import numpy as np
import pytest
import torch
from PIL import Image

from faceage.data import load_split
from faceage.errors import FaceAgeError
from faceage.logs import run_stage
from faceage.preprocess import FIELDS

BACKBONES = [("resnet18", None), ("dlib_face", "embeddings.npz"), ("dlib_age", "chips.npz")]


def faces_dir(tmp_path, crops: dict[str, int]):
    """A preprocess-like folder: ``crops[split]`` random 40x30 PNG crops per split (non-square on
    purpose), and for ``test`` one row skipped by preprocess (no crop)."""
    rng = np.random.default_rng(0)
    rows = []
    for split, n in crops.items():
        (tmp_path / split).mkdir(exist_ok=True)
        for i in range(n):
            crop = f"{split}/{i:06d}.png"
            Image.fromarray(rng.integers(0, 256, (40, 30, 3), dtype=np.uint8)).save(tmp_path / crop)
            rows.append({"split": split, "file_name": f"{i:06d}.jpg", "crop": crop, "apparent_age": "30.5",
                         "apparent_age_std": "2.0", "real_age": "31", "status": "face", "n_faces": "1"})
    rows.append({"split": "test", "file_name": "skipped.jpg", "crop": "", "apparent_age": "40",
                 "apparent_age_std": "0", "real_age": "40", "status": "no_face", "n_faces": "0"})
    with open(tmp_path / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows(rows)
    return tmp_path


@pytest.mark.parametrize("backbone,features", BACKBONES)
def test_a_split_without_faces_is_a_user_error_for_every_backbone(tmp_path, backbone, features):
    folder = faces_dir(tmp_path, {"train": 2})
    embeddings = tmp_path / features if features else None  # never read: the split is refused first
    with pytest.raises(FaceAgeError, match="no face crops for split 'test'.*preprocess") as e:
        load_split(folder, "test", backbone, 32, embeddings)
    assert isinstance(e.value, ValueError)  # what callers caught before


def test_a_stage_reports_a_split_without_faces_in_one_line(tmp_path, caplog):
    folder = faces_dir(tmp_path, {"train": 2})
    with caplog.at_level(logging.ERROR, logger="faceage"), pytest.raises(SystemExit) as e:
        run_stage(lambda: load_split(folder, "test", "resnet18", 32))
    assert e.value.code == 1
    assert any("SplitDataError: no face crops for split 'test'" in r.getMessage() for r in caplog.records)


def test_a_split_of_one_non_square_crop_loads(tmp_path):
    folder = faces_dir(tmp_path, {"test": 1})
    data = load_split(folder, "test", "resnet18", 32)
    assert len(data) == 1 and data.images.shape == (1, 3, 32, 32) and data.images.dtype == torch.uint8
    image, age, std = data[0]
    assert image.shape == (3, 32, 32) and float(age) == 30.5 and float(std) == 2.0
