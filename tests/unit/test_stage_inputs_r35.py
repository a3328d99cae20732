"""Round 35: a stage run by hand with its inputs missing says what is missing in one line, not a traceback.

``dvc repro`` checks a stage's deps before it runs it; a user running ``python stages/X.py`` (as the README
shows) does not. Without ``data/faces`` ``embed`` and ``train`` died with ``FileNotFoundError`` on
``manifest.csv`` / ``preprocess.json``, and every stage run from another folder died on ``params.yaml``, both
as tracebacks. The real stage scripts run here as subprocesses, from a temporary folder.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faceage.config import load_params
from faceage.errors import FaceAgeError
from faceage.preprocess import MANIFEST, SETTINGS, read_crop_settings, read_faces_manifest

REPO = Path(__file__).resolve().parents[2]


def _params(tmp_path: Path, **train) -> Path:
    """The repo's params.yaml with ``train`` keys changed, written in ``tmp_path``."""
    raw = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["train"].update(train)
    raw["evaluate"]["external"] = []  # no ../shared needed
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False), encoding="utf-8")
    return path


def _run_stage(tmp_path: Path, stage: str, *args: str) -> subprocess.CompletedProcess:
    """``python stages/<stage>.py ARGS`` run from ``tmp_path`` (not the repo root), stores kept in ``tmp_path``."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
           "BENTOML_HOME": str(tmp_path / "bentoml"), "PYTHONWARNINGS": "ignore"}
    return subprocess.run([sys.executable, str(REPO / "stages" / f"{stage}.py"), *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=240)


def _one_error_line(proc: subprocess.CompletedProcess) -> str:
    """The one ERROR line a failed stage printed (asserting it failed so, without a traceback)."""
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out
    assert "Traceback" not in out, out
    errors = [line for line in out.splitlines() if " ERROR " in line]
    assert len(errors) == 1, out
    return errors[0]


STAGE_ARGS = {
    "embed": ["--faces", "data/faces", "--detector", "models/detector", "--out", "data/embeddings.npz"],
    "train": ["--faces", "data/faces", "--embeddings", "data/embeddings.npz", "--model", "models/model.pt",
              "--reports", "reports/train", "--run-file", "models/run.json", "--state", "models/train_state.pt",
              "--detector", "models/detector"],
}


@pytest.mark.parametrize(("stage", "backbone"), [("embed", "dlib_face"), ("embed", "dlib_age"),
                                                 ("train", "resnet18")])
def test_stage_without_preprocess_output_is_one_line(tmp_path, stage, backbone):
    params = _params(tmp_path, backbone=backbone)
    proc = _run_stage(tmp_path, stage, "--params", str(params), *STAGE_ARGS[stage])
    line = _one_error_line(proc)
    assert "data/faces" in line and "dvc repro preprocess" in line, line
    assert MANIFEST in line or SETTINGS in line, line


def test_stage_from_another_folder_names_the_params_file(tmp_path):
    """The default ``--params params.yaml`` from a folder without one: the absolute path and the fix."""
    proc = _run_stage(tmp_path, "embed", *STAGE_ARGS["embed"])
    line = _one_error_line(proc)
    assert str(tmp_path / "params.yaml") in line, line
    assert "repo root" in line and "--params" in line, line


@pytest.mark.parametrize("stage", ["check_sources", "fetch_data", "fetch_detector", "preprocess", "train",
                                   "evaluate"])
def test_every_stage_names_a_missing_params_file(tmp_path, stage):
    """Each stage that reads params, run with its dvc.yaml arguments and ``--params`` naming no file."""
    args = {
        "check_sources": ["--source", "s.json", "--external", "e.json", "--pretrained", "p.json"],
        "fetch_data": ["--out", "raw"], "fetch_detector": ["--out", "det"],
        "preprocess": ["--data", "raw", "--detector", "det", "--out", "faces", "--metrics", "m.json"],
        "train": STAGE_ARGS["train"],
        "evaluate": ["--model", "m.pt", "--faces", "f", "--embeddings", "e.npz", "--run-file", "r.json",
                     "--detector", "d", "--history", "h.csv", "--data", "raw", "--preprocess-metrics", "p.json",
                     "--card", "c.md", "--out", "o"],
    }[stage]
    proc = _run_stage(tmp_path, stage, "--params", "nowhere/params.yaml", *args)
    line = _one_error_line(proc)
    assert str(tmp_path / "nowhere" / "params.yaml") in line, line


# --- the readers themselves


@pytest.mark.parametrize("reader", [read_faces_manifest, read_crop_settings])
def test_reader_of_an_absent_faces_folder(tmp_path, reader):
    faces = tmp_path / "faces"
    with pytest.raises(FaceAgeError) as info:
        reader(faces)
    # callers that catch FileNotFoundError / OSError (recipe, packaging) still do
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(faces) in message and "dvc repro preprocess" in message and "\n" not in message


@pytest.mark.parametrize(("reader", "missing"), [(read_faces_manifest, MANIFEST), (read_crop_settings, SETTINGS)])
def test_reader_of_a_folder_without_the_file(tmp_path, reader, missing):
    faces = tmp_path / "faces"
    faces.mkdir()
    (faces / MANIFEST).write_text("split,file_name,crop\n", encoding="utf-8") if missing == SETTINGS else None
    (faces / SETTINGS).write_text("{}", encoding="utf-8") if missing == MANIFEST else None
    with pytest.raises(FileNotFoundError) as info:
        reader(faces)
    assert isinstance(info.value, FaceAgeError)
    assert missing in str(info.value) and str(faces) in str(info.value)


def test_reader_of_a_file_in_place_of_the_folder(tmp_path):
    """``--faces`` naming a file: was NotADirectoryError's traceback."""
    faces = tmp_path / "faces.csv"
    faces.write_text("x\n", encoding="utf-8")
    with pytest.raises(FaceAgeError, match="not a folder"):
        read_faces_manifest(faces)


def test_readers_still_read_a_preprocess_output(tmp_path):
    (tmp_path / MANIFEST).write_text("split,file_name,crop\ntrain,a.jpg,train/a.png\ntest,b.jpg,\n", encoding="utf-8")
    (tmp_path / SETTINGS).write_text('{"margin": 0.4}', encoding="utf-8")
    assert read_faces_manifest(tmp_path) == [{"split": "train", "file_name": "a.jpg", "crop": "train/a.png"}]
    assert read_crop_settings(tmp_path) == {"margin": 0.4}


def test_load_params_of_a_missing_file(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FaceAgeError) as info:
        load_params("params.yaml")
    assert isinstance(info.value, FileNotFoundError)  # as documented before
    message = str(info.value)
    assert str(tmp_path / "params.yaml") in message and "--params" in message and "\n" not in message
