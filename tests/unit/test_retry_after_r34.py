"""BentoML's own 429 (``traffic.max_concurrency``) carries ``Retry-After``, as the service's own 429s and 503s do.

A client that honours the header (urllib3's ``Retry(respect_retry_after_header=True)``, many SDKs) retried BentoML's
bare 429 at once, or not at all. The stack below is BentoML 1.4's own order (``ServiceAppFactory.middlewares``), with
its real traffic middlewares; :func:`faceage.http.with_retry_after` is what ``CORSService.to_asgi`` does to BentoML's
app. The real server is tests/integration/test_retry_after_r34.py.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import pytest
from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware, TimeoutMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from urllib3.util.retry import Retry

from faceage.http import (
    BUSY_RETRY_AFTER_S, CORS_EXPOSED_HEADERS, CORSFallbackMiddleware, RetryAfterMiddleware, with_retry_after,
)
from tests.unit.test_cors_r34 import FRONT_END, assert_passes_other_scopes_through


def bentoml_stack(gate: asyncio.Event) -> Starlette:
    """A tiny app behind BentoML's traffic middlewares with room for one request at a time."""

    async def wait(request: Request):
        await gate.wait()
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/wait", wait)], middleware=[
        Middleware(TimeoutMiddleware, timeout=5.0), Middleware(MaxConcurrencyMiddleware, max_concurrency=1)])


async def _raw_busy_answer(hooked: bool, *, cors: bool = False, origin: str | None = None):
    """The ASGI messages of the answer to a request sent while another holds the only slot, and the held one's."""
    gate = asyncio.Event()
    app = bentoml_stack(gate)
    if hooked:
        app = with_retry_after(app)
    if cors:
        app = CORSFallbackMiddleware(app, (FRONT_END,), skip_paths=("/ui",))
    headers = [(b"origin", origin.encode())] if origin else []

    async def call() -> list[dict]:
        sent: list[dict] = []

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            sent.append(message)

        await app({"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
                   "scheme": "http", "path": "/wait", "raw_path": b"/wait", "query_string": b"", "root_path": "",
                   "headers": headers, "client": ("127.0.0.1", 1), "server": ("t", 80)}, receive, send)
        return sent

    held = asyncio.ensure_future(call())
    await asyncio.sleep(0.05)
    busy = await call()
    gate.set()
    return busy, await held


def headers_of(messages: list[dict]) -> list[tuple[bytes, bytes]]:
    return list(messages[0]["headers"])


def test_bentomls_429_carries_retry_after_and_is_otherwise_byte_identical():
    before, held_before = asyncio.run(_raw_busy_answer(hooked=False))
    after, held_after = asyncio.run(_raw_busy_answer(hooked=True))
    assert before[0]["status"] == after[0]["status"] == 429
    assert (b"retry-after", str(BUSY_RETRY_AFTER_S).encode()) in headers_of(after)
    assert not [name for name, _ in headers_of(before) if name.lower() == b"retry-after"]  # the defect itself
    # Nothing else changed: the same headers, in the same order, and the same JSON body in the service's shape.
    assert [h for h in headers_of(after) if h[0] != b"retry-after"] == headers_of(before)
    assert after[1:] == before[1:]
    assert json.loads(b"".join(m.get("body", b"") for m in after[1:])) == {"error": "Too many requests"}
    # The held request's 200 is untouched, byte for byte.
    assert held_before[0]["status"] == held_after[0]["status"] == 200
    assert held_after == held_before


def test_urllib3_waits_the_retry_after_of_bentomls_429():
    """What a client that honours the header sleeps before its retry (none before: it retried at once)."""
    from urllib3.response import HTTPResponse

    after, _ = asyncio.run(_raw_busy_answer(hooked=True))
    response = HTTPResponse(status=429, headers={k.decode(): v.decode() for k, v in headers_of(after)})
    retry = Retry(total=3, status_forcelist=[429], respect_retry_after_header=True)
    assert retry.is_retry("GET", 429, has_retry_after=True)
    assert retry.get_retry_after(response) == BUSY_RETRY_AFTER_S
    before, _ = asyncio.run(_raw_busy_answer(hooked=False))
    response = HTTPResponse(status=429, headers={k.decode(): v.decode() for k, v in headers_of(before)})
    assert retry.get_retry_after(response) is None


def test_retry_after_is_a_small_whole_number_of_seconds():
    assert isinstance(BUSY_RETRY_AFTER_S, int) and 1 <= BUSY_RETRY_AFTER_S <= 5


def test_with_cors_on_bentomls_429_carries_both_retry_after_and_the_cors_headers():
    busy, held = asyncio.run(_raw_busy_answer(hooked=True, cors=True, origin=FRONT_END))
    headers = dict(headers_of(busy))
    assert busy[0]["status"] == 429
    assert headers[b"retry-after"] == str(BUSY_RETRY_AFTER_S).encode()
    assert headers[b"access-control-allow-origin"] == FRONT_END.encode()
    assert "Retry-After" in CORS_EXPOSED_HEADERS  # so the page may read it
    assert held[0]["status"] == 200 and b"retry-after" not in dict(headers_of(held))


