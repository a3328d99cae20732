"""Shared fixtures: where the shared real data lives, and a small real pipeline run.

``../shared/datasets`` (or ``$FACEAGE_SHARED_DATASETS``) holds real faces; tests that need
it skip with a reason when it is absent. ``.ci/run`` points CI at it so every test runs there.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path:
    return Path(os.environ.get("FACEAGE_SHARED_DATASETS", REPO.parent / "shared" / "datasets"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"needs the shared real data at {path} (set FACEAGE_SHARED_DATASETS); absent here")
    return path


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 2,100-face APPA-REAL-layout sample (UTKFace crops)."""
    return _require(shared_datasets() / "appa-real-sample")


@pytest.fixture(scope="session")
def wild_dir() -> Path:
    """51 in-the-wild / odd-format photos with labels.csv."""
    return _require(shared_datasets() / "wild")


@pytest.fixture(scope="session")
def external_dir() -> Path:
    """1,743 more UTKFace faces (test split only): the cross-dataset set."""
    return _require(shared_datasets() / "utk-external")


def make_subset(sample: Path, dest: Path, per_split: dict[str, int]) -> Path:
    """Copies the first N rows of each split (and their images) into a release-layout folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for extra in sample.glob("*.csv"):  # label files beside the ground truth (gender/race)
        if not extra.name.startswith("gt_avg_"):
            shutil.copyfile(extra, dest / extra.name)
    for split, n in per_split.items():
        with open(sample / f"gt_avg_{split}.csv", newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for _, r in zip(range(n), reader)]
            fields = reader.fieldnames
        (dest / split).mkdir(exist_ok=True)
        with open(dest / f"gt_avg_{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            for name in (r["file_name"], r["file_name"] + "_face.jpg"):
                if (sample / split / name).exists():
                    shutil.copyfile(sample / split / name, dest / split / name)
    return dest


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """dlib's model files (HOG and CNN detectors, shape predictors, face encoder) with their manifest,
    from the offline face-recognition-models package: read-only for the tests that share it."""
    from faceage.detector import fetch_detector_files

    out = tmp_path_factory.mktemp("detector") / "dlib"
    fetch_detector_files("face_recognition_models", out)
    return out


@pytest.fixture(scope="session")
def tiny_run(sample_dir, external_dir, tmp_path_factory):
    """A real, small pipeline run through the library: fetch -> detector -> preprocess -> train -> evaluate.

    64/16/16 real faces, ResNet-18 from scratch, 1 epoch at 64 px; MLflow in a temp sqlite store;
    evaluated also on 12 faces of ``utk-external`` (``evaluate.external``).
    Returns a dict of paths (data, detector, faces, model, run, eval, model_card, tracking_uri, external).
    """
    from faceage.appa_real import fetch_appa_real
    from faceage.config import Params
    from faceage.detector import fetch_detector_files
    from faceage.evaluation import evaluate_model
    from faceage.preprocess import preprocess_dataset
    from faceage.tracking import mlflow_env
    from faceage.training import train_model

    root = tmp_path_factory.mktemp("tiny_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        source = make_subset(sample_dir, root / "source", {"train": 64, "valid": 16, "test": 16})
        external = make_subset(external_dir, root / "utk-external", {"test": 12})
        p = Params()
        fetch_appa_real(str(source), root / "data", md5="")
        fetch_detector_files("face_recognition_models", root / "detector")
        counts = preprocess_dataset(root / "data", root / "detector", root / "faces", replace(p.preprocess, workers=1))
        (root / "preprocess.json").write_text(json.dumps(counts))
        tp = replace(p.train, pretrained="none", epochs=1, image_size=64, batch_size=16)
        train_model(tp, root / "faces", root / "model.pt", root / "reports", root / "run.json", root / "state.pt")
        evaluate_model(root / "model.pt", root / "faces", root / "eval", replace(p.evaluate, external=(str(external),)),
                       run_path=root / "run.json", history_csv=root / "reports" / "history.csv",
                       data_dir=root / "data", preprocess_metrics=root / "preprocess.json",
                       model_card=root / "model_card.md", detector_dir=root / "detector",
                       external_cache=root / "external-cache")
    return {
        "root": root, "data": root / "data", "detector": root / "detector", "faces": root / "faces",
        "model": root / "model.pt", "run": root / "run.json", "eval": root / "eval", "tracking_uri": uri,
        "model_card": root / "model_card.md", "external": external, "external_cache": root / "external-cache",
    }
