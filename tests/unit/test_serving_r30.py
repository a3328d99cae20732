"""Round-30 review of the age batcher: a failing merged forward pass fails only the requests whose own faces
fail, a model that answers the wrong number of rows fails its pass (no hang, no rows routed to the wrong
request), and shutdown answers every waiting request.

Real components: the real :class:`AgeBatcher` over a small real torch age model (a linear layer on the
flattened chip). A gate holds the first forward pass so that the requests that arrive meanwhile queue up
and merge into the next one, as they do under load.
"""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
import torch

from faceage.serving import AgeBatcher, DetectionUnavailable, ServingClosed

SIDE = 4  # the tiny model reads SIDE x SIDE x 3 chips


class _TinyAgeModel:
    """``faces -> (mean, std)`` through a real ``torch.nn.Linear``; records each pass's face count. The first
    pass waits for ``release`` (the other requests queue behind it meanwhile)."""

    def __init__(self, rows: int | None = None):
        torch.manual_seed(0)
        self.net = torch.nn.Linear(SIDE * SIDE * 3, 1)
        self.rows = rows  # answer this many rows more (or fewer) than faces: a broken model
        self.passes: list[int] = []
        self.started, self.release = threading.Event(), threading.Event()

    def __call__(self, faces):
        self.passes.append(len(faces))
        if len(self.passes) == 1:
            self.started.set()
            assert self.release.wait(30)
        # torch.stack raises for chips of different sizes; the layer for a chip of the wrong size
        x = torch.stack([torch.as_tensor(f, dtype=torch.float32).flatten() for f in faces])
        with torch.no_grad():
            mean = self.net(x)[:, 0].numpy()
        if self.rows is not None:
            mean = np.resize(mean, len(mean) + self.rows)
        return mean, np.abs(mean) / 10

    def alone(self, faces):
        """The model's answer for these faces in a pass of their own (not recorded)."""
        x = torch.stack([torch.as_tensor(f, dtype=torch.float32).flatten() for f in faces])
        with torch.no_grad():
            mean = self.net(x)[:, 0].numpy()
        return mean, np.abs(mean) / 10


def _chips(*values: int, side: int = SIDE) -> list[np.ndarray]:
    return [np.full((side, side, 3), v, np.uint8) for v in values]


async def _until(event: threading.Event) -> None:
    while not event.is_set():
        await asyncio.sleep(0.01)


def _run(coro, timeout: float = 20):
    return asyncio.run(asyncio.wait_for(coro, timeout))


# --- Fault isolation ------------------------------------------------------------------------------


def test_a_failing_merged_pass_fails_only_the_request_whose_faces_fail():
    """Three requests merged into one forward pass, one of them with a chip the model cannot read: all three
    failed with its error. Now the pass is retried one request at a time: only that one fails."""
    model = _TinyAgeModel()
    batcher = AgeBatcher(model)
    good, bad, other = _chips(10, 20), _chips(30, side=SIDE + 1), _chips(40)

    async def scenario():
        first = asyncio.ensure_future(batcher(_chips(1)))
        await _until(model.started)
        queued = [asyncio.ensure_future(batcher(faces)) for faces in (good, bad, other)]
        await asyncio.sleep(0.05)
        model.release.set()
        return await first, await asyncio.gather(*queued, return_exceptions=True)

    _, (good_answer, bad_answer, other_answer) = _run(scenario())
    assert isinstance(bad_answer, RuntimeError), bad_answer
    for faces, answer in ((good, good_answer), (other, other_answer)):
        assert not isinstance(answer, BaseException), answer
        alone = model.alone(faces)
        assert np.allclose(answer[0], alone[0]) and np.allclose(answer[1], alone[1])
    # the held pass, the merged one that failed, then each request in a pass of its own, in arrival order
    assert model.passes == [1, 4, 2, 1, 1], model.passes


def test_a_failing_pass_of_a_request_alone_is_not_retried_and_the_batcher_goes_on():
    model = _TinyAgeModel()
    model.release.set()
    batcher = AgeBatcher(model)

    async def scenario():
        failed = await asyncio.gather(batcher(_chips(1, side=SIDE + 1)), return_exceptions=True)
        return failed[0], await batcher(_chips(2))

    failed, later = _run(scenario())
    assert isinstance(failed, RuntimeError) and np.allclose(later[0], model.alone(_chips(2))[0])
    assert model.passes == [1, 1]


@pytest.mark.parametrize("rows", [-1, 1])
def test_a_model_answering_the_wrong_number_of_rows_fails_its_requests_not_hangs_or_misroutes(rows):
    """A model (or a bad tensor) answering one age too few left the last request of the pass with faces
    that never got a row: it went back to the queue and ran again, forever (the request hung and the model
    never rested); one too many gave the next request the rows of the one before it."""
    model = _TinyAgeModel(rows=rows)
    batcher = AgeBatcher(model)

    async def scenario():
        first = asyncio.ensure_future(batcher(_chips(1)))
        await _until(model.started)
        queued = [asyncio.ensure_future(batcher(_chips(*v))) for v in ((2, 3), (4,))]
        await asyncio.sleep(0.05)
        model.release.set()
        return await asyncio.gather(first, *queued, return_exceptions=True)

    answers = _run(scenario(), timeout=10)
    for answer in answers:
        assert isinstance(answer, ValueError), answer
        assert "ages" in str(answer) and "faces" in str(answer), answer
    assert len(model.passes) == 4, model.passes  # held pass, merged pass, then each of the two alone


