"""The Gradio UI at /ui, driven in headless Chromium (Debian's package, never a downloaded browser).

Upload a photo, press the button, and check that the page shows the annotated photo and a
table of faces, and that both are what the HTTP API answers for the same photo.
"""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from faceage.annotate import face_label
from faceage.predict import FaceAge
from faceage.ui import to_jpeg

pytestmark = pytest.mark.integration

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]
TIMEOUT_MS = 120_000


@pytest.fixture(scope="module")
def browser():
    if not CHROMIUM.exists() and not shutil.which("chromium"):
        pytest.skip("needs Debian's chromium (apt-get install chromium; .ci/run installs it)")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
                                    args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def upload_and_run(page, url: str, photo: Path) -> None:
    page.goto(url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
    page.wait_for_selector("#photo input[type=file]", state="attached", timeout=TIMEOUT_MS)
    page.set_input_files("#photo input[type=file]", str(photo))
    page.wait_for_selector("#photo img", timeout=TIMEOUT_MS)  # the upload is shown
    page.click("#submit")


def test_upload_shows_the_annotated_photo_and_a_table_of_faces(browser, bento_server, wild_dir):
    photo = wild_dir / "fr_two_people.jpg"
    page = browser.new_page()
    try:
        upload_and_run(page, bento_server.url, photo)
        page.wait_for_selector("#annotated img", timeout=TIMEOUT_MS)
        page.wait_for_function("document.querySelector('#faces [role=grid]')?.getAttribute('aria-rowcount') === '3'",
                               timeout=TIMEOUT_MS)  # header + one row per face
        table = page.inner_text("#faces")
        src = page.get_attribute("#annotated img", "src")
        shown = np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))
    finally:
        page.close()

    served = requests.post(bento_server.url + "/predict", files={"image": photo.open("rb")}, timeout=120).json()
    for face in served["faces"]:
        # the label's own rounding (half up: .0f rounds an exact half to even, and the test then failed on it)
        assert face_label(FaceAge(age=face["age"], age_std=face["age_std"], box=tuple(face["box"]),
                                  score=face["score"])) in table
        assert str(face["box"]) in table
    annotated = requests.post(bento_server.url + "/annotate", files={"image": photo.open("rb")}, timeout=120)
    expected = np.asarray(Image.open(io.BytesIO(annotated.content)).convert("RGB"))
    assert shown.shape == expected.shape == (661, 1126, 3)  # under UI_MAX_SIDE_PX: the photo's own size
    # The same predictor and drawing as the API, sent as the UI's JPEG (the API's PNG is lossless).
    assert np.array_equal(shown, np.asarray(Image.open(io.BytesIO(to_jpeg(expected))).convert("RGB")))


def test_a_photo_without_faces_says_so(browser, bento_server, wild_dir):
    page = browser.new_page()
    try:
        upload_and_run(page, bento_server.url, wild_dir / "dlib_dogs.jpg")
        page.wait_for_selector("text=No face found in this photo.", timeout=TIMEOUT_MS)
        page.wait_for_selector("#annotated img", timeout=TIMEOUT_MS)
        rows = page.get_attribute("#faces [role=grid]", "aria-rowcount")
    finally:
        page.close()
    assert rows in ("1", None)  # the header only


def test_the_page_names_the_model_and_an_example_photo_gets_its_faces(browser, bento_server):
    page = browser.new_page()
    try:
        page.goto(bento_server.url + "/ui/", wait_until="domcontentloaded", timeout=TIMEOUT_MS)
        page.wait_for_selector("#model", timeout=TIMEOUT_MS)
        header = page.inner_text("#model")
        page.click("#examples button", timeout=TIMEOUT_MS)  # the first bundled example: the astronaut
        page.wait_for_selector("#photo img", timeout=TIMEOUT_MS)
        page.click("#submit")
        page.wait_for_selector("#annotated img", timeout=TIMEOUT_MS)
        page.wait_for_function("Number(document.querySelector('#faces [role=grid]')?.getAttribute('aria-rowcount')) >= 2",
                               timeout=TIMEOUT_MS)  # header + at least one face
    finally:
        page.close()
    assert f"test MAE {bento_server.package['test_mae_years']:.2f} years" in header
    assert f"v{bento_server.package['registered_version']}" in header
