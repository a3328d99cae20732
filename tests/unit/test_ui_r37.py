"""Round-37 review of the UI's HTTP layer: the middlewares in front of ``/ui`` as the service stacks them (the UI's
gate, the body cap, the UI's router), served by a real uvicorn on 127.0.0.1 and called over raw HTTP.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from faceage.http import BodyLimitMiddleware
from faceage.ui import UI_PATH, LazyUI, UIGateMiddleware, UIMiddleware
from tests.unit.test_ui_r36 import predict_events

UPLOAD = "/ui/gradio_api/upload"
BODY_CAP = 20_000_000


async def _api(scope, receive, send):
    raise AssertionError("a /ui request reached the API")


@pytest.fixture
def serve(tmp_path):
    """``serve(upload_cache_bytes)``: the service's middleware stack for ``/ui`` on a real uvicorn; its port.

    The UI is configured with the body cap (as the service's ``__init__`` does) but not started: a request that
    passes both caps gets the UI's "still loading" 503, which is enough to tell it was let through.
    """
    import uvicorn

    servers = []

    def start(upload_cache_bytes: int) -> int:
        lazy = LazyUI()
        lazy.configure({"registered_version": "1"}, BODY_CAP)
        app = UIGateMiddleware(BodyLimitMiddleware(UIMiddleware(_api, lazy), max_bytes=BODY_CAP,
                                                   length_required=(UI_PATH,)),
                               ui=lazy, max_concurrent=4, upload_cache_bytes=upload_cache_bytes,
                               upload_folder=lambda: str(tmp_path))
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        server = uvicorn.Server(uvicorn.Config(app, lifespan="off", log_level="warning"))
        thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
        thread.start()
        servers.append((server, thread))
        deadline = time.monotonic() + 30
        while not server.started:
            assert time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)
        return sock.getsockname()[1]

    yield start
    for server, thread in servers:
        server.should_exit = True
        thread.join(10)


def _form(size: int) -> bytes:
    """A whole multipart body of ``size`` bytes: one file."""
    head = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    tail = b"\r\n--b--\r\n"
    return head + b"x" * (size - len(head) - len(tail)) + tail


def _post(port: int, path: str, length: int, body: bytes = b"") -> tuple[int, dict[str, str], dict]:
    """POSTs ``path`` declaring ``length`` bytes of multipart body and sends ``body`` (none: a client that waits
    for an early answer, as curl does with ``Expect``); the status, headers and JSON body of the answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: ui.test\r\nContent-Type: multipart/form-data; boundary=b\r\n"
                  f"Content-Length: {length}\r\n\r\n".encode() + body)
        raw = b""
        while b"\r\n\r\n" not in raw or len(raw.split(b"\r\n\r\n", 1)[1]) < _length(raw):
            chunk = s.recv(65536)
            if not chunk:
                break
            raw += chunk
    head, body = raw.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:])}
    return int(lines[0].split()[1]), headers, json.loads(body)


def _length(raw: bytes) -> int:
    head = raw.split(b"\r\n\r\n", 1)[0].decode("latin-1").lower()
    return next((int(line.split(":", 1)[1]) for line in head.split("\r\n") if line.startswith("content-length:")), 0)


def test_an_upload_over_the_body_cap_gets_413_not_a_retry_later_429(serve):
    """An upload larger than the UI's whole upload cache (256 MiB by default) was refused by the UI's gate, outside
    the body cap, with 429 "retry later" and ``Retry-After: 60``: a client that honours it (gradio_client, urllib3's
    Retry) retried a 300 MB file every minute, for ever, told nothing about the 20 MB limit it is over."""
    port = serve(256 * 2**20)
    status, headers, body = _post(port, UPLOAD, 300_000_000)
    assert status == 413, (status, body)
    assert "retry-after" not in headers
    assert "FACEAGE_MAX_BODY_BYTES" in body["error"] and str(BODY_CAP) in body["error"]


def test_an_upload_larger_than_the_whole_upload_cache_gets_413_naming_that_cap(serve):
    """Where the UI's upload cache is smaller than the body cap (``FACEAGE_UI_UPLOAD_CACHE_BYTES``, or a container's
    small ``/dev/shm``), an upload under the body cap but over the cache's whole size never fits, even in an empty
    cache: it got 429 "retry later" too, for ever."""
    port = serve(10_000)
    status, headers, body = _post(port, UPLOAD, 15_000)
    assert status == 413, (status, body)
    assert "retry-after" not in headers
    assert "FACEAGE_UI_UPLOAD_CACHE_BYTES" in body["error"] and "10000" in body["error"]
    # one that fits the empty cache passes both caps (to the UI, still loading here)
    status, _, body = _post(port, UPLOAD, 9_000, _form(9_000))
    assert status == 503 and "still loading" in body["error"], (status, body)


@pytest.mark.parametrize("path", ["photo.jpg", "/etc/passwd", "file:///etc/passwd"])
def test_a_photo_that_was_not_uploaded_says_to_upload_it_without_the_servers_paths(monkeypatch, capfd, path):
    """The "Use via API" page's own example (``{"path": "photo.jpg"}``, sent without uploading the file first, as its
    curl snippet reads) got Gradio's "Cannot move /srv/.../photo.jpg to the gradio cache dir because it was not
    uploaded by a user": the server's working directory, and no word of how to upload; each such call also logged a
    25-line traceback."""
    import os

    from faceage.ui import API_EXAMPLE_FILE

    assert API_EXAMPLE_FILE == "photo.jpg"
    [(event, data)], logged = predict_events(monkeypatch, capfd, {"path": path, "meta": {"_type": "gradio.FileData"}})
    message = json.loads(data)["error"]
    assert event == "error" and "/ui/gradio_api/upload" in message and "handle_file" in message, message
    assert "not uploaded by a user" in message  # what tests/integration/test_ui_api_limits.py reads
    assert os.getcwd() not in message and "Cannot move" not in message and "/etc" not in message, message
    assert "Traceback" not in logged, logged[-2000:]


def test_a_photo_input_that_is_not_a_file_says_what_it_takes_not_pydantics_dump(monkeypatch, capfd):
    [(event, data)], logged = predict_events(monkeypatch, capfd, 123)
    message = json.loads(data)["error"]
    assert event == "error" and "validation error" not in message and "pydantic" not in message, message
    assert "/ui/gradio_api/upload" in message, message
    assert "Traceback" not in logged, logged[-2000:]
