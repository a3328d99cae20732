"""Round-25 review of the service: forward passes bounded in faces, the UI's concurrency and its user
errors, and the error shape of unknown routes and wrong methods.

No bento and no shared data: the batcher runs with a stand-in age model, the UI as the Gradio app
``LazyUI`` builds (in Starlette's TestClient, lifespan and queue included) with a stand-in service,
and the routes in FastAPI's TestClient.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from starlette.testclient import TestClient

from faceage.serving import AgeBatcher


def _astronaut() -> bytes:
    import faceage

    return (Path(faceage.__file__).parent / "examples" / "astronaut.jpg").read_bytes()


# --- Forward passes ---------------------------------------------------------------------------------


def test_a_request_with_more_faces_than_a_pass_holds_runs_in_passes_of_at_most_max_pass_faces():
    """One request's faces all went into one forward pass: /predict_batch of 8 crowd photos (1,152 faces)
    took the server process from 1 to 5 GB, which ONNX Runtime's arena then kept."""
    passes = []

    def estimate(faces):
        passes.append(len(faces))
        values = np.array([float(f[0]) for f in faces])
        return values, values / 10

    observed = []
    batcher = AgeBatcher(estimate, on_batch=observed.append)  # the service's defaults: 64 faces a pass

    async def scenario():
        crowd = [np.array([i]) for i in range(150)]
        small = [np.array([1000 + i]) for i in range(3)]
        return await asyncio.gather(batcher(crowd), batcher(small))

    (crowd_mean, crowd_std), (small_mean, small_std) = asyncio.run(scenario())
    assert max(passes) <= 64 and sum(passes) == 153, passes
    assert observed == passes  # the metric counts faces per forward pass
    assert crowd_mean.tolist() == list(range(150)) and np.allclose(crowd_std, np.arange(150) / 10)
    assert small_mean.tolist() == [1000, 1001, 1002] and np.allclose(small_std, [100, 100.1, 100.2])


def test_a_failing_pass_of_a_split_request_fails_that_request_and_the_batcher_goes_on():
    calls = []

    def estimate(faces):
        calls.append(len(faces))
        if len(calls) == 2:
            raise RuntimeError("the age model failed")
        return np.zeros(len(faces)), np.zeros(len(faces))

    batcher = AgeBatcher(estimate, max_pass_faces=4)

    async def scenario():
        first = await asyncio.gather(batcher([np.zeros(1)] * 10), return_exceptions=True)
        return first[0], await batcher([np.zeros(1)] * 2)

    failed, later = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and len(later[0]) == 2


# --- The UI -------------------------------------------------------------------------------------------


class _SlowService:
    """Stands in for the service: ``analyse`` takes 0.5 s and counts how many run at once."""

    def __init__(self):
        self.running = self.most = 0

    async def analyse(self, data, with_image=False):
        self.running += 1
        self.most = max(self.most, self.running)
        try:
            await asyncio.sleep(0.5)
        finally:
            self.running -= 1
        return None, [], np.zeros((8, 8, 3), np.uint8)


def _ui_call(client: TestClient, photo: dict) -> str:
    """One run of the UI's predict through Gradio's HTTP API; the event stream's text."""
    event = client.post("/ui/gradio_api/call/predict", json={"data": [photo]}).json()["event_id"]
    return client.get(f"/ui/gradio_api/call/predict/{event}").text


