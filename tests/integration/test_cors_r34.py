"""BentoML's own 429 (``traffic.max_concurrency``) and 504 (``traffic.timeout``) over real HTTP, with
FACEAGE_CORS_ORIGINS on: a page on an allowed origin must be able to read them (and back off), not see an opaque
CORS failure.

BentoML answers both from middlewares that sit outside its CORS middleware, so they carried no
``Access-Control-Allow-Origin``. The session's bento is served again with the two limits made tiny through BentoML's
own config override (``BENTOML_CONFIG_OVERRIDES``: ``max_concurrency`` 1, ``timeout`` 4 s); one upload that never
finishes holds the only slot, so the next request gets 429, and the held one itself gets 504 when the timeout passes.
"""

from __future__ import annotations

import json
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests

from tests.integration.test_cors_r33 import FRONT_END, ORIGINS, STRANGER, cors_headers, serving

pytestmark = pytest.mark.integration

TIMEOUT_S = 4


@contextmanager
def one_slot_server(bento_server, tmp_path_factory, name: str, timeout_s: int, **env: str | None):
    """The session's bento served with room for one request at a time and BentoML's ``traffic.timeout`` of
    ``timeout_s``, from a BentoML home of its own (see test_cors_r33's ``cors_url`` for why), ``env`` on top of the
    session server's (None: unset); yields its URL."""
    busy_config = {"services": {"face_age": {"traffic": {"max_concurrency": 1, "timeout": timeout_s}}}}
    home = tmp_path_factory.mktemp(f"{name}-bentoml-home")
    for store in ("bentos", "models"):
        (home / store).symlink_to(Path(bento_server.env["BENTOML_HOME"]) / store, target_is_directory=True)
    merged = {**bento_server.env, "BENTOML_HOME": str(home), "FACEAGE_DETECT_PROCESSES": "1",
              "BENTOML_CONFIG_OVERRIDES": json.dumps(busy_config), **env}
    log = bento_server.home / f"serve-{name}.log"
    with serving({k: v for k, v in merged.items() if v is not None}, bento_server.home, log) as (url, proc):
        assert url, f"bentoml serve with {busy_config} exited {proc.returncode}:\n{log.read_text()[-5000:]}"
        yield url


@pytest.fixture(scope="module")
def busy_url(bento_server, tmp_path_factory):
    """One slot, CORS on."""
    with one_slot_server(bento_server, tmp_path_factory, "busy", TIMEOUT_S, FACEAGE_CORS_ORIGINS=ORIGINS) as url:
        yield url


def hold_the_only_slot(url: str, origin: str) -> socket.socket:
    """A POST /predict from ``origin`` that declares 1000 bytes and sends 10: it stays in progress until the timeout."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=TIMEOUT_S + 30)
    head = (f"POST /predict HTTP/1.1\r\nHost: {host}:{port}\r\nOrigin: {origin}\r\n"
            "Content-Type: multipart/form-data; boundary=b\r\nContent-Length: 1000\r\n\r\n")
    sock.sendall(head.encode() + b"--b\r\n" * 2)
    return sock


def raw_answer(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """Status, headers (lower-case names) and body of the one answer on ``sock``."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            break
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        key = name.strip().lower()
        headers[key] = f"{headers[key]}, {value.strip()}" if key in headers else value.strip()
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            break
        body += chunk
    return int(lines[0].split()[1]), headers, body


def busy(url: str, wait_s: float = 2, **kwargs) -> requests.Response:
    """A request sent while the slot is held: retried for up to ``wait_s`` until the server has the held one in
    progress."""
    deadline = time.monotonic() + wait_s
    while True:
        r = requests.request(url=url, timeout=30, **kwargs)
        if r.status_code == 429 or time.monotonic() > deadline:
            return r
        time.sleep(0.05)


def test_a_busy_servers_429_and_504_are_readable_by_an_allowed_page(busy_url):
    held = hold_the_only_slot(busy_url, FRONT_END)
    try:
        started = time.monotonic()
        r = busy(busy_url + "/model_card", TIMEOUT_S / 2, method="GET", headers={"Origin": FRONT_END})
        assert r.status_code == 429, f"the held upload did not take the only slot: {r.status_code} {r.text[:200]}"
        assert r.json() == {"error": "Too many requests"}  # BentoML's own answer, unchanged
        assert r.headers.get("access-control-allow-origin") == FRONT_END, r.headers
        assert "Retry-After" in r.headers["access-control-expose-headers"]
        assert "Origin" in [v.strip() for v in r.headers["vary"].split(",")]
        # The other listed origin (written with a trailing slash in the setting), on a POST route.
        r = requests.post(busy_url + "/predict", files={"image": ("a.jpg", b"x", "image/jpeg")},
                          headers={"Origin": "https://app.example.com"}, timeout=30)
        assert r.status_code == 429 and r.headers.get("access-control-allow-origin") == "https://app.example.com"
        # Another origin, and no Origin at all (curl, a server-side client): the same 429, no CORS header.
        r = requests.get(busy_url + "/model_card", headers={"Origin": STRANGER}, timeout=30)
        assert r.status_code == 429 and cors_headers(r) == {}, r.headers
        r = requests.get(busy_url + "/model_card", timeout=30)
        assert r.status_code == 429 and cors_headers(r) == {}, r.headers
        assert requests.get(busy_url + "/readyz", timeout=30).status_code == 200  # BentoML never limits its probes
        # The held upload itself: BentoML's 504 once traffic.timeout has passed, readable by its page too.
        status, headers, body = raw_answer(held)
        assert status == 504, (status, headers, body)
        assert time.monotonic() - started >= TIMEOUT_S - 1
        assert f"in {TIMEOUT_S}" in json.loads(body)["error"]
        assert headers.get("access-control-allow-origin") == FRONT_END, headers
        assert "Origin" in [v.strip() for v in headers["vary"].split(",")]
    finally:
        held.close()
    # Free again: the slot was given back, and an ordinary answer still carries the header once (not twice).
    r = requests.get(busy_url + "/model_card", headers={"Origin": FRONT_END}, timeout=30)
    assert r.status_code in (200, 404) and r.headers["access-control-allow-origin"] == FRONT_END
    assert [v.strip() for v in r.headers["vary"].split(",")].count("Origin") == 1, r.headers["vary"]
