"""The UI's HTTP API against the real served bento: what anyone who can reach ``/ui`` can make the server do.

Gradio's API (``/ui/gradio_api/...``) is public wherever the UI is: these tests call it over plain
HTTP and raw sockets, as a script would, and check that it reads no file on the server's disk,
fetches no URL, keeps little in ``GRADIO_TEMP_DIR`` (RAM in production) per photo, leaves nothing
behind when an upload is cut off, and cannot take the API's share of the concurrent requests.
"""

from __future__ import annotations

import io
import json
import os
import socket
import time
import uuid
from pathlib import Path
from urllib.parse import urlparse

import numpy as np
import pytest
import requests
from PIL import Image

pytestmark = pytest.mark.integration

FILE_META = {"_type": "gradio.FileData"}
MAX_CONCURRENCY = 64  # service.py's traffic.max_concurrency


def gradio_dir(server) -> Path:
    return Path(server.env["GRADIO_TEMP_DIR"])


def cache_files(server) -> dict[Path, int]:
    """Every file under the server's GRADIO_TEMP_DIR, with its size."""
    root = gradio_dir(server)
    return {p: p.stat().st_size for p in root.rglob("*") if p.is_file()} if root.is_dir() else {}


def ui_upload(server, data: bytes, name: str) -> str:
    """Uploads a file the way the page does; its path on the server."""
    r = requests.post(server.url + "/ui/gradio_api/upload", files={"files": (name, data, "image/jpeg")}, timeout=120)
    assert r.status_code == 200, r.text[:300]
    return r.json()[0]


def ui_predict(server, payload: dict, timeout: float = 300) -> tuple[str, object]:
    """Calls the UI's ``predict`` with one file payload: the last event (``complete``/``error``) and its data."""
    r = requests.post(server.url + "/ui/gradio_api/call/predict", json={"data": [payload]}, timeout=60)
    assert r.status_code == 200, r.text[:300]
    stream = requests.get(server.url + f"/ui/gradio_api/call/predict/{r.json()['event_id']}", timeout=timeout)
    event, data = None, None
    for line in stream.text.splitlines():
        if line.startswith("event: "):
            event = line[len("event: "):]
        elif line.startswith("data: ") and event in ("complete", "error"):
            data = json.loads(line[len("data: "):])
            break
    return event, data


def server_file(server, path: str) -> int:
    """The status of ``/ui/gradio_api/file=<path>``."""
    return requests.get(server.url + "/ui/gradio_api/file=" + path, timeout=30).status_code


def open_request(server, head: str, body: bytes = b"") -> socket.socket:
    """A raw connection that sent ``head`` (request line + headers) and ``body``, and stays open."""
    port = urlparse(server.url).port
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    s.sendall(head.encode("latin-1") + b"\r\n" + body)
    return s


def status_of(s: socket.socket, timeout: float) -> int | None:
    """The response status on ``s``, or ``None`` if none came within ``timeout`` seconds."""
    s.settimeout(timeout)
    try:
        line = s.recv(64)
    except (TimeoutError, socket.timeout):
        return None
    return int(line.split()[1]) if line.startswith(b"HTTP/") else None


def partial_upload(server, declared: int = 1_000_000, sent: int = 100_000) -> socket.socket:
    """An upload that declares ``declared`` body bytes, sends ``sent`` of them and waits."""
    boundary = "faceage-partial"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"cut.jpg\"\r\n"
            f"Content-Type: image/jpeg\r\n\r\n").encode() + b"\xff" * sent
    host = urlparse(server.url).netloc
    head = (f"POST /ui/gradio_api/upload HTTP/1.1\r\nHost: {host}\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\nContent-Length: {declared}\r\n")
    return open_request(server, head, body)


def close_all(sockets: list[socket.socket]) -> None:
    for s in sockets:
        s.close()


def uploads_in_progress(server, within_s: float = 10.0) -> float:
    """BentoML's in-progress gauge for UI uploads, once it is 0 or after ``within_s`` seconds."""
    deadline = time.monotonic() + within_s
    while True:
        metrics = requests.get(server.url + "/metrics", timeout=30).text.splitlines()
        value = sum(float(line.split()[-1]) for line in metrics
                    if line.startswith("bentoml_service_request_in_progress{")
                    and 'endpoint="/ui/gradio_api/upload"' in line)
        if value == 0 or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


def wait_for_ui(server) -> None:
    r = requests.get(server.url + "/ui/config", timeout=180)
    assert r.status_code == 200, r.text[:300]


