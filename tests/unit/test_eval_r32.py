"""Round 32 (second read of round 31): evaluation, tracking, packaging."""

from __future__ import annotations

import pytest

from faceage.evaluation import evaluate_external
from tests.unit.test_evaluation_r31 import two_sets
from tests.unit.test_tracking_r31 import read_only

FIXTURES = (two_sets, read_only)  # shared fixtures, used by name


# --- the model card: an external set where no face was found ----------------------------------------------


def test_a_set_without_a_face_shows_no_mae_in_the_card_not_nan(two_sets, detector_dir, tmp_path):
    """Round 31 reports a faceless set instead of stopping evaluate, with NaN metrics in metrics.json; the card
    printed them as "nan" (MAE, RMSE, CS@5, baseline), which reads as a model that output NaN. Nothing was scored:
    "-", as for a metric a set has not."""
    from faceage.model_card import _external_table, _metrics_table

    sets, model, p = two_sets
    results, _, _ = evaluate_external(model, sets, p, detector_dir, 30.0, tmp_path / "cache")
    table = "\n".join(_external_table(results, "cs5"))
    blank = next(line for line in table.splitlines() if line.startswith("| `blank` |"))
    assert "nan" not in blank.lower()
    assert blank == "| `blank` | 2 | 0 | 1 | 1 | - | - | - | - |"
    faces = next(line for line in table.splitlines() if line.startswith("| `faces` |"))
    assert "| 13.00 |" in faces  # a scored set keeps its numbers
    metrics = {"mae_years": 5.0, "mae_real_years": 5.5, "rmse_years": 6.0, "cs5": 0.5, "baseline_mae_years": 9.0,
               "n_test_faces": 10, "external": results}
    lines = _metrics_table(metrics, "cs5")
    assert not any("nan" in line.lower() for line in lines)
    assert any(line.startswith("| MAE, apparent age (years) | 5.00 | - | 13.00 |") for line in lines)
    assert any("Faces evaluated | 10 | 0 | 1" in line for line in lines)


# --- the tracking store: a sqlite path whose folder is not there --------------------------------------------


def test_a_store_in_a_folder_that_is_not_there_is_said_so(tmp_path, read_only):
    """A store on a share that is not mounted (its folder missing, the first folder that exists read-only) was
    reported as "<that folder> is read-only for this user": the user made it writable, or asked for it, when the
    path was what was wrong. Packaging, which reads an existing store, said that instead of "no MLflow store"."""
    from faceage.packaging import PackagingError, package_champion
    from faceage.tracking import TrackingError, check_reachable, mlflow_env

    mount = tmp_path / "mnt"
    mount.mkdir()
    read_only(mount)
    db = mount / "share" / "mlflow.db"
    uri = f"sqlite:///{db}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        with pytest.raises(TrackingError) as e:  # train's check: it would create the store there
            check_reachable()
        message = str(e.value)
        assert f"{mount / 'share'} does not exist" in message and "\n" not in message
        with pytest.raises(PackagingError) as e:  # packaging reads a store: there is none
            package_champion(tmp_path / "model.pt", tmp_path / "detector", tmp_path / "faces")
        assert f"no MLflow store at {db}" in str(e.value)
        assert not db.parent.exists()


def test_a_read_only_existing_store_is_still_refused_by_packaging(tmp_path, read_only):
    """The order changed (is the store there, then can it be written): a read-only store is still refused first."""
    from faceage.packaging import package_champion
    from faceage.tracking import TrackingError, mlflow_env
    from tests.unit.test_tracking_r31 import store_with_a_run

    uri, _ = store_with_a_run(tmp_path)
    read_only(tmp_path / "store" / "mlflow.db")
    with mlflow_env("MLFLOW_TRACKING_URI", uri), pytest.raises(TrackingError, match="read-only"):
        package_champion(tmp_path / "model.pt", tmp_path / "detector", tmp_path / "faces")


# --- stages/package.py: the last line on the model card ---------------------------------------------------


@pytest.mark.parametrize("reason", ["unreadable", "another run's"])
def test_the_last_line_does_not_say_the_run_logged_no_card_when_it_did(tmp_path, monkeypatch, capsys, reason):
    """champion_card ships no card for three reasons (none logged, one describing another run, one that could
    not be downloaded), each named in a warning; the stage's last line then said "its run logged no
    model_card.md" whatever the reason, contradicting the warning above it."""
    import mlflow

    import faceage.packaging as packaging
    from faceage.packaging import Winner, champion_card
    from faceage.tracking import EXPERIMENT
    from stages import package
    from tests.unit.test_packaging2_r31 import add_run, card_text

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = add_run(client, tmp_path, "champion", card_text("someone-else" if reason == "another run's" else "RUN",
                                                             4.2))
    winner = Winner(run_id, "champion", 5.0, 5.5, 0, None, None)
    if reason == "unreadable":
        def failing(*args, **kwargs):
            raise OSError("disk full")
        monkeypatch.setattr(client, "download_artifacts", failing)
    assert champion_card(client, winner, tmp_path / "dl") is None

    summary = {"bento_model": "face_age:new", "registered_model": "face-age", "registered_version": "2",
               "model_card_path": None}
    monkeypatch.setattr(packaging, "package_champion", lambda *a, **k: summary)
    capsys.readouterr()
    package.main([])  # setup_logging: its lines go to stderr
    last = capsys.readouterr().err.strip().splitlines()[-1]
    assert "packaged face_age:new" in last
    assert "logged no model_card.md" not in last
    assert "none" in last and "warning" in last


def test_a_card_naming_no_run_is_not_said_to_describe_run_none(tmp_path, caplog):
    """A card whose Lineage names no run (a checkpoint that recorded none: `?`) was refused with "describes run
    None", as if a run of that id existed."""
    import mlflow

    from faceage.packaging import Winner, champion_card
    from faceage.tracking import EXPERIMENT
    from tests.unit.test_packaging2_r31 import add_run, card_text

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    client.create_experiment(EXPERIMENT, artifact_location=(tmp_path / "artifacts").as_uri())
    run_id = add_run(client, tmp_path, "champion", card_text("?", 4.2))
    assert champion_card(client, Winner(run_id, "champion", 5.0, 5.5, 0, None, None), tmp_path / "dl") is None
    assert "None" not in caplog.text
    assert "names no MLflow run" in caplog.text
