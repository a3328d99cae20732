"""Round-30 review of the Gradio UI, without a browser: the analysis queue is bounded.

The UI's real app (:class:`faceage.ui.LazyUI`, Gradio's queue running in its lifespan) is driven over ASGI
with a stand-in for the service whose analysis waits until the test lets it go.
"""

from __future__ import annotations

import asyncio

import httpx
import numpy as np
import pytest

from faceage.predict import FaceAge
from faceage.ui import EXAMPLES_DIR, LazyUI

FILE_META = {"_type": "gradio.FileData"}


class HeldService:
    """The service's ``analyse``, held until ``release`` is set; counts the analyses that started."""

    def __init__(self) -> None:
        self.started = 0
        self.release = asyncio.Event()

    async def analyse(self, data: bytes, *, with_image: bool = False):
        self.started += 1
        await self.release.wait()
        face = FaceAge(box=(10, 10, 60, 60), age=30.0, age_std=3.0, score=1.0)
        return None, [face], np.zeros((100, 100, 3), np.uint8)


async def _until(condition, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


@pytest.fixture
def held_service(monkeypatch):
    import bentoml

    service = HeldService()
    monkeypatch.setattr(bentoml, "get_current_service", lambda: service)
    return service


async def started_ui(**configure) -> LazyUI:
    """The UI mounted as the service mounts it (a 20 MB body cap, ``configure``'s other settings), its app built."""
    lazy = LazyUI()
    lazy.configure({"registered_version": "1"}, 20_000_000, **configure)
    await lazy.start()
    await lazy.wait(120)
    assert lazy.app is not None, lazy.error
    return lazy


def test_the_analysis_queue_is_bounded(held_service):
    """Gradio's queue had no size: every photo sent to the UI's API while the analyses were busy waited in
    memory, however many; past the bound a request is refused at once (503, "Queue is full")."""

    async def scenario():
        lazy = await started_ui(concurrency=1)
        transport = httpx.ASGITransport(app=lazy.app)
        try:
            async with httpx.AsyncClient(transport=transport, base_url="http://ui.test") as client:
                photo = (EXAMPLES_DIR / "astronaut.jpg").read_bytes()
                r = await client.post("/ui/gradio_api/upload", files={"files": ("a.jpg", photo, "image/jpeg")})
                assert r.status_code == 200, r.text
                payload = {"data": [{"path": r.json()[0], "meta": FILE_META}]}

                async def join() -> httpx.Response:
                    return await client.post("/ui/gradio_api/call/predict", json=payload)

                first = await join()
                await _until(lambda: held_service.started == 1)  # it is analysed, no longer waiting
                waiting = [await join() for _ in range(2)]  # the default bound: twice the analyses at once
                refused = await join()
                held_service.release.set()
        finally:
            await lazy.close()
        return first, waiting, refused

    first, waiting, refused = asyncio.run(scenario())
    assert first.status_code == 200 and [r.status_code for r in waiting] == [200, 200]
    assert refused.status_code == 503 and "Queue is full" in refused.text, (refused.status_code, refused.text)


def test_the_ui_queue_size_is_a_service_setting(monkeypatch):
    from faceage.http import Limits

    assert Limits.from_env().ui_queue_size == 0  # unset: build_ui's default, UI_QUEUE_FACTOR x the slots
    monkeypatch.setenv("FACEAGE_UI_QUEUE_SIZE", "5")
    assert Limits.from_env().ui_queue_size == 5
    monkeypatch.setenv("FACEAGE_UI_QUEUE_SIZE", "-1")
    with pytest.raises(ValueError, match="FACEAGE_UI_QUEUE_SIZE must be >= 0"):
        Limits.from_env()
