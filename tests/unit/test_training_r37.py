"""Round 37 review of training: defects a user hit, each pinned by a tiny real run (synthetic crops, a sqlite
MLflow store in the test's tmp_path)."""

from __future__ import annotations

import json

import pytest
import torch

from faceage.config import TrainParams
from tests.unit.test_training_r30 import TINY, _faces, _train, store

FIXTURES = (store,)


def _weights(path, value: float, layer: str = ""):
    """A state dict of TINY's network whose floats (those of keys starting with ``layer``) are all ``value``."""
    from faceage.model import build_model

    state = build_model(TINY["backbone"]).state_dict()
    torch.save({k: v.fill_(value) if v.is_floating_point() and k.startswith(layer) else v
                for k, v in state.items()}, path)
    return path


def _runs(store):
    return store.search_runs([e.experiment_id for e in store.search_experiments()])


@pytest.mark.parametrize("epochs", [0, 1])
def test_pretrained_weights_that_are_not_numbers_are_refused_naming_the_param(tmp_path, store, epochs):
    """A weights file with NaN in one layer (a diverged network's) trained a whole epoch, then stopped with
    "lower train.lr, or check the labels", which no lower rate fixes; with train.epochs=0 it shipped a NaN
    model. Refused at the load now, before the data or an MLflow run, naming train.pretrained and the layer."""
    from faceage.model import PretrainedWeightsError

    _faces(tmp_path / "faces")
    weights = _weights(tmp_path / "nan.pth", float("nan"), layer="features.1.")
    p = TrainParams(**{**TINY, "epochs": epochs, "pretrained": str(weights)})
    with pytest.raises(PretrainedWeightsError) as e:
        _train(p, tmp_path)
    assert f"train.pretrained={str(weights)!r}" in str(e.value) and "features.1." in str(e.value)
    assert "lower train.lr" not in str(e.value)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "state.pt").exists()
    assert _runs(store) == []


def test_a_zero_shot_network_whose_outputs_are_not_numbers_fails_and_ships_nothing(tmp_path, store):
    """train.epochs=0 evaluates the initial network: finite weights that overflow (1e30 everywhere) gave NaN ages,
    and the run shipped them, wrote ``"best_val_mae": NaN`` into metrics.json (not JSON) and ended FINISHED."""
    from faceage.training import TrainingDivergedError

    _faces(tmp_path / "faces")
    weights = _weights(tmp_path / "huge.pth", 1e30)
    p = TrainParams(**{**TINY, "epochs": 0, "pretrained": str(weights)})
    with pytest.raises(TrainingDivergedError) as e:
        _train(p, tmp_path)
    assert "train.epochs=0" in str(e.value) and f"train.pretrained={str(weights)!r}" in str(e.value)
    assert not (tmp_path / "model.pt").exists() and not (tmp_path / "reports" / "metrics.json").exists()
    [run] = _runs(store)
    assert run.info.status == "FAILED"


def test_a_zero_shot_run_still_ships_and_tracks_its_network(tmp_path, store):
    """The valid zero-shot run is untouched: evaluated, shipped, its metrics in metrics.json and MLflow."""
    _faces(tmp_path / "faces")
    result = _train(TrainParams(**{**TINY, "epochs": 0}), tmp_path)
    metrics = json.loads((tmp_path / "reports" / "metrics.json").read_text())
    assert metrics["epochs"] == 0 and metrics["best_epoch"] == 0
    assert metrics["best_val_mae"] == pytest.approx(result["best_val_mae"]) and metrics["best_val_mae"] > 0
    run = store.get_run(result["run_id"])
    assert run.info.status == "FINISHED"
    assert run.data.metrics["best_val_mae"] == pytest.approx(result["best_val_mae"])
    assert not (tmp_path / "state.pt").exists() and (tmp_path / "model.pt").exists()
