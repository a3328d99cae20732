"""Round 33, the detection pool (faceage/serving.py): a worker that hangs for ever as it starts, and the one message of
a closed pool.

Real spawned pools with a real (HOG) :class:`faceage.predict.FaceLocator`, as in ``test_serving_r24``. The hang is
made in the child itself: the pool's initializer is replaced (as ``test_serving_r24`` does; spawned children import
this module by name) by one that, in the worker, makes the real ``_init_child`` build a locator that blocks while the
file named by ``$FACEAGE_TEST_HANG_FLAG`` exists (inherited by the spawned workers), as a detector file read from a
hung network filesystem would. The worker has then already ignored SIGINT and SIGTERM, as a real one has.
"""

from __future__ import annotations

import asyncio
import inspect
import os
import time
from pathlib import Path

import pytest

import faceage.serving as serving
from faceage.predict import FaceLocator
from faceage.serving import DetectionUnavailable, LocatorPool, ServingClosed
from tests.unit.test_serving_pool import _png, count_starts

HANG_FLAG = "FACEAGE_TEST_HANG_FLAG"  # a path: the workers' start blocks while it exists
HANG_ONE = "FACEAGE_TEST_HANG_ONE"  # set: only the first worker to start hangs


def _init_hanging(settings, started=None):
    """The pool's initializer in the worker: the real one, whose detector load blocks while the flag file exists."""
    flag = os.environ.get(HANG_FLAG)
    if flag and os.path.exists(flag):
        hang = True
        if os.environ.get(HANG_ONE):
            try:
                os.close(os.open(flag + ".claimed", os.O_CREAT | os.O_EXCL))
            except FileExistsError:
                hang = False  # another worker is the hung one
        if hang:
            real_locator = serving.FaceLocator

            def hanging_locator(**kwargs):
                with open(flag + ".pids", "a") as f:
                    f.write(f"{os.getpid()}\n")
                while os.path.exists(flag):
                    time.sleep(0.05)
                return real_locator(**kwargs)

            serving.FaceLocator = hanging_locator
    serving._init_child(settings, started)


@pytest.fixture(scope="module")
def locator(hog_detector_dir) -> FaceLocator:
    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


@pytest.fixture
def hang(tmp_path, monkeypatch) -> Path:
    """The flag file: workers that start while it exists hang (remove it to let them start)."""
    flag = tmp_path / "hang"
    flag.touch()
    monkeypatch.setenv(HANG_FLAG, str(flag))
    monkeypatch.setattr(serving, "_init_child", _init_hanging)
    return flag


def _hung_pids(flag: Path, timeout: float = 20.0) -> list[int]:
    deadline = time.monotonic() + timeout
    pids = Path(str(flag) + ".pids")
    while time.monotonic() < deadline:
        if pids.exists() and pids.read_text().strip():
            return [int(line) for line in pids.read_text().split()]
        time.sleep(0.05)
    raise AssertionError("no worker reached the hanging detector load")


