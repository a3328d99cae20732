"""Round-31 review of the Gradio UI, second part, in headless Chromium on the served bento (``test_ui``'s way): what a
screen reader announces for the examples, what the "Use via API" page says the photo may be, and the annotated
photo's corner buttons on a phone's screen.
"""

from __future__ import annotations

import pytest

import tests.integration.test_ui as ui_tests
from tests.integration.test_ui import TIMEOUT_MS

browser = ui_tests.browser  # its fixture: headless Chromium on the served bento

pytestmark = pytest.mark.integration


def open_ui(page, url: str) -> None:
    page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    page.wait_for_selector("#examples button", timeout=TIMEOUT_MS)


def test_examples_have_names_and_the_api_page_does_not_offer_urls(browser, bento_server):
    """The example buttons held only a thumbnail without text (a screen reader announced "button", twice), and the
    "Use via API" page described the photo as "A local filepath or publicly available URL", though URLs are refused."""
    page = browser.new_page()
    try:
        open_ui(page, bento_server.url)
        examples = page.locator("#examples button")
        names = [examples.nth(i).aria_snapshot() for i in range(examples.count())]
        page.click("text=Use via API", timeout=TIMEOUT_MS)
        page.wait_for_selector("code:has-text('client.predict(')", timeout=TIMEOUT_MS)
        api_page = page.inner_text("body")
    finally:
        page.close()
    assert len(names) == 2 and all(name.startswith('- button "') and "Astronaut" in name for name in names), names
    assert "publicly available URL" not in api_page and "uploaded" in api_page, api_page[-2000:]


def test_on_a_phone_the_corner_buttons_do_not_cover_the_annotated_photo(browser, bento_server):
    """The annotated photo's full-screen, download and share buttons sat over its top right corner, and its name
    ("Faces") over its top left one: on a phone, over the labels of faces there."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        open_ui(page, bento_server.url)
        page.click("#examples button", timeout=TIMEOUT_MS)  # the astronaut
        page.wait_for_selector("#photo img", timeout=TIMEOUT_MS)
        page.click("#submit")
        page.wait_for_selector("#annotated img", timeout=TIMEOUT_MS)
        page.wait_for_timeout(300)  # the layout settles around the shown photo
        image = page.locator("#annotated img").bounding_box()
        chrome = page.locator("#annotated button:not(:has(img)), #annotated [data-testid=block-label]")
        buttons = [b for b in (chrome.nth(i).bounding_box() for i in range(chrome.count())) if b and b["width"]]
    finally:
        page.close()

    def overlaps(a, b) -> bool:
        return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
                and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])

    assert buttons and image["width"] > 300, (image, buttons)
    assert not [b for b in buttons if overlaps(b, image)], (image, buttons)
