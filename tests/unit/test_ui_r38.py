"""Round-38 review of the Gradio UI, as a user of the page reads it.

The UI's real app (:class:`faceage.ui.LazyUI`, Gradio's queue and cache purge in its lifespan) is driven over ASGI,
as a browser calls it, with a stand-in for the service's ``analyse``.
"""

from __future__ import annotations

import asyncio
import json
import os

import httpx

from faceage.ui import EXAMPLES_DIR, model_line
from tests.unit.test_ui_r30 import FILE_META, started_ui
from tests.unit.test_ui_r35 import OneFaceService, _events, _use


def test_a_photo_uploaded_before_the_server_restarted_is_said_to_be_gone_because_of_the_restart(monkeypatch):
    """Gradio empties its cache when the server stops ("The cache will be deleted entirely when the server
    restarts"), so a page left open across a restart still shows the photo, and its click answered "uploads are
    kept 10-15 minutes" to a user who uploaded it seconds before: the restart, the reason, was not named."""
    _use(monkeypatch, OneFaceService())

    async def scenario() -> tuple[bool, list[tuple[str, str]]]:
        lazy = await started_ui(concurrency=1)
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=lazy.app), base_url="http://ui.test",
                                         timeout=60) as client:
                photo = (EXAMPLES_DIR / "astronaut.jpg").read_bytes()
                r = await client.post("/ui/gradio_api/upload", files={"files": ("a.jpg", photo, "image/jpeg")})
                assert r.status_code == 200, r.text
                path = r.json()[0]
        finally:
            await lazy.close()  # the server stops ...
        kept = os.path.exists(path)
        lazy = await started_ui(concurrency=1)  # ... and starts again; the page, still open, sends the same photo
        try:
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=lazy.app), base_url="http://ui.test",
                                         timeout=60) as client:
                r = await client.post("/ui/gradio_api/call/predict", json={"data": [{"path": path, "meta": FILE_META}]})
                assert r.status_code == 200, r.text
                r = await client.get(f"/ui/gradio_api/call/predict/{r.json()['event_id']}")
                return kept, _events(r.text)
        finally:
            await lazy.close()

    kept, events = asyncio.run(scenario())
    assert not kept  # Gradio's own shutdown emptied the cache
    [(event, data)] = events
    assert event == "error"
    message = json.loads(data)["error"]
    assert "restart" in message and "upload it again" in message
    assert "10-15 minutes" in message  # the other reason stays named


LINEAGE = {"registered_model": "face-age", "registered_version": "3", "backbone": "dlib_age",
           "mlflow_run_name": "quick", "test_mae_years": 4.579, "external_mae_years": {"utk_external": 7.061}}


def test_the_model_line_says_which_error_to_expect_on_faces_unlike_the_training_data():
    """The page put "test MAE 4.58 years" first and "external set 'utk_external' MAE 7.06 years" after it, without
    saying that the test faces come from the collection the model was trained on and the external set from
    another one: a user read 4.6 years as the error to expect on their own photo, which is no face of that
    collection (README, "Cross-dataset evaluation")."""
    line = model_line(LINEAGE)
    assert "**4.58**" in line and "**7.06**" in line  # the figures as before, bold
    assert "collection it was trained on" in line
    assert "another collection" in line and "'utk_external'" in line
    assert "mean absolute error" in line.lower()  # "MAE" spelled out once, for a user who is no statistician


def test_the_model_line_without_an_external_set_says_the_test_faces_are_of_the_training_collection():
    line = model_line({k: v for k, v in LINEAGE.items() if k != "external_mae_years"})
    assert "**4.58**" in line and "collection it was trained on" in line
    assert "another collection" not in line
    assert model_line({}).startswith("Model **face-age v?**") and "error" not in model_line({}).lower()


# The annotated photo's width on the page of a 360-px-wide phone, the most common phone screen width, measured in
# Chromium (tests/integration/test_ui_r38.py): 294 px (324 px on a 390-px iPhone), not the 400 px labels were sized for.
PHONE_SHOWN_PX = 294


def test_a_crowd_s_labels_on_the_ui_s_photo_stay_legible_on_a_360_px_phone():
    """The UI's photo (2048 px on its long side) of a crowd, shown 294 px wide on a 360-px phone: label text was sized
    for 400 px, and the faces' numbers ("#1", room to be larger in their faces) came out 5.5 px tall there."""
    import numpy as np

    from faceage.annotate import PALETTE, PHONE_SHOWN_WIDTH_PX
    from faceage.predict import FaceAge
    from faceage.ui import annotate_for_ui
    from tests.unit.test_annotate_r31 import GREY, _label_text_rows

    width, height = 4032, 3024  # a phone's 12 MP photo, drawn at 2048 x 1536
    image = np.full((height, width, 3), GREY, np.uint8)
    side = width // 12  # a row of a crowd: twelve faces across the photo (six checked)
    faces = [FaceAge(box=(side * k + 4, height // 3, side * (k + 1) - 4, height // 3 + side), age=30.0 + k,
                     age_std=4.0, score=0.9) for k in range(6)]
    out = annotate_for_ui(image, faces)
    scale = out.shape[1] / width
    shown = PHONE_SHOWN_PX / out.shape[1]
    for k, face in enumerate(faces):
        digits = _label_text_rows(out, PALETTE[k], round(face.box[0] * scale) + 2, round(face.box[1] * scale))
        assert digits * shown >= 6, (k, digits, digits * shown)  # 6 px digits on the phone's screen at least
    assert PHONE_SHOWN_WIDTH_PX <= PHONE_SHOWN_PX  # what annotate sizes labels for
