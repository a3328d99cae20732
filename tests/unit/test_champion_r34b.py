"""Round 34b: the champion rule compared MAEs measured on different faces of the same files.

- Validation: with ``preprocess.no_face=skip`` the validation split loses its faceless photos, so a skip run's
  ``best_val_mae`` is measured on fewer, easier faces than a release_crop run's, on the same data (``data_sha256``),
  and it won on that alone. ``train`` now tags the faces it validated on (``train.val_faces_sha256``, with
  ``train.val_n_faces``), and packaging compares validation MAEs only among runs validated on the same faces: the
  workspace's, else the ones most runs were.
- External sets: a set without release crops (utk-external) is scored only on the faces the run's own detector
  found, so hog and cnn runs (or other upsample, retry_pad, cnn_retry_side) are scored on different subsets of the
  same files (``evaluate.external_sha256`` equal, ``external_<name>_n_faces`` not), yet the guard compared their
  MAEs. ``evaluate`` now tags the faces it scored per set (``evaluate.external_faces_sha256``); runs scored on
  different faces are compared on the faces they have in common (34c: excluding all but the majority's threw a
  preprocess sweep away), from their logged predictions; see tests.unit.test_champion_r34c.
- Runs logged before the tags compare as before, except that a run trained with ``no_face=skip`` is not compared
  with runs that were not.

Every store is a real SQLite MLflow store in ``tmp_path``.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from dataclasses import replace

import pytest

import tests.unit.test_packaging as packaging_tests
from faceage.external import EXTERNAL_SHA256_TAG
from faceage.packaging import PackagingError, select_winner
from faceage.tracking import EXPERIMENT, mlflow_env
from faceage.training import faces_fingerprint

from tests.unit.test_evaluation_r31 import two_sets

store, client = packaging_tests.store, packaging_tests.client
FIXTURES = (two_sets,)  # shared fixtures, used by name

VAL_TAG, VAL_N_TAG, EXT_FACES_TAG = "train.val_faces_sha256", "train.val_n_faces", "evaluate.external_faces_sha256"
RELEASE_CROP = {"no_face": "release_crop", "detector": "hog", "upsample": "1", "retry_pad": "0.25",
                "cnn_retry_side": "0"}


def add_run(client, name, val, *, preprocess=None, val_faces=None, ext=None, ext_faces=None, n_faces=None):
    """A finished run as train + evaluate log it: ``ext`` {set: MAE} on version v1 of each set, ``ext_faces``
    {set: faces fingerprint} (None: a run from before the tags), ``n_faces`` {set: faces scored}."""
    ext = ext or {}
    exp = client.get_experiment_by_name(EXPERIMENT)
    tags = {"data_sha256": "d" * 64, "git_commit": "c0",
            "evaluate.external": json.dumps([f"/sets/{n}" for n in ext]),
            EXTERNAL_SHA256_TAG: json.dumps({n: "v1" for n in ext})}
    if val_faces is not None:
        tags.update({VAL_TAG: val_faces[0], VAL_N_TAG: str(val_faces[1])})
    if ext_faces is not None:
        tags[EXT_FACES_TAG] = json.dumps(ext_faces)
    run = client.create_run(exp.experiment_id, run_name=name, tags=tags)
    for key, value in (preprocess or RELEASE_CROP).items():
        client.log_param(run.info.run_id, f"preprocess.{key}", value)
    for key, value in {"best_val_mae": val, "test_mae_years": val, **{f"external_{n}_mae": v for n, v in ext.items()},
                       **{f"external_{n}_n_faces": (n_faces or {}).get(n, 500) for n in ext}}.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, "FINISHED")
    time.sleep(0.01)
    return run.info.run_id


def verdicts(caplog) -> str:
    return "\n".join(r.getMessage() for r in caplog.records if r.name == "faceage.packaging")


SKIP = {**RELEASE_CROP, "no_face": "skip"}


def test_a_skip_run_validated_on_fewer_photos_does_not_beat_the_release_crop_runs(client, caplog):
    add_run(client, "crop-a", 4.0, val_faces=("a" * 64, 1500))
    add_run(client, "crop-b", 4.2, val_faces=("a" * 64, 1500))
    add_run(client, "skip", 3.0, preprocess=SKIP, val_faces=("b" * 64, 1412))
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client)
    assert winner.run_name == "crop-a"
    text = verdicts(caplog)
    assert "validated on other photos (1412 photos, faces bbbbbbbb; the compared runs': 1500 photos, faces aaaaaaaa" \
        in text
    assert "preprocess.no_face=skip (the compared runs': release_crop)" in text
    assert "dvc exp run -S preprocess.no_face=release_crop" in text


def test_the_workspace_validation_faces_are_the_reference_not_the_majority(client, caplog):
    """Two skip runs and one release_crop run, the workspace's preprocess a release_crop one: the skip runs'
    faces are the most common, but packaging ships a model checked on the workspace's faces."""
    add_run(client, "crop", 4.0, val_faces=("a" * 64, 1500))
    add_run(client, "skip-1", 3.0, preprocess=SKIP, val_faces=("b" * 64, 1412))
    add_run(client, "skip-2", 3.1, preprocess=SKIP, val_faces=("b" * 64, 1412))
    assert select_winner(client).run_name == "skip-1"  # no workspace: most runs' faces
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, val_faces="a" * 64).run_name == "crop"
    assert "the workspace's: 1500 photos, faces aaaaaaaa" in verdicts(caplog)


