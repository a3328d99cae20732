"""Round 35b: the sweep report's common-faces column compares the runs packaging's champion rule compares.

Packaging's guard pairs runs scored on different faces of an external set on the faces all of them scored, and since
round 35 only the runs that can win take part (``contender``: finite validation and test MAEs, validated on the
compared photos; :func:`faceage.packaging.rank_candidates`). The sweep report's ``<set> MAE, N common faces`` column
said it used packaging's comparison, yet paired every row with an external MAE: a row with a NaN test MAE, or one
validated on other photos, shrank the common faces of the others, so the report's MAEs (and face count) differed from
the champion table's for the same runs. And a resumed training said "resuming from epoch N of M", which reads as if
epoch N were trained again.

Every store is a real SQLite MLflow store in ``tmp_path`` with real logged artifacts.
"""

from __future__ import annotations

import math
import tempfile
from dataclasses import replace

import pytest

from faceage.config import Params

from faceage.packaging import candidate, rank_candidates, read_face_errors
from faceage.training import VAL_FACES_TAG, VAL_N_FACES_TAG
from tests.unit.test_champion_r34b import client, store
from tests.unit.test_champion_r34c import faces
from tests.unit.test_sweep_r34 import add_backbone_run, report, upsample_sweep
from tests.unit.test_training_r30 import TINY, _faces, _kill_after_first_save, _Killed, _train

FIXTURES = (client, store, report)  # shared fixtures, used by name

WORKSPACE, OTHER = "a" * 64, "b" * 64  # validation faces: the sweep's, an older preprocess output's


def packaging_paired(client, runs: dict) -> dict[str, tuple[float, int]]:
    """{backbone: (utk MAE on the common faces, how many)} as packaging's champion rule compares the same runs."""
    names = {info["run_id"]: b for b, info in runs.items()}
    with tempfile.TemporaryDirectory() as workdir:
        ranked = rank_candidates([candidate(client.get_run(info["run_id"])) for info in runs.values()],
                                 face_errors=lambda c: read_face_errors(client, c.run_id, workdir))
    return {names[c.run_id]: (c.paired_mae_years["utk"], c.paired_n_faces["utk"])
            for c in ranked if "utk" in c.paired_mae_years}


def common_column(text: str) -> str:
    return next(line for line in text.splitlines() if line.startswith("| backbone"))


def test_a_run_with_a_nan_test_mae_does_not_shrink_the_common_faces(client, tmp_path, report):
    """An older dlib_face run (test MAE NaN: packaging never compares it) scored faces 0-119 of utk with another
    detector: pairing it too compared the three CNNs on 120 faces, not the 150 packaging compares them on."""
    runs = {"dlib_face": add_backbone_run(client, tmp_path, "dlib_face", math.nan, faces(0, 120, 3.0)),
            **upsample_sweep(client, tmp_path)}
    text, rows = report(runs)
    assert "| `utk` MAE | `utk` MAE, 150 common faces |" in common_column(text)
    assert "| 7.00† | 7.00 |" in rows["resnet18"] and "| 7.92 | 5.20 |" in rows["resnet50"]
    assert "| 3.00† | - |" in rows["dlib_face"]  # its own MAE, marked; not in the column
    assert ("column compares `resnet18`, `resnet34`, `resnet50` on the 150 faces all of them scored (their "
            "`evaluation/external_predictions.csv`); `dlib_face` not: it cannot be champion (validation MAE is nan; "
            "test MAE is nan), so packaging compares it with no run; sweep") in text
    column = {r["backbone"]: r["external_common"]["utk"] for r in report.rows if "utk" in r.get("external_common", {})}
    assert column == packaging_paired(client, runs)
    assert {b: (round(mae, 6), n) for b, (mae, n) in column.items()} == {"resnet18": (7.0, 150),
                                                                          "resnet34": (6.0, 150),
                                                                          "resnet50": (5.2, 150)}


