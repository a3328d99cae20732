"""FaceAge BentoML service: the age of every face in a photo, over HTTP and in a Gradio UI.

Input: photos as ``multipart/form-data`` (field ``image``); the model is the BentoML model
``face_age:latest`` (``stages/package.py``: checkpoint, its ONNX export, detector, lineage).
Routes:

- ``POST /predict``: ``{"faces": [{"box": [x1, y1, x2, y2], "age", "age_std", "score"}],
  "width", "height", "model": {lineage}}``, faces largest first (ties to the most central), ``[]`` when there is none;
- ``POST /annotate``: a PNG of the photo with each box and its "#n age ± std" label;
- ``POST /predict_batch``: several ``image`` fields, one result (or error) per image;
- ``POST /crop?face=i``: PNG of face ``i``'s margin crop, exactly as ``preprocess`` cuts it;
- ``GET /model_card``: the served model's card (``text/markdown``), the one ``stages/package.py`` shipped in the
  BentoML model (404 ``{"error"}`` for a model packaged without one);
- every route's answer names the model that gave it in the header ``X-FaceAge-Model`` (its tag, the JSON's
  ``model.tag``), its errors too (not the body cap's 413 nor BentoML's 429: answered before the API); boxes,
  ``width`` and ``height`` are in the upright photo's pixels (EXIF orientation applied), as in the CLI's ``--json``
  and ``/annotate``'s PNG;
- ``/ui``: Gradio (:mod:`faceage.ui`, loaded in the background once the service is ready);
  ``/api/docs``: OpenAPI;
- BentoML's ``/healthz``, ``/livez``, ``/readyz`` and ``/metrics``;
- CORS (off by default): ``FACEAGE_CORS_ORIGINS`` (comma-separated ``scheme://host[:port]``, or ``*``) lets pages
  of those origins call the API from a browser: preflights (``OPTIONS``) are answered and every answer, errors
  included (BentoML's own 429 and 504 too: :class:`faceage.http.CORSService`), carries ``Access-Control-Allow-Origin``
  for them (:func:`faceage.http.cors_service_config`); a value that is not an origin stops the start-up with one line
  naming it.

Every step is :class:`faceage.predict.AgePredictor`'s, with the age network in ONNX Runtime (no
torch in the service); decode + detect + crop run in worker processes and the age model is
batched across requests (:mod:`faceage.serving`). Limits, in-memory parsing and the 4xx
mapping live in :mod:`faceage.http`: 400 (empty body, missing field, not an image, truncated,
too many pixels, a query parameter that does not parse), 413 (body over the cap), 415 (not
multipart/form-data, or a part that is not an image), 422 (face index out of range, or an image that
crashed its worker on its own), 503 (the detection workers cannot start, or died beside other
photos: :class:`faceage.serving.DetectionUnavailable`; ``/readyz`` too while they cannot start);
429 past ``MAX_CONCURRENCY`` requests in progress (BentoML's own ``{"error": "Too many requests"}``, with
``Retry-After`` of :data:`faceage.http.BUSY_RETRY_AFTER_S`: :class:`faceage.http.RetryAfterMiddleware`; the UI's 429s
give their own wait);
500 for a failure no handler expects (the traceback goes to the log, not the client); in ``/predict_batch`` each
photo's error is its own result (``status``: 400, 415, 422, 503 or 500), counted in ``faceage_batch_image_errors_total``;
every error is ``{"error": message}`` (but BentoML's plain-text 404 for a path no route has). Ages
and stds are rounded as the CLI rounds them (:data:`faceage.predict.AGE_DECIMALS`). ``/ui`` holds at
most half of the concurrent requests (:class:`faceage.ui.UIGateMiddleware`), so the API keeps the other
half, and analyses that many photos at once. A request whose client disconnects once it sent its photo is
cancelled (:func:`faceage.http.while_connected`): its photos still waiting for a detection worker or the age model
never run.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import bentoml
import numpy as np
from bentoml.exceptions import BentoMLException
from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from faceage.annotate import annotate as draw_faces, to_png
from faceage.http import (
    CORS_ORIGINS, FIELD, INPUT_ERRORS, LIMITS, PHOTO_ERRORS, BadRequest, BodyLimitMiddleware, CORSService,
    cors_service_config, count, error_response, input_status, photo_status, read_images, while_connected, wrong_type,
)
from faceage.predict import AgePredictor, FaceAge, LocatedFaces, available_cores, split_results
from faceage.serving import RESTART_AFTER_S, AgeBatcher, DetectionUnavailable, LocatorPool, drawn_then_released
from faceage.ui import UI_PATH, LazyUI, UIGateMiddleware, UIMiddleware

log = logging.getLogger("faceage.service")

# Gradio stages UI uploads under GRADIO_TEMP_DIR: keep them in RAM (tmpfs) where there is one.
# Read when gradio is imported: in the background after start-up (faceage.ui.LazyUI).
if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK):
    os.environ.setdefault("GRADIO_TEMP_DIR", os.path.join("/dev/shm", "faceage-gradio"))
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")



def served_model_tag(manifest: Path = Path(__file__).resolve().parent.parent / "bento.yaml",
                     default: str = "face_age:latest") -> str:
    """Inside a bento, the exact model version ``bentoml build`` recorded in its ``bento.yaml``; from source,
    ``face_age:latest``. Why: BentoML resolves ``face_age:latest`` again when a bento is served, so an older
    bento would otherwise serve whatever model was packaged last."""
    if manifest.is_file():  # <bento>/bento.yaml beside <bento>/src/service.py
        import yaml

        for service in yaml.safe_load(manifest.read_text()).get("services") or []:
            for model in service.get("models") or []:
                if str(model.get("tag", "")).split(":")[0] == default.split(":")[0]:
                    return str(model["tag"])
    return default


MODEL_TAG = served_model_tag()
MAX_CONCURRENCY = 64  # requests in progress at once (BentoML answers 429 past it, Retry-After: CORSService)
UI_MAX_CONCURRENCY = MAX_CONCURRENCY // 2  # of which /ui may hold at most this many
# The routes read the raw body and parse it in memory (faceage.http explains why), so FastAPI
# cannot infer their form; this one schema documents it in the generated OpenAPI.
IMAGE_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD], "properties": {FIELD: {"type": "string", "format": "binary"}}}}}}}
# /predict_batch's form: the field repeated (a client generated from the schema sends every photo in one request).
BATCH_FORM = {"requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
    "type": "object", "required": [FIELD], "properties": {FIELD: {
        "type": "array", "items": {"type": "string", "format": "binary"}, "minItems": 1,
        "maxItems": LIMITS.max_batch_images}}}}}}}
MODEL_HEADER = "X-FaceAge-Model"  # the answering model's tag on every route's answer, the PNG ones too
_ERROR = {"content": {"application/json": {"schema": {
    "type": "object", "required": ["error"], "properties": {"error": {"type": "string"}}}}}}
# A 429's or 503's wait, by which a client backs off.
_RETRY_AFTER = {"headers": {"Retry-After": {"description": "seconds to wait before trying again",
                                            "schema": {"type": "integer"}}}}
_MODEL = {MODEL_HEADER: {"description": "tag of the model that answered", "schema": {"type": "string"}}}
# Every route's errors in the service's own shape (FastAPI documented its 422 ``{"detail"}``, which it never sends),
# with their headers: a 429's or 503's wait, and the model of those the API answers (answering_model): not the body
# cap's 413 nor BentoML's 429, answered before the API is reached.
ERRORS = {status: {**_ERROR, "description": why, "headers": {
    **(_RETRY_AFTER["headers"] if status in (429, 503) else {}), **(_MODEL if status not in (413, 429) else {})}}
    for status, why in (
        (400, "bad input: empty body, missing field, not an image, too many pixels, a parameter that does not parse"),
        (413, "body over FACEAGE_MAX_BODY_BYTES"), (415, "not multipart/form-data, or a part that is not an image"),
        (422, "face index out of range, or a photo that crashed its detection worker"),
        (429, "too many requests in progress (traffic.max_concurrency): retry after Retry-After seconds"),
        (503, "detection workers unavailable (Retry-After)"), (500, "internal error (logged)"))}


def ok_response(description: str, media_type: str, headers: dict[str, str], errors: dict = ERRORS) -> dict:
    """OpenAPI ``responses`` of a route: its 200 (``media_type``, with ``headers``: name -> what it gives) and
    ``errors`` (status -> response; the photo routes': :data:`ERRORS`)."""
    if media_type.startswith("image/"):
        schema = {"type": "string", "format": "binary"}
    else:
        schema = {"type": "string"} if media_type.startswith("text/") else {"type": "object"}
    return {200: {"description": description, "content": {media_type: {"schema": schema}},
                  "headers": {name: {"description": what, "schema": {"type": "string"}}
                              for name, what in {**headers, MODEL_HEADER: "tag of the model that answered"}.items()}},
            **errors}


# GET /model_card's 404 (why, where the metadata names a card that is missing: the server's log at start-up).
NO_MODEL_CARD = ("the served model carries no model card: it was packaged without one (its run logged no "
                 "readable model card of its own: rerun that run's evaluate, then package it again)")


def read_model_card(model_dir: str | Path, metadata: dict) -> str | None:
    """The model card a BentoML model ships: the file its metadata's ``model_card`` names (``model_card.md``,
    :func:`faceage.packaging.save_bento_model`) in ``model_dir``; ``None`` where it names none, or a file that is
    not there (or not inside ``model_dir``)."""
    name = metadata.get("model_card")
    if not name:
        return None
    folder = Path(model_dir).resolve()
    path = (folder / str(name)).resolve()
    try:
        if path.parent != folder or not path.is_file():
            raise FileNotFoundError("not a file there")
        return path.read_text(encoding="utf-8", errors="replace")
    except OSError as e:  # the card is a document: the service serves its model without it
        log.warning("the model's metadata names the model card %r, which cannot be read in %s (%s): GET /model_card "
                    "answers 404", name, folder, e)
        return None


class MarkdownResponse(Response):
    media_type = "text/markdown"
    charset = "utf-8"


UI = LazyUI()  # the Gradio UI at /ui (faceage.ui), loaded once the service is ready
api = FastAPI(title="FaceAge", version="2", docs_url="/api/docs", openapi_url="/api/openapi.json", redoc_url=None)


def answering_model(request: Request) -> dict[str, str]:
    """:func:`model_header` for an error the API answers: the model of the service its routes get as ``self`` (the
    dependency FastAPI resolves for them, ``bentoml.get_current_service``, or what overrides it); ``{}`` while none
    is instantiated.

    Without it only the 200s named their model: during a rollout, or behind a load balancer over two bentos, a
    client that got a 422, a 503 or a 500 could not tell which model (which detector, which build's bug) refused it.
    """
    provider = request.app.dependency_overrides.get(bentoml.get_current_service, bentoml.get_current_service)
    try:
        lineage = getattr(provider(), "lineage", None)
    except BentoMLException:  # "service isn't instantiated yet"
        return {}
    return model_header(lineage) if lineage else {}


@api.exception_handler(BadRequest)
async def _bad_request(request: Request, e: BadRequest) -> JSONResponse:
    return error_response(e.status, e.message, answering_model(request))


def validation_message(error: dict) -> str:
    """One of FastAPI's validation errors as a sentence: ``query parameter 'face': <why>, got 'abc'``."""
    where, *names = error.get("loc") or ("request",)
    what = f"{where} parameter {'.'.join(map(str, names))!r}" if names else str(where)
    got = f", got {error['input']!r}" if "input" in error else ""
    return f"{what}: {error.get('msg', 'invalid')}{got}"


@api.exception_handler(DetectionUnavailable)
async def _unavailable(request: Request, e: DetectionUnavailable) -> JSONResponse:
    """The detection workers cannot take the photo now (not its fault): 503 ``{"error": message}``, retry soon."""
    response = error_response(503, str(e), answering_model(request))
    response.headers["Retry-After"] = str(int(RESTART_AFTER_S))
    return response


@api.exception_handler(405)
async def _wrong_method(request: Request, e) -> JSONResponse:
    """A route asked with another method (``GET /predict``): 405 ``{"error": message}`` with its ``Allow`` header,
    not FastAPI's ``{"detail": ...}``."""
    response = error_response(e.status_code, f"{request.method} {request.url.path}: {e.detail}",
                              answering_model(request))
    response.headers.update(e.headers or {})
    return response


INTERNAL_ERROR = "internal error while analysing the photo (the server logged why)"


@api.exception_handler(Exception)
async def _internal_error(request: Request, e: Exception) -> JSONResponse:
    """A failure no other handler expects: 500 ``{"error": message}``, not Starlette's plain-text "Internal Server
    Error" (the traceback still goes to the log, not to the client)."""
    return error_response(500, INTERNAL_ERROR, answering_model(request))


@api.exception_handler(RequestValidationError)
async def _invalid_parameter(request: Request, e: RequestValidationError) -> JSONResponse:
    """A parameter FastAPI could not parse (``/crop?face=abc``): 400 ``{"error": message}``, not its 422 ``detail``."""
    return error_response(400, "; ".join(validation_message(error) for error in e.errors()),
                          answering_model(request))


def batch_error(part, e: Exception) -> dict:
    """A ``/predict_batch`` photo's error result, counted in ``faceage_batch_image_errors_total{status}`` (the
    request itself is a 200, so BentoML's request metrics do not show it)."""
    if isinstance(e, PHOTO_ERRORS):
        status, message = photo_status(e), e.message if isinstance(e, BadRequest) else str(e)
    else:
        status, message = 500, INTERNAL_ERROR
    count("faceage_batch_image_errors", "Photos of /predict_batch answered with an error, by status", status)
    return {"filename": part.filename, "error": message, "status": status}


class PNGResponse(Response):
    media_type = "image/png"


def png(data: bytes, headers: dict[str, str]) -> Response:
    return PNGResponse(content=data, headers=headers)


def model_header(lineage: dict) -> dict[str, str]:
    """``{MODEL_HEADER: tag}``: which model answered (``model.tag`` of the JSON answers). Without it an
    ``/annotate`` or ``/crop`` PNG could not be traced to its model (a rollout, two bentos behind one address)."""
    return {MODEL_HEADER: str(lineage.get("tag", ""))}


@bentoml.service(
    name="face_age",
    resources={"cpu": str(available_cores())},
    # One worker: Gradio's queue lives in one process, and the detection pool uses every core.
    workers=1,
    traffic={"timeout": 120, "max_concurrency": MAX_CONCURRENCY},
    # FACEAGE_CORS_ORIGINS, read as this module is imported (bentoml serve, a container's start): BentoML's CORS
    # support for those origins on the API's routes (none: no CORS headers); /ui stays Gradio's. CORSService adds
    # the headers to what BentoML answers outside its CORS middleware (429 past max_concurrency, 504 past timeout),
    # and, CORS on or off, Retry-After to that 429 (faceage.http.RetryAfterMiddleware).
    **cors_service_config(CORS_ORIGINS),
    service_class=CORSService,
)
@bentoml.asgi_app(api, path="/")
class FaceAgeService:
    """Age of every face in a photo (see the module docstring for routes and :class:`faceage.http.Limits`)."""

    bento_model = bentoml.models.BentoModel(MODEL_TAG)

    def __init__(self) -> None:
        import prometheus_client  # after BentoML has set up its multiprocess metrics directory

        stored = self.bento_model
        self.predictor = AgePredictor.from_model_dir(stored.path, runtime="onnx", threads=LIMITS.threads,
                                                     max_pixels=LIMITS.max_pixels,
                                                     max_detect_pixels=LIMITS.max_detect_pixels)
        self.lineage = {"tag": str(stored.tag), **self.predictor.lineage(), **dict(stored.info.metadata)}
        self.card = read_model_card(stored.path, self.lineage)  # GET /model_card (None: 404)
        # The detection workers start in the background (LocatorPool) while the model warms up.
        self.locator = LocatorPool(self.predictor.locator, LIMITS.detect_processes, LIMITS.start_timeout_s)
        self.predictor.warm_up()
        batch_faces = prometheus_client.Histogram(
            "faceage_age_batch_faces", "Faces per forward pass of the age model (adaptive batching)",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        # With no photo in detection the cores are free: the age model's threads may spin (faster).
        self.batcher = AgeBatcher(lambda faces: self.predictor.estimate(faces, idle=not self.locator.busy),
                                  on_batch=batch_faces.observe)
        UI.configure(self.lineage, LIMITS.max_body_bytes, concurrency=UI_MAX_CONCURRENCY,
                     queue_max_size=LIMITS.ui_queue_size or None)
        log.info("serving %s (run %s, %s) with %d detection process(es); %s; CORS origins: %s", stored.tag,
                 self.lineage.get("mlflow_run_id"), self.predictor.runtime, LIMITS.detect_processes, LIMITS,
                 ", ".join(CORS_ORIGINS) or "none (FACEAGE_CORS_ORIGINS unset)")

    @bentoml.on_startup
    async def load_ui(self) -> None:
        await UI.start()  # in the background: the service is ready without waiting for Gradio

    async def __is_ready__(self) -> bool:
        """``/readyz``: 503 while the detection workers cannot start (:meth:`LocatorPool.ready`)."""
        return self.locator.ready()

    @bentoml.on_shutdown
    async def close(self) -> None:
        self.batcher.close()  # requests still waiting for the age model get a 503 (ServingClosed), not a hang
        # Waits for the detection workers (and their queues' semaphores) to go: the process dies by its signal next.
        await asyncio.to_thread(self.locator.close)
        await UI.close()

    async def analyse(self, data: bytes, *, with_image: bool = False
                      ) -> tuple[LocatedFaces, list[FaceAge], np.ndarray | None]:
        """Encoded photo -> located faces, their ages (largest first, ties to the most central) and, optionally,
        the decoded image."""
        located, image = await self.locator.locate(data, with_image=with_image, crops=False)
        mean, std = await self.batcher(located.inputs)
        return located, split_results([located], mean, std)[0], image

    async def _analyse_one(self, request: Request, *, with_image: bool = False):
        """The one photo of a request, analysed; bad input -> :class:`BadRequest` with its status."""
        part = (await read_images(request, limit=1))[0]
        try:
            return await while_connected(request, self.analyse(part.data, with_image=with_image))
        except INPUT_ERRORS as e:
            raise BadRequest(input_status(e), str(e)) from None

    @api.post("/predict", openapi_extra=IMAGE_FORM, responses=ok_response(
        '{"faces": [{"box", "age", "age_std", "score"}], "width", "height", "model"}', "application/json", {}))
    async def predict(self, request: Request) -> JSONResponse:
        """Faces and ages of the photo in the form field ``image`` (JSON)."""
        located, faces, _ = await self._analyse_one(request)
        return JSONResponse({"faces": [f.as_dict() for f in faces], "width": located.width,
                             "height": located.height, "model": self.lineage}, headers=model_header(self.lineage))

    @api.post("/annotate", openapi_extra=IMAGE_FORM, response_class=PNGResponse, responses=ok_response(
        "the photo with each face's box and label", "image/png", {"X-FaceAge-Faces": "number of faces"}))
    async def annotate(self, request: Request) -> Response:
        """The photo in ``image`` with each face's box and "age ± std" label (PNG)."""
        _, faces, data = await drawn_then_released(self._analyse_one(request, with_image=True),
                                                   lambda image, faces: to_png(draw_faces(image, faces)))
        return png(data, {"X-FaceAge-Faces": str(len(faces)), **model_header(self.lineage)})

    @api.post("/crop", openapi_extra=IMAGE_FORM, response_class=PNGResponse, responses=ok_response(
        "the face's margin crop", "image/png", {"X-FaceAge-Box": "the face's box: x1,y1,x2,y2"}))
    async def crop(self, request: Request,
                   face: int = Query(0, description="face index, largest first (ties to the most central)")) -> Response:
        """Face ``face``'s margin crop (PNG), the exact pixels ``preprocess`` would store."""
        part = (await read_images(request, limit=1))[0]
        try:
            located, _ = await while_connected(request, self.locator.locate(part.data))
        except INPUT_ERRORS as e:
            raise BadRequest(input_status(e), str(e)) from None
        if not 0 <= face < len(located.crops):
            raise BadRequest(422, f"no face {face}: the photo has {len(located.crops)} face(s)")
        box = ",".join(map(str, located.boxes[face].as_list()))
        return png(await asyncio.to_thread(to_png, located.crops[face]),
                   {"X-FaceAge-Box": box, **model_header(self.lineage)})

    @api.get("/model_card", response_class=MarkdownResponse, responses=ok_response(
        "the served model's card (Markdown)", "text/markdown", {},
        errors={404: dict(_ERROR, description="the served model carries no model card", headers=_MODEL),
                429: ERRORS[429], 500: ERRORS[500]}))
    async def model_card(self) -> Response:
        """The served model's card (Markdown): its test MAE, per-group errors, data and lineage."""
        if self.card is None:
            response = error_response(404, NO_MODEL_CARD)
            response.headers.update(model_header(self.lineage))  # which model has no card (a rollout, two bentos)
            return response
        return MarkdownResponse(content=self.card, headers=model_header(self.lineage))

    # FastAPI's @get takes no HEAD (Starlette's routes, BentoML's probes among them, do): `curl -I /model_card` was a
    # 405. Apart from the GET route: one route of both methods gives OpenAPI two operations of the same id.
    @api.head("/model_card", include_in_schema=False)
    async def model_card_head(self) -> Response:
        """``HEAD /model_card``: GET's status and headers (which model answers, whether it ships a card); the server
        sends no body."""
        return await self.model_card()

    @api.post("/predict_batch", openapi_extra=BATCH_FORM, responses=ok_response(
        '{"results": [{"filename", "faces", "width", "height"} or {"filename", "error", "status"}], "model"}',
        "application/json", {}))
    async def predict_batch(self, request: Request) -> JSONResponse:
        """Up to 16 photos (repeated field ``image``): one result or error per photo, in order; a photo that is not
        an image (415), does not decode (400) or hits a bug (500, logged) fails alone."""
        parts = await read_images(request, limit=LIMITS.max_batch_images, check_types=False)
        return await while_connected(request, self._predict_batch(parts))

    async def _predict_batch(self, parts) -> JSONResponse:
        async def locate(part):
            error = wrong_type(part)
            if error is not None:
                raise error
            return await self.locator.locate(part.data, crops=False)

        found = await asyncio.gather(*(locate(p) for p in parts), return_exceptions=True)
        for i, (part, item) in enumerate(zip(parts, found)):
            if isinstance(item, BaseException) and not isinstance(item, Exception):
                raise item  # cancelled: not a photo's result
            if isinstance(item, Exception) and not isinstance(item, PHOTO_ERRORS):
                log.error("/predict_batch: image %d (%s) failed", i, part.filename, exc_info=item)
        located = [item[0] for item in found if not isinstance(item, BaseException)]
        ages = iter(await self._batch_ages(located, [p for p, item in zip(parts, found)
                                                     if not isinstance(item, BaseException)]))
        results = []
        for part, item in zip(parts, found):
            faces = item if isinstance(item, BaseException) else next(ages)
            results.append(batch_error(part, faces) if isinstance(faces, BaseException) else
                           {"filename": part.filename, "faces": [f.as_dict() for f in faces],
                            "width": item[0].width, "height": item[0].height})
        return JSONResponse({"results": results, "model": self.lineage}, headers=model_header(self.lineage))

    async def _batch_ages(self, located: list[LocatedFaces], parts: list) -> list[list[FaceAge] | Exception]:
        """The ages of each located photo of a ``/predict_batch``, or the error of a photo whose faces the age model
        failed on (a 500 that is its own result, as a detection bug's is).

        All faces of all photos go in one call of the batcher (which also merges concurrent requests). Should it
        fail, each photo's faces run again in passes of their own (``alone``), so only the photos whose faces fail
        get the error: before, one such photo made the whole batch a 500.
        """
        try:
            mean, std = await self.batcher([c for loc in located for c in loc.inputs])
            return split_results(located, mean, std)
        except DetectionUnavailable:
            raise  # the batcher closed (ServingClosed): the server shuts down, the whole request's 503
        except Exception as e:
            if len(located) == 1:
                log.error("/predict_batch: the age model failed on %s", parts[0].filename, exc_info=e)
                return [e]
            # Said here: where every photo then gets through alone (a pass too large for memory), nothing else would
            log.warning("/predict_batch: the age model failed on the faces of %d photos together (%s: %s); running "
                        "each photo's alone", len(located), type(e).__name__, e)
        ages: list[list[FaceAge] | Exception] = []
        # Alone: sent back at once, the batcher merged them into the same pass again, which failed again first
        for loc, part, item in zip(located, parts, await asyncio.gather(
                *(self.batcher(loc.inputs, alone=True) for loc in located), return_exceptions=True)):
            if isinstance(item, BaseException) and not isinstance(item, Exception):
                raise item  # cancelled: not a photo's result
            if isinstance(item, Exception):
                if not isinstance(item, DetectionUnavailable):
                    log.error("/predict_batch: the age model failed on %s", part.filename, exc_info=item)
                ages.append(item)
            else:
                ages.append(split_results([loc], *item)[0])
        return ages


# In this order, outermost first: the UI's share of the requests in progress (a slow upload counts
# while the body cap reads it), the body cap, then /ui to Gradio and the rest to the API.
FaceAgeService.add_asgi_middleware(UIGateMiddleware, ui=UI, max_concurrent=UI_MAX_CONCURRENCY,
                                   upload_cache_bytes=LIMITS.ui_upload_cache_bytes)
FaceAgeService.add_asgi_middleware(BodyLimitMiddleware, max_bytes=LIMITS.max_body_bytes,  # every route, /ui too
                                   length_required=(UI_PATH,), cors_origins=CORS_ORIGINS)
FaceAgeService.add_asgi_middleware(UIMiddleware, ui=UI)