def test_the_ui_api_reads_no_file_on_the_servers_disk_and_fetches_no_url(bento_server, wild_dir, tmp_path):
    """Gradio checks that a file input was uploaded only once the app has launched, which mounting
    never set: {"path": "/etc/passwd"} was copied into the cache and served from /file=."""
    wait_for_ui(bento_server)
    secret = tmp_path / f"secret-{uuid.uuid4().hex}.txt"
    secret.write_text("not for the UI\n")
    before = cache_files(bento_server)
    for path in (str(secret), "/etc/passwd", str(wild_dir / "fr_obama_small.jpg")):
        event, data = ui_predict(bento_server, {"path": path, "meta": FILE_META})
        assert event == "error", f"{path}: {event} {str(data)[:300]}"
        assert "not uploaded by a user" in str(data), f"{path}: {data}"
    added = set(cache_files(bento_server)) - set(before)
    assert not added, f"copied into GRADIO_TEMP_DIR: {sorted(map(str, added))}"
    names = {p.name for p in cache_files(bento_server)}
    assert secret.name not in names and "passwd" not in names
    for path in (str(secret), "/etc/passwd"):
        assert server_file(bento_server, path) in (403, 404), path
    # A URL is not fetched either (Gradio would download it into the cache, with no size limit).
    event, data = ui_predict(bento_server, {"path": "https://example.com/photo.jpg", "meta": FILE_META}, timeout=60)
    assert event == "error" and "does not fetch URLs" in str(data), (event, data)
    assert set(cache_files(bento_server)) - set(before) == set()


def test_uploads_and_the_bundled_examples_still_work_through_the_ui_api(bento_server, wild_dir):
    wait_for_ui(bento_server)
    photo = wild_dir / "fr_two_people.jpg"
    path = ui_upload(bento_server, photo.read_bytes(), photo.name)
    event, data = ui_predict(bento_server, {"path": path, "meta": FILE_META})
    assert event == "complete", data
    served = requests.post(bento_server.url + "/predict", files={"image": photo.open("rb")}, timeout=120).json()
    assert [row[4] for row in data[1]["data"]] == [str(f["box"]) for f in served["faces"]]
    # The examples are cached by Gradio when the UI is built; the page sends their cached paths.
    config = requests.get(bento_server.url + "/ui/config", timeout=60).json()
    samples = [s for c in config["components"] if c.get("props", {}).get("elem_id") == "examples"
               for s in c["props"]["samples"]]
    example = next(s[0] for s in samples if s[0]["orig_name"] == "astronaut.jpg")
    event, data = ui_predict(bento_server, {**example, "meta": FILE_META})
    assert event == "complete", data
    assert len(data[1]["data"]) >= 1  # the astronaut's face


def test_a_20_mp_photo_leaves_under_a_megabyte_of_output_in_the_cache(bento_server, wild_dir):
    """The annotated photo was a full-size PNG (~16.6 MB for 20 MP) kept 10 minutes in /dev/shm: now a JPEG,
    2048 px on its long side, its boxes and labels drawn at that size (the table keeps the full-size boxes)."""
    wait_for_ui(bento_server)
    photo = wild_dir / "derived_large_6000x3375_pexels-214576.jpg"  # 20.25 MP
    before = cache_files(bento_server)
    path = ui_upload(bento_server, photo.read_bytes(), photo.name)
    event, data = ui_predict(bento_server, {"path": path, "meta": FILE_META})
    assert event == "complete", data
    after = cache_files(bento_server)
    # The two files by the paths Gradio gives, not by what is new in the cache: Gradio keeps files by their
    # content, so the same photo uploaded earlier in the session (another test's) is no new file.
    upload_bytes, output_bytes = (Path(p).stat().st_size for p in (path, data[0]["path"]))
    assert all(Path(p).resolve().is_relative_to(gradio_dir(bento_server).resolve()) for p in (path, data[0]["path"]))
    written = sum(size for p, size in after.items() if p not in before)
    print(f"\n20 MP photo in GRADIO_TEMP_DIR: upload {upload_bytes} B, output {output_bytes} B")
    assert upload_bytes == photo.stat().st_size
    assert 0 < output_bytes < 1_000_000, f"output {output_bytes} bytes, upload {upload_bytes}"
    assert written <= upload_bytes + output_bytes  # nothing else (the full-size PNG it once kept as well)
    r = requests.get(bento_server.url + "/ui/gradio_api/file=" + data[0]["path"], timeout=60)
    assert r.status_code == 200
    shown = Image.open(io.BytesIO(r.content))
    assert shown.format == "JPEG" and shown.size == (2048, 1152)
    served = requests.post(bento_server.url + "/predict", files={"image": photo.open("rb")}, timeout=300).json()
    assert (served["width"], served["height"]) == (6000, 3375)
    assert [row[4] for row in data[1]["data"]] == [str(f["box"]) for f in served["faces"]]
    assert len(served["faces"]) == 2  # labels.csv: 2 faces
    x1, y1, x2, y2 = (round(v * 2048 / 6000) for v in served["faces"][0]["box"])  # where it lands when smaller
    pixels = np.asarray(shown.convert("RGB")).astype(int)
    edge = pixels[y1 + 5:y2 - 5, x1 + 2]  # the middle of the line (5 px wide at 1152 px)
    assert np.abs(edge - (230, 159, 0)).sum(axis=1).mean() < 60  # the first palette colour


