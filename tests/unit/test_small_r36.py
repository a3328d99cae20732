"""Round 36, small items: a UI that failed to load for good does not invite retries, and ``GET /model_card``'s 404
names the served model as its 200 does.

The UI is the real :class:`faceage.ui.LazyUI` behind the real :class:`faceage.ui.UIMiddleware`, driven over ASGI; the
routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML injects it the
same way), as in ``test_service_r31``.
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from starlette.testclient import TestClient

from tests.unit.test_http_r30 import _Service


async def _api(scope, receive, send):
    raise AssertionError("a /ui request reached the API")


async def _get_ui(lazy):
    import httpx

    from faceage.ui import UIMiddleware

    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=UIMiddleware(_api, lazy, wait_s=0.05)),
                                 base_url="http://ui.test") as client:
        return await client.get("/ui/")


def test_a_ui_that_failed_to_load_for_good_does_not_ask_to_be_retried(caplog):
    """The failed UI answered 503 with ``Retry-After: 5``, the still-loading UI's answer: a client that honours it
    (urllib3's ``Retry``, many SDKs) retried every 5 s for ever, though the UI never loads until the service is
    restarted. A UI that is still loading keeps its ``Retry-After``."""
    from faceage.ui import LazyUI

    async def scenario():
        lazy = LazyUI()
        # a lineage the build cannot read (model_line's float()): a real failure of the real build
        lazy.configure({"registered_version": "1", "test_mae_years": "not a number"}, 20_000_000)
        await lazy.start()
        await lazy.wait(120)
        try:
            assert lazy.error is not None and lazy.app is None
            return await _get_ui(lazy)
        finally:
            await lazy.close()

    with caplog.at_level(logging.CRITICAL, logger="faceage.ui"):  # the failure's traceback: expected here
        r = asyncio.run(scenario())
    assert r.status_code == 503, r.text
    assert "retry-after" not in r.headers, dict(r.headers)
    assert "failed to load" in r.json()["error"] and "retry" not in r.json()["error"].lower()


def test_a_ui_still_loading_asks_to_be_retried():
    from faceage.ui import LazyUI

    async def scenario():
        lazy = LazyUI()  # never started: still loading as far as /ui can tell
        return await _get_ui(lazy)

    r = asyncio.run(scenario())
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert "still loading" in r.json()["error"]


@pytest.fixture()
def cardless(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    svc.lineage = {"tag": "face_age:r36nocard"}
    svc.card = None  # a model packaged without a card
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return TestClient(service.api, raise_server_exceptions=False)


def test_the_model_cards_404_names_the_model_that_has_none(cardless):
    """README: "Every answer of ... ``/model_card`` names the model that gave it in the header ``X-FaceAge-Model``".
    The 404 for a model packaged without a card carried none, so during a rollout, or behind a load balancer over two
    bentos, a client could not tell which model lacks its card."""
    import service

    r = cardless.get("/model_card")
    assert r.status_code == 404 and r.json() == {"error": service.NO_MODEL_CARD}
    assert r.headers.get("x-faceage-model") == "face_age:r36nocard"
