"""Round-35 review of the Gradio UI: what a user reads when an analysis fails for no fault of the photo, and what a
screen reader announces for the annotated photo.

The UI's real app (:class:`faceage.ui.LazyUI`, Gradio's queue in its lifespan) is driven over ASGI, as a browser or
``gradio_client`` calls it, with a stand-in for the service's ``analyse``.
"""

from __future__ import annotations

import asyncio
import json
import logging

import httpx
import numpy as np
import pytest

from faceage.predict import FaceAge
from faceage.ui import EXAMPLES_DIR, UI_INTERNAL_ERROR, build_ui, ui_predict
from tests.unit.test_ui_r30 import started_ui

FILE_META = {"_type": "gradio.FileData"}
# What an unexpected failure says about the server: an ONNX Runtime error names its files and nodes.
SECRET = "/opt/bentoml/models/face_age/abc123/model.onnx"


class BrokenService:
    """The service's ``analyse`` failing as a bug or the runtime does (not a bad photo, not a busy pool)."""

    async def analyse(self, data: bytes, *, with_image: bool = False):
        raise RuntimeError(f"[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Non-zero status code returned while "
                           f"running Conv node. Name:'/backbone/conv1/Conv' ({SECRET})")


class OneFaceService:
    async def analyse(self, data: bytes, *, with_image: bool = False):
        face = FaceAge(box=(10, 10, 60, 60), age=30.0, age_std=3.0, score=1.0)
        return None, [face], np.zeros((100, 100, 3), np.uint8)


def _use(monkeypatch, service) -> None:
    import bentoml

    monkeypatch.setattr(bentoml, "get_current_service", lambda: service)


def test_an_unexpected_failure_reads_as_the_apis_sentence_and_is_logged(monkeypatch, caplog, tmp_path):
    """The UI showed the exception's own text (Gradio's ``show_error``): runtime internals and the server's paths,
    where ``/predict`` answers "internal error while analysing the photo (the server logged why)"."""
    import gradio as gr

    _use(monkeypatch, BrokenService())
    photo = tmp_path / "photo.jpg"
    photo.write_bytes((EXAMPLES_DIR / "astronaut.jpg").read_bytes())
    with caplog.at_level(logging.ERROR, logger="faceage.ui"), pytest.raises(gr.Error) as e:
        asyncio.run(ui_predict(str(photo), 20_000_000))
    assert e.value.message == UI_INTERNAL_ERROR and SECRET not in e.value.message
    assert "internal error while analysing the photo (the server logged why)" in UI_INTERNAL_ERROR.lower()
    [record] = [r for r in caplog.records if r.name == "faceage.ui"]
    assert record.exc_info and SECRET in str(record.exc_info[1])  # the server's log keeps why


def _events(stream: str) -> list[tuple[str, str]]:
    """Gradio's server-sent events: ``[(event, data), ...]``."""
    out = []
    for block in stream.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if ": " in line)
        out.append((fields.get("event", ""), fields.get("data", "")))
    return out


def _call_predict(monkeypatch, service) -> list[tuple[str, str]]:
    """Uploads the astronaut and runs the UI's ``predict`` through the mounted app; its events."""
    _use(monkeypatch, service)

    async def scenario():
        lazy = await started_ui(concurrency=1)
        try:
            transport = httpx.ASGITransport(app=lazy.app)
            async with httpx.AsyncClient(transport=transport, base_url="http://ui.test", timeout=60) as client:
                photo = (EXAMPLES_DIR / "astronaut.jpg").read_bytes()
                r = await client.post("/ui/gradio_api/upload", files={"files": ("a.jpg", photo, "image/jpeg")})
                assert r.status_code == 200, r.text
                r = await client.post("/ui/gradio_api/call/predict",
                                      json={"data": [{"path": r.json()[0], "meta": FILE_META}]})
                assert r.status_code == 200, r.text
                r = await client.get(f"/ui/gradio_api/call/predict/{r.json()['event_id']}")
                return _events(r.text)
        finally:
            await lazy.close()

    return asyncio.run(scenario())


def test_the_mounted_ui_shows_the_sentence_not_the_runtimes_text(monkeypatch):
    [(event, data)] = _call_predict(monkeypatch, BrokenService())
    assert event == "error" and SECRET not in data and "ONNXRuntimeError" not in data
    assert json.loads(data)["error"] == UI_INTERNAL_ERROR


def _served_components(monkeypatch) -> dict[str, dict]:
    """The components of the page as the mounted app serves them to the browser (``/ui/config``), by elem_id."""
    _use(monkeypatch, OneFaceService())

    async def scenario():
        lazy = await started_ui()
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=lazy.app),
                                         base_url="http://ui.test") as client:
                r = await client.get("/ui/config")
                assert r.status_code == 200, r.text
                return r.json()
        finally:
            await lazy.close()

    config = asyncio.run(scenario())
    return {c["props"]["elem_id"]: c["props"] for c in config["components"] if c.get("props", {}).get("elem_id")}


def test_the_annotated_photo_has_a_name_of_its_own_for_a_screen_reader(monkeypatch):
    """The annotated photo was an ``<img alt="">`` inside a button (it opens full screen): a screen reader announced
    an unnamed "button". Its label, "Faces", was also the table's: two regions, and the "Use via API" page's two
    outputs, named alike."""
    served = _served_components(monkeypatch)
    annotated, table = served["annotated"], served["faces"]
    assert annotated.get("alt_text") and "table" in annotated["alt_text"].lower()  # where the ages are read
    assert annotated["label"] != table["label"] and table["label"] == "Faces"
    blocks = build_ui({"registered_version": "1"}, 20_000_000)
    api = blocks.get_api_info()["named_endpoints"]["/predict"]["returns"]
    assert len({r["label"] for r in api}) == 2, api


def test_a_normal_analysis_still_returns_the_annotated_photo_and_its_table(monkeypatch):
    [*_, (event, data)] = _call_predict(monkeypatch, OneFaceService())
    shown, table = json.loads(data)
    assert event == "complete" and shown["path"].endswith("faces.jpg")
    assert table["headers"][:2] == ["face", "age"] and table["data"] == [[1, 30.0, 3.0, "30 \u00b1 3", "[10, 10, 60, 60]", 1.0]]

