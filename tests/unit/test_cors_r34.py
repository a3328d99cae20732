"""CORSFallbackMiddleware without a server: the CORS headers on the answers BentoML sends from outside its CORS
middleware (its 429 past ``traffic.max_concurrency``, its 504 past ``traffic.timeout``), and on nothing else.

The stack below is BentoML 1.4's own order (``_bentoml_impl.server.app.ServiceAppFactory.middlewares``), with its own
traffic middlewares and Starlette's CORSMiddleware as BentoML configures it; the real server is
tests/integration/test_cors_r34.py.
"""

import asyncio
import json
import os
import subprocess
import sys
import textwrap

import httpx
import pytest
from bentoml._internal.server.http.traffic import MaxConcurrencyMiddleware, TimeoutMiddleware
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from faceage.http import CORS_EXPOSED_HEADERS, CORSFallbackMiddleware, cors_service_config

FRONT_END = "http://localhost:3000"
STRANGER = "http://evil.example"


def bentoml_stack(origins: tuple[str, ...], gate: asyncio.Event, timeout_s: float = 5.0) -> Starlette:
    """A tiny app behind BentoML's traffic middlewares (outermost first), the service's middlewares' place, then
    BentoML's CORS middleware for ``origins`` (its ``http.cors`` settings: :func:`cors_service_config`)."""
    cors = cors_service_config(origins)["http"]["cors"]

    async def wait(request: Request):
        await gate.wait()
        return JSONResponse({"ok": True})

    return Starlette(routes=[Route("/wait", wait)], middleware=[
        Middleware(TimeoutMiddleware, timeout=timeout_s),
        Middleware(MaxConcurrencyMiddleware, max_concurrency=1),
        Middleware(CORSMiddleware, allow_origins=cors["access_control_allow_origins"],
                   allow_methods=cors["access_control_allow_methods"],
                   allow_headers=cors["access_control_allow_headers"],
                   expose_headers=cors["access_control_expose_headers"]),
    ])


def vary(response) -> list[str]:
    return [v.strip() for v in response.headers.get("vary", "").split(",") if v.strip()]


async def _busy_answers(app, origin: str | None):
    """The answer to a request sent while another holds BentoML's only slot, then the held one's own answer."""
    headers = {"Origin": origin} if origin else {}
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
        gate = app.gate
        held = asyncio.ensure_future(client.get("/wait", headers=headers))
        await asyncio.sleep(0.05)
        busy = await client.get("/wait", headers=headers)
        gate.set()
        return busy, await held


def wrapped(origins: tuple[str, ...], timeout_s: float = 5.0, fallback: bool = True):
    gate = asyncio.Event()
    app = bentoml_stack(origins, gate, timeout_s)
    outer = CORSFallbackMiddleware(app, origins, skip_paths=("/ui",)) if fallback else app
    outer.gate = gate
    return outer


@pytest.mark.parametrize("origins, allowed", [((FRONT_END,), FRONT_END), (("*",), "*")])
def test_bentomls_429_to_an_allowed_origin_carries_the_cors_headers(origins, allowed):
    busy, held = asyncio.run(_busy_answers(wrapped(origins), FRONT_END))
    assert busy.status_code == 429 and busy.json() == {"error": "Too many requests"}  # BentoML's answer, unchanged
    assert busy.headers["access-control-allow-origin"] == allowed
    assert busy.headers["access-control-expose-headers"] == ", ".join(CORS_EXPOSED_HEADERS)
    assert "Retry-After" in busy.headers["access-control-expose-headers"]
    assert vary(busy) == ["Origin"]
    # The held request went through BentoML's CORS middleware: its headers as they were, none added twice.
    assert held.status_code == 200 and held.headers["access-control-allow-origin"] == allowed
    assert held.headers.get_list("access-control-allow-origin") == [allowed]
    assert vary(held) == ["Origin"]


def test_without_the_fallback_bentomls_429_has_no_cors_header():
    """The defect itself, in BentoML's stack: its 429 never passes through its CORS middleware."""
    busy, _ = asyncio.run(_busy_answers(wrapped((FRONT_END,), fallback=False), FRONT_END))
    assert busy.status_code == 429 and "access-control-allow-origin" not in busy.headers


@pytest.mark.parametrize("origin", [STRANGER, None])
def test_a_429_to_another_origin_or_without_origin_is_unchanged(origin):
    busy, _ = asyncio.run(_busy_answers(wrapped((FRONT_END,)), origin))
    assert busy.status_code == 429
    assert not [h for h in busy.headers if h.lower().startswith("access-control-")] and "vary" not in busy.headers


def test_bentomls_504_to_an_allowed_origin_carries_the_cors_headers():
    async def timed_out():
        app = wrapped((FRONT_END,), timeout_s=0.2)
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.get("/wait", headers={"Origin": FRONT_END})

    r = asyncio.run(timed_out())
    assert r.status_code == 504 and "0.2 seconds" in r.json()["error"]
    assert r.headers["access-control-allow-origin"] == FRONT_END and vary(r) == ["Origin"]


