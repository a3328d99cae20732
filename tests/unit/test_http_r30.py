"""Round-30 review of the HTTP API (service.py, faceage/http.py): what a client gets for a failure the routes
did not expect, a /predict_batch with one odd photo among good ones, and /metrics for requests the body cap
refuses before BentoML's own metrics middleware sees them.

The routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML
injects it the same way, as in ``test_serving_r24``); detection is a stand-in locator keyed on the photo's
first bytes, so no detector or model is needed.
"""

from __future__ import annotations

import numpy as np
import prometheus_client
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from faceage.http import BodyLimitMiddleware
from faceage.images import ImageDecodeError
from faceage.predict import FaceBox, LocatedFaces
from faceage.serving import AgeBatcher


class _Locator:
    """``FACE...``: one face; ``BAD...``: undecodable (400); ``BOOM...``: a bug (RuntimeError); else no face."""

    busy = False

    def ready(self) -> bool:
        return True

    async def locate(self, data: bytes, with_image: bool = False, crops: bool = True):
        if data.startswith(b"BAD"):
            raise ImageDecodeError("not an image")
        if data.startswith(b"BOOM"):
            raise RuntimeError("an unexpected bug")
        n = int(data.startswith(b"FACE"))
        located = LocatedFaces(20, 10, [FaceBox(0, 0, 10, 10, 1.0)] * n, [np.zeros((4, 4, 3), np.uint8)] * n)
        return located, (np.zeros((10, 20, 3), np.uint8) if with_image else None)


class _Service:
    def __init__(self):
        import service

        self.inner = service.FaceAgeService.inner
        self.locator = _Locator()
        self.batcher = AgeBatcher(lambda faces: (np.full(len(faces), 30.0), np.full(len(faces), 4.0)))
        self.lineage = {"tag": "face_age:test"}

    def __getattr__(self, name):
        return getattr(self.inner, name).__get__(self)


@pytest.fixture()
def client(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return TestClient(service.api, raise_server_exceptions=False)


def _sample(name: str, **labels) -> float:
    return prometheus_client.REGISTRY.get_sample_value(name, labels) or 0.0


def _batch(client, *parts: tuple[str, bytes, str]) -> list[dict]:
    """``/predict_batch`` of ``(filename, bytes, content type)`` parts: its per-photo results (a 200)."""
    r = client.post("/predict_batch", files=[("image", part) for part in parts])
    assert r.status_code == 200, r.text
    return r.json()["results"]


@pytest.mark.parametrize("route", ["/predict", "/annotate", "/crop", "/predict_batch"])
def test_an_unexpected_failure_is_a_500_in_the_services_error_shape(client, route):
    """The module docstring promises ``{"error": message}`` for every error; a failure no handler expected was
    Starlette's plain-text "Internal Server Error", which a client parsing JSON could not read."""
    r = client.post(route, files=[("image", ("a.jpg", b"BOOM", "image/jpeg"))])
    assert r.headers["content-type"] == "application/json", r.text
    if route == "/predict_batch":  # the photo's own result (the next test)
        assert r.status_code == 200 and r.json()["results"][0]["status"] == 500
        error = r.json()["results"][0]["error"]
    else:
        assert r.status_code == 500
        error = r.json()["error"]
    assert "internal error" in error and "an unexpected bug" not in error  # the details go to the log only


def test_one_photo_that_hits_a_bug_does_not_fail_the_rest_of_the_batch(client):
    """A /predict_batch of 16 photos was one 500 for all of them when one photo's analysis raised something
    unexpected: the batch answers every photo, and that one gets status 500 (the service logs why)."""
    before = _sample("faceage_batch_image_errors_total", status="500")
    results = _batch(client, ("a.jpg", b"FACE", "image/jpeg"), ("b.jpg", b"BOOM", "image/jpeg"),
                     ("c.jpg", b"FACE", "image/jpeg"))
    assert [x["filename"] for x in results] == ["a.jpg", "b.jpg", "c.jpg"]
    assert [len(x.get("faces", [])) for x in results] == [1, 0, 1]
    assert results[1]["status"] == 500 and "internal error" in results[1]["error"]
    assert _sample("faceage_batch_image_errors_total", status="500") == before + 1


def test_a_part_that_is_not_an_image_fails_only_itself_in_a_batch(client):
    """``curl -F image=@notes.txt`` sends text/plain: among 15 photos it made the whole batch a 415, naming only
    its filename (or "no filename"). It is that part's result now, with its position; the others are answered."""
    before = _sample("faceage_batch_image_errors_total", status="415")
    results = _batch(client, ("a.jpg", b"FACE", "image/jpeg"), ("notes.txt", b"FACE", "text/plain"),
                     ("b.jpg", b"BAD", "image/jpeg"))
    assert len(results[0]["faces"]) == 1
    assert results[1]["status"] == 415 and "text/plain" in results[1]["error"] and results[1]["filename"] == "notes.txt"
    assert "faces" not in results[1]
    assert results[2]["status"] == 400
    assert _sample("faceage_batch_image_errors_total", status="415") == before + 1
    assert _sample("faceage_batch_image_errors_total", status="400") >= 1


def test_a_single_photo_route_still_refuses_a_part_that_is_not_an_image(client):
    r = client.post("/predict", files={"image": ("notes.txt", b"FACE", "text/plain")})
    assert r.status_code == 415 and "text/plain" in r.json()["error"]


@pytest.mark.parametrize("route", ["/predict", "/predict_batch"])
def test_statuses_of_bad_requests(client, route):
    """The statuses README's Serving section gives, on both kinds of route (these held before this round)."""
    assert client.post(route, content=b"", headers={"content-type": "multipart/form-data; boundary=b"}).status_code == 400
    assert client.post(route, json={"image": "x"}).status_code == 415
    assert client.post(route, files={"photo": ("a.jpg", b"FACE", "image/jpeg")}).status_code == 400
    r = client.post(route, files=[("image", (f"{i}.jpg", b"FACE", "image/jpeg")) for i in range(17)])
    assert r.status_code == 400 and "at most" in r.json()["error"]


def test_requests_the_body_cap_refuses_are_counted_in_metrics():
    """BentoML adds a service's ASGI middlewares outside its own metrics middleware, so the body cap's 413 (and
    the UI's 411) never reached ``bentoml_service_request_total``: /metrics showed no trace of them."""
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    client = TestClient(BodyLimitMiddleware(Starlette(routes=[Route("/echo", echo, methods=["POST"])]), max_bytes=10))
    before = _sample("faceage_rejected_requests_total", status="413")
    assert client.post("/echo", content=b"x" * 11).status_code == 413
    assert client.post("/echo", content=iter([b"y" * 6, b"y" * 6])).status_code == 413  # streamed
    assert client.post("/echo", content=b"x" * 10).status_code == 200
    assert _sample("faceage_rejected_requests_total", status="413") == before + 2