def test_an_upload_cut_off_mid_body_leaves_no_file_behind(bento_server):
    """A client that declares a length under the cap, sends part of the body and goes: Gradio wrote the
    part to a tmpXXXX file in GRADIO_TEMP_DIR and never deleted it. Now the body is read whole first."""
    wait_for_ui(bento_server)
    before = set(cache_files(bento_server))
    for _ in range(3):
        s = partial_upload(bento_server)
        time.sleep(1.0)  # the server has the part
        s.close()
    time.sleep(2.0)
    assert requests.get(bento_server.url + "/readyz", timeout=30).status_code == 200
    # Over at once: an aborted upload that got no answer stayed open in BentoML 120 s (and held up its shutdown).
    assert uploads_in_progress(bento_server) == 0
    left = set(cache_files(bento_server)) - before
    assert not left, f"left in GRADIO_TEMP_DIR: {sorted(map(str, left))}"
    # A whole body whose form has no closing boundary: Gradio answered 200 [] and kept the file too.
    body = (b"--cut\r\nContent-Disposition: form-data; name=\"files\"; filename=\"cut.jpg\"\r\n"
            b"Content-Type: image/jpeg\r\n\r\n" + b"\xff" * 50_000)
    r = requests.post(bento_server.url + "/ui/gradio_api/upload", data=body,
                      headers={"Content-Type": "multipart/form-data; boundary=cut"}, timeout=60)
    left = set(cache_files(bento_server)) - before
    assert r.status_code == 400 and "closing boundary" in r.json()["error"], (r.text[:300], sorted(map(str, left)))
    assert not left, f"left in GRADIO_TEMP_DIR: {sorted(map(str, left))}"
    # A whole upload still works.
    with open(Path(__file__).resolve().parents[2] / "faceage" / "examples" / "astronaut.jpg", "rb") as f:
        assert os.path.isfile(ui_upload(bento_server, f.read(), "astronaut.jpg"))


def test_heartbeat_streams_are_refused_so_they_cannot_lock_out_the_api(bento_server, wild_dir):
    """64 idle /ui/gradio_api/heartbeat streams (never ending; this UI does not use them) took every one of
    BentoML's 64 slots: /predict got 429 while /readyz stayed 200."""
    wait_for_ui(bento_server)
    config = requests.get(bento_server.url + "/ui/config", timeout=60).json()
    assert config["connect_heartbeat"] is False
    photo = wild_dir / "fr_obama_small.jpg"
    host = urlparse(bento_server.url).netloc
    heartbeats = []
    try:
        for i in range(MAX_CONCURRENCY):
            heartbeats.append(open_request(bento_server, f"GET /ui/gradio_api/heartbeat/s{i} HTTP/1.1\r\n"
                                                         f"Host: {host}\r\n"))
        statuses = [status_of(s, timeout=30) for s in heartbeats]
        r = bento_server.post("/predict", photo)  # while all of them are connected
        assert r.status_code == 200, f"{r.status_code} {r.text[:300]}; heartbeats: {set(statuses)}"
        assert statuses == [404] * MAX_CONCURRENCY, statuses
    finally:
        close_all(heartbeats)


def test_ui_requests_that_stay_open_leave_the_api_its_slots(bento_server, wild_dir):
    """Other /ui requests that stay open (here: uploads that arrive slowly; Gradio's queue streams while
    many photos wait) hold at most half of BentoML's slots: past that the UI answers 429, the API is served."""
    wait_for_ui(bento_server)
    photo = wild_dir / "fr_obama_small.jpg"
    held = []
    try:
        for _ in range(MAX_CONCURRENCY + 6):
            held.append(partial_upload(bento_server, declared=1000, sent=10))
        time.sleep(3.0)  # every answer that is coming has come
        statuses = [status_of(s, timeout=0.1) for s in held]
        answered = [s for s in statuses if s is not None]
        assert answered and set(answered) == {429}, statuses
        assert requests.get(bento_server.url + "/readyz", timeout=30).status_code == 200
        r = bento_server.post("/predict", photo)
        assert r.status_code == 200, r.text[:300]
        busy = requests.get(bento_server.url + "/ui/config", timeout=30)
        assert busy.status_code == 429 and "the UI is busy" in busy.json()["error"]
    finally:
        close_all(held)
    assert uploads_in_progress(bento_server) == 0
    assert requests.get(bento_server.url + "/ui/config", timeout=60).status_code == 200
