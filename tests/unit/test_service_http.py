"""The service's HTTP plumbing without a server: limits, in-memory multipart parsing, the body-size cap."""

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from faceage.http import FIELD, BadRequest, BodyLimitMiddleware, Limits, image_parts, parse_form

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


def test_limits_come_from_the_environment_in_one_place(monkeypatch):
    monkeypatch.setenv("FACEAGE_MAX_BODY_BYTES", "1000")
    monkeypatch.setenv("FACEAGE_DETECT_PROCESSES", "0")
    limits = Limits.from_env()
    assert limits.max_body_bytes == 1000 and limits.detect_processes == 0 and limits.max_batch_images == 16
    monkeypatch.setenv("FACEAGE_MAX_PIXELS", "many")
    with pytest.raises(ValueError, match="FACEAGE_MAX_PIXELS must be an integer, got 'many'"):
        Limits.from_env()
    monkeypatch.setenv("FACEAGE_MAX_PIXELS", "0")
    with pytest.raises(ValueError, match="FACEAGE_MAX_PIXELS must be >= 1, got 0"):
        Limits.from_env()


def test_bad_requests_are_bentoml_invalid_arguments():
    from bentoml.exceptions import InvalidArgument

    e = BadRequest(415, "not multipart")
    assert isinstance(e, InvalidArgument) and e.error_code == 415 and e.message == "not multipart"


def test_the_ui_names_the_model_and_its_test_and_external_maes():
    from faceage.ui import examples, model_line

    lineage = {"registered_model": "face-age", "registered_version": "4", "backbone": "dlib_face",
               "mlflow_run_name": "run-a", "test_mae_years": 5.04, "external_mae_years": {"utk": 7.315}}
    line = model_line(lineage)
    assert "face-age v4" in line and "dlib_face" in line and "test MAE **5.04**" in line
    assert "external set 'utk' MAE **7.32**" in line
    assert "external" not in model_line({k: v for k, v in lineage.items() if not k.startswith("external")})
    assert [p.rsplit("/", 1)[-1] for p in examples()] == ["astronaut.jpg", "astronaut_twice.jpg"]


def test_a_bento_serves_the_model_version_it_was_built_with(tmp_path):
    """Not face_age:latest again at serve time: an older bento keeps serving its own model."""
    from service import served_model_tag

    manifest = tmp_path / "bento.yaml"
    manifest.write_text("models: []\nservices:\n- name: face_age\n  models:\n  - tag: face_age:abc123\n    module: ''\n")
    assert served_model_tag(manifest) == "face_age:abc123"
    assert served_model_tag(tmp_path / "missing.yaml") == "face_age:latest"  # running from source


def test_a_ui_upload_must_declare_its_length():
    """Gradio writes an upload to a temporary file as it streams in; a streamed body stopped at the cap
    left that file behind (~20 MB of /dev/shm per request). Under the UI, a POST must declare its length."""
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    app = BodyLimitMiddleware(Starlette(routes=[Route("/ui/upload", echo, methods=["POST"]),
                                                Route("/echo", echo, methods=["POST"])]),
                              max_bytes=1000, length_required=("/ui",))
    client = TestClient(app)

    def chunks():
        yield b"y" * 300

    r = client.post("/ui/upload", content=chunks())
    assert r.status_code == 411 and "Content-Length" in r.json()["error"]
    assert client.post("/ui/upload", content=b"y" * 300).json() == {"bytes": 300}
    assert client.post("/echo", content=chunks()).json() == {"bytes": 300}  # other routes may stream


def test_the_ui_hands_its_handler_the_upload_as_it_came_and_caps_files_below_the_body_cap(tmp_path):
    """Gradio's Image opened each upload with PIL first: a file that is not an image, or an empty one, got
    Gradio's developer message (handler name, payload, temp path) instead of the service's. And a file
    just under the advertised size passed Gradio's check, then its body got a 413."""
    from gradio.data_classes import FileData

    from faceage.ui import UPLOAD_OVERHEAD, LazyUI

    lazy = LazyUI()
    lazy.configure({"registered_version": "1", "test_mae_years": 5.0}, 1_000_000)
    [mount] = [r for r in lazy._build().routes if getattr(r, "path", "") == "/ui"]
    blocks = mount.app.get_blocks()
    assert blocks.max_file_size == 1_000_000 - UPLOAD_OVERHEAD
    photo = next(c for c in blocks.blocks.values() if getattr(c, "elem_id", None) == "photo")
    for name, data in (("text.jpg", b"not an image"), ("empty.jpg", b"")):
        (tmp_path / name).write_bytes(data)
        assert photo.preprocess(FileData(path=str(tmp_path / name))) == str(tmp_path / name)
    assert photo.preprocess(None) is None
