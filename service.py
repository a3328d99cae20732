"""FaceAge BentoML service: the age of every face in a photo, over HTTP and in a Gradio UI.

Input: photos as ``multipart/form-data`` (field ``image``); the model is the BentoML model
``face_age:latest`` (``stages/package.py``: checkpoint + detector + lineage).
Routes:

- ``POST /predict``: ``{"faces": [{"box": [x1, y1, x2, y2], "age", "age_std", "score"}],
  "width", "height", "model": {lineage}}``, faces largest first, ``[]`` when there is none;
- ``POST /annotate``: a PNG of the photo with each box and its "age ± std" label;
- ``POST /predict_batch``: several ``image`` fields, one result (or error) per image;
- ``POST /crop?face=i``: PNG of face ``i``'s margin crop, exactly as ``preprocess`` cuts it;
- ``/ui``: Gradio (upload or webcam -> annotated photo + table); ``/api/docs``: OpenAPI;
- BentoML's ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics``.

Every step is :class:`faceage.predict.AgePredictor`'s: decode + detect + crop run in worker
processes (:class:`~faceage.predict.LocatorPool`), and the age model is batched across
concurrent requests (:class:`~faceage.predict.AgeBatcher`). Uploads stay in memory: the
routes read the raw body and parse it themselves, because BentoML's file inputs spool
uploads to temporary files (and fetch URLs given in place of files).

Bad input gets a JSON ``{"error": message}`` with a 4xx status: 400 (empty body, missing
field, not an image, truncated, too many pixels), 413 (body over the cap), 415 (not
multipart/form-data, or a part that is not an image), 422 (face index out of range, or an
image that crashed its worker). Settings (environment variables):

- ``FACEAGE_MAX_BODY_BYTES``: largest request body, default 20 MiB (also caps UI uploads);
- ``FACEAGE_MAX_PIXELS``: largest image in pixels, default 40 M (decompression bombs);
- ``FACEAGE_MAX_DETECT_PIXELS``: larger images are downscaled for detection only (default
  3840x2160; 0 = never);
- ``FACEAGE_DETECT_PROCESSES``: detection worker processes (default: one per core; 0 =
  in-process);
- ``FACEAGE_TORCH_THREADS``: torch threads for the age model (default: half the cores).
"""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Gradio stages UI uploads and results as files under GRADIO_TEMP_DIR: keep them in RAM
# (tmpfs) where there is one. Both must be set before gradio is imported.
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join("/dev/shm", "faceage-gradio"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")

import bentoml  # noqa: E402
from fastapi import FastAPI, Request  # noqa: E402
from fastapi.responses import JSONResponse, Response  # noqa: E402
from python_multipart.exceptions import MultipartParseError  # noqa: E402
from python_multipart.multipart import MultipartParser, parse_options_header  # noqa: E402

from faceage.annotate import annotate as draw_faces, face_label, to_png  # noqa: E402
from faceage.images import DEFAULT_MAX_PIXELS, ImageDecodeError  # noqa: E402
from faceage.predict import (  # noqa: E402
    DEFAULT_MAX_DETECT_PIXELS, AgeBatcher, AgePredictor, ImageProcessingError, LocatedFaces, LocatorPool,
    available_cores, split_results,
)
from faceage.predict import FaceAge as FaceResult  # noqa: E402  (the service class below is FaceAge)

log = logging.getLogger("faceage.service")


def _env_int(name: str, default: int, minimum: int = 0) -> int:
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


MAX_BODY_BYTES = _env_int("FACEAGE_MAX_BODY_BYTES", 20 * 1024 * 1024, minimum=1)
MAX_PIXELS = _env_int("FACEAGE_MAX_PIXELS", DEFAULT_MAX_PIXELS, minimum=1)
MAX_DETECT_PIXELS = _env_int("FACEAGE_MAX_DETECT_PIXELS", DEFAULT_MAX_DETECT_PIXELS)
DETECT_PROCESSES = _env_int("FACEAGE_DETECT_PROCESSES", available_cores())
TORCH_THREADS = _env_int("FACEAGE_TORCH_THREADS", 0) or None
MAX_BATCH_IMAGES = 16  # images per /predict_batch request
MAX_PARTS = 32  # form parts per request
FIELD = "image"
MODEL_TAG = "face_age:latest"


class BadRequest(Exception):
    """A client error: becomes ``{"error": message}`` with ``status``."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


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
        if len(parts) >= MAX_PARTS:
            raise BadRequest(400, f"too many form parts: at most {MAX_PARTS}")
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

    parser = MultipartParser(boundary, {
        "on_part_begin": on_part_begin, "on_header_field": on_header_field, "on_header_value": on_header_value,
        "on_header_end": on_header_end, "on_part_data": on_part_data, "on_part_end": on_part_end,
        "on_end": on_end,
    })
    try:
        parser.write(body)
        parser.finalize()
    except MultipartParseError as e:
        raise BadRequest(400, f"malformed multipart/form-data body: {e}") from None
    if not state.get("complete"):
        raise BadRequest(400, "malformed multipart/form-data body: it ends before the closing boundary "
                              "(truncated upload?)")
    return parts


def image_parts(parts: list[Part], limit: int) -> list[Part]:
    """The ``image`` parts, checked: present, at most ``limit``, image content types only.

    Raises:
        BadRequest: 400 for a missing field or too many images, 415 for a non-image part.
    """
    images = [p for p in parts if p.name == FIELD]
    if not images:
        got = ", ".join(sorted({repr(p.name) for p in parts})) or "none"
        raise BadRequest(400, f"missing form field {FIELD!r} (got fields: {got})")
    if len(images) > limit:
        raise BadRequest(400, f"too many images: {len(images)}, at most {limit} per request")
    for p in images:
        kind = (p.content_type or "").split(";")[0].strip().lower()
        if kind and not (kind.startswith("image/") or kind == "application/octet-stream"):
            raise BadRequest(415, f"form field {FIELD!r} ({p.filename or 'no filename'}) has Content-Type "
                                  f"{kind!r}; expected image/* or application/octet-stream")
    return images


async def read_body(request: Request) -> bytes:
    """The request body, refused with 413 once it passes ``MAX_BODY_BYTES``."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > MAX_BODY_BYTES:
        raise BadRequest(413, f"request body of {int(length)} bytes is over the limit of {MAX_BODY_BYTES} bytes "
                              "(FACEAGE_MAX_BODY_BYTES)")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise BadRequest(413, f"request body is over the limit of {MAX_BODY_BYTES} bytes (FACEAGE_MAX_BODY_BYTES)")
        chunks.append(chunk)
    return b"".join(chunks)


def error_response(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


INPUT_ERRORS = (BadRequest, ImageDecodeError, ImageProcessingError)


def input_status(e: Exception) -> int:
    """The HTTP status of a bad-input error: the request's own, 400 undecodable, 422 unprocessable."""
    if isinstance(e, BadRequest):
        return e.status
    return 422 if isinstance(e, ImageProcessingError) else 400


def input_error_response(e: Exception) -> JSONResponse:
    """``{"error": message}`` with :func:`input_status` for one of :data:`INPUT_ERRORS`."""
    return error_response(input_status(e), e.message if isinstance(e, BadRequest) else str(e))


class BodyLimitMiddleware:
    """ASGI middleware: answers 413 to any request whose body passes ``max_bytes``.

    It covers every route, the mounted Gradio app included (mounting Gradio through BentoML
    removes Gradio's own upload cap). A declared Content-Length is checked before reading;
    a streamed body is counted, and once over the cap the app sees a disconnect and its own
    reply is dropped.
    """

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes

    async def _reject(self, send, detail: str) -> None:
        body = JSONResponse({"error": f"request body {detail} is over the limit of {self.max_bytes} bytes "
                                      "(FACEAGE_MAX_BODY_BYTES)"}, status_code=413).body
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length", b"")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._reject(send, f"of {int(length)} bytes")
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
                    await self._reject(send, "(streamed)")
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


def _png(data: bytes, headers: dict[str, str] | None = None) -> Response:
    return Response(content=data, media_type="image/png", headers=headers)


# --- Gradio UI: calls the running service's own pipeline ---

async def ui_predict(path: str | None) -> tuple[np.ndarray, list[list[Any]]]:
    """Gradio handler: uploaded or webcam photo -> annotated image + one table row per face."""
    import gradio as gr

    if not path:
        raise gr.Error("Upload a photo (or take one with the webcam) first.")
    size = os.path.getsize(path)
    if size > MAX_BODY_BYTES:
        raise gr.Error(f"The file has {size} bytes; the limit is {MAX_BODY_BYTES}.")
    data = Path(path).read_bytes()
    service = bentoml.get_current_service()
    try:
        located, faces, image = await service.analyse(data, with_image=True)
    except (ImageDecodeError, ImageProcessingError) as e:
        raise gr.Error(str(e)) from None
    rows = [[i + 1, round(f.age, 1), round(f.age_std, 1), face_label(f), str(list(f.box)), round(f.score, 3)]
            for i, f in enumerate(faces)]
    if not faces:
        gr.Info("No face found in this photo.")
    return draw_faces(image, faces), rows


def build_ui():
    """The Gradio UI: upload or webcam -> annotated image and a table of faces."""
    import gradio as gr

    with gr.Blocks(title="FaceAge", analytics_enabled=False, delete_cache=(300, 600)) as ui:
        gr.Markdown("# FaceAge\nUpload a photo or use the webcam: every face gets a box and its "
                    "estimated age ± std (years).")
        with gr.Row():
            photo = gr.Image(label="Photo", sources=["upload", "webcam"], type="filepath", image_mode=None,
                             elem_id="photo")
            result = gr.Image(label="Faces", format="png", interactive=False, elem_id="annotated")
        table = gr.Dataframe(headers=["face", "age", "age_std", "label", "box", "score"], label="Faces",
                             interactive=False, elem_id="faces")
        button = gr.Button("Estimate ages", variant="primary", elem_id="submit")
        button.click(ui_predict, inputs=photo, outputs=[result, table], api_name="predict")
    return ui


def mount_ui(app: FastAPI) -> None:
    """Mounts the Gradio UI at ``/ui`` of ``app``, with the service's upload cap.

    Gradio's own ``gr.mount_gradio_app``: ``bentoml.gradio.mount_gradio_app`` (1.4.40) predates
    Gradio 6, which sets the theme in ``launch()``/``gr.mount_gradio_app`` (else ``/ui``
    answers 500), and it would lift Gradio's upload cap.
    """
    import gradio as gr

    gr.mount_gradio_app(app, build_ui(), path="/ui", max_file_size=MAX_BODY_BYTES, ssr_mode=False,
                        show_error=True, footer_links=["api", "settings"], run_history=False)


api = FastAPI(title="FaceAge", version="1", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)
_IMAGE_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD], "properties": {FIELD: {"type": "string", "format": "binary"}}}}}}}


