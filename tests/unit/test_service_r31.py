"""Round-31 review of the HTTP API as a client integrating FaceAge sees it (service.py): which model answered each
route, the coordinate frame of the boxes and sizes (EXIF-rotated photos), and the answers' shapes.

The routes run in FastAPI's TestClient with the service's ``self`` given by a dependency override (BentoML injects
it the same way), as in ``test_http_r30``: its stand-in locator needs no detector; the EXIF test uses a real
in-process :class:`faceage.serving.LocatorPool` with a real (HOG) :class:`faceage.predict.FaceLocator`.
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from starlette.testclient import TestClient

from faceage.predict import FaceLocator
from faceage.serving import LocatorPool
from tests.unit.test_http_r30 import _Service

FACE = ("a.jpg", b"FACE", "image/jpeg")


@pytest.fixture()
def svc(monkeypatch):
    import bentoml
    import service

    svc = _Service()
    svc.lineage = {"tag": "face_age:r31test", "mlflow_run_id": "abc"}
    monkeypatch.setitem(service.api.dependency_overrides, bentoml.get_current_service, lambda: svc)
    return svc


@pytest.fixture()
def client(svc):
    import service

    return TestClient(service.api, raise_server_exceptions=False)


@pytest.mark.parametrize("route", ["/predict", "/annotate", "/crop", "/predict_batch"])
def test_every_route_names_the_model_that_answered(client, route):
    """/annotate and /crop answer a PNG, so their client had no way to know which model drew the ages (the JSON
    routes carry ``"model"``, the PNG ones nothing): during a rollout, or behind a load balancer over two bentos,
    an annotated photo could not be traced to its model. Every route now sends ``X-FaceAge-Model: <tag>``, the
    ``model.tag`` of the JSON answers."""
    r = client.post(route, files=[("image", FACE)])
    assert r.status_code == 200, r.text
    assert r.headers.get("x-faceage-model") == "face_age:r31test"
    if r.headers["content-type"] == "application/json":
        assert r.json()["model"]["tag"] == r.headers["x-faceage-model"]


def test_json_answers_share_one_face_shape(client):
    """/predict, each /predict_batch result and the CLI's ``--json`` (``faceage.cli``, the same ``FaceAge.as_dict``)
    give a face as ``{"box", "age", "age_std", "score"}`` and the photo's ``width``/``height``; /crop's
    ``X-FaceAge-Box`` is /predict's box of that face."""
    one = client.post("/predict", files=[("image", FACE)]).json()
    batch = client.post("/predict_batch", files=[("image", FACE)]).json()["results"][0]
    assert one["faces"] == batch["faces"] and (one["width"], one["height"]) == (batch["width"], batch["height"])
    assert set(one["faces"][0]) == {"box", "age", "age_std", "score"}
    crop = client.post("/crop?face=0", files=[("image", FACE)])
    assert [int(v) for v in crop.headers["x-faceage-box"].split(",")] == one["faces"][0]["box"]


def _exif_rotated_jpeg(width: int, height: int, orientation: int) -> bytes:
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width, 3), dtype=np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    image.save(buf, "JPEG", exif=exif.tobytes())
    return buf.getvalue()


def test_sizes_and_boxes_are_in_the_upright_photos_frame(svc, client, hog_detector_dir):
    """A phone photo stored 40x24 with EXIF orientation 6 (turned 90 degrees) is 24 wide and 40 high as shown:
    ``width``/``height`` (and so the boxes, cut from the same decoded image) are in that upright frame, the one the
    CLI's ``--json`` and /annotate's PNG use, not the stored pixels' frame."""
    locator = FaceLocator(hog_detector_dir, kind="hog", upsample=0, margin=0.4, crop_size=32)
    svc.locator = LocatorPool(locator, 0)
    try:
        r = client.post("/predict", files=[("image", ("phone.jpg", _exif_rotated_jpeg(40, 24, 6), "image/jpeg"))])
        assert r.status_code == 200, r.text
        assert (r.json()["width"], r.json()["height"]) == (24, 40)
        png = client.post("/annotate", files=[("image", ("phone.jpg", _exif_rotated_jpeg(40, 24, 6), "image/jpeg"))])
        assert Image.open(io.BytesIO(png.content)).size == (24, 40)
    finally:
        svc.locator.close()


@pytest.fixture(scope="module")
def openapi() -> dict:
    import service

    return TestClient(service.api).get("/api/openapi.json").json()["paths"]


@pytest.mark.parametrize("route", ["/annotate", "/crop"])
def test_openapi_says_the_png_routes_answer_png(openapi, route):
    """``/api/docs`` said /annotate and /crop answer ``application/json`` (FastAPI's default): a client generated
    from it parsed the PNG as JSON and failed. Their 200 is ``image/png`` now, with its headers."""
    ok = openapi[route]["post"]["responses"]["200"]
    assert list(ok["content"]) == ["image/png"]
    assert "X-FaceAge-Model" in ok["headers"]


def test_openapi_documents_predict_batchs_several_images(openapi):
    """/predict_batch's form said one ``image``: a generated client sent one photo per request."""
    import service

    image = openapi["/predict_batch"]["post"]["requestBody"]["content"]["multipart/form-data"]["schema"]["properties"][
        "image"]
    assert image["type"] == "array" and image["items"]["format"] == "binary"
    assert image["maxItems"] == service.LIMITS.max_batch_images


def test_openapi_gives_crops_errors_in_the_services_shape(openapi):
    """/crop listed FastAPI's 422 ``{"detail": [...]}`` for a bad ``face``, which the service answers 400
    ``{"error"}`` (its 422 is a face index out of range, ``{"error"}`` too)."""
    responses = openapi["/crop"]["post"]["responses"]
    assert "HTTPValidationError" not in str(responses)
    assert responses["422"]["content"]["application/json"]["schema"]["required"] == ["error"]
