"""Round-26 review of annotation: labels stay readable in group photos, and /annotate and the UI let go of a
decoded photo through one helper (``faceage.serving.drawn_then_released``) before giving its memory back."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

import faceage.serving as serving
from faceage.annotate import PALETTE, annotate
from faceage.predict import FaceAge


def _astronaut() -> bytes:
    import faceage

    return (Path(faceage.__file__).parent / "examples" / "astronaut.jpg").read_bytes()


def test_no_box_is_drawn_over_an_earlier_face_s_label():
    """Faces are drawn largest first; a smaller face's box drawn after a larger face's label ran through its
    digits (wild/dlib_2008_007676.jpg: a neighbour's box edge crossed the "1" of "38 ± 12")."""
    image = np.zeros((200, 200, 3), np.uint8)
    big = FaceAge(box=(20, 60, 120, 160), age=38.0, age_std=12.0, score=1.0)  # its label sits above y = 60
    small = FaceAge(box=(30, 10, 60, 52), age=42.0, age_std=12.0, score=1.0)  # its box edges cross that label
    alone = annotate(image, [big])
    rows, cols = np.nonzero((alone[:60] == PALETTE[0]).all(axis=2))  # the big face's label, above its box
    top, bottom, left, right = rows.min(), rows.max() + 1, cols.min(), cols.max() + 1
    assert top <= 50 < bottom and left <= 45 < right  # the small box's bottom edge (rows 50-51) runs through it
    out = annotate(image, [big, small])
    label = out[top:bottom, left:right]
    assert np.array_equal(label, alone[top:bottom, left:right])  # the label whole, no line of the small box on it
    assert (out[30, 30] == PALETTE[1]).all() and (out[51, 82:] == 0).all()  # that box is drawn elsewhere


def _label_extent(out: np.ndarray, colour, above_row: int) -> tuple[int, int]:
    """Width and height of the label filled with ``colour`` above ``above_row``."""
    rows, cols = np.nonzero((out[:above_row] == colour).all(axis=2))
    return cols.max() - cols.min() + 1, rows.max() - rows.min() + 1


def test_a_crowd_s_labels_are_no_wider_than_their_faces():
    """Text size followed the photo only: in a 2000 x 1500 group photo (the 7 faces of wild/dlib_2007_007763.jpg
    tiled 4 x 4, 37-px faces) each label was 54 px tall and ~200 px wide, and the labels hid each other and the
    neighbours' faces ("85 ± 7 ± 20" read as one label)."""
    image = np.zeros((1500, 2000, 3), np.uint8)
    row = [FaceAge(box=(100 + 90 * k, 500, 180 + 90 * k, 580), age=38.0, age_std=12.0, score=1.0) for k in range(4)]
    out = annotate(image, row)
    for k in range(4):
        width, height = _label_extent(out[:, 100 + 90 * k:180 + 90 * k + 10], PALETTE[k], 500)
        assert width <= 80 and height >= 12, (k, width, height)  # inside its own column, readable
    big = annotate(image, [FaceAge(box=(500, 500, 1100, 1100), age=38.0, age_std=12.0, score=1.0)])
    assert _label_extent(big, PALETTE[0], 500)[1] >= 54  # a large face keeps the photo's text size
    tiny = annotate(np.zeros((1500, 2000, 3), np.uint8), [FaceAge(box=(100, 500, 120, 520), age=38.0, age_std=12.0,
                                                                  score=1.0)])
    assert _label_extent(tiny, PALETTE[0], 500)[1] >= 12  # never below 12 px text, even wider than its face


@pytest.fixture(scope="module")
def locator(hog_detector_dir):
    """A real HOG locator (dlib's detector alone)."""
    from faceage.predict import FaceLocator

    return FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)


class _Service:
    """What /annotate reads of the service (its own methods, a locator pool, a batcher), as in test_serving_r24."""

    def __init__(self, locator):
        import service

        self.inner = service.FaceAgeService.inner
        self.locator = serving.LocatorPool(locator, 0)
        self.batcher = serving.AgeBatcher(lambda faces: (np.full(len(faces), 30.0), np.full(len(faces), 4.0)))
        self.lineage = {"tag": "face_age:test"}

    def __getattr__(self, name):
        return getattr(self.inner, name).__get__(self)


def _count_releases(monkeypatch) -> list:
    """serving.release_memory, counted; 512 x 512 (the astronaut) counts as a large photo."""
    calls = []
    monkeypatch.setattr(serving, "release_memory", lambda: calls.append(1))
    monkeypatch.setattr(serving, "RELEASE_AFTER_PIXELS", 512 * 512)
    return calls


def test_annotate_gives_a_large_photo_s_memory_back_through_the_shared_helper(locator, monkeypatch):
    """/annotate and the UI each wrote their own "large photo -> drop it -> release_memory()" (the UI had none
    until round 25): both now go through serving.drawn_then_released."""
    import bentoml

    import service

    calls = _count_releases(monkeypatch)
    svc = _Service(locator)
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    client = TestClient(service.api)
    r = client.post("/annotate", files={"image": ("a.jpg", _astronaut(), "image/jpeg")})  # 512 x 512
    assert r.status_code == 200 and r.headers["content-type"] == "image/png" and r.headers["x-faceage-faces"] != "0"
    assert calls == [1]  # through serving's helper, as the UI (the route had its own copy of release_memory)
    assert Image.open(io.BytesIO(r.content)).size == (512, 512)
    small = io.BytesIO()
    Image.new("RGB", (100, 80)).save(small, format="PNG")
    r = client.post("/annotate", files={"image": ("b.png", small.getvalue(), "image/png")})
    assert r.status_code == 200 and calls == [1]  # a small photo: nothing to give back
