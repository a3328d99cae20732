"""Round-24 review of the service's request path: detection workers that die, memory, statuses.

Real spawned pools with a real (HOG) FaceLocator, as in ``test_serving_pool``; worker deaths are
marker photos (or a start) that the child functions below turn into ``os._exit``, as a decoder
segfault or the OOM killer would. The routes run in FastAPI's TestClient with the service's
``self`` given by a dependency override (BentoML injects it the same way), without a bento.
"""

from __future__ import annotations

import asyncio
import io
import os
import select
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import faceage.serving as serving
from faceage.predict import FaceLocator
from faceage.serving import ImageProcessingError, LocatorPool
from tests.unit.test_serving_pool import count_starts


REAL_INIT = serving._init_child


def _die_at_start(settings, started=None):
    """A worker that dies as it starts (the OOM killer at warm-up, a detector file gone)."""
    os._exit(1)


def _locate_or_die(data: bytes, with_image: bool, crops: bool, parallel: bool):
    """``KILL...`` kills its worker after 0.2 s; ``SLOW...`` takes 2 s; the rest 0.3 s (spawned children
    import this module by name: the parent's monkeypatch does not reach them)."""
    if data.startswith(b"KILL"):
        time.sleep(0.2)
        os._exit(1)
    time.sleep(2.0 if data.startswith(b"SLOW") else 0.3)
    return "located"


@pytest.fixture(scope="module")
def detector(hog_detector_dir):
    return hog_detector_dir


@pytest.fixture(scope="module")
def locator(detector) -> FaceLocator:
    return FaceLocator(detector, kind="hog", upsample=0, margin=0.4, crop_size=32)


def _png(width: int = 32, height: int = 24, seed: int = 0) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def test_workers_that_cannot_start_are_a_503_and_not_ready_not_the_photos_422(locator, monkeypatch):
    """Every worker died as it started: each photo got ImageProcessingError (422, "in this N-byte image")
    and two new pools, and /readyz stayed 200. Now: DetectionUnavailable (503), not ready, no new pool
    per request within the back-off; once workers start again, ready and serving."""
    monkeypatch.setattr(serving, "_init_child", _die_at_start)
    monkeypatch.setattr(serving, "RESTART_AFTER_S", 5.0, raising=False)
    starts = count_starts(monkeypatch)

    async def scenario():
        pool = LocatorPool(locator, 1)
        try:
            first = (await asyncio.gather(pool.locate(_png()), return_exceptions=True))[0]
            assert not isinstance(first, ImageProcessingError), f"the photo was blamed (422): {first}"
            assert isinstance(first, serving.DetectionUnavailable) and "did not start" in str(first)
            more = await asyncio.gather(pool.locate(_png(seed=1)), pool.locate(_png(seed=2)), return_exceptions=True)
            assert all(isinstance(e, serving.DetectionUnavailable) for e in more), more
            assert len(starts) == 1  # no new pool per request while it backs off
            assert not pool.ready()
            monkeypatch.setattr(serving, "_init_child", REAL_INIT)  # the workers can start again
            await asyncio.sleep(5.1)
            assert not pool.ready()  # past the back-off: the probe starts a new pool, not up yet
            assert len(starts) == 2
            for _ in range(200):
                if pool.ready():
                    break
                await asyncio.sleep(0.1)
            assert pool.ready()
            return await pool.locate(_png(seed=3))
        finally:
            pool.close()

    located, _ = asyncio.run(asyncio.wait_for(scenario(), 60))
    assert located.boxes == []


def test_a_photo_retried_beside_a_new_hostile_photo_is_not_blamed(locator, monkeypatch):
    """An innocent photo in flight when a hostile one broke the pool is retried on the new pool; a fresh
    request with the hostile photo (a client retrying it) broke that pool beside it, and the innocent
    photo got ImageProcessingError (422, its own fault). Now it gets a 503; the hostile photo, alone on
    its retry, still gets the 422."""
    monkeypatch.setattr(serving, "_child_locate", _locate_or_die)

    async def scenario():
        pool = LocatorPool(locator, 2)
        try:
            hostile = asyncio.ensure_future(pool.locate(b"KILL the first hostile photo"))
            await asyncio.sleep(0.05)
            innocent = asyncio.ensure_future(pool.locate(b"SLOW an innocent photo"))
            first = (await asyncio.gather(hostile, return_exceptions=True))[0]  # retried first, alone: 422
            again = (await asyncio.gather(pool.locate(b"KILL the hostile photo again"), return_exceptions=True))[0]
            return first, again, (await asyncio.gather(innocent, return_exceptions=True))[0]
        finally:
            pool.close()

    first, again, innocent = asyncio.run(asyncio.wait_for(scenario(), 90))
    assert isinstance(first, ImageProcessingError) and isinstance(again, ImageProcessingError), (first, again)
    assert not isinstance(innocent, ImageProcessingError), f"the innocent photo was blamed: {innocent}"
    assert isinstance(innocent, serving.DetectionUnavailable) and "beside 1 other photo" in str(innocent)