def _gone(pid: int, timeout: float = 10.0) -> bool:
    """Whether process ``pid`` ended (gone, or a zombie not yet reaped) within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)


# --- 1. a worker that hangs as it starts --------------------------------------------------------------------------


def test_a_worker_hung_at_start_is_killed_the_photo_gets_a_503_and_the_pool_restarts(locator, hang, monkeypatch):
    """The only worker hung loading its detector: the photo waited for ever (its job queued behind the start job no
    worker ever took; the slot held, so every later photo waited too), ``ready()`` (``/readyz``) stayed True, and
    nothing restarted the pool. Now the start has a deadline (START_TIMEOUT_S): past it the hung worker is killed,
    the photo gets DetectionUnavailable (503), the pool is not ready, photos get a 503 at once (no new pool per
    request) until the pool is started again after RESTART_AFTER_S, which then serves."""
    # Long enough for the worker to reach its detector load on a loaded machine (spawn and imports: 1-3 s).
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 4.0)
    monkeypatch.setattr(serving, "RESTART_AFTER_S", 6.0)
    starts = count_starts(monkeypatch)

    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            began = time.monotonic()
            try:
                first = await asyncio.wait_for(pool.locate(_png(1)), 15)
            except Exception as e:  # noqa: BLE001 - which error is the point
                first = e
            waited = time.monotonic() - began
            (pid,) = _hung_pids(hang)
            killed = _gone(pid)
            ready = pool.ready()
            began = time.monotonic()
            second = (await asyncio.gather(asyncio.wait_for(pool.locate(_png(2)), 5), return_exceptions=True))[0]
            second_s = time.monotonic() - began
            pools_while_backing_off = len(starts)
            hang.unlink()  # the filesystem answers again
            monkeypatch.setattr(serving, "START_TIMEOUT_S", 60.0)
            deadline = time.monotonic() + 40
            while not pool.ready() and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            healed = pool.ready()
            located, _ = await asyncio.wait_for(pool.locate(_png(3)), 30)
            return first, waited, killed, ready, second, second_s, pools_while_backing_off, healed, located
        finally:
            await asyncio.to_thread(pool.close, 3.0)

    first, waited, killed, ready, second, second_s, backing_off, healed, located = asyncio.run(scenario())
    assert isinstance(first, DetectionUnavailable) and not isinstance(first, ServingClosed), repr(first)
    assert "did not start" in str(first) and "4 s (FACEAGE_START_TIMEOUT_S)" in str(first), str(first)
    assert waited < 12, f"the photo waited {waited:.1f} s for a start with a 4 s deadline"
    assert killed, "the hung worker is still running"
    assert not ready, "/readyz said ready with the workers hung"
    assert isinstance(second, DetectionUnavailable), repr(second)
    assert second_s < 1.5, f"a photo during the back-off waited {second_s:.1f} s for its 503"
    assert backing_off == 1, "a new pool was started within RESTART_AFTER_S"
    assert healed
    assert located.boxes == []


def test_one_hung_worker_of_two_is_killed_not_left_behind(locator, hang, monkeypatch):
    """One worker of two hung as it started: the other's start job timed out at the barrier, its photo then ran on
    a pool that never started, and the hung process was left running when the pool was replaced (one more for
    every restart while the mount hangs, each ignoring SIGTERM). Now past the deadline both are killed, the photo
    gets a 503 and the pool is not ready."""
    monkeypatch.setenv(HANG_ONE, "1")
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 6.0)  # both spawned and importing at once: slower than one
    monkeypatch.setattr(serving, "RESTART_AFTER_S", 30.0)

    async def scenario():
        pool = LocatorPool(locator, 2)
        try:
            photo = (await asyncio.gather(asyncio.wait_for(pool.locate(_png(4)), 15), return_exceptions=True))[0]
            (pid,) = _hung_pids(hang)
            return photo, _gone(pid), pool.ready()
        finally:
            await asyncio.to_thread(pool.close, 3.0)

    photo, killed, ready = asyncio.run(scenario())
    assert isinstance(photo, DetectionUnavailable) and "did not start" in str(photo), repr(photo)
    assert killed, "the hung worker was left running"
    assert not ready


def test_a_pool_that_starts_in_time_is_not_killed_by_its_deadline(locator, monkeypatch):
    """The deadline only ends a start that did not finish: a pool up before it goes on serving after it."""
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 30.0)

    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            await asyncio.wait_for(pool.locate(_png(5)), 30)
            workers = pool._workers
            workers._start_deadline()  # as its timer does at the deadline
            located, _ = await asyncio.wait_for(pool.locate(_png(6)), 30)
            return located, pool.ready(), workers is pool._workers, workers.start_error()
        finally:
            await asyncio.to_thread(pool.close, 3.0)

    located, ready, same, error = asyncio.run(scenario())
    assert located.boxes == [] and ready and same and error is None


# --- 2. one message for a closed pool -----------------------------------------------------------------------------

CLOSED = "the detection pool was closed (the server is shutting down): try again"


def test_the_closed_pool_message_is_written_once():
    """It was written out in three places (four with the "before this photo" variant), free to drift apart."""
    assert inspect.getsource(serving).count("the detection pool was closed (the server is shutting down)") == 1


@pytest.mark.parametrize("processes", [0, 1])
def test_a_closed_pool_answers_its_one_message(locator, processes):
    async def scenario():
        pool = LocatorPool(locator, processes)
        await asyncio.to_thread(pool.close, 3.0)
        try:
            await pool.locate(_png(7))
        except ServingClosed as e:
            return e
        raise AssertionError("a closed pool located a photo")

    error = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert str(error) == CLOSED
    assert isinstance(error, DetectionUnavailable)  # a 503


def test_the_in_flight_variant_keeps_its_own_wording():
    assert str(ServingClosed.pool_closed("before this photo was analysed")) == (
        "the detection pool was closed (the server is shutting down) before this photo was analysed: try again")
