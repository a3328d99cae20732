"""FACEAGE_CORS_ORIGINS without a server: parsing and validating the setting, the BentoML ``http.cors`` config it
becomes, and the body cap's own answers (413/411/400, sent before BentoML's CORS middleware sees the request)."""

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from faceage.http import CORS_ENV, CORS_EXPOSED_HEADERS, BodyLimitMiddleware, cors_service_config, parse_cors_origins


@pytest.mark.parametrize("raw", [None, "", "  ", " , "])
def test_unset_or_empty_is_off(raw):
    assert parse_cors_origins(raw) == ()
    assert cors_service_config(parse_cors_origins(raw)) == {}  # no http.cors at all: BentoML's default (off)


@pytest.mark.parametrize("raw, origins", [
    ("http://localhost:3000", ("http://localhost:3000",)),
    (" http://localhost:3000 , https://app.example.com ,", ("http://localhost:3000", "https://app.example.com")),
    # What a browser sends in Origin: no trailing slash, lower-case scheme and host, no default port.
    ("HTTP://LocalHost:3000/", ("http://localhost:3000",)),
    ("https://app.example.com:443,http://app.example.com:80", ("https://app.example.com", "http://app.example.com")),
    ("http://[::1]:8080", ("http://[::1]:8080",)),
    ("http://127.0.0.1:5173,http://127.0.0.1:5173", ("http://127.0.0.1:5173",)),  # a repeat counts once
    ("*", ("*",)),
    (" * ", ("*",)),
])
def test_origins_are_parsed_as_the_browser_writes_them(raw, origins):
    assert parse_cors_origins(raw) == origins


@pytest.mark.parametrize("raw, why", [
    ("localhost:3000", "'localhost:3000' is not an origin"),  # no scheme: it would have matched no browser
    ("http://", "'http://' is not an origin"),
    ("//localhost:3000", "'//localhost:3000' is not an origin"),
    ("http://localhost:3000/app", "an origin has no path"),
    ("http://localhost:3000?x=1", "an origin has no path"),
    ("http://user@localhost:3000", "'http://user@localhost:3000' is not an origin"),
    ("http://localhost:99999", "'http://localhost:99999' is not an origin"),
    ("https://*.example.com", "wildcards"),
    ("http://localhost:3000,*", "'*' stands alone"),
    ("null", "'null' is not an origin"),
])
def test_a_malformed_value_is_refused_in_one_line_naming_the_variable(raw, why):
    with pytest.raises(ValueError) as e:
        parse_cors_origins(raw)
    message = str(e.value)
    assert message.startswith(f"{CORS_ENV}=") and why in message, message
    assert "\n" not in message and "http://localhost:3000" in message  # the example of the right form


def test_the_bentoml_config_allows_the_apis_methods_and_exposes_its_headers():
    config = cors_service_config(("http://localhost:3000", "https://app.example.com"))
    assert list(config) == ["http"] and list(config["http"]) == ["cors"]
    cors = config["http"]["cors"]
    assert cors["enabled"] is True
    assert cors["access_control_allow_origins"] == ["http://localhost:3000", "https://app.example.com"]
    assert {"GET", "POST"} <= set(cors["access_control_allow_methods"])
    assert cors["access_control_allow_headers"] == ["*"]  # a front end's own headers (X-Request-Id...) preflight too
    assert cors.get("access_control_allow_credentials") in (None, False)  # the API reads no cookies
    # Without them a page could not read which model answered, a crop's box, an annotation's face count, a 503's wait.
    assert {"X-FaceAge-Model", "X-FaceAge-Box", "X-FaceAge-Faces", "Retry-After"} <= set(CORS_EXPOSED_HEADERS)
    assert list(cors["access_control_expose_headers"]) == list(CORS_EXPOSED_HEADERS)
    assert cors_service_config(("*",))["http"]["cors"]["access_control_allow_origins"] == ["*"]


def test_the_config_passes_bentomls_own_schema():
    from _bentoml_sdk.service.config import validate

    validate(cors_service_config(("http://localhost:3000",)))


def _capped(cors_origins: tuple[str, ...]):
    async def echo(request: Request):
        return JSONResponse({"bytes": len(await request.body())})

    app = Starlette(routes=[Route("/predict", echo, methods=["POST"]), Route("/ui/upload", echo, methods=["POST"])])
    return TestClient(BodyLimitMiddleware(app, max_bytes=1000, length_required=("/ui",), cors_origins=cors_origins))


@pytest.mark.parametrize("origins", [("http://localhost:3000",), ("*",)])
def test_the_body_caps_own_answers_carry_the_allowed_origin(origins):
    """The cap answers before BentoML's CORS middleware (inside the service's middlewares) sees the request: without
    the header a browser hid the 413 and its message behind a CORS error."""
    client = _capped(origins)
    origin = {"Origin": "http://localhost:3000"}
    r = client.post("/predict", content=b"x" * 1001, headers=origin)
    assert r.status_code == 413 and "over the limit of 1000" in r.json()["error"]
    assert r.headers["access-control-allow-origin"] == ("*" if origins == ("*",) else "http://localhost:3000")
    assert "Origin" in r.headers.get("vary", "")
    assert "X-FaceAge-Model" in r.headers["access-control-expose-headers"]
    unclosed = {**origin, "Content-Type": "multipart/form-data; boundary=b"}
    r = client.post("/ui/upload", content=b"x" * 10, headers=unclosed)
    assert r.status_code == 400 and "closing boundary" in r.json()["error"]  # the UI path's own 400
    assert "access-control-allow-origin" in r.headers


def test_the_body_caps_answers_carry_no_allow_origin_for_another_origin_or_when_off():
    for client, origin in ((_capped(("http://localhost:3000",)), "http://evil.example"),
                           (_capped(()), "http://localhost:3000")):
        r = client.post("/predict", content=b"x" * 1001, headers={"Origin": origin})
        assert r.status_code == 413
        assert not [h for h in r.headers if h.lower().startswith("access-control-")], r.headers
    r = _capped(("http://localhost:3000",)).post("/predict", content=b"x" * 1001)  # no Origin: not a CORS request
    assert r.status_code == 413 and "access-control-allow-origin" not in r.headers


@pytest.mark.parametrize("name, value, message", [
    (CORS_ENV, "localhost:3000", "error: FACEAGE_CORS_ORIGINS='localhost:3000': 'localhost:3000' is not an origin; "
                                 "write scheme://host[:port], e.g. http://localhost:3000"),
    # The other settings read as the service starts, stopped the same way.
    ("FACEAGE_MAX_BODY_BYTES", "20MB", "error: FACEAGE_MAX_BODY_BYTES must be an integer, got '20MB'"),
])
def test_a_bad_setting_stops_the_start_with_one_line_not_a_traceback(name, value, message):
    """As a ValueError it was a 30-line traceback, or, under `bentoml serve face_age:latest` (which takes a
    ValueError for "not a bento tag"), hidden behind `No module named 'face_age'`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, name: value}
    done = subprocess.run([sys.executable, "-c", "import faceage.http"], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.splitlines() == [done.stderr.strip()] and done.stderr.startswith(message), done.stderr