def test_workers_exit_when_the_server_process_is_killed(detector, tmp_path):
    """A server process killed with SIGKILL (the OOM killer) left its idle detection workers waiting for
    work for ever, reparented to init, each holding its detector; every restart added more."""
    script = tmp_path / "server.py"
    script.write_text(textwrap.dedent(f"""
        import asyncio, time
        from faceage.predict import FaceLocator
        from faceage.serving import LocatorPool

        if __name__ == "__main__":
            async def main():
                pool = LocatorPool(FaceLocator({str(detector)!r}, kind="hog", upsample=0, margin=0.4, crop_size=32), 2)
                await pool.locate({_png()!r})
                print("up", flush=True)
                time.sleep(60)
            asyncio.run(main())
    """))
    server = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True,
                              cwd=os.getcwd(), env={**os.environ, "PYTHONPATH": os.getcwd()})
    workers: list[int] = []
    try:
        assert select.select([server.stdout], [], [], 60)[0] and server.stdout.readline().strip() == "up"
        workers = _children(server.pid)
        assert len(workers) >= 2  # the two workers (and multiprocessing's resource tracker)
        server.kill()
        server.wait()
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and any(os.path.exists(f"/proc/{pid}") and not _zombie(pid)
                                                  for pid in workers):
            time.sleep(0.1)
        alive = [pid for pid in workers if os.path.exists(f"/proc/{pid}") and not _zombie(pid)]
        assert not alive, f"detection workers {alive} outlived the killed server"
    finally:
        server.kill()
        for pid in workers:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _children(pid: int) -> list[int]:
    found = []
    for task in os.listdir(f"/proc/{pid}/task"):
        with open(f"/proc/{pid}/task/{task}/children") as f:
            found += [int(child) for child in f.read().split()]
    return found


