"""Round-29 review of the Gradio UI, in headless Chromium against the real served bento (``test_ui``'s way).

A user uploads one photo after another: what the page shows must be the faces of the photo it shows.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout

import tests.integration.test_ui as ui_tests
from tests.integration.test_ui import TIMEOUT_MS, upload_and_run

browser = ui_tests.browser  # its fixture: headless Chromium on the served bento

pytestmark = pytest.mark.integration

ROWS = "(document.querySelector('#faces [role=grid]')?.getAttribute('aria-rowcount') ?? null)"
CLEARED = f"!document.querySelector('#annotated img') && ['1', null].includes({ROWS})"  # no photo, header only


def shown(page) -> tuple[bool, str | None]:
    """Whether the page shows an annotated photo, and the table's row count (header included; None: no grid)."""
    return tuple(page.evaluate(f"[!!document.querySelector('#annotated img'), {ROWS}]"))


def upload_another(page, photo: Path) -> None:
    """Puts ``photo`` in the photo input in place of the one there, and waits until the page shows it."""
    page.set_input_files("#photo input[type=file]", str(photo))
    page.wait_for_selector(f"#photo img[src*='{photo.name}']", timeout=TIMEOUT_MS)


def test_a_new_photo_takes_the_last_photos_faces_away(browser, bento_server, wild_dir):
    """The annotated photo and table of faces of the last photo stayed beside a newly uploaded one, as if they
    were its faces, until the button was pressed again."""
    page = browser.new_page()
    try:
        upload_and_run(page, bento_server.url, wild_dir / "fr_two_people.jpg")
        page.wait_for_selector("#annotated img", timeout=TIMEOUT_MS)
        page.wait_for_function(f"{ROWS} === '3'", timeout=TIMEOUT_MS)  # header + two faces
        upload_another(page, wild_dir / "fr_obama_small.jpg")
        try:
            page.wait_for_function(CLEARED, timeout=15_000)
        except PlaywrightTimeout:
            pass  # the assertion below says what stayed
        after_upload = shown(page)
    finally:
        page.close()
    assert after_upload == (False, "1") or after_upload == (False, None), after_upload


def test_a_photo_changed_while_the_last_is_analysed_gets_its_own_faces(browser, bento_server, wild_dir):
    """Pressing the button again while a large photo was still being analysed did nothing (Gradio runs a click
    once at a time), and the large photo's faces came back beside the new photo."""
    large, small = wild_dir / "derived_large_6000x3375_pexels-214576.jpg", wild_dir / "fr_obama_small.jpg"
    page = browser.new_page()
    try:
        upload_and_run(page, bento_server.url, large)  # 20 MP: seconds of analysis
        upload_another(page, small)
        page.click("#submit")
        page.wait_for_function(f"['2', '3'].includes({ROWS})", timeout=TIMEOUT_MS)  # one face, or the large's two
        page.wait_for_timeout(2000)  # anything still to come
        table = page.inner_text("#faces")
    finally:
        page.close()
    served = requests.post(bento_server.url + "/predict", files={"image": small.open("rb")}, timeout=120).json()
    assert len(served["faces"]) == 1
    assert str(served["faces"][0]["box"]) in table, table