def test_the_ui_analyses_photos_of_several_users_at_once(tmp_path, monkeypatch):
    """Gradio runs an event one at a time unless told otherwise (BentoML's own Gradio mount told it; LazyUI's
    gr.mount_gradio_app does not): a small photo waited 5.5 s behind another user's 20 MP one (0.2 s on /predict)."""
    import bentoml

    from faceage.ui import LazyUI

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    service = _SlowService()
    monkeypatch.setattr(bentoml, "get_current_service", lambda: service)
    lazy = LazyUI()
    lazy.configure({"registered_version": "1"}, 10_000_000)  # the default concurrency (the service passes its UI share)
    with TestClient(lazy._build()) as client:
        [uploaded] = client.post("/ui/gradio_api/upload", files={"files": ("a.jpg", _astronaut(), "image/jpeg")}).json()
        photo = {"path": uploaded, "meta": {"_type": "gradio.FileData"}}
        results = []
        threads = [threading.Thread(target=lambda: results.append(_ui_call(client, photo))) for _ in range(3)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        took = time.monotonic() - start
    assert len(results) == 3 and all("event: complete" in r for r in results), results
    assert service.most == 3, f"{service.most} photo(s) analysed at once; 3 users took {took:.1f} s"


def test_a_user_s_bad_photo_is_a_message_not_a_logged_traceback(tmp_path, monkeypatch):
    """Every UI upload that was not a photo (or a missing one) logged Gradio's 25-line traceback."""
    import bentoml
    import gradio as gr

    from faceage.images import ImageDecodeError
    from faceage.ui import ui_predict

    class Service:
        async def analyse(self, data, with_image=False):
            raise ImageDecodeError("not an image (unknown format): the uploaded file")

    monkeypatch.setattr(bentoml, "get_current_service", lambda: Service())
    photo = tmp_path / "a.jpg"
    photo.write_bytes(b"not a photo")
    for path in (str(photo), None, str(tmp_path / "gone.jpg")):
        with pytest.raises(gr.Error) as raised:
            asyncio.run(ui_predict(path, 10_000_000))
        assert raised.value.print_exception is False, (path, raised.value.message)
    with pytest.raises(gr.Error, match="not an image"):
        asyncio.run(ui_predict(str(photo), 10_000_000))


def test_the_ui_gives_the_heap_back_after_a_large_photo(tmp_path, monkeypatch):
    """/annotate gave a large photo's buffers back (round 24), the UI did not: three 38 MP photos through the UI
    left the server process 318 MB larger, and growing."""
    import bentoml

    import faceage.serving as serving
    from faceage.ui import ui_predict

    calls = []
    monkeypatch.setattr(serving, "release_memory", lambda: calls.append(1))
    monkeypatch.setattr(serving, "RELEASE_AFTER_PIXELS", 512 * 512)
    monkeypatch.setattr("faceage.ui._ui_image_file", lambda image, faces: str(tmp_path / "faces.jpg"))
    sides = iter([(512, 512), (100, 200)])

    class Service:
        async def analyse(self, data, with_image=False):
            return None, [], np.zeros((*next(sides), 3), np.uint8)

    monkeypatch.setattr(bentoml, "get_current_service", lambda: Service())
    photo = tmp_path / "a.jpg"
    photo.write_bytes(_astronaut())
    asyncio.run(ui_predict(str(photo), 10_000_000))
    assert calls == [1]
    asyncio.run(ui_predict(str(photo), 10_000_000))  # a small photo: nothing to give back
    assert calls == [1]


@pytest.fixture(scope="module")
def locator(hog_detector_dir):
    """A real HOG locator (dlib's detector alone)."""
    from faceage.predict import FaceLocator

    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


def test_in_process_detection_gives_the_heap_back_after_a_large_photo(locator, monkeypatch):
    """FACEAGE_DETECT_PROCESSES=0: a worker gives a large photo's memory back, the in-process path did not
    (a 20 MP photo left the server process 115 MB larger)."""
    import faceage.serving as serving

    calls = []
    monkeypatch.setattr(serving, "release_memory", lambda: calls.append(1))
    monkeypatch.setattr(serving, "RELEASE_AFTER_PIXELS", 512 * 512)
    pool = serving.LocatorPool(locator, 0)
    located, image = asyncio.run(pool.locate(_astronaut()))  # 512 x 512
    assert image is None and located.width == 512 and calls == [1]
    located, image = asyncio.run(pool.locate(_astronaut(), with_image=True))  # the caller gives it back
    assert image is not None and calls == [1]


# --- Error shape ---------------------------------------------------------------------------------------


def test_a_wrong_method_answers_in_the_services_error_shape():
    """The service's docstring: every error is {"error": message}; a GET /predict was {"detail": ...}. (A path no
    route has never reaches this app: BentoML answers it, plain text.)"""
    import service

    client = TestClient(service.api)
    r = client.get("/predict")
    assert r.status_code == 405 and r.json() == {"error": "GET /predict: Method Not Allowed"}
    assert r.headers["allow"] == "POST"