def _zombie(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


def test_a_worker_gives_its_heap_back_after_a_large_photo(locator, monkeypatch):
    """A 12 MP photo left its detection worker 115 MB larger for good (glibc keeps the freed pyramid):
    after a photo of RELEASE_AFTER_PIXELS or more the worker trims its heap; at once without the image,
    after it has been sent back with it; not after a small photo."""
    calls = []
    monkeypatch.setattr(serving, "release_memory", lambda: calls.append(time.monotonic()), raising=False)
    monkeypatch.setattr(serving, "RELEASE_AFTER_PIXELS", 2000 * 1000, raising=False)
    monkeypatch.setattr(serving, "_child_locator", locator)
    large = np.zeros((1000, 2000, 3), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(large).save(buf, "PNG")
    serving._child_locate(_png(), False, False, False)
    assert calls == []
    serving._child_locate(buf.getvalue(), False, False, False)
    assert len(calls) == 1
    located, image = serving._child_locate(buf.getvalue(), True, False, False)
    assert image.shape == large.shape and len(calls) == 1  # not while the image is still to be sent
    time.sleep(1.3)
    assert len(calls) == 2


def test_release_memory_runs_anywhere():
    serving.release_memory()  # glibc's malloc_trim here; nothing where there is none


# --- The routes, without a bento ---------------------------------------------------------------


class _Service:
    """What the routes read of the service: its locator pool, age batcher and lineage."""

    def __init__(self, locator, estimate):
        import service

        self.inner = service.FaceAgeService.inner
        self.locator = locator
        self.batcher = serving.AgeBatcher(estimate)
        self.lineage = {"tag": "face_age:test"}

    def __getattr__(self, name):  # the routes call the service's own methods (analyse, _analyse_one)
        return getattr(self.inner, name).__get__(self)


@pytest.fixture()
def routes(monkeypatch):
    import bentoml
    import service

    def make(locator, estimate=None):
        estimate = estimate or (lambda faces: (np.full(len(faces), 30.123456789, np.float32),
                                               np.full(len(faces), 4.000012, np.float32)))
        svc = _Service(locator, estimate)
        monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
        return svc, TestClient(service.api)

    return make


def _astronaut() -> bytes:
    import faceage

    return (Path(faceage.__file__).parent / "examples" / "astronaut.jpg").read_bytes()


def test_predict_rounds_ages_as_the_cli_does(routes, locator):
    """The digits past AGE_DECIMALS (the CLI's rounding) are float32 noise that changes with the other requests'
    faces sharing a forward pass: the same photo answered differently with the traffic beside it."""
    _, client = routes(LocatorPool(locator, 0))
    faces = client.post("/predict", files={"image": ("a.jpg", _astronaut(), "image/jpeg")}).json()["faces"]
    assert faces and all(f["age"] == 30.1235 and f["age_std"] == 4.0 for f in faces), faces
    batch = client.post("/predict_batch", files=[("image", ("a.jpg", _astronaut(), "image/jpeg"))]).json()
    assert [f["age"] for f in batch["results"][0]["faces"]] == [30.1235] * len(faces)


class _Unavailable:
    busy = False

    def ready(self):
        return False

    async def locate(self, data, **kwargs):
        raise serving.DetectionUnavailable("the detection workers did not start (test): try again")


def test_unavailable_workers_are_a_503_with_retry_after_and_readyz_says_so(routes):
    svc, client = routes(_Unavailable())
    for route in ("/predict", "/annotate", "/crop"):
        r = client.post(route, files={"image": ("a.jpg", _astronaut(), "image/jpeg")})
        assert r.status_code == 503 and "did not start" in r.json()["error"], (route, r.text)
        assert r.headers["retry-after"] == str(int(serving.RESTART_AFTER_S))
    r = client.post("/predict_batch", files=[("image", ("a.jpg", _astronaut(), "image/jpeg")),
                                             ("image", ("b.jpg", b"not an image", "image/jpeg"))])
    assert r.status_code == 200
    assert [(x["filename"], x["status"]) for x in r.json()["results"]] == [("a.jpg", 503), ("b.jpg", 503)]
    import service

    assert asyncio.run(service.FaceAgeService.inner.__is_ready__(svc)) is False


def test_an_upload_the_client_abandons_is_not_a_server_error(routes, locator):
    """A client that left mid-body raised Starlette's ClientDisconnect out of the route: a 500 and an
    "Exception in ASGI application" traceback in the log for every aborted upload."""
    import service

    routes(LocatorPool(locator, 0))
    body = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\"\r\n\r\n" + b"x" * 100
    messages = [{"type": "http.request", "body": body, "more_body": True}, {"type": "http.disconnect"}]
    sent = []

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": "/predict", "raw_path": b"/predict", "query_string": b"",
             "headers": [(b"content-type", b"multipart/form-data; boundary=b"), (b"content-length", b"100000")],
             "http_version": "1.1", "scheme": "http", "server": ("test", 80), "client": ("test", 1), "root_path": ""}
    asyncio.run(service.api(scope, receive, send))  # raised ClientDisconnect
    assert sent[0]["status"] == 400


def test_annotate_gives_the_heap_back_after_a_large_photo(routes, locator, monkeypatch):
    """/annotate of a 36 MP photo left the server process 250 MB larger for good (the decoded image and
    its copies, freed into glibc's heap)."""
    calls = []
    monkeypatch.setattr(serving, "release_memory", lambda: calls.append(1))
    monkeypatch.setattr(serving, "RELEASE_AFTER_PIXELS", 512 * 512)
    _, client = routes(LocatorPool(locator, 0))
    r = client.post("/annotate", files={"image": ("a.jpg", _astronaut(), "image/jpeg")})  # 512 x 512
    assert r.status_code == 200 and calls == [1]
    r = client.post("/annotate", files={"image": ("b.png", _png(), "image/png")})
    assert r.status_code == 200 and calls == [1]


def test_the_ui_shows_unavailable_workers_as_a_message(tmp_path, monkeypatch):
    """The UI caught the photo's own errors only: a 503 case showed Gradio's generic "Error"."""
    import bentoml
    import gradio as gr

    from faceage.ui import ui_predict

    class Service:
        async def analyse(self, data, with_image=False):
            raise serving.DetectionUnavailable("the detection workers did not start (test): try again")

    monkeypatch.setattr(bentoml, "get_current_service", lambda: Service())
    photo = tmp_path / "a.jpg"
    photo.write_bytes(_astronaut())
    with pytest.raises(gr.Error, match="did not start"):
        asyncio.run(ui_predict(str(photo), 10_000_000))
