"""Round 32, second read of the serving changes (faceage/serving.py, service.py): the detection pool closed (in its
worker thread, as the service's shutdown hook does) while the event loop replaces a broken pool, and the champion's
model card served at ``GET /model_card``.

The routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML injects
it the same way), as in ``test_http_r30``; the pool tests use a real :class:`faceage.serving.LocatorPool` with real
worker processes and a real (HOG) :class:`faceage.predict.FaceLocator`.
"""

from __future__ import annotations

import threading

import pytest
from starlette.testclient import TestClient

from faceage.serving import LocatorPool, _Workers
from tests.unit.test_http_r30 import _Service

CARD = "# Model card\n\nrun abc123: test MAE **5.10** years (± 0.2), ages 0-100.\n"


@pytest.fixture(scope="module")
def locator(hog_detector_dir):
    from faceage.predict import FaceLocator

    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


# --- 1. close() in its thread while the loop replaces a broken pool --------------------------------------------


def test_a_pool_closed_while_a_broken_one_is_replaced_leaves_no_workers_running(locator, monkeypatch):
    """The service closes the pool in a worker thread (``asyncio.to_thread(self.locator.close)``) while the event
    loop may be replacing a broken pool (a worker died, the OOM killer, a probe of ``/readyz``). close() cleared the
    pool and stopped the broken one as ``_replace`` spawned the new one, which ``_replace`` then put in place: a
    fresh pool of detection workers (which ignore Ctrl-C and SIGTERM) that nothing ever stopped, on a closed pool."""
    pool = LocatorPool(locator, 1)
    broken = pool._workers
    closer: list[threading.Thread] = []
    spawned: list[_Workers] = []
    processes = []  # the new pool's worker processes
    start = pool._start

    def start_while_closing() -> _Workers:
        # The shutdown hook's close() runs now, in its thread, as the new pool is spawned here.
        closer.append(threading.Thread(target=pool.close, kwargs={"timeout": 5.0}))
        closer[0].start()
        closer[0].join(1.0)  # close() ran to its end meanwhile (before the fix), or waits for the swap (after)
        spawned.append(start())
        processes.extend(spawned[-1].executor._processes.values())
        return spawned[-1]

    monkeypatch.setattr(pool, "_start", start_while_closing)
    try:
        pool._replace(broken, RuntimeError("a detection worker died"))  # as a break seen on the loop thread does
        closer[0].join(30.0)
        assert not closer[0].is_alive()
        assert pool._workers is None, "a closed pool holds a new pool of workers"
        for process in processes:  # (none is made once close() has begun; one made as it begins, it stops)
            process.join(10.0)
        assert not [p for p in processes if p.is_alive()], "the workers of a pool made during close() still run"
        assert not pool.ready()
    finally:
        for workers in spawned:
            workers.stop(5.0)


# --- 2. GET /model_card ----------------------------------------------------------------------------------------


@pytest.fixture()
def svc(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    svc.lineage = {"tag": "face_age:r32test", "model_card": "model_card.md"}
    svc.card = CARD
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return svc


@pytest.fixture()
def client(svc):
    import service

    return TestClient(service.api, raise_server_exceptions=False)


def test_the_running_service_serves_its_models_card_as_markdown(client):
    """The bento ships the champion's ``model_card.md`` (``stages/package.py --card``), but a user of the running
    service could not read it: no route gave it. ``GET /model_card`` answers it as ``text/markdown``, with the
    model's tag in ``X-FaceAge-Model`` as every route's answer."""
    r = client.get("/model_card")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("text/markdown")
    assert "charset=utf-8" in r.headers["content-type"]
    assert r.text == CARD
    assert r.headers.get("x-faceage-model") == "face_age:r32test"


def test_a_bento_without_a_model_card_answers_404_in_the_services_error_shape(svc, client):
    svc.card = None
    r = client.get("/model_card")
    assert r.status_code == 404
    assert r.headers["content-type"] == "application/json"
    assert "model card" in r.json()["error"]


def test_the_model_card_is_read_from_the_bentoml_model_dir(tmp_path):
    """The service reads the card its model's metadata names (``model_card``: ``model_card.md``, as packaging writes
    it) from the model's directory; none where the metadata names none or the file is gone, and never a path
    outside the model's directory."""
    import service

    (tmp_path / "model_card.md").write_text(CARD, encoding="utf-8")
    assert service.read_model_card(tmp_path, {"model_card": "model_card.md"}) == CARD
    assert service.read_model_card(tmp_path, {}) is None
    assert service.read_model_card(tmp_path / "gone", {"model_card": "model_card.md"}) is None
    (tmp_path / "secret.md").write_text("secret", encoding="utf-8")
    inner = tmp_path / "model"
    inner.mkdir()
    assert service.read_model_card(inner, {"model_card": "../secret.md"}) is None


def test_openapi_lists_the_model_card_route():
    import service

    paths = TestClient(service.api).get("/api/openapi.json").json()["paths"]
    responses = paths["/model_card"]["get"]["responses"]
    assert list(responses["200"]["content"]) == ["text/markdown"]
    assert "X-FaceAge-Model" in responses["200"]["headers"]
    assert responses["404"]["content"]["application/json"]["schema"]["required"] == ["error"]
