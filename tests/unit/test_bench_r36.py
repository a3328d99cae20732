"""Round 36's review of ``bench_service --url``: the running service must serve the ``--tag`` bento's model.

The benchmark measured whatever answered at ``--url`` and labelled it with ``--tag``'s model (and built its
in-process side from that model), so a side-by-side run of two champions could time one model twice. It now reads
the model the service names (``X-FaceAge-Model``, on ``GET /model_card`` or else ``POST /predict``) and refuses
in one line when it is not the tag's. A real HTTP service on 127.0.0.1 stands in for ``bentoml serve``; the bento
store is the round-35 stand-in (no bento, no model, no shared data).
"""

import json
from http.server import BaseHTTPRequestHandler
from pathlib import Path

import pytest

from tests.conftest import http_server
from tests.unit.test_bench_r35 import Measured, bento_stand_ins

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "faceage" / "examples"
TAG_MODEL = "face-age:m"  # the model of the stand-in bento (bento_stand_ins)

pytestmark = pytest.mark.usefixtures("sigterm_restored")


class NamedModelService(BaseHTTPRequestHandler):
    """A stand-in FaceAge service: ``/readyz`` 200; ``/model_card`` 200 naming ``server.model`` in
    ``X-FaceAge-Model`` (404 without it when ``server.card`` is false, as a model packaged without a card);
    ``POST /predict`` one face, naming the model in the header and the JSON (none when ``server.model`` is None)."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self.path == "/readyz":
            self._answer(200, b"ok")
        elif self.path == "/model_card" and self.server.card:
            self._answer(200, b"# card", named=True)
        else:
            self._answer(404, b'{"error": "no card"}')

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self.server.posts += 1
        body = {"faces": [{"age": 30.0}]}
        if self.server.model is not None:
            body["model"] = {"tag": self.server.model}
        self._answer(200, json.dumps(body).encode(), named=True)

    def _answer(self, code: int, body: bytes, named: bool = False) -> None:
        self.send_response(code)
        if named and self.server.model is not None:
            self.send_header("X-FaceAge-Model", self.server.model)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def run_against(monkeypatch, model: str | None, card: bool = True) -> tuple[pytest.ExceptionInfo, list]:
    """``bench_service --url <stand-in naming model> --tag face_age:x``: how it stopped, and the predictors built."""
    import benchmarks.bench_service as bs

    built: list = []
    bento_stand_ins(monkeypatch, built)
    with http_server(NamedModelService, model=model, card=card, posts=0) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises((SystemExit, Measured)) as e:
            bs.main(["--url", url, "--tag", "face_age:x", "--photos", str(EXAMPLES), "--rounds", "1",
                     "--clients", "2"])
    return e, built


@pytest.mark.parametrize("card", [True, False], ids=["named-on-model-card", "named-on-predict"])
def test_a_url_serving_another_model_is_refused_in_one_line_before_measuring(monkeypatch, card):
    e, built = run_against(monkeypatch, "face-age:other", card=card)
    assert e.type is SystemExit, "measured a service that serves another model than --tag's"
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message
    assert "face-age:other" in message and TAG_MODEL in message and "face_age:x" in message
    assert built == []  # refused before the in-process predictor loads


@pytest.mark.parametrize("card", [True, False], ids=["named-on-model-card", "named-on-predict"])
def test_a_url_serving_the_tags_model_is_measured(monkeypatch, card):
    e, built = run_against(monkeypatch, TAG_MODEL, card=card)
    assert e.type is Measured and len(built) == 1


def test_a_url_that_names_no_model_is_refused_as_unverifiable(monkeypatch):
    """Not the FaceAge service (or one from before ``X-FaceAge-Model``): nothing says which model it serves."""
    e, built = run_against(monkeypatch, None)
    assert e.type is SystemExit
    message = e.value.code
    assert isinstance(message, str) and "\n" not in message and "X-FaceAge-Model" in message
    assert built == []
