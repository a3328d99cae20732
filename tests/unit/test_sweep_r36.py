"""Round 36: the sweep report's † reference row is a run that can win, judged as packaging judges it.

The report marks an external MAE measured on other faces of a set than the reference row's with ``†`` and tells the
user to sweep those backbones again "to score them on the newest run's faces". The reference was the newest row,
whatever it was: a diverged run (NaN test MAE) or one validated on other photos, which packaging's champion rule
never compares (not a ``contender``), so every run that can win was marked and sent to be swept again onto the faces
of a run that cannot. And the report judged validation photos by the majority only: packaging compares them with the
workspace's ``preprocess`` output (``data/faces``) where that holds the runs' data.

Every store is a real SQLite MLflow store in ``tmp_path`` with real logged artifacts; the workspace's preprocess
output is a real one (``tests.unit.test_training_r30._faces``).
"""

from __future__ import annotations

import math
import tempfile

from faceage.packaging import candidate, rank_candidates, read_face_errors, workspace_val_faces
from faceage.training import VAL_FACES_TAG, VAL_N_FACES_TAG
from tests.unit.test_champion_r34b import client, store
from tests.unit.test_champion_r34c import faces
from tests.unit.test_sweep_r34 import add_backbone_run, report
from tests.unit.test_training_r30 import _faces

FIXTURES = (client, store, report)  # shared fixtures, used by name

OTHER = "b" * 64  # validation faces of an older preprocess output


def test_a_newest_run_that_cannot_win_is_not_the_reference_of_the_faces_mark(client, tmp_path, report):
    """resnet50, swept last after upsample 2 (250 faces), diverged (NaN test MAE): packaging never compares it, yet
    the report marked the two runs that can win † and sent them to be swept again onto resnet50's faces."""
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, faces(0, 150, 7.0)),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, faces(0, 150, 6.0)),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", math.nan,
                                         {**faces(0, 150, 5.2), **faces(150, 250, 12.0)})}
    text, rows = report(runs)
    assert "| 7.00 |" in rows["resnet18"] and "| 6.00 |" in rows["resnet34"]
    assert "| 7.92† |" in rows["resnet50"]
    assert ("`utk` MAE marked † was measured on other faces of the set than the newest champion-eligible run's "
            "(`resnet34`, 150 faces): `resnet50` 250 faces") in text
    assert "--backbones resnet50`) to score them on the newest champion-eligible run's faces" in text
    assert "resnet18 resnet34" not in text


def test_the_workspace_validation_photos_decide_which_run_is_the_reference(client, tmp_path, report):
    """resnet18 was validated on the workspace's photos (``data/faces``, the runs' data); resnet34 and resnet50 on an
    older output's (the majority). Packaging compares resnet18 alone; the report took the majority's photos and the
    newest of those, resnet50, as the reference, and resnet18 as the run that cannot win."""
    workspace = workspace_val_faces(_faces(tmp_path / "data" / "faces"))  # data_sha256 d*64, as the runs'
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, faces(0, 150, 7.0)),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, faces(0, 150, 6.0)),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", 8.5,
                                         {**faces(0, 150, 5.2), **faces(150, 250, 12.0)})}
    for backbone, info in runs.items():
        val_faces, n = (workspace, "4") if backbone == "resnet18" else (OTHER, "5")
        client.set_tag(info["run_id"], VAL_FACES_TAG, val_faces)
        client.set_tag(info["run_id"], VAL_N_FACES_TAG, n)
    text, rows = report(runs)
    assert "| 7.00 |" in rows["resnet18"] and "| 6.00 |" in rows["resnet34"] and "| 7.92† |" in rows["resnet50"]
    assert "(`resnet18`, 150 faces): `resnet50` 250 faces" in text
    assert "`resnet50` not: it cannot be champion (validated on other photos (5 photos, faces bbbbbbbb; the " \
           "workspace's: 4 photos" in text
    # The runs the report calls able to win are packaging's contenders with the workspace's validation faces
    with tempfile.TemporaryDirectory() as workdir:
        ranked = rank_candidates([candidate(client.get_run(info["run_id"])) for info in runs.values()],
                                 val_faces=workspace, face_errors=lambda c: read_face_errors(client, c.run_id, workdir))
    names = {info["run_id"]: b for b, info in runs.items()}
    assert {names[c.run_id] for c in ranked if c.contender} == {"resnet18"}
    assert {r["backbone"] for r in report.rows if r.get("contender", True)} == {"resnet18"}


