"""Round-28 review of the service's request path: cancellation (BentoML's request timeout cancels the
route's task, ``bentoml._internal.server.http.traffic.TimeoutMiddleware``) and what it leaves running, and
multipart bodies the parser refuses before parsing (a 500, in the API and in Gradio's upload).

Real components: a real (HOG) FaceLocator in a LocatorPool, the real AgeBatcher (with a stand-in age
model), the routes in FastAPI's TestClient (as ``test_serving_r24``) and the Gradio app LazyUI builds; the
detection step is wrapped (not replaced) to record how many photos are in it at once.
"""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

import faceage.serving as serving
from faceage.predict import FaceLocator
from faceage.serving import AgeBatcher, LocatorPool
from tests.unit.test_serving_pool import _png


@pytest.fixture(scope="module")
def locator(hog_detector_dir) -> FaceLocator:
    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


def test_in_process_detection_stays_one_at_a_time_when_a_request_is_cancelled(locator, monkeypatch):
    """FACEAGE_DETECT_PROCESSES=0 promises one image at a time: a request cancelled while its photo was in
    decode + detect (BentoML's 120 s timeout cancels the route's task) released the asyncio lock while its
    thread ran on, and the next photo was decoded beside it. dlib's own calls stay serialised (FaceDetector's
    lock), but full-size decodes piled up in the server process (one more per timeout, up to the default
    executor's threads), and the waiting photos held executor threads the age model and drawing need."""
    real = serving._decode_and_locate
    state = {"in": 0, "most": 0}
    guard = threading.Lock()

    def recorded(*args):
        with guard:
            state["in"] += 1
            state["most"] = max(state["most"], state["in"])
        try:
            time.sleep(0.5)  # a slow photo: the request is cancelled while it is in detection
            return real(*args)
        finally:
            with guard:
                state["in"] -= 1

    monkeypatch.setattr(serving, "_decode_and_locate", recorded)

    async def scenario():
        pool = LocatorPool(locator, 0)
        first = asyncio.ensure_future(pool.locate(_png(1)))
        await asyncio.sleep(0.1)  # in detection now
        first.cancel()
        located, _ = await pool.locate(_png(2))
        with pytest.raises(asyncio.CancelledError):
            await first
        return located

    located = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert located.boxes == []
    assert state["most"] == 1, f"{state['most']} photos were in decode + detect at once"


def test_a_request_cancelled_while_queued_for_the_age_model_costs_no_forward_pass():
    """A request that timed out (or was cancelled) while it waited behind a running forward pass still had its
    faces run: under overload, a cancelled /predict_batch of crowd photos kept the age model busy for nobody."""
    passes = []

    def estimate(faces):
        passes.append([int(f[0]) for f in faces])
        time.sleep(0.3)
        values = np.array([float(f[0]) for f in faces])
        return values, values / 10

    batcher = AgeBatcher(estimate)

    async def scenario():
        running = asyncio.ensure_future(batcher([np.array([1])]))
        await asyncio.sleep(0.05)  # its pass runs now
        gone = asyncio.ensure_future(batcher([np.array([i]) for i in range(100, 140)]))
        kept = asyncio.ensure_future(batcher([np.array([7])]))
        await asyncio.sleep(0.05)
        gone.cancel()
        return await running, await kept, gone

    (mean1, _), (mean7, std7), gone = asyncio.run(asyncio.wait_for(scenario(), 30))
    assert gone.cancelled()
    assert mean1.tolist() == [1.0] and mean7.tolist() == [7.0] and std7.tolist() == [0.7]
    assert passes == [[1], [7]], passes


# --- Error mapping ------------------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/predict", "/annotate", "/crop", "/predict_batch"])
def test_a_boundary_longer_than_the_parser_takes_is_a_400_not_a_500(route, locator, monkeypatch):
    """python-multipart refuses a boundary over 256 bytes in MultipartParser's constructor, with a FormParserError
    that parse_form did not catch: any client could get a 500 (and a logged traceback) with one header."""
    import bentoml
    import service
    from starlette.testclient import TestClient

    from tests.unit.test_serving_r24 import _Service

    svc = _Service(LocatorPool(locator, 0), lambda faces: (np.full(len(faces), 30.0), np.full(len(faces), 4.0)))
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    boundary = "b" * 300
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.png\"\r\n"
            f"Content-Type: image/png\r\n\r\n").encode() + _png(1) + f"\r\n--{boundary}--\r\n".encode()
    r = TestClient(service.api, raise_server_exceptions=False).post(
        route, content=body, headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 400, (r.status_code, r.text)
    assert r.json()["error"] == "malformed multipart/form-data body: Boundary length 300 exceeds maximum of 256"


def test_a_ui_upload_with_a_boundary_the_parser_refuses_is_a_400_not_gradio_s_500(tmp_path, monkeypatch):
    """Gradio parses its uploads with python-multipart too, whose constructor refuses a boundary over 256 bytes:
    /ui/gradio_api/upload answered 500 (a logged traceback), where the service answers a malformed form with 400."""
    from starlette.testclient import TestClient

    from faceage.http import BodyLimitMiddleware
    from faceage.ui import UI_PATH, LazyUI

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    lazy = LazyUI()
    lazy.configure({"registered_version": "1"}, 1_000_000)
    app = BodyLimitMiddleware(lazy._build(), max_bytes=1_000_000, length_required=(UI_PATH,))
    client = TestClient(app, raise_server_exceptions=False)
    for boundary, status in (("b" * 10, 200), ("b" * 300, 400)):
        body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"a.png\"\r\n"
                f"Content-Type: image/png\r\n\r\n").encode() + _png(1) + f"\r\n--{boundary}--\r\n".encode()
        r = client.post("/ui/gradio_api/upload", content=body,
                        headers={"content-type": f"multipart/form-data; boundary={boundary}"})
        assert r.status_code == status, (boundary, r.status_code, r.text)
    assert r.json() == {"error": "malformed multipart/form-data body: Boundary length 300 exceeds maximum of 256"}
