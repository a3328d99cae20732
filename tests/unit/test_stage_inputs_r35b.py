"""Round 35 (b): the stage inputs round 35 left as tracebacks, and infinite metrics re-logged by each evaluation.

- ``embed`` with ``train.backbone=dlib_age`` and a ``data/faces`` without ``chips.npz``: a plain
  ``FileNotFoundError`` traceback.
- ``--embeddings`` missing (``train``, ``evaluate``), or a file of another kind (another backbone's
  features, not a ``.npz`` at all): ``np.load``'s ``FileNotFoundError`` / a ``ValueError`` in a traceback.
- ``evaluate`` with ``--preprocess-metrics`` or ``--data``'s ``dataset.json`` missing: the whole evaluation ran,
  then a traceback.
- MLflow's sqlite store saves +-inf as +-1.7976931348623157e308: a re-evaluation re-logged an infinite metric
  every time.

The real stage scripts run as subprocesses from a temporary folder, as in ``test_stage_inputs_r35``.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from faceage.errors import FaceAgeError
from faceage.preprocess import MANIFEST, SETTINGS
from tests.unit.test_stage_inputs_r35 import STAGE_ARGS, _one_error_line, _params, _run_stage

EVALUATE_ARGS = ["--model", "models/model.pt", "--faces", "data/faces", "--embeddings", "data/embeddings.npz",
                 "--run-file", "models/run.json", "--detector", "models/detector", "--history",
                 "reports/train/history.csv", "--data", "data/raw/appa-real", "--preprocess-metrics",
                 "reports/preprocess.json", "--card", "reports/model_card.md", "--out", "reports/eval"]


def _faces(folder, rows=()) -> None:
    """A preprocess output's manifest and settings (no crops, no chips) in ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = ["split,file_name,crop,apparent_age,apparent_age_std,real_age",
             *(f"{split},{i}.jpg,{split}/{i}.png,30,3,30" for i, split in enumerate(rows))]
    (folder / MANIFEST).write_text("\n".join(lines) + "\n", encoding="utf-8")
    (folder / SETTINGS).write_text('{"margin": 0.4, "size": 224}', encoding="utf-8")


# --- 1. embed (dlib_age) without chips.npz


def test_embed_dlib_age_without_chips_is_one_line(tmp_path):
    _faces(tmp_path / "data" / "faces", ["train"])
    params = _params(tmp_path, backbone="dlib_age")
    line = _one_error_line(_run_stage(tmp_path, "embed", "--params", str(params), *STAGE_ARGS["embed"]))
    assert str(tmp_path / "data" / "faces" / "chips.npz") in line, line
    assert "dvc repro -f preprocess" in line, line


def test_compute_features_without_chips_raises_a_faces_missing_error(tmp_path):
    from faceage.features import compute_features
    from faceage.preprocess import FacesMissingError

    _faces(tmp_path / "faces", ["train"])
    with pytest.raises(FacesMissingError) as info:
        compute_features("dlib_age", tmp_path / "faces", tmp_path / "detector", tmp_path / "out.npz")
    assert isinstance(info.value, FileNotFoundError)  # as before
    assert "chips.npz" in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "out.npz").exists()


def test_embed_dlib_age_with_chips_short_of_the_manifest_is_one_line(tmp_path):
    """A chips.npz that lacks crops of the manifest (cut before the manifest was): a ValueError traceback."""
    from faceage.chips import save_chips

    faces = tmp_path / "data" / "faces"
    _faces(faces, ["train", "test"])
    save_chips(faces / "chips.npz", ["train/0.png"], [np.zeros((3, 64, 64), np.uint8)], 0.4, "0" * 64,
               face_chips=[np.zeros((3, 150, 150), np.uint8)])
    params = _params(tmp_path, backbone="dlib_age")
    line = _one_error_line(_run_stage(tmp_path, "embed", "--params", str(params), *STAGE_ARGS["embed"]))
    assert "chips.npz has no chip (or face chip) for 1 crop(s)" in line and "dvc repro -f preprocess" in line, line


# --- 2. load_embeddings / load_chips: a missing file, a file of another kind


def _loaders():
    from faceage.chips import load_chips
    from faceage.face_encoder import load_embeddings

    return [load_embeddings, load_chips]


@pytest.mark.parametrize("loader", ["load_embeddings", "load_chips"])
def test_a_missing_embed_output_is_one_line(tmp_path, loader):
    load = {f.__name__: f for f in _loaders()}[loader]
    path = tmp_path / "data" / "embeddings.npz"
    with pytest.raises(FaceAgeError) as info:
        load(path)
    assert isinstance(info.value, FileNotFoundError)  # callers catching OSError (external descriptors) still do
    message = str(info.value)
    assert f"no embed output at {path}" in message and "dvc repro embed" in message and "\n" not in message


