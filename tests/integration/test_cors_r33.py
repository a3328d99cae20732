"""FACEAGE_CORS_ORIGINS over real HTTP: the session's bento served again by `bentoml serve` with the setting on.

A front end on another origin (http://localhost:3000) calls /predict from the browser: the browser first sends a
preflight (OPTIONS with Origin and Access-Control-Request-Method), then the POST, and shows the page the answer only
when it carries Access-Control-Allow-Origin. The session's own server (``bento_server``) runs without the setting:
no CORS headers at all, as before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.integration.conftest import BIN, READY_TIMEOUT_S, free_port
from tests.integration.test_service import predict

pytestmark = pytest.mark.integration

FRONT_END = "http://localhost:3000"
OTHER = "https://app.example.com"
ORIGINS = f"{FRONT_END}, {OTHER}/"  # as a user writes it: spaces, a trailing slash
STRANGER = "http://evil.example"


@contextmanager
def serving(env: dict, home: Path, log: Path):
    """`bentoml serve face_age:latest` on a free port with ``env``; yields (url, process) once /readyz is 200, or
    (None, process) when the process exited before (its output in ``log``)."""
    port = free_port()
    with open(log, "wb") as out:
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "face_age:latest", "--host", "127.0.0.1", "--port",
                                 str(port)], cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            if proc.poll() is not None:
                yield None, proc
                return
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:
                pass
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-5000:]}")
            time.sleep(0.25)
        yield url, proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.fixture(scope="module")
def cors_url(bento_server, tmp_path_factory):
    """The session's bento, served again with ``FACEAGE_CORS_ORIGINS`` (one detection process: two servers share
    the machine), from a BentoML home of its own that holds the session's bentos and models: a second `bentoml serve`
    in the same home empties its prometheus_multiproc_dir at start, and the session server's /metrics (which
    test_service reads) then counted nothing more."""
    home = tmp_path_factory.mktemp("cors-bentoml-home")
    for store in ("bentos", "models"):
        (home / store).symlink_to(Path(bento_server.env["BENTOML_HOME"]) / store, target_is_directory=True)
    env = {**bento_server.env, "BENTOML_HOME": str(home), "FACEAGE_CORS_ORIGINS": ORIGINS,
           "FACEAGE_DETECT_PROCESSES": "1"}
    log = bento_server.home / "serve-cors.log"
    with serving(env, bento_server.home, log) as (url, proc):
        assert url, f"bentoml serve with FACEAGE_CORS_ORIGINS={ORIGINS!r} exited {proc.returncode}:\n" \
                    f"{log.read_text()[-5000:]}"
        yield url


def preflight(url: str, route: str, origin: str, method: str = "POST") -> requests.Response:
    return requests.options(url + route, timeout=30, headers={
        "Origin": origin, "Access-Control-Request-Method": method,
        "Access-Control-Request-Headers": "content-type,x-request-id"})


def cors_headers(r: requests.Response) -> dict[str, str]:
    return {k.lower(): v for k, v in r.headers.items() if k.lower().startswith("access-control-")}


@pytest.mark.parametrize("route, method", [("/predict", "POST"), ("/predict_batch", "POST"), ("/annotate", "POST"),
                                           ("/crop", "POST"), ("/model_card", "GET"), ("/readyz", "GET")])
def test_a_preflight_from_an_allowed_origin_gets_the_allow_headers(cors_url, route, method):
    for origin in (FRONT_END, OTHER):
        r = preflight(cors_url, route, origin, method)
        assert r.status_code == 200, f"{route} from {origin}: {r.status_code} {r.text[:300]}"
        assert r.headers["access-control-allow-origin"] == origin
        assert method in r.headers["access-control-allow-methods"].split(", ")
        assert {"content-type", "x-request-id"} <= set(r.headers["access-control-allow-headers"].lower().split(","))
        assert "Origin" in r.headers["vary"]


def test_a_preflight_from_another_origin_gets_no_allow_origin(cors_url):
    r = preflight(cors_url, "/predict", STRANGER)
    assert r.status_code == 400 and "access-control-allow-origin" not in r.headers, r.headers


def test_a_cross_origin_post_carries_allow_origin_and_the_same_answer(cors_url, bento_server, wild_dir):
    photo = wild_dir / "fr_two_people.jpg"
    files = {"image": (photo.name, photo.read_bytes(), "image/jpeg")}
    r = requests.post(cors_url + "/predict", files=files, headers={"Origin": FRONT_END}, timeout=120)
    assert r.status_code == 200, r.text
    assert r.headers["access-control-allow-origin"] == FRONT_END
    assert "X-FaceAge-Model" in r.headers["access-control-expose-headers"]  # the page may read which model answered
    assert r.headers["X-FaceAge-Model"] == bento_server.package["bento_model"]
    assert [f["box"] for f in r.json()["faces"]] == [f["box"] for f in predict(bento_server, photo)["faces"]]
    r = requests.post(cors_url + "/predict_batch", files=[("image", (photo.name, photo.read_bytes(), "image/jpeg"))],
                      headers={"Origin": OTHER}, timeout=120)
    assert r.status_code == 200 and r.headers["access-control-allow-origin"] == OTHER
    assert len(r.json()["results"][0]["faces"]) == 2
    # The server answers another origin too (CORS is the browser's check), but without the header the browser needs.
    r = requests.post(cors_url + "/predict", files=files, headers={"Origin": STRANGER}, timeout=120)
    assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_a_cross_origin_error_is_readable_by_the_page(cors_url):
    """A 415 from the API and the body cap's 413 (answered before BentoML's CORS middleware) both carry the header:
    otherwise the page saw a CORS failure instead of the message."""
    r = requests.post(cors_url + "/predict", json={"image": "x"}, headers={"Origin": FRONT_END}, timeout=30)
    assert r.status_code == 415 and r.headers["access-control-allow-origin"] == FRONT_END
    big = {"image": ("big.jpg", b"\0" * (21 * 1024 * 1024), "image/jpeg")}
    r = requests.post(cors_url + "/predict", files=big, headers={"Origin": FRONT_END}, timeout=120)
    assert r.status_code == 413 and "FACEAGE_MAX_BODY_BYTES" in r.json()["error"]
    assert r.headers["access-control-allow-origin"] == FRONT_END


def test_the_ui_and_readyz_still_work_with_cors_on(cors_url):
    assert requests.get(cors_url + "/readyz", timeout=30).status_code == 200
    r = requests.get(cors_url + "/ui/config", timeout=180)  # Gradio loads in the background
    assert r.status_code == 200 and "astronaut.jpg" in r.text, r.text[:300]
    r = requests.get(cors_url + "/ui/", timeout=60)
    assert r.status_code == 200 and "<html" in r.text.lower()


def test_off_by_default_no_cors_headers_at_all(bento_server, wild_dir):
    assert not os.environ.get("FACEAGE_CORS_ORIGINS"), "the session's server must run without the setting"
    r = preflight(bento_server.url, "/predict", FRONT_END)
    assert r.status_code == 405 and cors_headers(r) == {}, r.headers  # the API's own answer to OPTIONS, as before
    r = bento_server.post("/predict", wild_dir / "fr_obama_small.jpg")
    assert r.status_code == 200 and cors_headers(r) == {}
    r = requests.post(bento_server.url + "/predict", files={"image": ("a.jpg", b"x", "image/jpeg")},
                      headers={"Origin": FRONT_END}, timeout=30)
    assert r.status_code == 400 and cors_headers(r) == {}


def test_a_malformed_value_stops_the_server_at_start_with_one_clear_line(bento_server):
    env = {**bento_server.env, "FACEAGE_CORS_ORIGINS": "localhost:3000"}  # no scheme: no browser sends that
    log = bento_server.home / "serve-cors-bad.log"
    with serving(env, bento_server.home, log) as (url, proc):
        assert url is None, "served with FACEAGE_CORS_ORIGINS='localhost:3000' instead of refusing it"
        assert proc.returncode != 0
    lines = [line for line in log.read_text().splitlines() if "FACEAGE_CORS_ORIGINS=" in line]
    assert lines and "'localhost:3000' is not an origin" in lines[-1] and "http://localhost:3000" in lines[-1], lines
