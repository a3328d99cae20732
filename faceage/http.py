"""The service's HTTP plumbing: its limits, in-memory multipart parsing, the body cap, bad-input errors, CORS.

Input: ASGI requests to the FaceAge service (:mod:`service`). Output: the uploaded parts as bytes
(nothing touches the disk), or a :class:`BadRequest` that becomes ``{"error": message}`` with
its status (400, 413, 415, 422); :func:`photo_status` also gives a photo's 503 (detection
workers unavailable).

BentoML's typed file inputs (``Annotated[Path, ContentType("image/*")]``) spool every upload to
a temporary file (and fetch URLs given in place of files); the FaceAge routes read the raw body
instead and parse it here, in memory, under one body cap (:class:`Limits`), which
:class:`BodyLimitMiddleware` also enforces for every other route (Gradio's uploads included).

Cross-origin pages (a front end on another origin) may call the API only where ``FACEAGE_CORS_ORIGINS`` lists
their origin (:func:`parse_cors_origins`; off by default): BentoML's own CORS support then answers preflights and
adds ``Access-Control-Allow-Origin`` (:func:`cors_service_config`), the body cap adds it to its own answers, and
:class:`CORSFallbackMiddleware`, outside all of BentoML's middlewares (:class:`CORSService`), to the rest: BentoML's
429 (``traffic.max_concurrency``) and 504 (``traffic.timeout``). That 429 also gets ``Retry-After``
(:class:`RetryAfterMiddleware`, CORS on or off), as the service's own 429s and 503s have.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import bentoml
from bentoml.exceptions import InvalidArgument
from fastapi import Request
from fastapi.responses import JSONResponse
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header

from faceage.images import DEFAULT_MAX_PIXELS, ImageDecodeError
from faceage.predict import DEFAULT_MAX_DETECT_PIXELS, available_cores
from faceage.serving import DetectionUnavailable, ImageProcessingError
from faceage.ui import UI_PATH

FIELD = "image"
T = TypeVar("T")
CLIENT_LEFT = "the client closed the connection before sending the whole body"  # a 400 nobody reads
CLIENT_GONE = "the client closed the connection before the answer"  # a 400 nobody reads either


def env_int(name: str, default: int, minimum: int = 0) -> int:
    """An integer setting from the environment.

    Raises:
        ValueError: Not an integer, or below ``minimum`` (the message names the variable).
    """
    raw = os.environ.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ValueError(f"{name} must be an integer, got {raw!r}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


@dataclass(frozen=True)
class Limits:
    """Every size limit and worker count of the service, in one place (environment variables).

    Attributes:
        max_body_bytes: Largest request body (``FACEAGE_MAX_BODY_BYTES``, 20 MiB; UI uploads too).
        max_pixels: Largest image in pixels (``FACEAGE_MAX_PIXELS``, 40 M: decompression bombs).
        max_detect_pixels: Larger photos are downscaled for detection only
            (``FACEAGE_MAX_DETECT_PIXELS``, 3840x2160; 0 = never).
        detect_processes: Detection worker processes (``FACEAGE_DETECT_PROCESSES``, one per
            core; 0 = in-process).
        threads: ONNX Runtime threads of the age model (``FACEAGE_THREADS``; 0/unset: every core,
            see :func:`faceage.predict.default_threads`).
        max_batch_images: Images per ``/predict_batch`` request.
        max_parts: Form parts per request.
        ui_queue_size: UI analyses that may wait for one of the UI's slots (``FACEAGE_UI_QUEUE_SIZE``; 0/unset:
            :data:`faceage.ui.UI_QUEUE_FACTOR` times the slots); past it the UI refuses a photo at once ("Queue is
            full", 503).
        ui_upload_cache_bytes: Total bytes the UI's uploads (and its annotated photos) may hold in Gradio's cache,
            ``GRADIO_TEMP_DIR`` (``FACEAGE_UI_UPLOAD_CACHE_BYTES``, 256 MiB; 0 = no cap): Gradio keeps each file
            10-15 minutes, in RAM under ``/dev/shm``; past it an upload gets 429 (:class:`faceage.ui.UIGateMiddleware`).
        start_timeout_s: Seconds the detection workers have to start (``FACEAGE_START_TIMEOUT_S``, 60:
            :data:`faceage.serving.START_TIMEOUT_S`); a pool not all up by then is killed and started again.
    """

    max_body_bytes: int = 20 * 1024 * 1024
    max_pixels: int = DEFAULT_MAX_PIXELS
    max_detect_pixels: int = DEFAULT_MAX_DETECT_PIXELS
    detect_processes: int = 1
    threads: int | None = None
    max_batch_images: int = 16
    max_parts: int = 32
    ui_queue_size: int = 0
    ui_upload_cache_bytes: int = 256 * 1024 * 1024
    start_timeout_s: int = 60

    @classmethod
    def from_env(cls) -> Limits:
        """The limits the environment sets (defaults above)."""
        return cls(max_body_bytes=env_int("FACEAGE_MAX_BODY_BYTES", cls.max_body_bytes, minimum=1),
                   max_pixels=env_int("FACEAGE_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1),
                   max_detect_pixels=env_int("FACEAGE_MAX_DETECT_PIXELS", DEFAULT_MAX_DETECT_PIXELS),
                   detect_processes=env_int("FACEAGE_DETECT_PROCESSES", available_cores()),
                   threads=env_int("FACEAGE_THREADS", env_int("FACEAGE_TORCH_THREADS", 0)) or None,
                   ui_queue_size=env_int("FACEAGE_UI_QUEUE_SIZE", 0),
                   ui_upload_cache_bytes=env_int("FACEAGE_UI_UPLOAD_CACHE_BYTES", cls.ui_upload_cache_bytes),
                   start_timeout_s=env_int("FACEAGE_START_TIMEOUT_S", cls.start_timeout_s, minimum=1))


def read_at_start(read: Callable[[], T]) -> T:
    """``read()``, a setting read from the environment as the service starts; a bad value stops the start-up with its
    own one-line message (``SystemExit``, exit status 1), not a traceback.

    As a ``ValueError`` it was hidden: ``bentoml serve face_age:latest`` takes a ``ValueError`` raised while it imports
    the bento's service for "not a bento tag", and printed only ``Failed to import module "face_age": No module named
    'face_age'``.
    """
    try:
        return read()
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


LIMITS = read_at_start(Limits.from_env)

CORS_ENV = "FACEAGE_CORS_ORIGINS"
# Response headers a cross-origin page may read besides the CORS-safelisted ones (Content-Type, Content-Length...):
# which model answered, /crop's box, /annotate's face count, a 503's wait.
CORS_EXPOSED_HEADERS = ("X-FaceAge-Model", "X-FaceAge-Box", "X-FaceAge-Faces", "Retry-After")
_DEFAULT_PORTS = {"http": 80, "https": 443}
_SCHEME = re.compile(r"[a-z][a-z0-9+.-]*")
_HOST_PORT = re.compile(r"(?P<host>\[[0-9a-f:.]+\]|[a-z0-9._~!$&'()+;=%-]+)(?::(?P<port>[0-9]{1,5}))?")


def _origin(item: str, name: str, raw: str) -> str:
    """One origin of ``name``'s list as a browser's ``Origin`` header writes it (lower case, no default port, no
    trailing slash): the CORS middleware compares strings, so any other spelling would match no request."""
    example = "write scheme://host[:port], e.g. http://localhost:3000 (comma-separated origins, or * for any)"
    scheme, sep, rest = item.partition("://")
    scheme, host_port = scheme.lower(), (rest[:-1] if rest.endswith("/") else rest).lower()
    if any(c in host_port for c in "/?#"):
        raise ValueError(f"{name}={raw!r}: {item!r}: an origin has no path, query or fragment; {example}")
    if "*" in host_port:
        raise ValueError(f"{name}={raw!r}: {item!r}: wildcards in a host are not supported, list each origin; "
                         f"{example}")
    match = _HOST_PORT.fullmatch(host_port)
    port = int(match["port"]) if match and match["port"] else None
    if not (sep and _SCHEME.fullmatch(scheme) and match and (port is None or 0 < port < 65536)):
        raise ValueError(f"{name}={raw!r}: {item!r} is not an origin; {example}")
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        return f"{scheme}://{match['host']}"
    return f"{scheme}://{match['host']}:{port}"


def parse_cors_origins(raw: str | None, name: str = CORS_ENV) -> tuple[str, ...]:
    """The origins a cross-origin page may call the API from (``FACEAGE_CORS_ORIGINS``): comma-separated
    ``scheme://host[:port]``, or ``*`` for any; ``()`` (CORS off, as without the setting) when unset or empty.

    Raises:
        ValueError: One line naming the variable and the item that is not an origin (``localhost:3000``, without
            its scheme, matched no browser: the server would have started and allowed nothing).
    """
    items = [item.strip() for item in (raw or "").split(",")]
    items = [item for item in items if item]
    if "*" in items:
        if len(items) > 1:
            raise ValueError(f"{name}={raw!r}: '*' stands alone (any origin); otherwise list each origin as "
                             "scheme://host[:port], e.g. http://localhost:3000")
        return ("*",)
    return tuple(dict.fromkeys(_origin(item, name, raw or "") for item in items))


def cors_service_config(origins: tuple[str, ...]) -> dict:
    """The ``@bentoml.service`` keyword that turns on BentoML's CORS support for ``origins`` (``{}`` for none: off).

    Preflights (OPTIONS) and the API's answers then carry ``Access-Control-Allow-Origin`` for an allowed origin
    (BentoML's Starlette ``CORSMiddleware``, inside the service's own middlewares: ``/ui`` is Gradio's, unchanged).
    GET and POST, any request header, no credentials (the API reads no cookies), :data:`CORS_EXPOSED_HEADERS`.
    """
    if not origins:
        return {}
    return {"http": {"cors": {
        "enabled": True,
        "access_control_allow_origins": list(origins),
        "access_control_allow_methods": ["GET", "HEAD", "POST"],
        "access_control_allow_headers": ["*"],
        "access_control_expose_headers": list(CORS_EXPOSED_HEADERS),
    }}}


CORS_ORIGINS = read_at_start(lambda: parse_cors_origins(os.environ.get(CORS_ENV)))  # read as the service starts


def cors_allow_headers(origin: bytes | None, origins: tuple[str, ...]) -> list[tuple[bytes, bytes]]:
    """``Access-Control-Allow-Origin`` and ``-Expose-Headers`` as BentoML's CORS middleware writes them for a request
    whose ``Origin`` header is ``origin`` (``None``: not a cross-origin request) when ``origins`` may call the API
    (:func:`parse_cors_origins`); ``[]`` for no origin, another origin, or CORS off."""
    if origin is None or not origins:
        return []
    if origins != ("*",) and origin.decode("latin-1") not in origins:
        return []
    return [(b"access-control-allow-origin", b"*" if origins == ("*",) else origin),
            (b"access-control-expose-headers", ", ".join(CORS_EXPOSED_HEADERS).encode())]


def _with_vary_origin(headers: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """``headers`` with ``Origin`` in one ``Vary`` header (the answer depends on it: a cache must not give one
    origin's answer to another); unchanged when it is there already, or ``Vary: *``."""
    values = [value.strip() for name, field in headers if name.lower() == b"vary" for value in field.split(b",")]
    if any(value.lower() in (b"origin", b"*") for value in values):
        return headers
    return [*(h for h in headers if h[0].lower() != b"vary"), (b"vary", b", ".join([*filter(None, values), b"Origin"]))]


class CORSFallbackMiddleware:
    """ASGI middleware, outside all of BentoML's: the CORS headers on an answer to an allowed origin that has none.

    BentoML's CORS middleware (``http.cors``, :func:`cors_service_config`) sits inside its traffic middlewares, so
    their answers never passed through it: the 429 of ``traffic.max_concurrency`` and the 504 of ``traffic.timeout``
    (and Starlette's plain 500 for a middleware's error) carried no ``Access-Control-Allow-Origin``, and a page on an
    allowed origin saw a busy server as a CORS failure, with no status to read (nor the ``Retry-After`` that
    :class:`RetryAfterMiddleware` adds to the 429).
    This one adds, to such an answer only, what BentoML's would have: the origin (``*`` for any), the exposed headers
    (:data:`CORS_EXPOSED_HEADERS`) and ``Origin`` in ``Vary``. An answer that has the header (every one that passed
    through BentoML's CORS middleware, the body cap's own) is left as it is, and so is every answer to another origin
    or to a request without ``Origin``, and under ``skip_paths`` (``/ui``: Gradio's page, same origin, whose requests
    never reach BentoML's CORS middleware either).
    """

    def __init__(self, app, origins: tuple[str, ...], skip_paths: tuple[str, ...] = ()):
        self.app = app
        self.origins = origins
        self.skip_paths = skip_paths

    def _skipped(self, path: str) -> bool:
        return any(path == prefix or path.startswith(prefix.rstrip("/") + "/") for prefix in self.skip_paths)

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or self._skipped(scope.get("path", "")):
            await self.app(scope, receive, send)
            return
        origin = next((value for name, value in scope["headers"] if name.lower() == b"origin"), None)
        cors = cors_allow_headers(origin, self.origins)
        if not cors:
            await self.app(scope, receive, send)
            return

        async def send_with_cors(message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"access-control-allow-origin" for name, _ in headers):
                    message = {**message, "headers": _with_vary_origin([*headers, *cors])}
            await send(message)

        await self.app(scope, receive, send_with_cors)


# Retry-After of BentoML's 429 past traffic.max_concurrency (RetryAfterMiddleware). That 429 is answered at once, with
# every slot taken by a request in progress; a slot frees as soon as any of them ends, and most end within a second
# (one photo's analysis), so 1 s is the shortest whole wait that is not an immediate retry (0). urllib3's Retry
# sleeps this instead of its own back-off, so a longer one would only keep a client idle while slots are free.
BUSY_RETRY_AFTER_S = 1


class RetryAfterMiddleware:
    """ASGI middleware, outside BentoML's traffic middlewares: ``Retry-After`` on a 429 that has none.

    BentoML's ``traffic.max_concurrency`` answers 429 ``{"error": "Too many requests"}`` without ``Retry-After``,
    while the service's own 429s (the UI's share, its upload cache: :class:`faceage.ui.UIGateMiddleware`) and 503s
    send one: a client that honours it (urllib3's ``Retry(respect_retry_after_header=True)``, many SDKs) retried
    that 429 at once, or not at all. This one adds ``Retry-After: retry_after_s`` to such a 429 only; a 429 with its
    own (any spelling) and every other answer pass byte for byte, bodies included.
    """

    def __init__(self, app, retry_after_s: int = BUSY_RETRY_AFTER_S):
        self.app = app
        self.retry_after = str(retry_after_s).encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_retry_after(message) -> None:
            if message["type"] == "http.response.start" and message.get("status") == 429:
                headers = list(message.get("headers", ()))
                if not any(name.lower() == b"retry-after" for name, _ in headers):
                    message = {**message, "headers": [*headers, (b"retry-after", self.retry_after)]}
            await send(message)

        await self.app(scope, receive, send_with_retry_after)


def with_retry_after(app, retry_after_s: int = BUSY_RETRY_AFTER_S):
    """``app`` (BentoML's ASGI app) whose 429s carry ``Retry-After`` (:class:`RetryAfterMiddleware`).

    BentoML's app is a Starlette app that has not started: the middleware goes first in its own list
    (``add_middleware``), outside BentoML's traffic middlewares, so the app stays BentoML's (what ``to_asgi`` gave
    before, with CORS off). Any other ASGI app is wrapped.
    """
    if callable(getattr(app, "add_middleware", None)) and getattr(app, "middleware_stack", True) is None:
        app.add_middleware(RetryAfterMiddleware, retry_after_s=retry_after_s)
        return app
    return RetryAfterMiddleware(app, retry_after_s)


class CORSService(bentoml.Service):
    """A BentoML service whose ASGI app (:meth:`to_asgi`, what ``bentoml serve`` runs in each worker) completes the
    answers BentoML sends from outside the service's own middlewares.

    ``@bentoml.service(service_class=CORSService, ...)``: the service's own middlewares (``add_asgi_middleware``) all
    sit inside BentoML's traffic limits, too deep to see their answers. So, here:

    - always, :func:`with_retry_after`: ``Retry-After`` on BentoML's 429 (``traffic.max_concurrency``); the app is
      still BentoML's Starlette app, with one more middleware first in its list;
    - with ``http.cors`` (:func:`cors_service_config`), that app sits inside a :class:`CORSFallbackMiddleware` for
      its origins. Without it (CORS off) nothing else changes.
    """

    __slots__ = ()

    def to_asgi(self, is_main: bool = True):
        app = with_retry_after(super().to_asgi(is_main=is_main))
        cors = ((self.config or {}).get("http") or {}).get("cors") or {}
        if not cors.get("enabled") or not cors.get("access_control_allow_origins"):
            return app
        return CORSFallbackMiddleware(app, tuple(cors["access_control_allow_origins"]), skip_paths=(UI_PATH,))


class BadRequest(InvalidArgument):
    """A client error: becomes ``{"error": message}`` with ``status`` (BentoML's ``InvalidArgument``)."""

    def __init__(self, status: int, message: str):
        super().__init__(message, error_code=status)
        self.status = status


@dataclass(frozen=True)
class Part:
    """One part of a multipart/form-data body, held in memory."""

    name: str
    filename: str | None
    content_type: str | None
    data: bytes


def parse_form(body: bytes, content_type: str | None) -> list[Part]:
    """Parses a multipart/form-data body in memory (nothing touches the disk).

    Raises:
        BadRequest: 415 when the body is not multipart/form-data, 400 when it is malformed.
    """
    kind, options = parse_options_header(content_type or "")
    if kind != b"multipart/form-data":
        raise BadRequest(415, f"Content-Type must be multipart/form-data with the photo in the field "
                              f"{FIELD!r}, got {content_type or 'none'!r}")
    boundary = options.get(b"boundary")
    if not boundary:
        raise BadRequest(400, "multipart/form-data body without a boundary parameter in its Content-Type")
    if not body:
        raise BadRequest(400, f"empty request body: send the photo in the form field {FIELD!r}")
    parts: list[Part] = []
    state: dict[str, Any] = {}

    def on_part_begin() -> None:
        if len(parts) >= LIMITS.max_parts:
            raise BadRequest(400, f"too many form parts: at most {LIMITS.max_parts}")
        state.update(headers={}, chunks=[], field=b"", value=b"")

    def on_header_field(data: bytes, start: int, end: int) -> None:
        state["field"] += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        state["value"] += data[start:end]

    def on_header_end() -> None:
        state["headers"][state["field"].decode("latin-1").lower()] = state["value"].decode("latin-1")
        state.update(field=b"", value=b"")

    def on_part_data(data: bytes, start: int, end: int) -> None:
        state["chunks"].append(data[start:end])

    def on_part_end() -> None:
        _, disposition = parse_options_header(state["headers"].get("content-disposition", ""))
        name = disposition.get(b"name", b"").decode("utf-8", "replace")
        filename = disposition.get(b"filename")
        parts.append(Part(name=name, filename=filename.decode("utf-8", "replace") if filename is not None else None,
                          content_type=state["headers"].get("content-type"), data=b"".join(state["chunks"])))

    def on_end() -> None:
        state["complete"] = True

    callbacks = {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_end": on_end,
    }
    try:  # the constructor too: it refuses a boundary over 256 bytes (FormParserError, the parse errors' base)
        parser = MultipartParser(boundary, callbacks)
        parser.write(body)
        parser.finalize()
    except FormParserError as e:
        raise BadRequest(400, f"malformed multipart/form-data body: {e}") from None
    if not state.get("complete"):
        raise BadRequest(400, "malformed multipart/form-data body: it ends before the closing boundary "
                              "(truncated upload?)")
    return parts


def wrong_type(part: Part) -> BadRequest | None:
    """The 415 for an ``image`` part whose Content-Type is not an image's (none given passes), else ``None``."""
    kind = (part.content_type or "").split(";")[0].strip().lower()
    if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
        return BadRequest(415, f"form field {FIELD!r} ({part.filename or 'no filename'}) has Content-Type "
                               f"{kind!r}; expected image/* or application/octet-stream")
    return None


def image_parts(parts: list[Part], limit: int, *, check_types: bool = True) -> list[Part]:
    """The ``image`` parts, checked: present, at most ``limit``, image content types only (unless
    ``check_types`` is false: ``/predict_batch`` answers such a part on its own, with :func:`wrong_type`).

    Raises:
        BadRequest: 400 for a missing field or too many images, 415 for a non-image part.
    """
    images = [p for p in parts if p.name == FIELD]
    if not images:
        got = ", ".join(sorted({repr(p.name) for p in parts})) or "none"
        raise BadRequest(400, f"missing form field {FIELD!r} (got fields: {got})")
    if len(images) > limit:
        if limit == 1:
            raise BadRequest(400, f"too many images: {len(images)}, at most 1 per request on this route (several "
                                  f"photos go to /predict_batch, up to {LIMITS.max_batch_images})")
        raise BadRequest(400, f"too many images: {len(images)}, at most {limit} per request")
    for p in images if check_types else ():
        error = wrong_type(p)
        if error is not None:
            raise error
    return images


async def read_images(request: Request, limit: int, *, check_types: bool = True) -> list[Part]:
    """The checked ``image`` parts of a request (the body cap is :class:`BodyLimitMiddleware`'s).

    Raises:
        BadRequest: See :func:`parse_form` and :func:`image_parts`; 400 when the client left before
            sending the whole body (Starlette's ``ClientDisconnect`` was a 500 with a logged
            traceback, "Exception in ASGI application", for every aborted upload).
    """
    try:
        body = await request.body()
    except Exception:  # Starlette's ClientDisconnect (starlette is not imported here: not a pinned dependency)
        if await request.is_disconnected():
            raise BadRequest(400, CLIENT_LEFT) from None
        raise
    return image_parts(parse_form(body, request.headers.get("content-type")), limit, check_types=check_types)


async def _client_left(request: Request) -> bool:
    """Waits for the client to disconnect (``True``); ``False`` at once when the server hands anything else, after
    the whole body (then nothing more is watched: no busy loop on a server that answers ``receive`` at once)."""
    message = await request.receive()
    return message.get("type") == "http.disconnect"


async def while_connected(request: Request, work: Awaitable[T]) -> T:
    """Awaits ``work`` (a request's analysis, once its whole body was read) and cancels it if the client disconnects.

    A client that gave up (its timeout, a closed tab) left its photo to be analysed anyway: the server held a
    detection worker for it (19 s for a 20 MP ``/predict``) while other photos waited. Cancelled, its photos still
    waiting for a worker never run, nor do its faces waiting for the age model (a photo a worker already runs goes
    on: only killing the worker would stop it).

    Raises:
        BadRequest: 400 :data:`CLIENT_GONE` (an answer nobody reads: the server drops it) when the client left.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_client_left(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if task.done() or watch.cancelled() or watch.exception() is not None or not watch.result():
            return await task
        task.cancel()
        try:
            await task
        except BaseException:  # its cancellation, or what it raised as it ended: nobody is left to read it
            if asyncio.current_task().cancelling():  # this request itself was cancelled meanwhile
                raise
        raise BadRequest(400, CLIENT_GONE)
    finally:
        for pending in (task, watch):
            if not pending.done():
                pending.cancel()
        await asyncio.gather(task, watch, return_exceptions=True)


_COUNTERS: dict[str, Any] = {}


def count(name: str, documentation: str, status: int) -> None:
    """Adds one to the Prometheus counter ``<name>_total{status}`` (shown on ``/metrics``).

    prometheus_client is imported at the first count, in a request: BentoML sets up its multiprocess metrics
    directory before serving, and the module picks its storage when it is first imported.
    """
    if name not in _COUNTERS:
        import prometheus_client

        _COUNTERS[name] = prometheus_client.Counter(name, documentation, ["status"])
    _COUNTERS[name].labels(status=str(status)).inc()


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    """``{"error": message}`` with ``status`` (and ``headers``: the service's ``X-FaceAge-Model``)."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


INPUT_ERRORS = (BadRequest, ImageDecodeError, ImageProcessingError)


def input_status(e: Exception) -> int:
    """The HTTP status of a bad-input error: the request's own, 400 undecodable, 422 unprocessable."""
    if isinstance(e, BadRequest):
        return e.status
    return 422 if isinstance(e, ImageProcessingError) else 400


PHOTO_ERRORS = (*INPUT_ERRORS, DetectionUnavailable)


def photo_status(e: Exception) -> int:
    """The HTTP status of one of :data:`PHOTO_ERRORS`: :func:`input_status`, or 503 when the detection
    workers are unavailable (not the photo's fault: try again)."""
    return 503 if isinstance(e, DetectionUnavailable) else input_status(e)


def input_error_response(e: Exception) -> JSONResponse:
    """``{"error": message}`` with :func:`input_status` for one of :data:`INPUT_ERRORS`."""
    return error_response(input_status(e), e.message if isinstance(e, BadRequest) else str(e))


def multipart_closed(body: bytes, content_type: str | None) -> bool:
    """Whether a whole ``multipart/form-data`` body has its closing boundary (other bodies: True).

    Without it the parser ends inside a part, and Gradio keeps the file it was writing.
    """
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return True  # not a form, or one the app rejects before writing anything
    close = b"--" + boundary + b"--"
    return body.startswith(close) or b"\r\n" + close in body


def multipart_boundary_error(content_type: str | None) -> str | None:
    """Why python-multipart refuses a ``multipart/form-data`` body's boundary (over 256 bytes), else ``None``.

    Gradio parses its uploads with it too, and answered such a form 500.
    """
    kind, options = parse_options_header(content_type or "")
    boundary = options.get(b"boundary")
    if kind != b"multipart/form-data" or not boundary:
        return None
    try:
        MultipartParser(boundary, {})
    except FormParserError as e:
        return str(e)
    return None


class BodyLimitMiddleware:
    """ASGI middleware: answers 413 to any request whose body passes ``max_bytes``.

    It covers every route, the mounted Gradio app included (mounting Gradio through BentoML
    removes Gradio's own upload cap). A declared Content-Length is checked before reading;
    a streamed body is counted, and once over the cap the app sees a disconnect and its own
    reply is dropped.

    Under ``length_required`` (the UI), a POST must declare its length (411 otherwise; browsers
    always do), and its whole body is read here before the app sees any of it: Gradio writes an
    upload to a temporary file as it streams in, and never deletes that file when the body stops
    early (a streamed body cut at the cap, or a client that disconnects mid-body: each left its
    partial ``tmpXXXX`` file in ``GRADIO_TEMP_DIR``, i.e. ``/dev/shm``). A body that ends early
    never reaches Gradio; it costs at most ``max_bytes`` of memory while it arrives. For the same
    reason a whole multipart body without its closing boundary (Gradio answered 200 ``[]`` and
    kept the file) gets 400 here, as does one whose boundary its parser refuses (Gradio's 500).
    """

    def __init__(self, app, max_bytes: int, length_required: tuple[str, ...] = (),
                 cors_origins: tuple[str, ...] = ()):
        self.app = app
        self.max_bytes = max_bytes
        self.length_required = length_required
        self.cors_origins = cors_origins

    def _cors_headers(self, scope) -> list[tuple[bytes, bytes]]:
        """The CORS headers of this middleware's own answers to an allowed origin (``cors_origins``, see
        :func:`cors_service_config`), as BentoML's CORS middleware adds them to the app's. That middleware sits
        inside this one, so without them a browser hid a 413 (and its message) from the page behind a CORS error."""
        cors = cors_allow_headers(dict(scope["headers"]).get(b"origin"), self.cors_origins)
        return [*cors, (b"vary", b"Origin")] if cors else []

    @staticmethod
    async def _answer(send, cors: list[tuple[bytes, bytes]], status: int, error: str) -> None:
        """Sends ``{"error": error}`` with ``status`` and closes the connection (the app never answers).

        Counted in ``faceage_rejected_requests_total{status}``, the body cap's own count. BentoML's metrics
        middleware is outside the service's middlewares, so ``bentoml_service_request_total`` counts these answers
        too, with the same status (a streamed body's 413 included: the app's own answer to the disconnect it is
        handed next is dropped by ``guarded_send``).
        """
        count("faceage_rejected_requests", "Requests the body cap answered before the app (413, 411, 400)", status)
        body = JSONResponse({"error": error}, status_code=status).body
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close"), *cors]})
        await send({"type": "http.response.body", "body": body})

    async def _reject(self, send, cors: list[tuple[bytes, bytes]], detail: str) -> None:
        await self._answer(send, cors, 413, f"request body {detail} is over the limit of {self.max_bytes} bytes "
                                            "(FACEAGE_MAX_BODY_BYTES)")

    @staticmethod
    async def _read_whole_body(receive, length: int) -> bytes | None:
        """The body of ``length`` declared bytes, or ``None`` when the client left before sending it all."""
        chunks, received = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            chunks.append(chunk)
            received += len(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks) if received == length else None

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        cors = self._cors_headers(scope)
        if length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send, cors, f"of {int(length)} bytes")
            return
        if scope.get("method") == "POST" and any(scope.get("path", "").startswith(prefix)
                                                 for prefix in self.length_required):
            if not length.isdigit():
                await self._answer(send, cors, 411, "send the upload with a Content-Length header")
                return
            body = await self._read_whole_body(receive, int(length))
            if body is None:
                # The client is gone and the app never saw a partial body. The answer goes nowhere (the
                # server drops it), but BentoML's timeout middleware waits for one: without it the
                # request stayed open 120 s, and so did the server's shutdown.
                await self._answer(send, cors, 400, CLIENT_LEFT)
                return
            content_type = dict(scope["headers"]).get(b"content-type", b"").decode("latin-1")
            refused = multipart_boundary_error(content_type)
            if refused is not None:
                await self._answer(send, cors, 400, f"malformed multipart/form-data body: {refused}")
                return
            if not multipart_closed(body, content_type):
                await self._answer(send, cors, 400, "malformed multipart/form-data body: it ends before the "
                                                    "closing boundary (truncated upload?)")
                return
            await self.app(scope, self._replay(body, receive), send)
            return
        state = {"received": 0, "started": False, "rejected": False}

        async def guarded_receive():
            if state["rejected"]:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                state["received"] += len(message.get("body", b""))
                if state["received"] > self.max_bytes and not state["started"]:
                    state["rejected"] = True
                    await self._reject(send, cors, "(streamed)")
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message) -> None:
            if state["rejected"]:
                return  # we already answered 413
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            if not state["rejected"]:
                raise  # the app's own failure; after a 413 it only reacts to the disconnect

    @staticmethod
    def _replay(body: bytes, receive):
        """A ``receive`` that gives ``body`` in one message, then waits on the client (its disconnect)."""
        sent = False

        async def replay():
            nonlocal sent
            if not sent:
                sent = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return replay
