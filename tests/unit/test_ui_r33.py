"""Round-33 review of the Gradio UI, without a browser: the page shows the served model's card.

The UI gave a user no way to read the card of the model it talks to (test and external MAE, known limits,
lineage), though ``GET /model_card`` serves it. The card is read once, when the UI is built, from the service's
own ``card`` (what ``/model_card`` answers), and shown as HTML rendered from its Markdown with any HTML in it
shown as text.
"""

from __future__ import annotations

import pytest

from faceage.ui import NO_MODEL_CARD_LINE, LazyUI, build_ui, model_card_html

CARD = """# Model card: FaceAge resnet18

## Test metrics
| metric | test split |
|---|---:|
| MAE, apparent age (years) | 4.58 |

## Known limits
- Group <unknown> & 0-9: few faces. <script>window.pwned = 1</script>
- <img src=x onerror="window.pwned = 1"> [click](javascript:window.pwned=1) `a <b> c`
"""


class CardService:
    """The service as the UI sees it (``bentoml.get_current_service()``): its ``card`` is what /model_card serves."""

    def __init__(self, card: str | None) -> None:
        self.card = card


def _components(blocks) -> list:
    return list(blocks.blocks.values())


def test_the_card_is_rendered_and_its_html_is_shown_as_text():
    html = model_card_html(CARD)
    assert "<h1>Model card: FaceAge resnet18</h1>" in html and "<h2>Known limits</h2>" in html
    assert "<table>" in html and ">4.58</td>" in html  # a Markdown table, as a table
    assert "<script" not in html and "<img" not in html and "<b>" not in html
    assert "&lt;script&gt;window.pwned = 1&lt;/script&gt;" in html and "Group &lt;unknown&gt; &amp; 0-9" in html
    assert "<code>a &lt;b&gt; c</code>" in html
    assert 'href="javascript:' not in html  # not a link: markdown-it refuses the scheme


def test_the_page_has_a_closed_model_card_accordion_with_the_card():
    import gradio as gr

    blocks = build_ui({"registered_version": "3", "test_mae_years": 4.58}, 1_000_000, model_card=CARD)
    [accordion] = [c for c in _components(blocks) if isinstance(c, gr.Accordion)]
    assert accordion.label == "Model card" and accordion.open is False and accordion.elem_id == "model-card"
    [card] = [c for c in _components(blocks) if isinstance(c, gr.HTML) and c.elem_id == "model-card-text"]
    assert card.value == model_card_html(CARD)
    assert not [c for c in _components(blocks) if getattr(c, "value", None) == NO_MODEL_CARD_LINE]


def test_without_a_card_the_page_says_so_in_one_line():
    import gradio as gr

    blocks = build_ui({"registered_version": "3"}, 1_000_000, model_card=None)
    assert not [c for c in _components(blocks) if isinstance(c, gr.Accordion)]
    [line] = [c for c in _components(blocks) if isinstance(c, gr.Markdown) and c.elem_id == "model-card"]
    assert line.value == NO_MODEL_CARD_LINE and "\n" not in NO_MODEL_CARD_LINE
    assert "no model card" in NO_MODEL_CARD_LINE.lower()


@pytest.mark.parametrize("card", [CARD, None])
def test_the_mounted_ui_shows_the_card_the_service_serves(monkeypatch, card):
    import bentoml
    import gradio as gr

    monkeypatch.setattr(bentoml, "get_current_service", lambda: CardService(card))
    lazy = LazyUI()
    lazy.configure({"registered_version": "1"}, 1_000_000)
    [mount] = [r for r in lazy._build().routes if getattr(r, "path", "") == "/ui"]
    shown = [c.value for c in _components(mount.app.get_blocks()) if isinstance(c, gr.HTML)
             and c.elem_id == "model-card-text"]
    assert shown == ([model_card_html(card)] if card else [])


def test_without_a_running_service_the_ui_builds_without_a_card():
    import gradio as gr

    lazy = LazyUI()  # no bentoml.get_current_service() here: "service isn't instantiated yet"
    lazy.configure({"registered_version": "1"}, 1_000_000)
    [mount] = [r for r in lazy._build().routes if getattr(r, "path", "") == "/ui"]
    lines = [c.value for c in _components(mount.app.get_blocks()) if isinstance(c, gr.Markdown)
             and c.elem_id == "model-card"]
    assert lines == [NO_MODEL_CARD_LINE]
