"""Round-38 review of the HTTP service (service.py, faceage/http.py, faceage/serving.py) as a deployer meets it.

The routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML injects
it the same way), with ``test_http_r30``'s stand-in locator (no detector needed) and a real :class:`AgeBatcher`.
"""

from __future__ import annotations

import pytest
from starlette.testclient import TestClient

from tests.unit.test_http_r30 import _Service

TAG = "face_age:r38test"
FACE = ("a.jpg", b"FACE", "image/jpeg")


@pytest.fixture()
def svc(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    svc.lineage = {"tag": TAG}
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return svc


@pytest.fixture()
def client(svc):
    import service

    return TestClient(service.api, raise_server_exceptions=False)


def _closed_batcher(svc) -> None:
    svc.batcher.close()  # the server shutting down: the next photo's faces get ServingClosed (a 503)


@pytest.mark.parametrize("why, method, route, kwargs, status", [
    ("missing field", "post", "/predict", {"files": [("photo", FACE)]}, 400),
    ("not a form", "post", "/annotate", {"json": {}}, 415),
    ("undecodable photo", "post", "/predict", {"files": [("image", ("b.jpg", b"BAD", "image/jpeg"))]}, 400),
    ("face index out of range", "post", "/crop?face=3", {"files": [("image", FACE)]}, 422),
    ("face index that does not parse", "post", "/crop?face=abc", {"files": [("image", FACE)]}, 400),
    ("a bug", "post", "/predict", {"files": [("image", ("c.jpg", b"BOOM", "image/jpeg"))]}, 500),
    ("wrong method", "get", "/predict", {}, 405),
    ("shutting down", "post", "/predict", {"files": [("image", FACE)]}, 503),
])
def test_error_answers_name_the_model_that_refused(svc, client, why, method, route, kwargs, status):
    """Only the 200s said which model answered (``X-FaceAge-Model``): during a rollout, or behind a load balancer
    over two bentos, a client that got a 422, 503 or 500 could not tell which model (which version's detector,
    which build's bug) refused its photo, though the service that answered knows. Every error the service's app
    answers now carries the header too (the JSON's ``model.tag``, as the 200s)."""
    if status == 503:
        _closed_batcher(svc)
    r = getattr(client, method)(route, **kwargs)
    assert r.status_code == status, (why, r.text)
    assert r.headers["content-type"] == "application/json" and "error" in r.json()
    assert r.headers.get("x-faceage-model") == TAG, why


def test_openapi_documents_the_model_header_on_the_errors_that_carry_it():
    """``/api/docs`` lists ``X-FaceAge-Model`` on the errors the API answers, and not on the body cap's 413 nor
    BentoML's 429, which are answered before the API is reached and carry none."""
    import service

    paths = TestClient(service.api).get("/api/openapi.json").json()["paths"]
    for route, method in (("/predict", "post"), ("/crop", "post"), ("/model_card", "get")):
        responses = paths[route][method]["responses"]
        for status, response in responses.items():
            carries = status not in ("413", "429")
            assert ("X-FaceAge-Model" in response.get("headers", {})) == carries, (route, status)
    assert "Retry-After" in paths["/predict"]["post"]["responses"]["503"]["headers"]
    assert "Retry-After" in paths["/predict"]["post"]["responses"]["429"]["headers"]


@pytest.mark.parametrize("card", ["# Model card\n", None])
def test_head_model_card_answers_as_get_does_without_the_body(svc, client, card):
    """``curl -I /model_card`` (a probe of which model a server has, or whether it ships a card) was a 405
    ``Allow: GET``: FastAPI's ``@get`` routes, unlike BentoML's probes and Starlette's, take no HEAD, though the
    service's CORS setting allows HEAD. It now answers GET's status and headers, without a body."""
    svc.card = card
    get, head = client.get("/model_card"), client.head("/model_card")
    assert head.status_code == get.status_code == (200 if card else 404), head.headers
    assert head.content == b""
    for name in ("content-type", "content-length", "x-faceage-model"):
        assert head.headers.get(name) == get.headers.get(name), name
    assert head.headers["x-faceage-model"] == TAG
