"""The service's HTTP plumbing without a server: in-memory multipart parsing and the body-size cap."""

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from service import FIELD, BadRequest, BodyLimitMiddleware, image_parts, parse_form

BOUNDARY = "faceage-test-boundary"
CT = f"multipart/form-data; boundary={BOUNDARY}"


def form(*parts: tuple[str, str | None, str | None, bytes]) -> bytes:
    out = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        if content_type:
            out += f"Content-Type: {content_type}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode()


def test_parts_are_parsed_in_memory_byte_for_byte():
    payload = bytes(range(256)) * 1000 + b"\r\n--not-the-boundary\r\n"
    parts = parse_form(form((FIELD, "a.jpg", "image/jpeg", payload), ("note", None, None, b"hi")), CT)
    assert [(p.name, p.filename, p.content_type) for p in parts] == [(FIELD, "a.jpg", "image/jpeg"),
                                                                      ("note", None, None)]
    assert parts[0].data == payload and parts[1].data == b"hi"


@pytest.mark.parametrize("body, content_type, status, message", [
    (b"{}", "application/json", 415, "Content-Type must be multipart/form-data .* got 'application/json'"),
    (b"x", None, 415, "got 'none'"),
    (b"x", "multipart/form-data", 400, "without a boundary"),
    (b"", CT, 400, "empty request body"),
    (b"--faceage-test-boundary\r\ngarbage", CT, 400, "malformed multipart/form-data"),
])
def test_bad_bodies_are_client_errors(body, content_type, status, message):
    with pytest.raises(BadRequest, match=message) as e:
        parse_form(body, content_type)
    assert e.value.status == status


def test_image_field_checks():
    other = parse_form(form(("photo", "a.jpg", "image/jpeg", b"x")), CT)
    with pytest.raises(BadRequest, match="missing form field 'image' \\(got fields: 'photo'\\)"):
        image_parts(other, limit=1)
    text = parse_form(form((FIELD, "a.txt", "text/plain", b"x")), CT)
    with pytest.raises(BadRequest, match="Content-Type 'text/plain'; expected image/\\*") as e:
        image_parts(text, limit=1)
    assert e.value.status == 415
    two = parse_form(form((FIELD, "a", "application/octet-stream", b"1"), (FIELD, "b", None, b"2")), CT)
    assert [p.data for p in image_parts(two, limit=2)] == [b"1", b"2"]
    with pytest.raises(BadRequest, match="too many images: 2, at most 1"):
        image_parts(two, limit=1)


def test_too_many_parts():
    with pytest.raises(BadRequest, match="too many form parts"):
        parse_form(form(*[("x", None, None, b"1")] * 40), CT)


@pytest.fixture()
def capped():
    seen = []

    async def echo(request: Request):
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"bytes": len(body)})

    app = BodyLimitMiddleware(Starlette(routes=[Route("/echo", echo, methods=["POST"])]), max_bytes=1000)
    return TestClient(app), seen


def test_body_cap_on_declared_length(capped):
    client, seen = capped
    assert client.post("/echo", content=b"x" * 1000).json() == {"bytes": 1000}
    r = client.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and "over the limit of 1000 bytes" in r.json()["error"]
    assert seen == [1000]  # the app never saw the large body


def test_body_cap_on_streamed_body(capped):
    client, seen = capped

    def chunks():
        for _ in range(10):
            yield b"y" * 300

    r = client.post("/echo", content=chunks())  # no Content-Length: chunked
    assert r.status_code == 413 and "(streamed)" in r.json()["error"]
    assert seen == []
