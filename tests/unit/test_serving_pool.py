"""LocatorPool's worker processes: a worker that dies costs one retry, not the photos beside it.

Real spawned processes with a real (HOG) FaceLocator; the photo that kills its worker is a
marker value that the child function below turns into ``os._exit``, as a decoder segfault or the
OOM killer would.
"""

from __future__ import annotations

import asyncio
import io
import os
import time

import numpy as np
import pytest
from PIL import Image

import faceage.serving
from faceage.predict import FaceLocator
from faceage.serving import ImageProcessingError, LocatorPool

KILLER = b"this photo kills its worker"


def _locate_or_die(data: bytes, with_image: bool, crops: bool, parallel: bool):
    """The worker's job, except that :data:`KILLER` kills the worker process (in a spawned child,
    which imports this module by name: the parent's monkeypatch does not reach it)."""
    if data == KILLER:
        time.sleep(0.2)  # the photos beside it are on a worker or queued by then
        os._exit(1)
    time.sleep(0.5)
    return faceage.serving._child_locate(data, with_image, crops, parallel)


@pytest.fixture(scope="module")
def locator(hog_detector_dir) -> FaceLocator:
    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


def _png(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def count_starts(monkeypatch) -> list[float]:
    """When each new pool of workers was started (:meth:`LocatorPool._start`), appended as it happens."""
    starts: list[float] = []
    real_start = LocatorPool._start

    def counting_start(self):
        starts.append(time.monotonic())
        return real_start(self)

    monkeypatch.setattr(LocatorPool, "_start", counting_start)
    return starts


def test_a_dying_worker_fails_only_its_own_photo_and_the_pool_is_replaced_once_and_warmed(locator, monkeypatch):
    """Three good photos in flight beside one that kills its worker: the good ones are tried again
    on the new pool and succeed; the killer breaks the new pool too and alone gets the error.
    One new pool per break (not one per photo in flight), with all its workers started at once,
    as the first pool's are, not on the first photo after."""
    monkeypatch.setattr(faceage.serving, "_child_locate", _locate_or_die)
    starts = count_starts(monkeypatch)

    async def scenario():
        pool = LocatorPool(locator, 2)
        try:
            results = await asyncio.gather(pool.locate(KILLER), *(pool.locate(_png(i)) for i in range(3)),
                                           return_exceptions=True)
            pools_after_the_crowd = len(starts)
            with pytest.raises(ImageProcessingError):
                await pool.locate(KILLER)  # alone now: it breaks this pool and the next, nothing else is sent
            workers = len(pool._workers.executor._processes)
            after = await pool.locate(_png(9))
            return results, pools_after_the_crowd, workers, after, pool.busy
        finally:
            pool.close()

    results, pools_after_the_crowd, workers, after, busy = asyncio.run(asyncio.wait_for(scenario(), 60))
    killed, *good = results
    assert isinstance(killed, ImageProcessingError), killed
    assert f"in this {len(KILLER)}-byte image" in str(killed)
    for located in good + [after]:
        assert not isinstance(located, BaseException), located
        assert located[0].boxes == []  # noise: no face, but an answer
    assert pools_after_the_crowd == 3  # the first pool, then one per break: two breaks, however many in flight
    assert len(starts) == 5
    assert workers == 2  # the newest pool, sent no photo yet, has its workers started (warm)
    assert not busy