def test_without_a_workspace_output_of_the_runs_data_the_majority_decides(client, tmp_path, report):
    """A workspace preprocess output of other data (another data_sha256) says nothing about these runs' photos:
    the majority's photos are compared, as packaging would with no preprocess output of the runs' data."""
    folder = _faces(tmp_path / "data" / "faces")
    settings = folder / "preprocess.json"
    settings.write_text(settings.read_text().replace("d" * 64, "e" * 64))
    workspace = workspace_val_faces(folder)
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, faces(0, 150, 7.0)),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, faces(0, 150, 6.0)),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", 8.5,
                                         {**faces(0, 150, 5.2), **faces(150, 250, 12.0)})}
    for backbone, info in runs.items():
        client.set_tag(info["run_id"], VAL_FACES_TAG, workspace if backbone == "resnet18" else OTHER)
        client.set_tag(info["run_id"], VAL_N_FACES_TAG, "4" if backbone == "resnet18" else "5")
    text, rows = report(runs)
    assert {r["backbone"] for r in report.rows if r.get("contender", True)} == {"resnet34", "resnet50"}
    assert "| 7.00† |" in rows["resnet18"] and "| 6.00† |" in rows["resnet34"] and "| 7.92 |" in rows["resnet50"]
    assert "than the newest run's (`resnet50`, 250 faces): `resnet18` 150 faces, `resnet34` 150 faces" in text


def test_a_dlib_age_checkpoint_behind_a_dead_server_is_not_waited_for(tmp_path):
    """An old dlib_age run (``train.head=auto``, no ``train.face_features``): the report reads its head from its
    checkpoint artifact. Behind an artifact server that does not answer (a real closed port), that download waited out
    MLflow's retries (minutes, in silence) before the params' reading; now the report says why at once and goes on."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    import mlflow

    from tests.unit.test_packaging_r36 import closed_port

    port = closed_port()
    db = tmp_path / "mlflow.db"
    client = mlflow.MlflowClient(f"sqlite:///{db}")
    # Where a tracking server that proxies artifacts keeps them, as an http location
    exp = client.create_experiment("face-age",
                                   artifact_location=f"http://127.0.0.1:{port}/api/2.0/mlflow-artifacts/artifacts/1")
    run_id = client.create_run(exp, run_name="dlib_age", tags={"data_sha256": "d" * 64}).info.run_id
    for key, value in {"train.backbone": "dlib_age", "train.num_parameters": "1000", "train.image_size": "64",
                       "train.epochs": "5"}.items():
        client.log_param(run_id, key, value)
    for key, value in {"best_val_mae": 5.0, "test_mae_years": 5.5}.items():
        client.log_metric(run_id, key, value)
    client.set_terminated(run_id, "FINISHED")
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps({"dlib_age": {"run_id": run_id, "overrides": ["train.backbone=dlib_age"]}}))
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{db}", "PYTHONPATH": str(root)}
    done = subprocess.run([sys.executable, "-m", "faceage.sweep", "--report-only", "--runs", str(runs)], cwd=tmp_path,
                          env=env, capture_output=True, text=True, timeout=90)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr
    assert f"127.0.0.1:{port}" in said and "does not answer" in said, said[-2000:]
    assert "its head is read from its params (fused)" in said, said[-2000:]
    assert "| `dlib_age` |" in (tmp_path / "reports" / "backbones.md").read_text()
