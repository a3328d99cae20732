"""Round-31 review of the Gradio UI, in headless Chromium on the served bento (``test_ui``'s way): a new user's walk
through it (examples, uploads, removal, a phone's screen, the "Use via API" page).
"""

from __future__ import annotations

import pytest

import tests.integration.test_ui as ui_tests
from tests.integration.test_ui import TIMEOUT_MS

browser = ui_tests.browser  # its fixture: headless Chromium on the served bento

pytestmark = pytest.mark.integration

HEADERS = ["face", "age", "age_std", "label", "box", "score"]
SHOWN_HEADERS = "[...document.querySelectorAll('#faces thead th')].map((th) => th.innerText.trim())"


def open_ui(page, url: str) -> None:
    page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    page.wait_for_selector("#photo input[type=file]", state="attached", timeout=TIMEOUT_MS)


def upload(page, photo) -> None:
    page.set_input_files("#photo input[type=file]", str(photo))
    page.wait_for_selector(f"#photo img[src*='{photo.name}']", state="attached", timeout=TIMEOUT_MS)


def headers_once_settled(page) -> list[str]:
    """The table's column headers, once they are the expected ones or 3 s have passed."""
    try:
        page.wait_for_function(f"JSON.stringify({SHOWN_HEADERS}) === {HEADERS!r}".replace("'", '"'), timeout=3000)
    except Exception:  # Playwright's timeout: the assertion says what is shown
        pass
    return page.evaluate(SHOWN_HEADERS)


def test_the_table_keeps_its_column_names_when_the_photo_changes(browser, bento_server, wild_dir):
    """Uploading (or removing) a photo emptied the table of faces by setting it to nothing, and Gradio then showed
    its columns as "0 1 2 3 4 5" instead of "face age age_std label box score" until an analysis came back."""
    page = browser.new_page()
    try:
        open_ui(page, bento_server.url)
        upload(page, wild_dir / "fr_obama_small.jpg")
        after_upload = headers_once_settled(page)
        page.click("#photo button[aria-label='Remove Image']", timeout=TIMEOUT_MS)
        page.wait_for_selector("#photo img", state="detached", timeout=TIMEOUT_MS)
        after_removal = headers_once_settled(page)
    finally:
        page.close()
    assert after_upload == HEADERS, after_upload
    assert after_removal == HEADERS, after_removal


def test_an_example_photo_is_shown_in_the_photo_input(browser, bento_server):
    """Clicking an example put a broken image in the photo input: Gradio answered the example's URL without the
    UI's /ui prefix (its direct-call route takes the mounted path for its own), a 404, though the analysis worked."""
    page = browser.new_page()
    try:
        open_ui(page, bento_server.url)
        page.click("#examples button", timeout=TIMEOUT_MS)  # the astronaut
        page.wait_for_selector("#photo img", timeout=TIMEOUT_MS)
        loaded = ("(() => { const img = document.querySelector('#photo img');"
                  " return img.complete && img.naturalWidth > 0 })()")
        try:
            page.wait_for_function(loaded, timeout=10_000)
        except Exception:  # Playwright's timeout: the assertion says what is shown
            pass
        src, shown = page.get_attribute("#photo img", "src"), page.evaluate(loaded)
        status = page.request.get(src).status
    finally:
        page.close()
    assert shown and status == 200, (src, status)


def test_the_api_page_example_uploads_a_file(browser, bento_server):
    """The page's "Use via API" snippet passed Gradio's default example, a URL of a photo on GitHub, and the UI
    refuses URLs: copied as it was, it failed with "the UI does not fetch URLs"."""
    page = browser.new_page()
    try:
        open_ui(page, bento_server.url)
        page.click("text=Use via API", timeout=TIMEOUT_MS)
        page.wait_for_selector("code:has-text('client.predict(')", timeout=TIMEOUT_MS)  # the Python snippet
        snippet = page.inner_text("code:has-text('client.predict(')")
    finally:
        page.close()
    assert "handle_file('photo.jpg')" in snippet, snippet


def test_on_a_phone_the_button_is_in_view_once_a_photo_is_uploaded(browser, bento_server, wild_dir):
    """On a phone's screen (390 x 844 CSS px) the "Estimate ages" button came after the empty annotated photo and the
    table, below the fold: a user who had just uploaded a photo saw no way to analyse it without scrolling."""
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        open_ui(page, bento_server.url)
        upload(page, wild_dir / "dlib_2008_007676.jpg")
        page.wait_for_timeout(500)  # the layout settles around the shown photo
        bottom, height = page.evaluate("[document.querySelector('#submit').getBoundingClientRect().bottom,"
                                       " innerHeight]")
    finally:
        page.close()
    assert bottom <= height, f"the button ends at {bottom} px, the screen at {height} px"