@bentoml.service(
    name="face_age",
    resources={"cpu": str(available_cores())},
    # One worker: Gradio's queue lives in one process, and the detection pool uses every core.
    workers=1,
    traffic={"timeout": 120, "max_concurrency": 64},
)
@bentoml.asgi_app(api, path="/")
class FaceAge:
    """Age of every face in a photo (see the module docstring for routes and settings)."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import prometheus_client  # after BentoML has set up its multiprocess metrics directory

        stored = self.bento_model
        self.predictor = AgePredictor.from_model_dir(stored.path, threads=TORCH_THREADS, max_pixels=MAX_PIXELS,
                                                     max_detect_pixels=MAX_DETECT_PIXELS)
        self.lineage = {"tag": str(stored.tag), **self.predictor.lineage(), **dict(stored.info.metadata)}
        self.locator = LocatorPool(self.predictor.locator, DETECT_PROCESSES)
        self.locator.warm_up()  # workers start in the background while the model warms up
        self.predictor.warm_up()
        batch_faces = prometheus_client.Histogram(
            "faceage_age_batch_faces", "Faces per forward pass of the age model (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.batcher = AgeBatcher(self.predictor.estimate, on_batch=batch_faces.observe)
        # Mounted here, in the worker, before BentoML enters the app's lifespan (which starts
        # Gradio's queue): the `bentoml serve` CLI imports this module only to read the
        # service's config, and skips Gradio's import (~6 s) this way.
        mount_ui(api)
        log.info("serving %s (run %s) with %d detection process(es), body cap %d bytes, pixel cap %d",
                 stored.tag, self.lineage.get("mlflow_run_id"), DETECT_PROCESSES, MAX_BODY_BYTES, MAX_PIXELS)

    @bentoml.on_shutdown
    def close(self) -> None:
        self.locator.close()

    async def analyse(self, data: bytes, *, with_image: bool = False
                      ) -> tuple[LocatedFaces, list[FaceResult], np.ndarray | None]:
        """Encoded photo -> located faces, their ages (largest first) and, optionally, the decoded image."""
        located, image = await self.locator.locate(data, with_image=with_image)
        mean, std = await self.batcher(located.crops)
        return located, split_results([located], mean, std)[0], image

    async def _one_image(self, request: Request) -> bytes:
        parts = parse_form(await read_body(request), request.headers.get("content-type"))
        return image_parts(parts, limit=1)[0].data

    @api.post("/predict", openapi_extra=_IMAGE_FORM)
    async def predict(self, request: Request) -> Response:
        """Faces and ages of the photo in the form field ``image`` (JSON)."""
        try:
            located, faces, _ = await self.analyse(await self._one_image(request))
        except INPUT_ERRORS as e:
            return input_error_response(e)
        return JSONResponse({"faces": [f.as_dict() for f in faces], "width": located.width,
                             "height": located.height, "model": self.lineage})

    @api.post("/annotate", openapi_extra=_IMAGE_FORM)
    async def annotate(self, request: Request) -> Response:
        """The photo in ``image`` with each face's box and "age ± std" label (PNG)."""
        try:
            _, faces, image = await self.analyse(await self._one_image(request), with_image=True)
        except INPUT_ERRORS as e:
            return input_error_response(e)
        png = await asyncio.to_thread(lambda: to_png(draw_faces(image, faces)))
        return _png(png, {"X-FaceAge-Faces": str(len(faces))})

    @api.post("/crop", openapi_extra=_IMAGE_FORM)
    async def crop(self, request: Request, face: int = 0) -> Response:
        """Face ``face``'s margin crop (PNG), the exact pixels ``preprocess`` would store."""
        try:
            located, _ = await self.locator.locate(await self._one_image(request))
        except INPUT_ERRORS as e:
            return input_error_response(e)
        if not 0 <= face < len(located.crops):
            return error_response(422, f"no face {face}: the photo has {len(located.crops)} face(s)")
        png = await asyncio.to_thread(to_png, located.crops[face])
        return _png(png, {"X-FaceAge-Box": ",".join(map(str, located.boxes[face].as_list()))})

    @api.post("/predict_batch")
    async def predict_batch(self, request: Request) -> Response:
        """Up to 16 photos (repeated field ``image``): one result or error per photo, in order."""
        try:
            parts = image_parts(parse_form(await read_body(request), request.headers.get("content-type")),
                                limit=MAX_BATCH_IMAGES)
        except BadRequest as e:
            return error_response(e.status, e.message)
        found = await asyncio.gather(*(self.locator.locate(p.data) for p in parts), return_exceptions=True)
        for item in found:
            if isinstance(item, BaseException) and not isinstance(item, (ImageDecodeError, ImageProcessingError)):
                raise item
        located = [item[0] for item in found if not isinstance(item, BaseException)]
        # All faces of all photos in one call of the batcher (which also merges concurrent requests).
        mean, std = await self.batcher([c for loc in located for c in loc.crops])
        ages = iter(split_results(located, mean, std))
        results = []
        for part, item in zip(parts, found):
            if isinstance(item, BaseException):
                results.append({"filename": part.filename, "error": str(item), "status": input_status(item)})
            else:
                results.append({"filename": part.filename, "faces": [f.as_dict() for f in next(ages)],
                                "width": item[0].width, "height": item[0].height})
        return JSONResponse({"results": results, "model": self.lineage})


FaceAge.add_asgi_middleware(BodyLimitMiddleware, max_bytes=MAX_BODY_BYTES)