@pytest.mark.parametrize("loader", ["load_embeddings", "load_chips"])
def test_a_folder_in_place_of_the_embed_output_is_one_line(tmp_path, loader):
    load = {f.__name__: f for f in _loaders()}[loader]
    with pytest.raises(FaceAgeError) as info:
        load(tmp_path)
    assert isinstance(info.value, FileNotFoundError)
    assert str(tmp_path) in str(info.value) and "dvc repro embed" in str(info.value)


def test_another_backbones_features_are_a_face_age_value_error(tmp_path):
    from faceage.chips import load_chips, save_chips
    from faceage.face_encoder import load_embeddings

    chips = tmp_path / "chips.npz"
    save_chips(chips, ["train/0.png"], [np.zeros((3, 64, 64), np.uint8)], 0.4, "0" * 64)
    none = tmp_path / "none.npz"
    np.savez(none, kind=np.array("none"), crops=np.array([], dtype=str))
    for load, path, what in [(load_embeddings, chips, "face descriptors"), (load_embeddings, none, "face descriptors"),
                             (load_chips, none, "aligned chips")]:
        with pytest.raises(FaceAgeError, match=f"holds no {what}") as info:
            load(path)
        assert isinstance(info.value, ValueError)  # packaging and the external descriptors catch ValueError
    with pytest.raises(FaceAgeError, match="holds no face chips") as info:
        load_chips(chips, pairs=True)
    assert isinstance(info.value, ValueError)


@pytest.mark.parametrize("loader", ["load_embeddings", "load_chips"])
@pytest.mark.parametrize("content", ["text", "npy", "cut"])
def test_a_file_that_is_no_npz_is_one_line(tmp_path, loader, content):
    """A CSV passed as --embeddings was numpy's "Cannot load file containing pickled data", a .npy an
    AttributeError, a cut-short .npz zipfile's BadZipFile: all tracebacks."""
    load = {f.__name__: f for f in _loaders()}[loader]
    path = tmp_path / "features.npz"
    if content == "text":
        path.write_text("split,file_name,crop\n", encoding="utf-8")
    elif content == "npy":
        with open(path, "wb") as f:
            np.save(f, np.zeros(3))
    else:
        np.savez(path, crops=np.array(["a.png"]), embeddings=np.zeros((1, 2, 128), np.float32))
        path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(FaceAgeError) as info:
        load(path)
    assert isinstance(info.value, ValueError)
    assert str(path) in str(info.value) and "dvc repro -f embed" in str(info.value)


def test_the_loaders_still_read_their_files(tmp_path):
    from faceage.chips import load_chips, save_chips
    from faceage.face_encoder import load_embeddings

    chips = tmp_path / "chips.npz"
    save_chips(chips, ["train/0.png"], [np.full((3, 64, 64), 7, np.uint8)], 0.4, "0" * 64)
    table, info = load_chips(chips)
    assert table["train/0.png"][0, 0, 0] == 7 and info["margin"] == 0.4
    emb = tmp_path / "emb.npz"
    np.savez(emb, crops=np.array(["train/0.png"]), embeddings=np.ones((1, 2, 128), np.float32),
             encoder_sha256=np.array("e"), shape_predictor_sha256=np.array("s"), margin=np.array(0.4))
    table, info = load_embeddings(emb)
    assert table["train/0.png"].shape == (2, 128) and info["encoder_sha256"] == "e"


def test_train_without_the_embed_output_is_one_line(tmp_path):
    _faces(tmp_path / "data" / "faces", ["train", "valid"])
    params = _params(tmp_path, backbone="dlib_face")
    line = _one_error_line(_run_stage(tmp_path, "train", "--params", str(params), *STAGE_ARGS["train"]))
    assert str(tmp_path / "data" / "embeddings.npz") in line and "dvc repro embed" in line, line


# --- 3. evaluate: --preprocess-metrics, --data checked before the evaluation


def _run_file(tmp_path):
    """A finished train run in ``tmp_path/mlflow.db`` (the store the stage subprocess uses), named in run.json."""
    import mlflow

    from faceage.tracking import EXPERIMENT, mlflow_env, write_run_file

    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = mlflow.MlflowClient()
        experiment = client.create_experiment(EXPERIMENT, (tmp_path / "mlruns").as_uri())
        run = client.create_run(experiment)
        client.set_terminated(run.info.run_id, "FINISHED")
    write_run_file(tmp_path / "models" / "run.json", run.info.run_id, experiment)


