"""The Gradio UI of the service: upload or webcam -> annotated photo + a table of faces.

Input: the running service (:func:`bentoml.get_current_service`, whose ``analyse`` is the API's
own pipeline) and its model lineage. Output: a ``gr.Blocks`` app to mount at ``/ui``, with a
line naming the model and its test (and, when recorded, external-set) MAE, its model card (the one
``GET /model_card`` serves, read once when the UI is built: :func:`service_model_card`) in a closed
"Model card" section, and example photos bundled in ``faceage/examples/`` (public domain: NASA's
astronaut portrait as scikit-image ships it, and a two-face picture made from it), never the shared
datasets.

Gradio is imported here only, in the background once the service is ready (:class:`LazyUI`):
neither the CLI that starts ``bentoml serve`` nor the service's readiness waits for it.

What the UI's HTTP API accepts is narrower than Gradio's defaults, because it is reachable by
anyone who can reach the service: only files a user uploaded (no path on the server's disk, no
URL for the server to fetch); the annotated photo it returns is a JPEG at most
:data:`UI_MAX_SIDE_PX` on its long side (it stays in ``GRADIO_TEMP_DIR``, RAM, for 10-15 minutes, as uploads do);
Gradio's session heartbeat stream, which this UI does not use, answers 404; and all ``/ui``
requests together hold at most a share of the service's concurrent requests
(:class:`UIGateMiddleware`), so the API keeps the rest, and an upload that would take Gradio's cache past
a total (``FACEAGE_UI_UPLOAD_CACHE_BYTES``) is refused. The UI analyses up to that many photos at once
(:data:`UI_CONCURRENCY`; Gradio's default, one, made each UI user wait for every other one), and lets
at most :data:`UI_QUEUE_FACTOR` times that many wait (Gradio's queue had no bound).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from faceage.annotate import annotate as draw_faces, face_label
from faceage.predict import FaceAge

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"
# The annotated photo the UI shows: a 20 MP photo as a full-size PNG was ~16.6 MB, kept in
# GRADIO_TEMP_DIR (/dev/shm) for 10-15 minutes; at 2048 px as a JPEG it is well under 1 MB.
UI_MAX_SIDE_PX = 2048
# Gradio's delete_cache=(UI_CACHE_PURGE_S, UI_CACHE_AGE_S): every UI_CACHE_PURGE_S seconds it deletes the cached
# files (uploads, annotated photos) older than UI_CACHE_AGE_S (by ctime), so a file stays 10 to 15 minutes.
UI_CACHE_PURGE_S = 300
UI_CACHE_AGE_S = 600
UI_CACHE_KEPT = f"{UI_CACHE_AGE_S // 60}-{(UI_CACHE_AGE_S + UI_CACHE_PURGE_S) // 60} minutes"
UI_JPEG_QUALITY = 90  # boxes and labels stay sharp-edged; the /annotate route keeps lossless full-size PNG
# Photos the UI analyses at once (the service passes its UI share, UI_MAX_CONCURRENCY). Gradio's own
# default is 1: every UI user waited for everyone before them (a small photo 5.5 s behind a 20 MP one,
# 0.2 s on /predict). BentoML's bentoml.gradio.mount_gradio_app set it to the service's max_concurrency;
# gr.mount_gradio_app (LazyUI) does not.
UI_CONCURRENCY = 32
# Photos that may wait for one of those slots, as a multiple of them: a request past it is refused at once
# (Gradio's "Queue is full", HTTP 503 on its API). Gradio's queue had no bound: a flood of requests to the UI's
# API all waited, in memory, in front of every later user's photo.
UI_QUEUE_FACTOR = 2
# What the UI says when an analysis fails for no fault of the photo (a bug, the runtime): the words of /predict's 500
# (service.INTERNAL_ERROR), not the exception's text.
UI_INTERNAL_ERROR = "Internal error while analysing the photo (the server logged why): try again, or report it."
# The table of faces' columns. An emptied table is given them (FACES_CLEARED), not nothing: Gradio showed a table
# set to null with the columns "0 1 2 3 4 5" until the next analysis came back.
FACES_HEADERS = ["face", "age", "age_std", "label", "box", "score"]
FACES_CLEARED = {"headers": FACES_HEADERS, "data": [], "metadata": None}
# The annotated photo's text alternative: what it shows, and where its ages are read as text.
ANNOTATED_ALT_TEXT = ("The photo with a numbered box and an age label (age ± std, years) on each face; the table of "
                      "faces below lists them.")
# Runs in the browser when the photo changes or is removed: the last photo's outputs go (returned), and so do
# what a failed analysis of it left: the "Error" badge Gradio's status tracker keeps on each output of a
# failed event until that event runs again (cleared with the badge's own button, as a user would) and the
# error's message (Gradio's toasts: closed as their own close button does). They stayed beside the new photo.
CLEAR_LAST_ANALYSIS_JS = """() => {
    document.querySelectorAll("#annotated .clear-status button, [data-testid=toast-close]")
        .forEach((button) => button.click());
    return [null, %s];
}""" % json.dumps(FACES_CLEARED)


def model_line(lineage: dict[str, Any]) -> str:
    """One line about the model: name, backbone, test MAE and any external-set MAE, each said of which faces.

    The test faces are held out of the collection the model was trained on; an external set's are of another
    collection, as a user's own photo is (README, "Cross-dataset evaluation"). Without those words, a user read the
    test MAE, shown first, as the error to expect on their photo, where the external sets' (larger) is nearer.
    """
    name = f"{lineage.get('registered_model', 'face-age')} v{lineage.get('registered_version', '?')}"
    parts = [f"Model **{name}** ({lineage.get('backbone', '?')}, MLflow run {lineage.get('mlflow_run_name') or '?'})"]
    if lineage.get("test_mae_years") is not None:
        parts.append(f"test MAE **{float(lineage['test_mae_years']):.2f}** years (mean absolute error, on held-out "
                     "faces of the collection it was trained on)")
    for name, mae in sorted((lineage.get("external_mae_years") or {}).items()):
        parts.append(f"external set {name!r} MAE **{float(mae):.2f}** years (faces of another collection, as a "
                     "photo of yours is)")
    return ", ".join(parts) + "."


# What the page says where the served model has no card (GET /model_card answers 404): one line, no broken link.
NO_MODEL_CARD_LINE = ("**No model card:** this model was packaged without one (its run's evaluate wrote no "
                      "card; rerun it, then package the model again).")


def model_card_html(card: str) -> str:
    """The model card (Markdown, tables included) as the HTML the page shows.

    Rendered here with HTML in the Markdown turned off: the card quotes data and settings (a group name such as
    ``<unknown>``, a dataset source), which are text, never markup, and a link with a ``javascript:`` (or other
    unsafe) scheme is not made a link. Gradio's own Markdown component renders raw HTML (sanitised, not escaped).

    Args:
        card: The card's Markdown (:func:`faceage.model_card.write_model_card`).

    Returns:
        An HTML fragment.
    """
    from markdown_it import MarkdownIt  # markdown-it-py: rich's (BentoML's) Markdown parser

    return MarkdownIt("commonmark", {"html": False}).enable(["table", "strikethrough"]).render(card)


def service_model_card() -> str | None:
    """The card the running service serves at ``GET /model_card`` (its ``card``, read from the bento's model
    directory when it started); ``None`` where it ships none, or where no service is running (a bare build)."""
    import bentoml
    from bentoml.exceptions import BentoMLException

    try:
        service = bentoml.get_current_service()
    except BentoMLException:  # "service isn't instantiated yet"
        return None
    card = getattr(service, "card", None)
    return card if isinstance(card, str) and card.strip() else None


def examples() -> list[str]:
    """The bundled example photos."""
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))


def example_label(path: str) -> str:
    """An example's button's text (its accessible name): ``astronaut_twice.jpg`` -> ``"Astronaut twice"``. The
    buttons showed a thumbnail only, and a screen reader announced an empty "button" for each."""
    return Path(path).stem.replace("_", " ").strip().capitalize() or "Example"


def annotate_for_ui(image: np.ndarray, faces: Sequence[FaceAge], max_side_px: int = UI_MAX_SIDE_PX) -> np.ndarray:
    """The photo with each face's box and label, its long side at most ``max_side_px``.

    The photo is downscaled first and the boxes scaled with it, so labels are drawn at the size
    they are shown (sharp, and as large relative to the photo as on ``/annotate``); the table of
    faces keeps the full-size boxes. A photo already small enough is drawn as ``/annotate`` draws it.

    Args:
        image: RGB uint8 array (H, W, 3), full size.
        faces: Its faces, boxes in full-size pixels.
        max_side_px: Longest side of the result.

    Returns:
        A new RGB uint8 array.
    """
    from PIL import Image

    h, w = image.shape[:2]
    scale = min(1.0, max_side_px / max(h, w))
    if scale == 1.0:
        return draw_faces(image, faces)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BICUBIC, reducing_gap=2.0))
    return draw_faces(small, [replace(f, box=tuple(round(v * scale) for v in f.box)) for f in faces])


def to_jpeg(image: np.ndarray, quality: int = UI_JPEG_QUALITY) -> bytes:
    """Encodes an RGB uint8 array as JPEG bytes (what the UI shows)."""
    from PIL import Image

    buf = io.BytesIO()
    # 4:4:4 (no chroma subsampling): the boxes are thin coloured lines, which 4:2:0 smears into the photo.
    Image.fromarray(image).save(buf, format="JPEG", quality=quality, subsampling=0)
    return buf.getvalue()


def _ui_image_file(image: np.ndarray, faces: Sequence[FaceAge]) -> str:
    """:func:`annotate_for_ui` as a JPEG in Gradio's cache (which purges it with the uploads), its path.

    Written here rather than returned as an array: Gradio saves arrays with PIL's default
    quality, and a file already in its cache is served as it is (not copied).
    """
    from gradio import processing_utils, utils

    return processing_utils.save_bytes_to_cache(to_jpeg(annotate_for_ui(image, faces)), "faces.jpg",
                                                utils.get_upload_folder())


async def ui_predict(path: str | None, max_body_bytes: int) -> tuple[str, list[list[Any]]]:
    """Uploaded or webcam photo -> annotated image (a JPEG's path) + one table row per face (the API's pipeline)."""
    import bentoml
    import gradio as gr

    from faceage.images import ImageDecodeError
    from faceage.serving import DetectionUnavailable, ImageProcessingError, drawn_then_released

    def user_error(message: str) -> Exception:
        # The user's message, without the 25-line traceback Gradio logs for every gr.Error by default
        # (a file that is not a photo is the user's mistake, not the server's; the API logs one line).
        return gr.Error(message, print_exception=False)

    if not path:
        raise user_error("Upload a photo (or take one with the webcam) first.")
    if not os.path.isfile(path):  # Gradio deletes uploads after 10-15 minutes (delete_cache in build_ui)
        # Gradio also empties its cache when the server stops: a page left open across a restart sends a photo
        # uploaded seconds before, whose user read "kept 10-15 minutes" alone as no reason at all.
        raise user_error(f"The photo is no longer on the server (uploads are kept {UI_CACHE_KEPT}, and not across a "
                         "restart of the server): upload it again.")
    size = os.path.getsize(path)
    if size > max_body_bytes:
        raise user_error(f"The file has {size} bytes; the limit is {max_body_bytes}.")
    try:  # the annotated JPEG, then the photo's memory given back (after a large one), as /annotate does
        _, faces, shown = await drawn_then_released(
            bentoml.get_current_service().analyse(Path(path).read_bytes(), with_image=True), _ui_image_file)
    except (ImageDecodeError, ImageProcessingError, DetectionUnavailable) as e:
        raise user_error(str(e)) from None
    except gr.Error:  # raised on purpose, its message (and title, duration) written for the user: not a bug
        raise
    except Exception:  # a bug or the runtime's failure: /predict's 500 sentence, the reason in the server's log
        # Gradio's show_error put the exception's own text in front of the user (an ONNX Runtime error names the
        # model's path and its nodes; a KeyError showed a bare "'x'").
        log.exception("the UI's analysis of %s failed", Path(path).name)
        raise user_error(UI_INTERNAL_ERROR) from None
    rows = [[i + 1, round(f.age, 1), round(f.age_std, 1), face_label(f), str(list(f.box)), round(f.score, 3)]
            for i, f in enumerate(faces)]
    if not faces:
        gr.Info("No face found in this photo.")
    return shown, rows


def _uploaded_path(payload) -> str | None:
    """The photo input's preprocessing: the uploaded file as it came.

    Gradio's Image opens every upload with PIL before the handler runs, so a file that is not an
    image, an empty one or one past PIL's pixel cap failed there, and the user read Gradio's
    developer message (the handler's name, the payload, the temp path) instead of the service's.
    The service's decoder (:func:`faceage.images.load_image`: limits, EXIF, errors) reads it instead.
    Set on the instance, not in a subclass: Gradio writes a ``.pyi`` file beside the module of every
    component subclass, which fails where the package is read-only (a container).
    """
    return None if payload is None else str(payload.path)


def _uploads_only(move):
    """Wraps the photo input's ``async_move_resource_to_block_cache``: a URL is refused.

    Gradio's API takes ``{"path": "https://..."}`` for a file input and downloads it into its
    cache, with no size limit (past the service's body cap) and from the server's network. A
    local path is checked by Gradio itself (:meth:`LazyUI._build` marks the app launched).
    """
    async def move_local_only(path):
        import gradio as gr

        # what Gradio downloads (gradio_client.utils.is_http_url_like; any case here, a superset)
        if str(path).lower().startswith(("http://", "https://")):
            # The client's mistake, not the server's: without the 25-line traceback Gradio logs for every gr.Error
            # by default (any client of the API could flood the log with them).
            raise gr.Error("Upload the photo: the UI does not fetch URLs.", print_exception=False)
        return await move(path)

    return move_local_only


# What a client of the UI's API reads when its photo input is not a file it uploaded (a path on the server, a file:
# URL, the "Use via API" page's placeholder sent as it is) or not a file at all (_client_input_errors).
UI_UPLOAD_FIRST = ("upload it first: POST it to /ui/gradio_api/upload and pass the path that answers, as "
                   "{\"path\": ..., \"meta\": {\"_type\": \"gradio.FileData\"}} "
                   "(gradio_client's handle_file('photo.jpg') does both).")
UI_NOT_UPLOADED = "The photo was not uploaded by a user (the UI reads no other file on the server): " + UI_UPLOAD_FIRST
UI_NOT_A_FILE = "The photo input is not a file: " + UI_UPLOAD_FIRST


def _client_input_errors(preprocess_data):
    """Wraps the app's ``preprocess_data`` (Gradio's check of the photo input, before :func:`ui_predict` runs): a
    photo input that is not an uploaded file becomes :data:`UI_NOT_UPLOADED` (or :data:`UI_NOT_A_FILE`), for the
    client.

    Gradio's own messages (``show_error``) named the path resolved against the server's working directory ("Cannot
    move /srv/app/photo.jpg to the gradio cache dir because it was not uploaded by a user") or were a pydantic
    dump, and each such call, the client's mistake, logged a 25-line traceback. Set on the instance, as the photo
    input's methods are (:func:`build_ui`).
    """
    async def preprocess(*args, **kwargs):
        import gradio as gr
        from gradio.exceptions import InvalidPathError

        try:
            return await preprocess_data(*args, **kwargs)
        except InvalidPathError:
            raise gr.Error(UI_NOT_UPLOADED, print_exception=False) from None
        except ValueError as e:
            # pydantic's ValidationError (a ValueError), told by its module: importing pydantic here would make it
            # one more package the bento must pin (tests/unit/test_bentofile.py), for gradio's own dependency
            if not type(e).__module__.startswith(("pydantic", "pydantic_core")):
                raise
            raise gr.Error(UI_NOT_A_FILE, print_exception=False) from None

    return preprocess


# The file the "Use via API" page's snippet uploads (``handle_file('photo.jpg')``), a placeholder to replace.
API_EXAMPLE_FILE = "photo.jpg"


def _api_page_example() -> dict[str, Any]:
    """The photo input's example on the "Use via API" page: a local file the client uploads.

    Gradio's default is a URL of a photo on GitHub, which the UI refuses (:func:`_uploads_only`): its
    snippet, copied as it was, failed. Set on the instance, as :func:`_uploaded_path` is. Written out rather than
    made by ``gradio_client.handle_file``, which refuses a file that does not exist here; the page's snippets show
    its ``url``.
    """
    return {"path": API_EXAMPLE_FILE, "url": API_EXAMPLE_FILE, "meta": {"_type": "gradio.FileData"},
            "orig_name": API_EXAMPLE_FILE}


# What the "Use via API" page says the photo input takes: Gradio's own words ("A local filepath or publicly
# available URL") offered URLs, which the UI refuses (_uploads_only).
API_PHOTO_DESCRIPTION = "A photo file on the client's machine, uploaded (handle_file('photo.jpg')); URLs are refused."


def _api_page_info(api_info: Callable[[], dict[str, Any]]) -> Callable[[], dict[str, Any]]:
    """Wraps the photo input's ``api_info``: its descriptions say a file is uploaded, never that a URL is taken."""
    def info() -> dict[str, Any]:
        schema = json.loads(json.dumps(api_info()))  # a copy: Gradio caches the original
        schema["additional_description"] = API_PHOTO_DESCRIPTION
        url = schema.get("properties", {}).get("url")
        if isinstance(url, dict):
            url["description"] = "The uploaded file's URL on this server (set by the client)"
        return schema

    return info


# The annotated photo's name ("Faces") and its corner buttons (full screen, download, share) above it, on a row of
# their own, instead of over its top corners, where they hid the labels of the faces there (on a phone, over a
# tenth of the photo's width each).
# The model card's wide tables scroll sideways on their own, and its long code (a sha256) wraps: on a phone both ran
# past the screen's edge, cut off where no one could scroll to them.
UI_CSS = """
#annotated label[data-testid=block-label].float { position: static; }
#annotated .image-container { position: static; }
#model-card-text table { display: block; max-width: 100%; overflow-x: auto; border: none; }
#model-card-text code { overflow-wrap: anywhere; }
"""


def build_ui(lineage: dict[str, Any], max_body_bytes: int, concurrency: int = UI_CONCURRENCY,
             queue_max_size: int | None = None, model_card: str | None = None):
    """The Gradio app (``gr.Blocks``).

    Args:
        lineage: The model's lineage (:func:`model_line`).
        max_body_bytes: Largest photo file, in bytes.
        concurrency: Photos analysed at once.
        queue_max_size: Photos that may wait for an analysis (all sessions together); ``None``:
            :data:`UI_QUEUE_FACTOR` times ``concurrency``.
        model_card: The model card's Markdown, shown in a closed "Model card" section; ``None``: the page says
            in one line that the model has none (:data:`NO_MODEL_CARD_LINE`).
    """
    import gradio as gr

    if queue_max_size is None:
        queue_max_size = UI_QUEUE_FACTOR * concurrency

    async def predict(path: str | None):
        return await ui_predict(path, max_body_bytes)

    with gr.Blocks(title="FaceAge", analytics_enabled=False, delete_cache=(UI_CACHE_PURGE_S, UI_CACHE_AGE_S)) as ui:
        gr.Markdown("# FaceAge\nUpload a photo, use the webcam or pick an example: every face gets a box and its "
                    "estimated age ± std (years).\n\n" + model_line(lineage), elem_id="model")
        # The card rendered in the page (not a link to /model_card: a raw Markdown download, and a URL that the
        # UI's mount path, or a proxy's prefix, would have to be spelled into), closed: the photo comes first.
        if model_card:
            with gr.Accordion("Model card", open=False, elem_id="model-card"):
                gr.HTML(model_card_html(model_card), elem_id="model-card-text", js_on_load=None,
                        apply_default_css=True, padding=True)
        else:
            gr.Markdown(NO_MODEL_CARD_LINE, elem_id="model-card")
        with gr.Row():
            # The button right under the photo: after the annotated photo and the table, on a phone's screen it was
            # below the fold once a photo was uploaded.
            with gr.Column():
                photo = gr.Image(label="Photo", sources=["upload", "webcam"], type="filepath", image_mode=None,
                                 elem_id="photo")
                button = gr.Button("Estimate ages", variant="primary", elem_id="submit")
            photo.preprocess = _uploaded_path
            photo.async_move_resource_to_block_cache = _uploads_only(photo.async_move_resource_to_block_cache)
            photo.example_payload = _api_page_example
            photo.api_info = _api_page_info(photo.api_info)
            # Named for a screen reader: Gradio shows the photo as an <img alt=""> in a button (full screen), which was
            # announced as an unnamed "button"; and its label, "Faces", was the table's too (two outputs named alike,
            # on the page and on the "Use via API" page).
            result = gr.Image(label="Annotated photo", alt_text=ANNOTATED_ALT_TEXT, type="filepath", format="jpeg",
                              interactive=False, elem_id="annotated")
        table = gr.Dataframe(headers=FACES_HEADERS, label="Faces",
                             interactive=False, elem_id="faces")
        photos = examples()
        gr.Examples(photos, inputs=photo, label="Examples (public domain)", elem_id="examples",
                    example_labels=[example_label(p) for p in photos])
        # Progress, and a failure's "Error" badge, on the annotated photo only: the table's badge (a Dataframe's
        # status tracker) stayed after its own clear button was clicked, beside the next photo.
        analysis = button.click(predict, inputs=photo, outputs=[result, table], api_name="predict",
                                concurrency_limit=concurrency, show_progress_on=[result])
        # A new photo (or none) takes the last one's faces away and cancels its analysis if it is still running:
        # they stayed beside the new photo as if they were its faces, and the button did nothing until a large
        # photo's analysis ended (Gradio runs a click once at a time). Cleared in the browser: a clear from the
        # server could come back after the next click's faces, and take them away.
        photo.change(None, outputs=[result, table], js=CLEAR_LAST_ANALYSIS_JS, cancels=[analysis],
                     api_visibility="private")
    # Photos waiting for an analysis slot: past this, Gradio refuses a new one at once ("Queue is full", 503)
    # instead of keeping every request of a flood in memory and in line before everyone's next photo.
    ui.queue(max_size=queue_max_size)
    ui.preprocess_data = _client_input_errors(ui.preprocess_data)
    return ui


UI_PATH = "/ui"
UPLOAD_OVERHEAD = 64 * 1024  # bytes of a multipart upload body that are not the file


class LazyUI:
    """The Gradio UI at ``/ui``, loaded in the background once the service is ready.

    Importing Gradio takes seconds (about half of the service's former cold start), so the
    service is ready without it: :meth:`start` (a start-up hook, in the server's event loop)
    builds the app in a thread and runs its lifespan (Gradio's queue) until :meth:`close`.
    :class:`UIMiddleware` routes ``/ui`` to it; a request that comes before it is loaded waits.
    """

    def __init__(self) -> None:
        self.lineage: dict[str, Any] = {}
        self.max_body_bytes = 0
        self.concurrency = UI_CONCURRENCY
        self.queue_max_size: int | None = None  # None: UI_QUEUE_FACTOR x concurrency (build_ui)
        self.app = None  # the loaded ASGI app (a FastAPI holder with Gradio at /ui)
        self.heartbeat = False  # whether the page uses Gradio's heartbeat stream (config "connect_heartbeat")
        self.error: BaseException | None = None
        self._loaded: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def configure(self, lineage: dict[str, Any], max_body_bytes: int, concurrency: int = UI_CONCURRENCY,
                  queue_max_size: int | None = None) -> None:
        """Settings from the service's ``__init__``: the model's lineage, the upload cap, how many photos
        the UI analyses at once and how many may wait (:func:`build_ui`)."""
        self.lineage, self.max_body_bytes, self.concurrency = lineage, max_body_bytes, concurrency
        self.queue_max_size = queue_max_size

    def _build(self):
        import gradio as gr
        from fastapi import FastAPI

        holder = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        # Gradio's own gr.mount_gradio_app: bentoml.gradio.mount_gradio_app (1.4.40) predates
        # Gradio 6, which sets the theme in launch()/gr.mount_gradio_app (else /ui answers 500),
        # and it would lift Gradio's upload cap.
        # The file cap leaves room for the multipart headers around the file in the body the
        # service caps at max_body_bytes: a file just under that passed Gradio's check and got a 413.
        blocks = build_ui(self.lineage, self.max_body_bytes, self.concurrency, self.queue_max_size,
                          model_card=service_model_card())
        # root_path: Gradio's direct-call route (/gradio_api/run/..., which loads a clicked example into the photo
        # input) takes the request's whole path, /ui included, for its own, and gave the example's URL without /ui
        # (a 404: a broken image in the input). Its other routes already use the mount's /ui.
        gr.mount_gradio_app(holder, blocks, path=UI_PATH, root_path=UI_PATH,
                            max_file_size=max(self.max_body_bytes - UPLOAD_OVERHEAD, 1), ssr_mode=False,
                            show_error=True,
                            footer_links=["api", "settings"], run_history=False, css=UI_CSS)
        # Gradio checks that a file input names a file a user uploaded (not any path on the
        # server's disk) only once the app has "launched"; launch() sets this, mounting does not,
        # and without it a POST to /ui/gradio_api/call/predict with {"path": "/etc/passwd"}
        # copied that file into the cache, to be downloaded from /ui/gradio_api/file=...
        blocks.has_launched = True
        self.heartbeat = bool(blocks.config.get("connect_heartbeat"))
        return holder

    async def start(self) -> None:
        """Starts loading the UI in the background (call from the server's event loop)."""
        self._loaded, self._closing = asyncio.Event(), asyncio.Event()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        try:
            holder = await asyncio.to_thread(self._build)
            async with holder.router.lifespan_context(holder):  # Gradio's queue and start-up events
                self.app = holder
                self._loaded.set()
                await self._closing.wait()
        except Exception as e:  # the API keeps serving; /ui answers 503, this log says why
            log.exception("the Gradio UI failed to load")
            self.error = e
        finally:
            self._loaded.set()

    async def wait(self, timeout_s: float) -> None:
        """Waits until the UI is loaded (or failed), at most ``timeout_s``."""
        if self.app is None and self._loaded is not None:
            try:
                await asyncio.wait_for(self._loaded.wait(), timeout_s)
            except TimeoutError:
                pass

    async def close(self) -> None:
        """Ends the UI's lifespan (call at shutdown)."""
        if self._closing is not None:
            self._closing.set()
        if self._task is not None:
            await self._task


HEARTBEAT_PATH = UI_PATH + "/gradio_api/heartbeat/"
UPLOAD_PATH = UI_PATH + "/gradio_api/upload"
UPLOAD_CACHE_REFRESH_S = 1.0  # how old the cache's counted total may be (one walk of the folder per second at most)
UPLOAD_CACHE_RETRY_S = 60  # Retry-After of a refused upload: space frees at Gradio's next purge (every 5 minutes)


def upload_folder() -> str:
    """Gradio's cache folder, where it writes uploads (``gradio.utils.get_upload_folder``, without importing Gradio)."""
    return os.environ.get("GRADIO_TEMP_DIR") or str((Path(tempfile.gettempdir()) / "gradio").resolve())


def folder_bytes(folder: str) -> int:
    """Bytes of the files under ``folder`` (0 when it does not exist); links are not followed."""
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:  # deleted meanwhile (Gradio's purge)
                pass
    return total


UPLOAD_CACHE_FS_SHARE = 0.75  # of the file system holding Gradio's cache, at most, whatever the setting


def file_system_bytes(folder: str) -> int:
    """The size of the file system that holds ``folder`` (or its nearest existing parent)."""
    path = Path(folder).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return shutil.disk_usage(path).total


class UploadBudget:
    """The bytes Gradio's cache holds, against a cap: counted on disk at most every ``refresh_s`` (a walk of the
    folder), plus the uploads admitted since (not yet on disk, or not yet counted), so a burst within one
    refresh cannot pass the cap either.

    The cap is ``max_bytes``, or :data:`UPLOAD_CACHE_FS_SHARE` of the file system holding the cache where that is
    less: a container's ``/dev/shm`` (``--shm-size``, Docker's default 64 MB) filled before a 256 MiB cap, and
    uploads failed with a 500 instead of a 429.
    """

    def __init__(self, max_bytes: int, folder: Callable[[], str] = upload_folder,
                 refresh_s: float = UPLOAD_CACHE_REFRESH_S, clock: Callable[[], float] = time.monotonic,
                 fs_bytes: Callable[[str], int] = file_system_bytes):
        self.setting, self.folder, self.refresh_s = max_bytes, folder, refresh_s
        self.clock, self.fs_bytes = clock, fs_bytes
        self.counted = 0  # bytes on disk at the last walk
        self.counted_at: float | None = None
        self.admitted = 0  # bytes of uploads admitted since the last walk
        self._max_bytes: int | None = None

    @property
    def max_bytes(self) -> int:
        """The cap in force (the file system's share read once, at the first upload)."""
        if self._max_bytes is None:
            try:
                share = int(UPLOAD_CACHE_FS_SHARE * self.fs_bytes(self.folder()))
            except OSError:
                share = self.setting
            self._max_bytes = min(self.setting, share)
        return self._max_bytes

    def held(self) -> int:
        """The bytes the cache holds (or is about to), at most ``refresh_s`` old."""
        now = self.clock()
        if self.counted_at is None or now - self.counted_at >= self.refresh_s:
            self.counted, self.counted_at, self.admitted = folder_bytes(self.folder()), now, 0
        return self.counted + self.admitted

    def admit(self, size: int) -> bool:
        """Whether an upload of ``size`` bytes fits; if so it is counted from now on."""
        if self.held() + size > self.max_bytes:
            return False
        self.admitted += size
        return True


class UIGateMiddleware:
    """ASGI middleware, outside the body cap: the UI's share of the service's concurrent requests.

    BentoML's ``max_concurrency`` counts every open request, and the UI's can stay open for long
    (Gradio's event streams, an upload arriving slowly): 64 of them answered 429 to every
    ``/predict`` while ``/readyz`` stayed 200. Here:

    - ``/ui/gradio_api/heartbeat/...`` answers 404 while the page does not use it (its config's
      ``connect_heartbeat`` is false): the stream never ends on its own;
    - at most ``max_concurrent`` ``/ui`` requests are in progress at once; past that, a ``/ui``
      request gets 429 (``Retry-After``), and the API keeps the other slots;
    - an upload (``POST /ui/gradio_api/upload``) that would take Gradio's cache past ``upload_cache_bytes``
      (0: no cap) gets 429 (``Retry-After``) before its body is read: Gradio keeps every upload 10-15
      minutes, in RAM under ``/dev/shm``, and the caps above are per request (:class:`UploadBudget`).
      One that can never fit gets 413 instead: over the body cap (the UI's ``max_body_bytes``), the body cap's
      own; over the whole cache, this one's. Both got 429 "retry later", which a client retried for ever.
    """

    def __init__(self, app, ui: LazyUI, max_concurrent: int, upload_cache_bytes: int = 0,
                 upload_folder: Callable[[], str] = upload_folder, clock: Callable[[], float] = time.monotonic):
        self.app, self.ui, self.max_concurrent = app, ui, max_concurrent
        self.in_progress = 0
        self.uploads = UploadBudget(upload_cache_bytes, upload_folder, clock=clock) if upload_cache_bytes else None

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not (path == UI_PATH or path.startswith(UI_PATH + "/")):
            await self.app(scope, receive, send)
            return
        from fastapi.responses import JSONResponse

        if scope["type"] == "http" and path.startswith(HEARTBEAT_PATH) and not self.ui.heartbeat:
            await JSONResponse({"error": "not found: this UI does not use Gradio's heartbeat"}, status_code=404)(
                scope, receive, send)
            return
        if self.in_progress >= self.max_concurrent:
            if scope["type"] == "websocket":
                await send({"type": "websocket.close", "code": 1013})  # "try again later"
                return
            await JSONResponse({"error": f"the UI is busy ({self.in_progress} requests in progress, at most "
                                         f"{self.max_concurrent}); retry in a few seconds"},
                               status_code=429, headers={"Retry-After": "5"})(scope, receive, send)
            return
        if (self.uploads is not None and scope["type"] == "http" and scope.get("method") == "POST"
                and path == UPLOAD_PATH):
            length = dict(scope.get("headers") or []).get(b"content-length", b"")
            # No length: the body cap answers 411 (BodyLimitMiddleware's length_required) before Gradio writes.
            size = int(length) if length.isdigit() else None
            if size is None or (self.ui.max_body_bytes and size > self.ui.max_body_bytes):
                pass  # the body cap's own answer (411, or 413 naming FACEAGE_MAX_BODY_BYTES), not "retry later"
            elif size > self.uploads.max_bytes:
                # Never fits, even in an empty cache: a 429 with Retry-After had a client retry it for ever.
                await JSONResponse({"error": f"the upload of {size} bytes is over the UI's whole upload cache, "
                                             f"{self.uploads.max_bytes} bytes (FACEAGE_UI_UPLOAD_CACHE_BYTES, at most "
                                             f"{UPLOAD_CACHE_FS_SHARE:.0%} of the file system holding it)"},
                                   status_code=413)(scope, receive, send)
                return
            elif not self.uploads.admit(size):
                await JSONResponse({"error": f"the UI's uploads hold {self.uploads.held()} bytes, at most "
                                             f"{self.uploads.max_bytes} (FACEAGE_UI_UPLOAD_CACHE_BYTES); each is kept "
                                             f"{UI_CACHE_KEPT}: retry later"},
                                   status_code=429, headers={"Retry-After": str(UPLOAD_CACHE_RETRY_S)})(
                    scope, receive, send)
                return
        self.in_progress += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_progress -= 1


class UIMiddleware:
    """ASGI middleware: ``/ui`` goes to the :class:`LazyUI` (503 if it is not loaded within ``wait_s``, with
    ``Retry-After``; without it once the UI failed to load, which is for good), every other path to the service's
    app."""

    def __init__(self, app, ui: LazyUI, wait_s: float = 120.0):
        self.app, self.ui, self.wait_s = app, ui, wait_s

    async def __call__(self, scope, receive, send) -> None:
        path = scope.get("path", "")
        if scope["type"] not in ("http", "websocket") or not (path == UI_PATH or path.startswith(UI_PATH + "/")):
            await self.app(scope, receive, send)
            return
        await self.ui.wait(self.wait_s)
        if self.ui.app is not None:
            await self.ui.app(scope, receive, send)
        elif scope["type"] == "http":
            from fastapi.responses import JSONResponse

            # Not the exception's text (a path on the server, a runtime's internals), as /predict's 500: the log has it.
            if self.ui.error:
                # For good (the UI loads once, at start-up): no Retry-After, which clients that honour it (urllib3's
                # Retry, many SDKs) followed every 5 s for ever
                why, headers = ("failed to load (the server logged why) and loads again only when the service "
                                "restarts; the API still serves"), {}
            else:
                why, headers = "is still loading; retry in a few seconds", {"Retry-After": "5"}
            await JSONResponse({"error": f"the UI {why}"}, status_code=503, headers=headers)(scope, receive, send)
