"""``mlflow_env``: an MLflow setting for the duration of a block, the environment restored after."""

import os

import pytest

from faceage.tracking import mlflow_env

NAME = "FACEAGE_TEST_MLFLOW_SETTING"


def test_an_unset_variable_is_unset_again(monkeypatch):
    monkeypatch.delenv(NAME, raising=False)
    with mlflow_env(NAME, "cpu"):
        assert os.environ[NAME] == "cpu"
    assert NAME not in os.environ


def test_a_set_variable_gets_its_value_back_also_after_an_error(monkeypatch):
    monkeypatch.setenv(NAME, "cuda")
    with pytest.raises(RuntimeError, match="boom"), mlflow_env(NAME, "cpu"):
        assert os.environ[NAME] == "cpu"
        raise RuntimeError("boom")
    assert os.environ[NAME] == "cuda"
