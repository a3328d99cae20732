"""Round 38, over a real ``bentoml serve`` of the packaged bento (the session's ``bento_server``): the errors the
API answers name the model that refused the request, as its 200s do (``X-FaceAge-Model``)."""

from __future__ import annotations

import pytest
import requests

pytestmark = pytest.mark.integration


def test_errors_over_real_http_name_the_model_that_refused(bento_server, wild_dir):
    """The unit test (``tests/unit/test_serving_r38.py``) gives the service's ``self`` by a dependency override;
    served, the error handlers find it as BentoML hands it to the routes (``bentoml.get_current_service``)."""
    tag = bento_server.package["bento_model"]
    refused = {
        "not an image (400)": (bento_server.post("/predict", wild_dir / "derived_not_an_image.jpg"), 400),
        "face out of range (422)": (bento_server.post("/crop", wild_dir / "dlib_dogs.jpg", params={"face": 0}), 422),
        "not a form (415)": (requests.post(bento_server.url + "/annotate", json={}, timeout=60), 415),
        "wrong method (405)": (requests.get(bento_server.url + "/predict", timeout=60), 405),
    }
    for why, (r, status) in refused.items():
        assert r.status_code == status, (why, r.text)
        assert "error" in r.json(), why
        assert r.headers.get("X-FaceAge-Model") == tag, (why, dict(r.headers))
    assert bento_server.post("/predict", wild_dir / "fr_two_people.jpg").headers["X-FaceAge-Model"] == tag


def test_head_model_card_over_real_http(bento_server):
    """``curl -I /model_card`` was a 405: served, the HEAD route gets the service as GET's does (BentoML injects
    ``self`` into the class's routes), and answers GET's status and headers without the card."""
    get = requests.get(bento_server.url + "/model_card", timeout=60)
    head = requests.head(bento_server.url + "/model_card", timeout=60)
    assert head.status_code == get.status_code == 200, head.headers
    assert head.content == b""
    assert head.headers["X-FaceAge-Model"] == bento_server.package["bento_model"]
    assert head.headers["content-type"] == get.headers["content-type"]
    assert head.headers["content-length"] == get.headers["content-length"]