def _answering(headers: dict[str, str], status: int = 429):
    """A bare app answering ``status`` with ``headers``, behind the fallback for FRONT_END (``/ui`` skipped)."""
    async def app(scope, receive, send):
        await PlainTextResponse("busy", status_code=status, headers=headers)(scope, receive, send)

    return TestClient(CORSFallbackMiddleware(app, (FRONT_END,), skip_paths=("/ui",)))


def test_an_existing_vary_keeps_its_values_and_gains_origin_once():
    client = _answering({"Vary": "Accept-Encoding"})
    r = client.get("/predict", headers={"Origin": FRONT_END})
    assert r.headers["access-control-allow-origin"] == FRONT_END and vary(r) == ["Accept-Encoding", "Origin"]
    r = _answering({"Vary": "accept-encoding, origin"}).get("/predict", headers={"Origin": FRONT_END})
    assert vary(r) == ["accept-encoding", "origin"]


def test_an_answer_with_its_own_allow_origin_is_left_as_it_is():
    client = _answering({"Access-Control-Allow-Origin": "https://other.example"})
    r = client.get("/predict", headers={"Origin": FRONT_END})
    assert r.headers.get_list("access-control-allow-origin") == ["https://other.example"]
    assert "access-control-expose-headers" not in r.headers and "vary" not in r.headers


def test_the_ui_is_gradios_and_left_alone():
    client = _answering({})
    for path in ("/ui", "/ui/", "/ui/gradio_api/upload"):
        r = client.get(path, headers={"Origin": FRONT_END})
        assert r.status_code == 429 and "access-control-allow-origin" not in r.headers, path
    r = client.get("/uix", headers={"Origin": FRONT_END})  # only the /ui path itself, not a name that starts so
    assert r.headers["access-control-allow-origin"] == FRONT_END


def assert_passes_other_scopes_through(wrap) -> None:
    """``wrap(app)`` (an ASGI middleware) hands lifespan and websocket scopes, an allowed Origin on them, to ``app``
    with the very ``send`` it was given."""
    seen = []

    async def app(scope, receive, send):
        seen.append((scope["type"], send))

    async def send(message):
        pass

    async def run():
        middleware = wrap(app)
        for kind in ("lifespan", "websocket"):
            await middleware({"type": kind, "path": "/", "headers": [(b"origin", FRONT_END.encode())]}, None, send)

    asyncio.run(run())
    assert seen == [("lifespan", send), ("websocket", send)]


def test_lifespan_and_websocket_scopes_pass_through():
    assert_passes_other_scopes_through(lambda app: CORSFallbackMiddleware(app, (FRONT_END,)))


SERVICE_PROBE = textwrap.dedent('''
    import asyncio, json, sys
    import bentoml
    from fastapi import FastAPI
    from starlette.applications import Starlette
    from starlette.testclient import TestClient
    from faceage.http import CORSFallbackMiddleware, CORSService, cors_service_config

    api = FastAPI()

    @api.get("/slow")
    async def slow():
        await asyncio.sleep(3)
        return {"ok": True}

    origins = tuple(json.loads(sys.argv[1]))

    @bentoml.service(name="cors_probe", traffic={"timeout": 1}, service_class=CORSService,
                     **cors_service_config(origins))
    @bentoml.asgi_app(api, path="/")
    class Probe:
        pass

    app = Probe.to_asgi()
    with TestClient(app) as client:
        r = client.get("/slow", headers={"Origin": "http://localhost:3000"})
    print(json.dumps({"wrapped": isinstance(app, CORSFallbackMiddleware), "starlette": isinstance(app, Starlette),
                      "status": r.status_code, "headers": {k.lower(): v for k, v in r.headers.items()}}))
''')


@pytest.mark.parametrize("origins", [["http://localhost:3000"], []])
def test_the_service_class_wraps_bentomls_app_only_with_cors_on(origins, tmp_path):
    """A real BentoML service (``to_asgi``, what each ``bentoml serve`` worker runs), in a process of its own:
    ``to_asgi`` loads BentoML's global config. CORS off: BentoML's own app, as before."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path), "BENTOML_DO_NOT_TRACK": "True"}
    done = subprocess.run([sys.executable, "-c", SERVICE_PROBE, json.dumps(origins)], env=env, capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    probe = json.loads(done.stdout.strip().splitlines()[-1])
    assert probe["status"] == 504  # BentoML's traffic.timeout
    if origins:
        assert probe["wrapped"] and probe["headers"]["access-control-allow-origin"] == "http://localhost:3000"
        assert "Origin" in probe["headers"]["vary"]
    else:
        assert probe["starlette"] and not probe["wrapped"]
        assert not [h for h in probe["headers"] if h.startswith("access-control-")]
