"""Round-30 review of the Gradio UI, in headless Chromium on the served bento: no stale error beside a new photo.

A file that is not a photo fails its analysis in the real service (``faceage.images``: "not an image"); what the
page shows of that failure (Gradio's "Error" badge and the error's message) must go with its photo.
"""

from __future__ import annotations

import pytest

import tests.integration.test_ui as ui_tests
from tests.integration.test_ui import TIMEOUT_MS

browser = ui_tests.browser  # its fixture: headless Chromium on the served bento

pytestmark = pytest.mark.integration

FAILURE = "the uploaded file"  # the end of every decode error's message the UI shows
# The "Error" badge Gradio's status tracker shows on an output of a failed event, and the error's message.
BADGES = "document.querySelectorAll('#annotated .error, #faces .error').length"
TOASTS = "document.querySelectorAll('[data-testid=toast-body]').length"


def upload(page, photo) -> None:
    page.set_input_files("#photo input[type=file]", str(photo))
    page.wait_for_selector(f"#photo img[src*='{photo.name}']", state="attached", timeout=TIMEOUT_MS)


def fail_an_analysis(page) -> None:
    """Presses the button and waits until the page shows the failure: a badge and the error message."""
    page.click("#submit")
    page.wait_for_selector(f"text={FAILURE}", timeout=TIMEOUT_MS)
    page.wait_for_function(f"{BADGES} > 0", timeout=TIMEOUT_MS)


def settled(page) -> list[int]:
    """The error badges and messages still shown, once 3 s have passed without them going."""
    try:
        page.wait_for_function(f"{BADGES} === 0 && {TOASTS} === 0", timeout=3000)
    except Exception:  # Playwright's timeout: the assertion says what stayed
        pass
    return page.evaluate(f"[{BADGES}, {TOASTS}]")


def test_a_new_or_removed_photo_takes_the_last_analysis_error_away(browser, bento_server, wild_dir):
    """After a failed analysis, the "Error" badges on the annotated photo and the table, and the error's
    message, stayed beside a newly uploaded photo (and an emptied input) until the button was pressed again."""
    not_a_photo, photo = wild_dir / "derived_not_an_image.jpg", wild_dir / "fr_obama.jpg"
    page = browser.new_page()
    try:
        page.goto(bento_server.url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        page.wait_for_selector("#photo input[type=file]", state="attached", timeout=TIMEOUT_MS)
        upload(page, not_a_photo)
        fail_an_analysis(page)
        upload(page, photo)
        after_new_photo = settled(page)
        upload(page, not_a_photo)
        fail_an_analysis(page)
        page.click("#photo button[aria-label='Remove Image']", timeout=TIMEOUT_MS)
        page.wait_for_selector(f"#photo img[src*='{not_a_photo.name}']", state="detached", timeout=TIMEOUT_MS)
        after_removal = settled(page)
    finally:
        page.close()
    assert after_new_photo == [0, 0], f"badges, messages beside the new photo: {after_new_photo}"
    assert after_removal == [0, 0], f"badges, messages beside the emptied input: {after_removal}"
