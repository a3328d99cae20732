"""Round 33, second read of the detection pool's start deadline (faceage/serving.py).

Real spawned pools with a real (HOG) :class:`faceage.predict.FaceLocator` whose detector folder is not there, so each
worker dies in its initializer ("... not found: run the fetch_detector stage first"), as with a detector file gone.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from pathlib import Path

import pytest

import faceage.serving as serving
from faceage.predict import FaceLocator
from faceage.serving import DetectionUnavailable, LocatorPool

KILL_LOG = "not all up"


@pytest.fixture(scope="module")
def dying_locator(hog_detector_dir, tmp_path_factory) -> FaceLocator:
    """A locator whose workers die as they start: their settings name a detector folder that is not there."""
    locator = FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)
    locator._settings["detector_dir"] = str(tmp_path_factory.mktemp("gone") / "detector")
    assert not Path(locator._settings["detector_dir"]).exists()
    return locator


def _deadline_threads() -> int:
    return sum(t.name == "faceage-start-deadline" and t.is_alive() for t in threading.enumerate())


def test_a_pool_whose_workers_died_at_start_is_not_reported_killed_at_its_deadline(dying_locator, monkeypatch,
                                                                                    caplog):
    """Its only worker died in its initializer (a detector file gone): the start failed at once, and the deadline's
    thread went on holding the pool until START_TIMEOUT_S, then logged "the detection workers were not all up 60 s
    ...; killing its 1 worker process(es)": an error about a hang, and a kill, that never happened, beside the
    real cause. Now the thread ends once the start failed and no worker is left to kill, and says nothing."""
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 5.0)
    monkeypatch.setattr(serving, "RESTART_AFTER_S", 60.0)  # the failed pool stays in place: its own deadline shows
    caplog.set_level(logging.ERROR, logger=serving.log.name)

    async def scenario():
        pool = LocatorPool(dying_locator, 1)
        workers = pool._workers
        try:
            photo = (await asyncio.gather(asyncio.wait_for(pool.locate(b"not read"), 10),
                                          return_exceptions=True))[0]
            failed_at = time.monotonic()
            while workers._deadline.is_alive() and time.monotonic() < workers.born + workers.start_timeout_s:
                await asyncio.sleep(0.05)
            ended_before_deadline = not workers._deadline.is_alive()
            thread_s = time.monotonic() - failed_at
            await asyncio.sleep(max(0.0, workers.born + workers.start_timeout_s + 0.8 - time.monotonic()))
            return photo, ended_before_deadline, thread_s, pool.ready(), workers.start_error()
        finally:
            await asyncio.to_thread(pool.close, 3.0)

    photo, ended_before_deadline, thread_s, ready, error = asyncio.run(scenario())
    assert isinstance(photo, DetectionUnavailable) and "did not start" in str(photo), repr(photo)
    assert ended_before_deadline, "the deadline's thread held the failed pool until its deadline"
    assert thread_s < 2.0, f"the deadline's thread ended {thread_s:.1f} s after the start failed"
    assert not ready
    assert not isinstance(error, TimeoutError), f"the failed start was rewritten as a timeout: {error!r}"
    kills = [r.getMessage() for r in caplog.records if KILL_LOG in r.getMessage()]
    assert not kills, f"a kill was logged for workers that had died at start: {kills}"


def test_restarts_of_a_pool_that_cannot_start_do_not_pile_up_deadline_threads(dying_locator, monkeypatch, caplog):
    """While the workers cannot start, the pool is started again every RESTART_AFTER_S (5 s): each replaced pool's
    deadline thread (and, through it, the pool: its executor and barrier's semaphores) stayed until its own
    deadline, START_TIMEOUT_S (60 s) after it was made, a dozen at a time, each logging a false kill. Now each ends
    once its pool failed with no worker left."""
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 30.0)
    monkeypatch.setattr(serving, "RESTART_AFTER_S", 0.3)
    caplog.set_level(logging.ERROR, logger=serving.log.name)
    before = _deadline_threads()
    starts = []
    real_start = LocatorPool._start
    monkeypatch.setattr(LocatorPool, "_start", lambda self: starts.append(1) or real_start(self))

    async def scenario():
        pool = LocatorPool(dying_locator, 1)
        try:
            began = time.monotonic()
            while len(starts) < 5 and time.monotonic() - began < 20:
                pool.ready()  # a probe: restarts the failed pool once RESTART_AFTER_S passed
                await asyncio.sleep(0.1)
            await asyncio.sleep(1.5)
            return len(starts), _deadline_threads() - before
        finally:
            await asyncio.to_thread(pool.close, 3.0)

    pools, threads = asyncio.run(scenario())
    assert pools >= 5, f"only {pools} pools were started"
    assert threads <= 1, f"{threads} deadline threads alive after {pools} failed starts (only the newest may run)"
    assert not [r for r in caplog.records if KILL_LOG in r.getMessage()]
