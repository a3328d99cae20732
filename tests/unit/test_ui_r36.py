"""Round-36 review of the Gradio UI, as a user of the page reads it.

The UI's real app (:class:`faceage.ui.LazyUI`, Gradio's queue in its lifespan) is driven over ASGI, as a browser or
``gradio_client`` calls it, with a stand-in for the service's ``analyse``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from faceage.ui import EXAMPLES_DIR, UI_INTERNAL_ERROR, ui_predict
from tests.unit.test_ui_r35 import _call_predict, _use

# A message meant for the user, raised on purpose inside the analysis (gr.Error, Gradio's user-facing error).
MEANT_FOR_THE_USER = "This photo is too dark to find faces in: try one taken in daylight."


class UserErrorService:
    """The service's ``analyse`` refusing a photo with a message for the user (``gr.Error``)."""

    async def analyse(self, data: bytes, *, with_image: bool = False):
        import gradio as gr

        raise gr.Error(MEANT_FOR_THE_USER, title="Too dark", print_exception=False)


def test_a_deliberate_user_facing_error_passes_through_unmasked_and_unlogged(monkeypatch, caplog, tmp_path):
    """The catch-all for unexpected failures also caught ``gr.Error``: its message (meant for the user) became the
    internal-error sentence, and the server logged a traceback for a refusal that is no bug."""
    import gradio as gr

    _use(monkeypatch, UserErrorService())
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((EXAMPLES_DIR / "astronaut.jpg").read_bytes())
    with caplog.at_level(logging.ERROR, logger="faceage.ui"), pytest.raises(gr.Error) as e:
        asyncio.run(ui_predict(str(photo), 20_000_000))
    assert e.value.message == MEANT_FOR_THE_USER and e.value.title == "Too dark"
    assert not [r for r in caplog.records if r.name == "faceage.ui"]


def test_the_mounted_ui_shows_the_deliberate_message_not_the_internal_error(monkeypatch):
    [(event, data)] = _call_predict(monkeypatch, UserErrorService())
    assert event == "error"
    shown = json.loads(data)
    assert shown["error"] == MEANT_FOR_THE_USER and shown["error"] != UI_INTERNAL_ERROR
    assert shown["title"] == "Too dark"


def predict_events(monkeypatch, capfd, photo_input) -> tuple[list[tuple[str, str]], str]:
    """Calls the mounted UI's ``predict`` with ``photo_input`` as its photo, as a client of its API does (no upload
    first); its events and what the server printed meanwhile."""
    import httpx

    from tests.unit.test_ui_r30 import started_ui
    from tests.unit.test_ui_r35 import OneFaceService, _events

    _use(monkeypatch, OneFaceService())

    async def scenario():
        lazy = await started_ui(concurrency=1)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=lazy.app), base_url="http://ui.test",
                                         timeout=60) as client:
                capfd.readouterr()  # the start-up's output, not the request's
                r = await client.post("/ui/gradio_api/call/predict", json={"data": [photo_input]})
                assert r.status_code == 200, r.text
                r = await client.get(f"/ui/gradio_api/call/predict/{r.json()['event_id']}")
                return _events(r.text)
        finally:
            await lazy.close()

    events = asyncio.run(scenario())
    return events, capfd.readouterr().err


def test_a_refused_url_is_one_message_for_the_client_and_no_traceback_in_the_log(monkeypatch, capfd):
    """Any client of the UI's API could send ``{"path": "https://..."}``: the refusal (the client's mistake) was
    logged as a 25-line traceback each time, Gradio's default for a ``gr.Error``, flooding the service's log."""
    from tests.unit.test_ui_r35 import FILE_META

    [(event, data)], logged = predict_events(monkeypatch, capfd, {"path": "https://example.com/a.jpg",
                                                                   "meta": FILE_META})
    assert event == "error" and "does not fetch URLs" in json.loads(data)["error"]
    assert "Traceback" not in logged and "move_local_only" not in logged, logged


def test_a_ui_that_failed_to_load_says_so_without_the_exceptions_text(caplog):
    """``/ui`` answered 503 with the exception's own text (a path, a runtime's internals) to anyone who opened it;
    the API's 500 says the server logged why, and so does this now."""
    import httpx

    from faceage.ui import LazyUI, UIMiddleware

    secret = "/opt/bentoml/models/face_age/abc123"

    async def api(scope, receive, send):
        raise AssertionError("a /ui request reached the API")

    async def scenario():
        lazy = LazyUI()
        # a lineage the build cannot read (model_line's float()): a real failure of the real build
        lazy.configure({"registered_version": "1", "test_mae_years": secret}, 20_000_000)
        await lazy.start()
        await lazy.wait(120)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=UIMiddleware(api, lazy)),
                                         base_url="http://ui.test") as client:
                return await client.get("/ui/")
        finally:
            await lazy.close()

    with caplog.at_level(logging.ERROR, logger="faceage.ui"):
        r = asyncio.run(scenario())
    assert r.status_code == 503 and r.headers["content-type"].startswith("application/json")
    assert secret not in r.text and "the server logged why" in r.json()["error"]
    [record] = [rec for rec in caplog.records if rec.name == "faceage.ui"]
    assert record.exc_info and secret in str(record.exc_info[1])  # the log keeps why