async def _answer(app, status: int, headers: dict[str, str]):
    """The ASGI messages of ``status`` with ``headers`` (body "busy") through ``RetryAfterMiddleware``."""
    async def inner(scope, receive, send):
        await PlainTextResponse("busy", status_code=status, headers=headers)(scope, receive, send)

    sent: list[dict] = []

    async def send(message):
        sent.append(message)

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    await app(inner)({"type": "http", "method": "GET", "path": "/ui/gradio_api/upload", "headers": []}, receive, send)
    return sent


@pytest.mark.parametrize("status, headers", [
    (429, {"Retry-After": "60"}),  # the UI's upload cache: its own wait, not ours
    (429, {"retry-after": "5"}),  # any spelling of the name
    (503, {}), (504, {}), (200, {}), (503, {"Retry-After": "5"}),
])
def test_other_answers_and_a_429_with_its_own_retry_after_are_left_as_they_are(status, headers):
    plain = asyncio.run(_answer(lambda inner: inner, status, headers))
    hooked = asyncio.run(_answer(RetryAfterMiddleware, status, headers))
    assert hooked == plain
    names = [name.lower() for name, _ in hooked[0]["headers"]]
    assert names.count(b"retry-after") == (1 if headers else 0)


def test_lifespan_and_websocket_scopes_pass_through():
    assert_passes_other_scopes_through(RetryAfterMiddleware)


def test_an_app_without_its_own_middleware_list_is_wrapped():
    async def app(scope, receive, send):
        pass

    wrapped = with_retry_after(app)
    assert isinstance(wrapped, RetryAfterMiddleware) and wrapped.app is app


SERVICE_PROBE = textwrap.dedent('''
    import asyncio, json, sys
    import bentoml
    import httpx
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from faceage.http import CORSFallbackMiddleware, CORSService, cors_service_config

    api = FastAPI()
    gate = asyncio.Event()

    @api.get("/wait")
    async def wait():
        await gate.wait()
        return {"ok": True}

    origins = tuple(json.loads(sys.argv[1]))

    @bentoml.service(name="busy_probe", traffic={"timeout": 10, "max_concurrency": 1}, service_class=CORSService,
                     **cors_service_config(origins))
    @bentoml.asgi_app(api, path="/")
    class Probe:
        pass

    app = Probe.to_asgi()

    async def main():
        headers = {"Origin": "http://localhost:3000"}
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            held = asyncio.ensure_future(client.get("/wait", headers=headers))
            for _ in range(100):
                await asyncio.sleep(0.02)
                busy = await client.get("/wait", headers=headers)
                if busy.status_code == 429:
                    break
            gate.set()
            held = await held
        return {"wrapped": isinstance(app, CORSFallbackMiddleware), "starlette": isinstance(app, Starlette),
                "status": busy.status_code, "body": busy.text, "headers": dict(busy.headers),
                "held": held.status_code, "held_headers": dict(held.headers)}

    print(json.dumps(asyncio.run(main())))
''')


@pytest.mark.parametrize("origins", [[], ["http://localhost:3000"]])
def test_the_service_classs_app_adds_retry_after_to_bentomls_429(origins, tmp_path):
    """A real BentoML service (``to_asgi``, what each ``bentoml serve`` worker runs), in a process of its own
    (``to_asgi`` loads BentoML's global config), with CORS off (BentoML's own app, its middlewares and one more) and
    on (the same app inside the CORS fallback)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-c", SERVICE_PROBE, json.dumps(origins)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["status"] == 429, probe
    assert probe["headers"]["retry-after"] == str(BUSY_RETRY_AFTER_S)
    assert json.loads(probe["body"]) == {"error": "Too many requests"}
    assert probe["held"] == 200 and "retry-after" not in probe["held_headers"]
    if origins:
        assert probe["wrapped"] and probe["headers"]["access-control-allow-origin"] == origins[0]
    else:
        assert probe["starlette"] and not probe["wrapped"]  # BentoML's own app, as test_cors_r34 requires
        assert not [h for h in probe["headers"] if h.startswith("access-control-")]


def test_openapi_documents_the_429_and_its_retry_after():
    """A client generated from the schema learns of the 429 every route may answer, and of its wait."""
    import service
    from starlette.testclient import TestClient

    paths = TestClient(service.api).get("/api/openapi.json").json()["paths"]
    for route, method in (("/predict", "post"), ("/predict_batch", "post"), ("/annotate", "post"),
                          ("/crop", "post"), ("/model_card", "get")):
        responses = paths[route][method]["responses"]
        assert responses["429"]["content"]["application/json"]["schema"]["required"] == ["error"], route
        assert "Retry-After" in responses["429"]["headers"], route
        assert "Retry-After" in responses["503" if route != "/model_card" else "429"]["headers"], route
