"""LocatorPool, round 26: a finished photo is not kept by its pool, and /readyz heals a pool whose idle worker died.

Real spawned pools with a real (HOG) FaceLocator, as in ``test_serving_pool``.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from faceage.predict import FaceLocator
from faceage.serving import LocatorPool
from tests.unit.test_serving_pool import _png


@pytest.fixture(scope="module")
def locator(detector_dir) -> FaceLocator:
    return FaceLocator(detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


def test_a_finished_photo_is_not_kept_by_the_pool(locator):
    """The pool's job list kept each finished job until the next photo was submitted, and the job holds its
    result: the decoded photo of the last /annotate or UI request (58 MB for 20 MP) stayed in the server."""
    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            located, image = await pool.locate(_png(1), with_image=True)
            return located, image, [job for job in pool._workers.jobs if job.done()]
        finally:
            pool.close()

    located, image, finished = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert image.shape == (24, 32, 3) and located.boxes == []
    assert finished == []


def test_readiness_replaces_a_pool_whose_idle_worker_was_killed(locator):
    """/readyz answered 200 after an idle worker was SIGKILLed and left the broken pool in place: the next
    photo paid the new pool's start (3.6 s, 8 s on a loaded machine). Asking now starts the new pool."""
    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            await pool.locate(_png(2))  # up and warm
            old = pool._workers
            (pid,) = old.executor._processes
            os.kill(pid, signal.SIGKILL)
            deadline = time.monotonic() + 20
            while old.broken() is None and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            assert old.broken() is not None, "the executor never saw its worker die"
            ready = pool.ready()
            replaced = pool._workers is not old
            await pool._started(pool._workers)
            located, _ = await pool.locate(_png(3))
            return ready, replaced, located
        finally:
            pool.close()

    ready, replaced, located = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert ready
    assert replaced, "the probe left the broken pool in place"
    assert located.boxes == []