def test_no_run_validated_on_the_workspace_faces_is_said_so_with_what_to_do(client):
    add_run(client, "skip", 3.0, preprocess=SKIP, val_faces=("b" * 64, 1412))
    with pytest.raises(PackagingError) as err:
        select_winner(client, val_faces="a" * 64)
    message = str(err.value)
    assert "validated on other photos" in message and "train it again" in message
    assert "evaluate the runs on the same evaluate.external sets" not in message


def log_predictions(client, run_id: str, tmp_path, scored: dict[str, dict[str, float]]) -> None:
    """Logs ``evaluation/external_predictions.csv`` as ``evaluate`` writes it: ``scored`` {set: {file: |error|}}."""
    path = tmp_path / run_id / "external_predictions.csv"
    path.parent.mkdir(parents=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["set", "file_name", "true_age", "predicted_age", "predicted_std", "abs_error"])
        for name, errors in scored.items():
            for file_name, error in errors.items():
                w.writerow([name, file_name, 30.0, round(30.0 + error, 3), 2.0, round(error, 3)])
    client.log_artifact(run_id, str(path), artifact_path="evaluation")


def test_runs_scored_on_other_faces_of_an_external_set_are_compared_on_the_common_faces(client, tmp_path, caplog):
    """The cnn run found fewer, easier faces on utk (MAE 6.0 on 1,500 of them): the hog runs' 8.0 on 1,743 faces
    (293 small ones cnn missed, at 17 years) does not trail it by 2 years. 34b excluded the cnn run (advising to
    train it with hog: no detector sweep possible); 34c compares the three on the 1,450 faces all of them scored
    (from their logged predictions), where the hog runs are within the margin of cnn, and hog wins on validation."""
    def utk(common: float, first: int, last: int, extra: float) -> dict[str, float]:
        return {**{f"{i:05d}.jpg": common for i in range(1450)}, **{f"{i:05d}.jpg": extra for i in range(first, last)}}

    scored = {"hog": (4.0, utk(6.2, 1450, 1743, 17.0), RELEASE_CROP),
              "hog-2": (4.3, utk(6.3, 1450, 1743, 17.0), RELEASE_CROP),
              "cnn": (4.1, utk(6.0, 1743, 1793, 6.0), {**RELEASE_CROP, "detector": "cnn"})}
    for name, (val, errors, preprocess) in scored.items():
        run_id = add_run(client, name, val, preprocess=preprocess, ext={"utk": sum(errors.values()) / len(errors)},
                         ext_faces={"utk": faces_fingerprint(errors)}, n_faces={"utk": len(errors)})
        log_predictions(client, run_id, tmp_path, {"utk": errors})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client, external_sha256={"utk": "v1"})
    assert winner.run_name == "hog"
    text = verdicts(caplog)
    assert "scored on other faces" not in text and "train it again" not in text  # no run excluded for its detector
    assert "faces per run: hog 1743, hog-2 1743, cnn 1500" in text
    assert "on the 1450 faces all 3 scored: hog 6.200 (own 8.015), hog-2 6.300 (own 8.099), cnn 6.000 (own 6.000)" \
        in text
    assert "utk MAE 8.01" not in text  # the hog run is not vetoed by the cnn run's subset


