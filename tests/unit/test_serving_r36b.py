"""Round-36 review of the service's request path, as a user deploying it sees it (service.py, faceage/serving.py).

The routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML injects
it the same way), as in ``test_http_r30``: a stand-in locator keyed on the photo's first bytes, and a real
:class:`faceage.serving.AgeBatcher` around an age "model" that fails on one photo's faces.
"""

from __future__ import annotations

import numpy as np
import prometheus_client
import pytest
from starlette.testclient import TestClient

from faceage.predict import FaceBox, LocatedFaces
from faceage.serving import AgeBatcher
from tests.unit.test_http_r30 import _Locator, _Service

POISON = 255  # the pixel value of the one face the age model below fails on


class _PoisonLocator(_Locator):
    """``_Locator``, plus ``POISON...``: one face whose input makes the age model raise."""

    async def locate(self, data: bytes, with_image: bool = False, crops: bool = True):
        if data.startswith(b"POISON"):
            return LocatedFaces(20, 10, [FaceBox(0, 0, 10, 10, 1.0)], [np.full((4, 4, 3), POISON, np.uint8)]), None
        return await super().locate(data, with_image, crops)


def _estimate(faces):
    if any(int(face.max()) == POISON for face in faces):
        raise RuntimeError("the age model failed on this face (secret internals)")
    return np.full(len(faces), 30.0), np.full(len(faces), 4.0)


@pytest.fixture()
def client(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    svc.locator = _PoisonLocator()
    svc.batcher = AgeBatcher(_estimate)
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return TestClient(service.api, raise_server_exceptions=False)


def _errors(status: int) -> float:
    return prometheus_client.REGISTRY.get_sample_value("faceage_batch_image_errors_total", {"status": str(status)}) or 0


def test_a_photo_whose_faces_fail_the_age_model_fails_alone_in_a_batch(client):
    """README: in ``/predict_batch`` a photo whose analysis fails unexpectedly (500) "is that photo's result too, and
    the other photos are answered". That held for detection only: all photos' faces go to the age model in one call,
    and one photo's faces that made it raise turned the whole batch of 16 into one 500, the good photos' ages lost."""
    before = _errors(500)
    r = client.post("/predict_batch", files=[("image", (name, data, "image/jpeg")) for name, data in (
        ("a.jpg", b"FACE"), ("b.jpg", b"POISON"), ("c.jpg", b"FACE"), ("d.jpg", b"BAD"), ("e.jpg", b"NONE"))])
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg"]
    assert [[f["age"] for f in results[i]["faces"]] for i in (0, 2)] == [[30.0], [30.0]]
    assert results[1]["status"] == 500 and "faces" not in results[1]
    assert "internal error" in results[1]["error"] and "secret" not in results[1]["error"]  # the log has the details
    assert results[3]["status"] == 400 and results[4]["faces"] == []
    assert _errors(500) == before + 1


def test_a_batch_of_one_photo_that_fails_the_age_model_answers_it_as_its_result(client):
    """As a photo whose detection hits a bug (``test_http_r30``): the batch answers 200 with that photo's 500."""
    r = client.post("/predict_batch", files=[("image", ("b.jpg", b"POISON", "image/jpeg"))])
    assert r.status_code == 200, r.text
    (result,) = r.json()["results"]
    assert result["status"] == 500 and "internal error" in result["error"]


def test_the_single_photo_routes_still_answer_such_a_photo_500(client):
    r = client.post("/predict", files=[("image", ("b.jpg", b"POISON", "image/jpeg"))])
    assert r.status_code == 500 and "secret" not in r.json()["error"]


def test_a_request_is_not_blamed_for_the_faces_of_one_cancelled_during_their_failed_pass():
    """Two requests shared a forward pass that failed on the first one's faces; its client left (cancelled) as the
    pass ran. The batcher reran a failed merged pass one request at a time only while more than one of its requests
    was still waiting, so the one left got the error of faces that were not its own: a 500 for a good photo."""
    import asyncio
    import threading

    gates = [threading.Event(), threading.Event()]
    calls: list[int] = []

    def estimate(faces):
        calls.append(len(faces))
        if len(calls) <= len(gates):
            assert gates[len(calls) - 1].wait(30.0)
        return _estimate(faces)

    good, poison = np.zeros((4, 4, 3), np.uint8), np.full((4, 4, 3), POISON, np.uint8)

    async def scenario():
        batcher = AgeBatcher(estimate)
        first = asyncio.ensure_future(batcher([good]))  # runs at once, held at its gate: the next two queue up
        while not calls:
            await asyncio.sleep(0.01)
        gone = asyncio.ensure_future(batcher([poison]))
        kept = asyncio.ensure_future(batcher([good, good]))
        await asyncio.sleep(0.05)
        gates[0].set()
        await first
        while len(calls) < 2:  # the merged pass of both runs now, held at its gate
            await asyncio.sleep(0.01)
        assert calls[1] == 3, f"the two requests did not share a pass: {calls}"
        gone.cancel()  # its client left while the pass ran
        await asyncio.sleep(0.05)
        gates[1].set()
        return await asyncio.wait_for(kept, 30.0)

    mean, std = asyncio.run(scenario())
    assert mean.tolist() == [30.0, 30.0] and std.tolist() == [4.0, 4.0]
    assert calls == [1, 3, 2]  # the failed pass, then the request left in it on its own
