"""Round 32: torchrun's environment variables, set to something else (by another tool, by hand), are one line
naming the variable: each was int()'s ValueError traceback in the train stage."""

from __future__ import annotations

import pytest

from faceage.config import ConfigError


@pytest.mark.parametrize("name", ["RANK", "WORLD_SIZE", "LOCAL_RANK"])
def test_a_rank_variable_that_is_no_number_is_one_config_error_naming_it(monkeypatch, name):
    from faceage.training import Distributed

    monkeypatch.setenv(name, "two")
    with pytest.raises(ConfigError) as e:
        Distributed.from_env()
    assert f"{name}='two'" in str(e.value) and "not a whole number" in str(e.value)


def test_local_world_size_that_is_no_number_is_one_config_error_not_a_traceback(monkeypatch):
    from faceage.training import pin_threads

    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2.0")
    with pytest.raises(ConfigError, match=r"LOCAL_WORLD_SIZE='2.0' is not a whole number"):
        pin_threads()


def test_unset_or_empty_variables_are_a_plain_process(monkeypatch):
    from faceage.training import Distributed, env_int

    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("WORLD_SIZE", "")
    assert Distributed.from_env() == Distributed(0, 1, 0)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", " 2 ")
    assert env_int("LOCAL_WORLD_SIZE", 1) == 2