def test_without_predictions_runs_on_other_faces_compare_by_their_own_maes(client, caplog):
    """Runs tagged with their faces but without predictions to pair (deleted artifacts): own MAEs, as before 34b,
    said in the log; no run is excluded for its faces."""
    add_run(client, "hog", 4.0, ext={"utk": 8.0}, ext_faces={"utk": "h" * 64}, n_faces={"utk": 1743})
    add_run(client, "cnn", 4.1, preprocess={**RELEASE_CROP, "detector": "cnn"}, ext={"utk": 6.0},
            ext_faces={"utk": "c" * 64}, n_faces={"utk": 1500})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}).run_name == "cnn"
    text = verdicts(caplog)
    assert "hog (" in text and "its own MAE on its own 1743 faces" in text and "its own MAE on its own 1500 faces" in text
    assert "utk MAE 8.000 > best 6.000 + 0.500" in text


def test_runs_scored_on_the_same_faces_are_still_guarded(client):
    faces = {"utk": "h" * 64}
    add_run(client, "overfit", 3.0, ext={"utk": 9.0}, ext_faces=faces)
    add_run(client, "general", 3.5, ext={"utk": 7.0}, ext_faces=faces)
    assert select_winner(client, external_sha256={"utk": "v1"}).run_name == "general"


def test_runs_from_before_the_tags_compare_as_before(client):
    """A store of older runs only (make quick's before this change): the champion is picked as it was."""
    add_run(client, "old-a", 4.0, ext={"utk": 8.0})
    add_run(client, "old-b", 3.5, ext={"utk": 9.0})
    add_run(client, "old-c", 3.8, ext={"utk": 7.9})
    assert select_winner(client, external_sha256={"utk": "v1"}, val_faces="a" * 64).run_name == "old-c"


def test_an_untagged_skip_run_is_not_compared_with_release_crop_runs(client, caplog):
    add_run(client, "crop", 4.0, val_faces=("a" * 64, 1500))
    add_run(client, "old-skip", 3.0, preprocess=SKIP)
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client).run_name == "crop"
    assert "validated on other photos (not tagged" in verdicts(caplog)


# --- what train and evaluate tag -------------------------------------------------------------------------------


@pytest.fixture
def train_store(tmp_path, monkeypatch):
    """A fresh sqlite store, current for the test (as tests.unit.test_training_r30's ``store``)."""
    import mlflow

    from faceage import training
    from faceage.tracking import setup_mlflow

    monkeypatch.setattr(training, "_cores_per_rank", lambda: 1)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        yield mlflow.MlflowClient()


def test_train_tags_the_validation_faces_packaging_compares_with_the_workspace(tmp_path, train_store):
    from faceage.config import Params
    from faceage.packaging import workspace_val_faces
    from tests.unit.test_training_r30 import TINY, _faces, _train

    faces = _faces(tmp_path / "faces", n_train=8, n_valid=4)
    result = _train(replace(Params().train, **{**TINY, "epochs": 1}), tmp_path)
    tags = train_store.get_run(result["run_id"]).data.tags
    assert tags[VAL_N_TAG] == "4"
    assert tags[VAL_TAG] == workspace_val_faces(faces) and len(tags[VAL_TAG]) == 64
    # One photo fewer in the split (a skip run's faceless photo): another fingerprint
    rows = (faces / "manifest.csv").read_text().splitlines()
    (faces / "manifest.csv").write_text("\n".join(r for r in rows if not r.startswith("valid,valid_3.png")) + "\n")
    assert workspace_val_faces(faces) != tags[VAL_TAG]
    assert workspace_val_faces(tmp_path / "nowhere") is None


def test_evaluate_records_the_faces_it_scored_on_each_external_set(two_sets, detector_dir, tmp_path):
    from faceage.evaluation import evaluate_external, external_faces_versions, scored_faces
    from faceage.training import faces_fingerprint

    sets, model, p = two_sets
    results, _, rows = evaluate_external(model, sets, p, detector_dir, 30.0, tmp_path / "cache")
    assert [r[1] for r in rows] == ["astronaut.jpg"]
    assert results["faces"]["faces_sha256"] == faces_fingerprint(["astronaut.jpg"])
    assert results["blank"]["faces_sha256"] == faces_fingerprint([])  # no face scored: no MAE logged either
    tag = json.dumps(scored_faces(results))
    assert external_faces_versions({EXT_FACES_TAG: tag}) == {"faces": faces_fingerprint(["astronaut.jpg"]),
                                                           "blank": faces_fingerprint([])}
    assert external_faces_versions({}) == {} and external_faces_versions({EXT_FACES_TAG: "[1]"}) == {}
