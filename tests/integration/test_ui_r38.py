"""Round-38 review of the Gradio UI in a real browser (headless Chromium): the page as a phone shows it.

The UI the service mounts (:class:`faceage.ui.LazyUI`'s app, Gradio's queue in its lifespan) is served by uvicorn on
127.0.0.1, with a stand-in for the service's ``analyse`` (no model needed).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pytest

import tests.integration.test_ui as ui_tests
from faceage.annotate import PHONE_SHOWN_WIDTH_PX
from faceage.predict import FaceAge
from faceage.ui import EXAMPLES_DIR, LazyUI
from tests.integration.test_ui import TIMEOUT_MS
from tests.integration.test_ui_r33 import _free_port

browser = ui_tests.browser  # its fixture: headless Chromium

pytestmark = pytest.mark.integration


class LandscapeService:
    """The service as the UI sees it: every photo is a 2048 x 1536 one (a phone's, as the UI draws it) with a face."""

    card = None

    async def analyse(self, data: bytes, *, with_image: bool = False):
        face = FaceAge(box=(200, 500, 456, 756), age=30.0, age_std=4.0, score=0.9)
        return None, [face], np.full((1536, 2048, 3), 128, np.uint8)


@pytest.fixture
def served_ui(monkeypatch, tmp_path):
    """The mounted UI, served on 127.0.0.1; its base URL."""
    import bentoml
    import uvicorn

    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
    monkeypatch.setattr(bentoml, "get_current_service", lambda: LandscapeService())
    lazy = LazyUI()
    lazy.configure({"registered_version": "7", "test_mae_years": 4.58}, 10_000_000)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(lazy._build(), host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    server.should_exit = True
    thread.join(30)


def test_on_a_360_px_phone_the_annotated_photo_is_as_wide_as_its_labels_are_sized_for(browser, served_ui):
    """Labels are sized to be legible with the photo shown ``PHONE_SHOWN_WIDTH_PX`` wide (faceage.annotate), which was
    400 px, "a phone's screen": on a 360-px-wide phone (the most common width) the page shows the annotated photo
    294 px wide, and a crowd's labels' digits were under 5.5 px tall."""
    page = browser.new_page(viewport={"width": 360, "height": 800})
    try:
        page.goto(served_ui + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        page.wait_for_selector("#photo input[type=file]", state="attached", timeout=TIMEOUT_MS)
        page.set_input_files("#photo input[type=file]", str(EXAMPLES_DIR / "astronaut.jpg"))
        page.wait_for_selector("#photo img", timeout=TIMEOUT_MS)
        page.click("#submit")
        page.wait_for_function("() => document.querySelector('#annotated img')?.naturalWidth > 0",
                               timeout=TIMEOUT_MS)
        shown, natural = page.eval_on_selector("#annotated img", "img => [img.clientWidth, img.naturalWidth]")
    finally:
        page.close()
    assert natural == 2048
    assert shown >= PHONE_SHOWN_WIDTH_PX, (shown, PHONE_SHOWN_WIDTH_PX)