# --- Shutdown ---------------------------------------------------------------------------------------


def test_closing_the_batcher_answers_every_waiting_request_and_refuses_new_ones():
    """The service's shutdown closed the detection pool but not the batcher: requests queued for the age
    model stayed queued. Now closing fails the queued ones at once (503, try again), the pass that runs
    answers its requests, a request split over passes gets no further pass, and new requests are refused."""
    model = _TinyAgeModel()
    batcher = AgeBatcher(model, max_pass_faces=2)

    async def scenario():
        running = asyncio.ensure_future(batcher(_chips(1)))
        await _until(model.started)
        queued = [asyncio.ensure_future(batcher(_chips(*v))) for v in ((2,), (3, 4, 5))]
        await asyncio.sleep(0.05)
        batcher.close()
        await asyncio.sleep(0)
        answered_at_close = [q.done() for q in queued]
        model.release.set()
        results = await asyncio.gather(running, *queued, return_exceptions=True)
        try:
            await batcher(_chips(6))
        except Exception as e:
            return answered_at_close, results, e
        return answered_at_close, results, None

    answered_at_close, (running, *queued), refused = _run(scenario())
    assert answered_at_close == [True, True]
    assert np.allclose(running[0], model.alone(_chips(1))[0])
    for answer in (*queued, refused):
        assert isinstance(answer, ServingClosed) and isinstance(answer, DetectionUnavailable), answer
        assert "closed" in str(answer)
    assert model.passes == [1]


def test_closing_answers_a_split_request_whose_pass_runs_with_an_error_not_a_hang():
    model = _TinyAgeModel()
    batcher = AgeBatcher(model, max_pass_faces=2)

    async def scenario():
        crowd = asyncio.ensure_future(batcher(_chips(1, 2, 3, 4, 5)))
        await _until(model.started)
        batcher.close()
        model.release.set()
        return await asyncio.gather(crowd, return_exceptions=True)

    (crowd,) = _run(scenario())
    assert isinstance(crowd, ServingClosed), crowd
    assert model.passes == [2]


def test_a_stopped_batcher_task_answers_the_requests_it_had_taken_instead_of_leaving_them_hanging():
    """The loop's task that runs the passes, cancelled (the server's event loop shutting down), left the
    requests of the pass it ran and those queued waiting on their futures for ever."""
    model = _TinyAgeModel()
    batcher = AgeBatcher(model)

    async def scenario():
        running = asyncio.ensure_future(batcher(_chips(1)))
        await _until(model.started)
        queued = asyncio.ensure_future(batcher(_chips(2)))
        await asyncio.sleep(0.05)
        batcher._task.cancel()
        try:
            return await asyncio.wait_for(asyncio.gather(running, queued, return_exceptions=True), 5)
        finally:
            model.release.set()

    answers = _run(scenario())
    for answer in answers:
        assert isinstance(answer, ServingClosed), answer


# --- The detection pool at shutdown -------------------------------------------------------------------


def _png(seed: int) -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (24, 32, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def locator(hog_detector_dir):
    from faceage.predict import FaceLocator

    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


def test_photos_queued_on_the_pool_when_it_closes_get_a_503_error_not_a_cancellation(locator):
    """Closing the pool (the server's shutdown) cancelled the photos still queued for a worker: their requests
    saw ``CancelledError``, as if they had been cancelled themselves (no answer at all), and a photo sent
    after close got a plain RuntimeError (a 500). Both are now :class:`ServingClosed` (503, try again); the
    photo a worker already runs is answered."""
    from faceage.serving import LocatorPool

    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            await pool._started(pool._workers)
            photos = [asyncio.ensure_future(pool.locate(_png(i))) for i in range(6)]
            await asyncio.sleep(0)  # all six submitted: one runs, the others wait for the worker
        finally:
            pool.close()
        answers = await asyncio.gather(*photos, return_exceptions=True)
        try:
            await pool.locate(_png(9))
        except Exception as e:
            return answers, e
        return answers, None

    answers, after = _run(scenario(), timeout=60)
    assert not any(isinstance(a, asyncio.CancelledError) for a in answers), answers
    closed = [a for a in answers if isinstance(a, BaseException)]
    assert closed and all(isinstance(a, ServingClosed) for a in closed), answers
    assert isinstance(after, ServingClosed) and "closed" in str(after), after


def test_an_in_process_pool_closed_refuses_photos_with_a_503_error(locator):
    from faceage.serving import LocatorPool

    pool = LocatorPool(locator, 0)
    assert _run(pool.locate(_png(1)))[0].boxes == []
    pool.close()
    with pytest.raises(ServingClosed, match="closed"):
        _run(pool.locate(_png(1)))
    assert not pool.ready()
