"""FACEAGE_START_TIMEOUT_S: the detection pool's start deadline is a service setting, not only a module constant
(a cold start slower than 60 s, many detection processes on few cores, was killed and restarted for ever)."""

from __future__ import annotations

import pytest

import faceage.serving as serving
from faceage.http import Limits
from faceage.predict import FaceLocator
from faceage.serving import LocatorPool
from tests.unit.test_serving_r33 import locator

FIXTURES = (locator,)


def test_the_setting_is_read_with_its_default_and_refused_below_one_second(monkeypatch):
    monkeypatch.delenv("FACEAGE_START_TIMEOUT_S", raising=False)
    assert Limits.from_env().start_timeout_s == 60 == serving.START_TIMEOUT_S
    monkeypatch.setenv("FACEAGE_START_TIMEOUT_S", "300")
    assert Limits.from_env().start_timeout_s == 300
    for bad in ("0", "1.5", "soon"):
        monkeypatch.setenv("FACEAGE_START_TIMEOUT_S", bad)
        with pytest.raises(ValueError, match="FACEAGE_START_TIMEOUT_S"):
            Limits.from_env()


def test_a_pool_keeps_the_deadline_it_was_given(locator: FaceLocator):
    pool = LocatorPool(locator, 1, start_timeout_s=300)
    try:
        workers = pool._workers
        assert workers is not None and workers.start_timeout_s == 300
    finally:
        pool.close()
    pool = LocatorPool(locator, 1)
    try:
        assert pool._workers is not None and pool._workers.start_timeout_s == serving.START_TIMEOUT_S
    finally:
        pool.close()
