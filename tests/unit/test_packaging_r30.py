"""Packaging, round 30: runs compared on a set the workspace no longer evaluates, on unknown data, two packages
pointing ``latest`` at once, and a data source URL's credentials in the model card and the bento lineage.

Every store is a real SQLite MLflow store in ``tmp_path``; the tracking URI is always set explicitly."""

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.unit.test_packaging as packaging_tests
from faceage.packaging import PackagingError, select_winner
from faceage.tracking import EXPERIMENT

REPO = Path(__file__).resolve().parents[2]


# One SQLite store for the module, and a fresh face-age experiment per test, as the packaging tests have them.
store, client = packaging_tests.store, packaging_tests.client


def add_run(client, name, metrics, data="d" * 64, tags=None):
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=name,
                            tags={"data_sha256": data, "git_commit": "c0", **(tags or {})})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)  # distinct start times
    return run.info.run_id


def ext(mae, name="utk_external", n=1650):
    return {f"external_{name}_mae": mae, f"external_{name}_n_faces": n}


def test_a_set_the_workspace_no_longer_evaluates_does_not_exclude_the_runs_not_scored_on_it(client):
    """One old run scored on a set since dropped from evaluate.external excluded every later run ("not scored on
    old_set"), and the old run won on validation MAE 4.0 against 3.0: no evaluate in the workspace could fix it."""
    add_run(client, "old", {"best_val_mae": 4.0, "test_mae_years": 4.1, **ext(6.0), **ext(7.0, "old_set")})
    new = add_run(client, "new", {"best_val_mae": 3.0, "test_mae_years": 3.1, **ext(6.1)})
    assert select_winner(client, external_sha256={"utk_external": "v1"}).run_id == new
    # No workspace record (packaging outside the pipeline): every set any run was scored on, as before.
    assert select_winner(client).run_name == "old"


def test_external_sets_switched_off_in_the_workspace_leave_the_plain_validation_rule(client):
    """evaluate.external=[] in the workspace (its record lists no set): runs evaluated since then have no external
    MAE, and were all excluded for it, so an older run won with a worse validation MAE."""
    add_run(client, "old", {"best_val_mae": 4.0, "test_mae_years": 4.1, **ext(6.0)})
    new = add_run(client, "new", {"best_val_mae": 3.0, "test_mae_years": 3.1})
    assert select_winner(client, external_sha256={}).run_id == new


def test_packaging_without_the_workspaces_data_does_not_compare_runs_on_different_data(client, store, tmp_path,
                                                                                       monkeypatch):
    """No data/faces (a fresh clone, or outputs left in DVC's cache): every run competed, and the run on the
    2,100-face sample (validation MAE 4.5 on its own faces) was named the winner, with the experiment to apply."""
    from faceage.packaging import package_champion

    _, root = store
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root / 'mlflow.db'}")
    sample = add_run(client, "sample", {"best_val_mae": 4.5, "test_mae_years": 4.6}, data="s" * 64,
                     tags={"dvc_experiment": "quick", "data_source": "sample"})
    add_run(client, "appa", {"best_val_mae": 5.2, "test_mae_years": 5.4}, data="a" * 64,
            tags={"dvc_experiment": "full"})
    with pytest.raises(PackagingError, match=r"trained on 2 different data") as e:
        package_champion(tmp_path / "model.pt", tmp_path / "detector", tmp_path / "faces")
    assert f"the winner is run {sample}" not in str(e.value)
    assert "ssssssssssss" in str(e.value) and "aaaaaaaaaaaa" in str(e.value) and "dvc exp apply" in str(e.value)


def test_two_packages_pointing_latest_at_once_do_not_fail(tmp_path):
    """Both used the one staging file `.latest.tmp`: the second os.replace found it gone (FileNotFoundError)."""
    code = """
import os, bentoml
import faceage.packaging as packaging
with bentoml.models.create("face_age") as model:
    pass
tag = model.tag
real = os.replace
calls = []
def interleaved(src, dst):
    calls.append(src)
    if len(calls) == 1:  # the other package's make_latest runs between this one's write and its rename
        packaging.make_latest(tag)
    real(src, dst)
os.replace = interleaved  # every module's os.replace: atomic.write_text's too
packaging.make_latest(tag)
assert str(bentoml.models.get("face_age:latest").tag) == str(tag)
print("OK")
"""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
           "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'unused.db'}"}
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "OK" in out.stdout, out.stderr[-3000:]
    assert not list((tmp_path / "bentoml" / "models" / "face_age").glob("*.tmp"))


SOURCE = "https://alice:s3cr3tpass@data.example.com/appa-real.zip?X-Amz-Signature=abcdef123456&X-Amz-Expires=3600"


def test_a_data_source_urls_credentials_stay_out_of_the_model_card(tmp_path):
    """The card's "Data" line showed fetch_data.source as given: a basic-auth password or a presigned URL's
    signature went into reports/model_card.md."""
    from faceage.model_card import write_model_card

    group = {"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 0.5}
    metrics = {"mae_years": 4.0, "rmse_years": 5.0, "cs5": 0.6, "baseline_mae_years": 9.0, "n_test_faces": 3,
               "temperature": 1.0, "mean_predicted_std": 3.0, "coverage_1std": 0.7, "coverage_2std": 0.95}
    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "val_mae": 4.0,
            "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "detector_sha256": "f" * 64},
            "train_params": {"epochs": 1}}
    path = write_model_card(tmp_path / "card.md", metrics, {"age_group": [group]}, meta,
                            {"source": SOURCE, "sha256": "d" * 64, "counts": {"train": 3}}, None, None)
    card = path.read_text()
    assert "s3cr3tpass" not in card and "abcdef123456" not in card
    assert "data.example.com/appa-real.zip" in card


def test_a_data_source_urls_credentials_stay_out_of_the_bento_lineage():
    """model_metadata copied the checkpoint's data_source as given into faceage.json, which ships in the bento."""
    import types

    from faceage.packaging import Winner, model_metadata

    winner = Winner("r", "n", 4.0, 4.1, 0, "d" * 64, "c0")
    meta = {"backbone": "resnet18", "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64,
                                            "detector_sha256": "f" * 64, "data_source": SOURCE}}
    lineage = model_metadata(winner, meta, types.SimpleNamespace(name="face-age", version=1))
    text = json.dumps(lineage)
    assert "s3cr3tpass" not in text and "abcdef123456" not in text
    assert "data.example.com/appa-real.zip" in lineage["data_source"]
    local = model_metadata(winner, {**meta, "crop": {**meta["crop"], "data_source": "data/appa-real.zip"}},
                           types.SimpleNamespace(name="face-age", version=1))
    assert local["data_source"] == "data/appa-real.zip"