@pytest.mark.parametrize("missing", ["preprocess_metrics", "dataset_json"])
def test_evaluate_names_a_missing_input_before_the_evaluation(tmp_path, missing):
    _run_file(tmp_path)
    data = tmp_path / "data" / "raw" / "appa-real"
    data.mkdir(parents=True)
    if missing != "dataset_json":
        (data / "dataset.json").write_text("{}", encoding="utf-8")
    if missing != "preprocess_metrics":
        (tmp_path / "reports").mkdir()
        (tmp_path / "reports" / "preprocess.json").write_text("{}", encoding="utf-8")
    params = _params(tmp_path)
    line = _one_error_line(_run_stage(tmp_path, "evaluate", "--params", str(params), *EVALUATE_ARGS))
    if missing == "preprocess_metrics":
        assert str(tmp_path / "reports" / "preprocess.json") in line and "dvc repro preprocess" in line, line
    else:
        assert str(data / "dataset.json") in line and "dvc repro -f fetch_data" in line, line
    assert not (tmp_path / "reports" / "eval").exists()  # nothing evaluated


def test_evaluate_model_checks_its_inputs_first(tmp_path):
    from faceage.config import EvaluateParams
    from faceage.evaluation import evaluate_model

    p = EvaluateParams(external=())
    (tmp_path / "data").mkdir()
    kwargs = dict(data_dir=tmp_path / "data", preprocess_metrics=tmp_path / "preprocess.json",
                  model_card=tmp_path / "card.md")
    with pytest.raises(FaceAgeError) as info:  # no checkpoint either: the inputs are named first, both at once
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", tmp_path / "out", p, **kwargs)
    assert isinstance(info.value, FileNotFoundError)
    message = str(info.value)
    assert str(tmp_path / "preprocess.json") in message and str(tmp_path / "data" / "dataset.json") in message
    assert "\n" not in message
    (tmp_path / "preprocess.json").write_text("{}")
    with pytest.raises(FaceAgeError, match="dataset.json") as info:
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", tmp_path / "out", p, **kwargs)
    assert isinstance(info.value, FileNotFoundError) and "preprocess.json" not in str(info.value)
    with pytest.raises(FaceAgeError, match=f"no fetch_data output at {tmp_path / 'nowhere'}"):
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", tmp_path / "out", p,
                       **{**kwargs, "data_dir": tmp_path / "nowhere"})
    (tmp_path / "data" / "dataset.json").write_text("{}")
    # both there: on to the checkpoint (which is missing here)
    with pytest.raises(Exception) as info:
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", tmp_path / "out", p, **kwargs)
    assert "model.pt" in str(info.value)
    # without a model card neither is read (the recipe's call): not required
    with pytest.raises(Exception) as info:
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", tmp_path / "out", p, data_dir=tmp_path / "nowhere")
    assert "model.pt" in str(info.value)


# --- 4. an infinite metric, as MLflow's sqlite store keeps it


def test_a_reevaluation_does_not_relog_an_infinite_metric(tmp_path):
    """MLflow's sqlite store saves +-inf as +-sys.float_info.max: an infinite metric (an MAE ratio over a 0
    baseline, a diverged model's RMSE) read back never equalled the value about to be logged, and each
    re-evaluation added another point to its history."""
    import mlflow

    from faceage.evaluation import log_evaluation
    from faceage.tracking import EXPERIMENT, mlflow_env

    card = tmp_path / "card.md"
    card.write_text("# card\n")
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        client = mlflow.MlflowClient()
        run_id = client.create_run(client.create_experiment(EXPERIMENT, (tmp_path / "mlruns").as_uri())).info.run_id
        client.set_terminated(run_id, "FINISHED")
        metrics = {"test_rmse_years": math.inf, "test_low": -math.inf, "test_mae_years": 4.5}
        for _ in range(3):
            log_evaluation(run_id, metrics, {}, [card])
        for key in metrics:
            assert len(client.get_metric_history(run_id, key)) == 1, key
        log_evaluation(run_id, {**metrics, "test_rmse_years": 7.0, "test_low": math.inf}, {}, [card])
        assert [m.value for m in client.get_metric_history(run_id, "test_rmse_years")][-1] == 7.0
        assert len(client.get_metric_history(run_id, "test_low")) == 2  # -inf -> +inf is a change
        log_evaluation(run_id, {**metrics, "test_rmse_years": 1.7976931348623157e308}, {}, [card])
        # the largest float itself compares equal to what the store keeps for it, as before
        assert len(client.get_metric_history(run_id, "test_rmse_years")) == 3


def test_same_value_counts_the_stores_infinity_as_infinity():
    import sys

    from faceage.evaluation import _same_value

    big = sys.float_info.max
    assert _same_value(big, math.inf) and _same_value(-big, -math.inf)
    assert not _same_value(big, -math.inf) and not _same_value(-big, math.inf)
    assert _same_value(math.inf, math.inf) and _same_value(math.nan, math.nan)
    assert not _same_value(None, math.inf) and not _same_value(big, 1.0) and not _same_value(1e300, math.inf)