def test_a_run_validated_on_other_photos_does_not_shrink_the_common_faces(client, tmp_path, report):
    """An old convnext_tiny run validated on fewer photos (``preprocess.no_face=skip``), finite MAEs: packaging
    excludes it, and the report compared the others on the 120 faces it shares with them."""
    runs = {"convnext_tiny": add_backbone_run(client, tmp_path, "convnext_tiny", 8.0, faces(0, 120, 3.0)),
            **upsample_sweep(client, tmp_path)}
    for backbone, info in runs.items():
        val_faces, n = (OTHER, "1412") if backbone == "convnext_tiny" else (WORKSPACE, "1500")
        client.set_tag(info["run_id"], VAL_FACES_TAG, val_faces)
        client.set_tag(info["run_id"], VAL_N_FACES_TAG, n)
    text, rows = report(runs)
    assert "| `utk` MAE | `utk` MAE, 150 common faces |" in common_column(text)
    assert "| 3.00† | - |" in rows["convnext_tiny"] and "| 6.00† | 6.00 |" in rows["resnet34"]
    assert "`convnext_tiny` not: it cannot be champion (validated on other photos (1412 photos, faces bbbbbbbb" in text
    column = {r["backbone"]: r["external_common"]["utk"] for r in report.rows if "utk" in r.get("external_common", {})}
    assert column == packaging_paired(client, runs)
    assert set(column) == {"resnet18", "resnet34", "resnet50"}


def test_runs_that_can_win_on_the_same_faces_get_no_common_column(client, tmp_path, report):
    """Only the NaN run scored other faces: the runs packaging compares share theirs, so there is nothing to pair
    (before, the NaN run made a column of 120 common faces), and the note says why the NaN run is not compared."""
    same = faces(0, 150, 6.0)
    runs = {"dlib_face": add_backbone_run(client, tmp_path, "dlib_face", math.nan, faces(0, 120, 3.0)),
            "resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, same),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, same)}
    text, rows = report(runs)
    assert "common faces" not in common_column(text)
    assert "| 3.00† |" in rows["dlib_face"] and "| 6.00 |" in rows["resnet34"]
    assert "`dlib_face` not: it cannot be champion (validation MAE is nan; test MAE is nan)" in text
    assert "no readable `evaluation/external_predictions.csv`" not in text
    assert packaging_paired(client, runs) == {}


def test_the_resume_line_says_which_epoch_is_done_and_which_comes_next():
    """"resuming from epoch 1 of 5" read as if epoch 1 were trained again; it had finished and was saved."""
    from faceage.training import resume_message

    assert resume_message(1, 5) == "resuming from epoch 1 of 5 (epoch 1 done, not trained again; next: epoch 2)"
    assert resume_message(3, 5) == "resuming from epoch 3 of 5 (epochs 1-3 done, not trained again; next: epoch 4)"
    assert resume_message(5, 5) == "resuming from epoch 5 of 5 (all 5 epochs done; no epoch left to train)"
    assert resume_message(1, 1) == "resuming from epoch 1 of 1 (epoch 1 done; no epoch left to train)"


@pytest.fixture()
def training_store(tmp_path, monkeypatch):
    """A fresh sqlite store, current for the test, as ``test_training_r30``'s ``store`` (one torch thread)."""
    from faceage import training
    from faceage.tracking import mlflow_env, setup_mlflow

    monkeypatch.setattr(training, "_cores_per_rank", lambda: 1)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'train-mlflow.db'}"):
        setup_mlflow()
        yield


def test_a_resumed_training_logs_the_epoch_done_and_the_next(tmp_path, training_store, caplog, monkeypatch):
    """A real training of 2 epochs killed after epoch 1's save, then rerun: the line says epoch 2 is next."""
    caplog.set_level("INFO", logger="faceage")
    _faces(tmp_path / "faces")
    p = replace(Params().train, **TINY)
    restore = _kill_after_first_save(monkeypatch)
    with pytest.raises(_Killed):
        _train(p, tmp_path)
    restore()
    caplog.clear()
    _train(p, tmp_path)
    assert "resuming from epoch 1 of 2 (epoch 1 done, not trained again; next: epoch 2) (" in caplog.text
    assert caplog.text.count("epoch 1/2") == 0 and caplog.text.count("epoch 2/2") == 1  # epoch 1 was not redone
