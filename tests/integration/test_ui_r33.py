"""Round-33 review of the Gradio UI, in headless Chromium (``test_ui``'s way): a user can read the served model's card.

The page named the model and its test MAE in one line, and gave no way to read its card (the external sets' MAE,
the known limits, the lineage), though ``GET /model_card`` serves it. Checked on the UI as the service mounts it
(:class:`faceage.ui.LazyUI`, served by uvicorn) with a card holding HTML that must stay text, and on the real
served bento against what its ``/model_card`` answers.
"""

from __future__ import annotations

import socket
import threading
import time

import pytest
import requests

import tests.integration.test_ui as ui_tests
from faceage.ui import LazyUI
from tests.integration.test_ui import TIMEOUT_MS

SHOWN_MS = 10_000  # for what is on the page once the header is

browser = ui_tests.browser  # its fixture: headless Chromium

pytestmark = pytest.mark.integration

CARD = """# Model card: FaceAge resnet18

## Test metrics
| metric | test split | `utk_external` |
|---|---:|---:|
| MAE, apparent age (years) | 4.58 | 7.05 |

## Known limits
- Group <unknown> & 0-9: few faces. <script>window.pwned = 1</script>
- <img src=x onerror="window.pwned = 1"> ${window.pwned = 1} [click](javascript:window.pwned=1)

## Lineage
- MLflow run `abc123`
"""


class CardService:
    """The service as the UI sees it (``bentoml.get_current_service()``): its ``card`` is what /model_card serves."""

    def __init__(self, card: str | None) -> None:
        self.card = card


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def mounted_ui(monkeypatch, tmp_path):
    """Serves the UI the service mounts (LazyUI's app, Gradio's queue in its lifespan) for a card; its base URL."""
    import bentoml
    import uvicorn

    servers = []

    def serve(card: str | None) -> str:
        monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path / "gradio"))
        monkeypatch.setattr(bentoml, "get_current_service", lambda: CardService(card))
        lazy = LazyUI()
        lazy.configure({"registered_version": "7", "test_mae_years": 4.58}, 10_000_000)
        port = _free_port()
        server = uvicorn.Server(uvicorn.Config(lazy._build(), host="127.0.0.1", port=port, log_level="warning"))
        thread = threading.Thread(target=server.run, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 60
        while not server.started:
            assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return f"http://127.0.0.1:{port}"

    yield serve
    for server, thread in servers:
        server.should_exit = True
        thread.join(30)


def open_card(page, url: str) -> str:
    """Opens the UI, then its "Model card" section; the section's text."""
    page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    page.wait_for_selector("#model", timeout=TIMEOUT_MS)
    page.get_by_role("button", name="Model card").click(timeout=SHOWN_MS)
    page.wait_for_selector("#model-card-text h1", timeout=TIMEOUT_MS)
    return page.inner_text("#model-card")


def test_the_model_card_is_shown_rendered_and_its_html_stays_text(browser, mounted_ui):
    """A user reads the card in the page: its headings and tables rendered, any HTML in it shown as written (a
    group name like "<unknown>" is not swallowed, a script in it does not run)."""
    url = mounted_ui(CARD)
    page = browser.new_page()
    try:
        open_card(page, url)
        text = page.inner_text("#model-card-text")
        headings = page.eval_on_selector_all("#model-card-text h2", "(hs) => hs.map((h) => h.innerText.trim())")
        cells = page.eval_on_selector_all("#model-card-text td", "(tds) => tds.map((td) => td.innerText.trim())")
        injected = page.evaluate("[window.pwned ?? null, document.querySelectorAll('#model-card-text img, "
                                 "#model-card-text script, #model-card-text a[href^=javascript]').length]")
    finally:
        page.close()
    assert headings == ["Test metrics", "Known limits", "Lineage"], headings
    assert cells == ["MAE, apparent age (years)", "4.58", "7.05"], cells
    assert "Group <unknown> & 0-9: few faces. <script>window.pwned = 1</script>" in text, text
    assert '<img src=x onerror="window.pwned = 1"> ${window.pwned = 1}' in text, text
    assert injected == [None, 0], injected


WIDE_CARD = """# Model card: FaceAge dlib_age

## Data
- Source: `appa-real-sample`; sha256 of all files: `e0323da862db151cf08200199f5d553079abfd666870eebbca2930d67616947f`.

### By age group (true apparent age)
| age group | faces | MAE (years) | mean error (years; + = predicted too old) | within 1 std |
|---|---:|---:|---:|---:|
| 10-19 | 36 | 5.40 | +3.75 | 0.611 |
"""
# What of the card runs past the screen's right edge, cut off (the page does not scroll sideways): elements outside
# a table, and the tables' own boxes (a table may scroll sideways inside its box).
CUT_OFF = """(() => {
    const card = document.querySelector('#model-card-text');
    return [...card.querySelectorAll('*')]
        .filter((e) => !e.parentElement.closest('table') && e.getBoundingClientRect().right > innerWidth + 0.5)
        .map((e) => `${e.tagName}: ${e.textContent.slice(0, 30)} ends at ${e.getBoundingClientRect().right} px`);
})()"""


def test_on_a_phone_the_card_fits_the_screen(browser, mounted_ui):
    """On a phone's screen (390 x 844 CSS px) the card's sha256 and its wide tables ran past the screen's right edge,
    cut off: the page does not scroll sideways. The hash wraps; a wide table scrolls sideways in its own box."""
    url = mounted_ui(WIDE_CARD)
    page = browser.new_page(viewport={"width": 390, "height": 844})
    try:
        open_card(page, url)
        page.wait_for_timeout(300)  # the layout settles around the opened card
        cut_off = page.evaluate(CUT_OFF)
        hash_shown = page.inner_text("#model-card-text").replace("\n", "")
        table = page.eval_on_selector("#model-card-text table", "(t) => [t.scrollWidth > t.clientWidth, "
                                      "(t.scrollLeft = 1e6, t.scrollLeft > 0)]")
    finally:
        page.close()
    assert cut_off == [], cut_off
    assert "e0323da862db151cf08200199f5d553079abfd666870eebbca2930d67616947f" in hash_shown
    assert table == [True, True], table  # wider than the screen, and its last columns can be scrolled to


def test_a_model_without_a_card_says_so_in_one_line(browser, mounted_ui):
    url = mounted_ui(None)
    page = browser.new_page()
    try:
        page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        page.wait_for_selector("#model", timeout=TIMEOUT_MS)
        page.wait_for_selector("#model-card", timeout=SHOWN_MS)
        line = page.inner_text("#model-card").strip()
        sections = page.get_by_role("button", name="Model card").count()
    finally:
        page.close()
    assert "no model card" in line.lower() and "\n" not in line and sections == 0, (line, sections)


def test_the_served_ui_shows_the_card_get_model_card_serves(browser, bento_server):
    """On the real served bento: the page's card is the one ``GET /model_card`` answers."""
    served = requests.get(bento_server.url + "/model_card", timeout=60)
    assert served.status_code == 200, served.text[:300]
    page = browser.new_page()
    try:
        shown = open_card(page, bento_server.url)
    finally:
        page.close()
    headings = [line.lstrip("#").strip() for line in served.text.splitlines() if line.startswith("#")]
    assert len(headings) >= 5 and all(h.replace("`", "") in shown for h in headings), (headings, shown[:2000])
    assert f"{bento_server.package['test_mae_years']:.2f}" in shown
