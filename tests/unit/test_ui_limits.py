"""What the UI's public API may do, without a server: launched-app file checks, the annotated photo's size,
the UI's share of concurrent requests, cut-off uploads, and the error shape of unparsable parameters."""

from __future__ import annotations

import asyncio
import io

import numpy as np
import pytest
from PIL import Image

from faceage.annotate import PALETTE, annotate as draw_faces
from faceage.http import BodyLimitMiddleware
from faceage.predict import FaceAge
from faceage.ui import LazyUI


def test_the_mounted_ui_checks_that_input_files_were_uploaded():
    """Gradio skips that check until the app has launched, which gr.mount_gradio_app never sets."""
    lazy = LazyUI()
    lazy.configure({"registered_version": "1", "test_mae_years": 5.0}, 1_000_000)
    [mount] = [r for r in lazy._build().routes if getattr(r, "path", "") == "/ui"]
    blocks = mount.app.get_blocks()
    assert blocks.has_launched and not lazy.heartbeat and blocks.config["connect_heartbeat"] is False


def test_a_large_photo_is_annotated_at_2048_px_with_its_boxes_scaled():
    from faceage.ui import UI_MAX_SIDE_PX, annotate_for_ui, to_jpeg

    image = np.full((3000, 6000, 3), 40, np.uint8)
    face = FaceAge(box=(3000, 1200, 3900, 2100), age=31.6, age_std=4.2, score=1.5)
    out = annotate_for_ui(image, [face])
    assert out.shape == (1024, 2048, 3) and UI_MAX_SIDE_PX == 2048
    x1, y1, x2, y2 = (round(v * 2048 / 6000) for v in face.box)
    assert tuple(out[(y1 + y2) // 2, x1]) == PALETTE[0] and tuple(out[(y1 + y2) // 2, x1 - 3]) == (40, 40, 40)
    small = np.full((300, 400, 3), 40, np.uint8)
    few = [FaceAge(box=(100, 100, 200, 200), age=30.0, age_std=3.0, score=1.0)]
    assert np.array_equal(annotate_for_ui(small, few), draw_faces(small, few))  # small photos: as /annotate draws
    jpeg = to_jpeg(out)
    assert Image.open(io.BytesIO(jpeg)).format == "JPEG" and len(jpeg) < out.nbytes // 10


async def _call(app, path: str, method: str = "GET", receive_messages=(), headers=()):
    """Runs one request through an ASGI app; the response messages it sent."""
    sent, queue = [], list(receive_messages)

    async def receive():
        if queue:
            return queue.pop(0)
        await asyncio.sleep(3600)  # the client neither sends nor leaves

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": method, "path": path, "headers": list(headers)}
    await app(scope, receive, send)
    return sent


def status(sent) -> int | None:
    return next((m["status"] for m in sent if m["type"] == "http.response.start"), None)


def test_an_upload_cut_off_mid_body_never_reaches_the_ui():
    """Gradio wrote each part it got to a temporary file and kept it when the client left mid-body."""
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    capped = BodyLimitMiddleware(app, max_bytes=1000, length_required=("/ui",))
    headers = [(b"content-length", b"500")]
    cut = [{"type": "http.request", "body": b"x" * 200, "more_body": True}, {"type": "http.disconnect"}]
    sent = asyncio.run(_call(capped, "/ui/gradio_api/upload", "POST", cut, headers))
    assert seen == []
    # An answer the server drops, but BentoML's timeout middleware waits for one (else 120 s, and shutdown too).
    assert status(sent) == 400 and b"closed the connection" in sent[1]["body"]
    whole = [{"type": "http.request", "body": b"x" * 200, "more_body": True},
             {"type": "http.request", "body": b"y" * 300, "more_body": False}]
    asyncio.run(_call(capped, "/ui/gradio_api/upload", "POST", whole, headers))
    assert seen == [{"type": "http.request", "body": b"x" * 200 + b"y" * 300, "more_body": False}]  # in one piece


def test_a_whole_ui_form_without_its_closing_boundary_never_reaches_the_ui():
    """Gradio's parser stopped inside the file part, answered 200 [] and kept the file it was writing."""
    seen = []

    async def app(scope, receive, send):
        seen.append(await receive())

    capped = BodyLimitMiddleware(app, max_bytes=1000, length_required=("/ui",))
    part = b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\n' + b"x" * 100
    for body, reaches in ((part, False), (part + b"\r\n--b--\r\n", True), (part + b"\r\n--b--", True)):
        headers = [(b"content-length", str(len(body)).encode()), (b"content-type", b"multipart/form-data; boundary=b")]
        sent = asyncio.run(_call(capped, "/ui/gradio_api/upload", "POST",
                                 [{"type": "http.request", "body": body, "more_body": False}], headers))
        assert bool(seen) == reaches and (status(sent) == 400) != reaches
        assert reaches or b"closing boundary" in sent[1]["body"]
        seen.clear()


def test_the_ui_holds_at_most_its_share_of_requests_and_no_heartbeat():
    from faceage.ui import UIGateMiddleware

    async def scenario():
        release = asyncio.Event()

        async def app(scope, receive, send):
            await send({"type": "http.response.start", "status": 200, "headers": []})
            if scope["path"] == "/ui/slow":
                await release.wait()
            await send({"type": "http.response.body", "body": b""})

        gate = UIGateMiddleware(app, ui=LazyUI(), max_concurrent=2)
        slow = [asyncio.create_task(_call(gate, "/ui/slow")) for _ in range(2)]
        await asyncio.sleep(0.01)
        busy = await _call(gate, "/ui/config")
        api = await _call(gate, "/predict", "POST")
        heartbeat = await _call(gate, "/ui/gradio_api/heartbeat/abc")
        release.set()
        await asyncio.gather(*slow)
        return busy, api, heartbeat, await _call(gate, "/ui/config"), gate.in_progress

    busy, api, heartbeat, later, in_progress = asyncio.run(scenario())
    assert status(busy) == 429 and b"the UI is busy" in busy[1]["body"]
    assert status(api) == 200 and status(heartbeat) == 404 and status(later) == 200 and in_progress == 0


@pytest.mark.parametrize("error, message", [
    ({"loc": ("query", "face"), "msg": "Input should be a valid integer", "input": "abc"},
     "query parameter 'face': Input should be a valid integer, got 'abc'"),
    ({"loc": ("body",), "msg": "Field required"}, "body: Field required"),
])
def test_validation_errors_read_as_one_sentence(error, message):
    from service import validation_message

    assert validation_message(error) == message
