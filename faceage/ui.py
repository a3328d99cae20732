"""The Gradio UI of the service: upload or webcam -> annotated photo + a table of faces.

Input: the running service (:func:`bentoml.get_current_service`, whose ``analyse`` is the API's
own pipeline) and its model lineage. Output: a ``gr.Blocks`` app to mount at ``/ui``, with a
line naming the model and its test (and, when recorded, external-set) MAE, and example photos
bundled in ``faceage/examples/`` (public domain: NASA's astronaut portrait as scikit-image ships
it, and a two-face picture made from it), never the shared datasets.

Gradio is imported here only, in the background once the service is ready (:class:`LazyUI`):
neither the CLI that starts ``bentoml serve`` nor the service's readiness waits for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path
from typing import Any

import numpy as np

from faceage.annotate import annotate as draw_faces, face_label

log = logging.getLogger(__name__)

EXAMPLES_DIR = Path(__file__).resolve().parent / "examples"


def model_line(lineage: dict[str, Any]) -> str:
    """One line about the model: name, backbone, test MAE and any external-set MAE."""
    name = f"{lineage.get('registered_model', 'face-age')} v{lineage.get('registered_version', '?')}"
    parts = [f"Model **{name}** ({lineage.get('backbone', '?')}, MLflow run {lineage.get('mlflow_run_name') or '?'})"]
    if lineage.get("test_mae_years") is not None:
        parts.append(f"test MAE **{float(lineage['test_mae_years']):.2f}** years")
    for name, mae in sorted((lineage.get("external_mae_years") or {}).items()):
        parts.append(f"external set {name!r} MAE **{float(mae):.2f}** years")
    return ", ".join(parts) + "."


def examples() -> list[str]:
    """The bundled example photos."""
    return sorted(str(p) for p in EXAMPLES_DIR.glob("*.jpg"))


async def ui_predict(path: str | None, max_body_bytes: int) -> tuple[np.ndarray, list[list[Any]]]:
    """Uploaded or webcam photo -> annotated image + one table row per face (the API's pipeline)."""
    import bentoml
    import gradio as gr

    from faceage.images import ImageDecodeError
    from faceage.serving import ImageProcessingError

    if not path:
        raise gr.Error("Upload a photo (or take one with the webcam) first.")
    if not os.path.isfile(path):  # Gradio deletes uploads after 10 minutes (delete_cache below)
        raise gr.Error("The photo is no longer on the server (uploads are kept 10 minutes): upload it again.")
    size = os.path.getsize(path)
    if size > max_body_bytes:
        raise gr.Error(f"The file has {size} bytes; the limit is {max_body_bytes}.")
    try:
        _, faces, image = await bentoml.get_current_service().analyse(Path(path).read_bytes(), with_image=True)
    except (ImageDecodeError, ImageProcessingError) as e:
        raise gr.Error(str(e)) from None
    rows = [[i + 1, round(f.age, 1), round(f.age_std, 1), face_label(f), str(list(f.box)), round(f.score, 3)]
            for i, f in enumerate(faces)]
    if not faces:
        gr.Info("No face found in this photo.")
    return draw_faces(image, faces), rows


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


def build_ui(lineage: dict[str, Any], max_body_bytes: int):
    """The Gradio app (``gr.Blocks``)."""
    import gradio as gr

    async def predict(path: str | None):
        return await ui_predict(path, max_body_bytes)

    with gr.Blocks(title="FaceAge", analytics_enabled=False, delete_cache=(300, 600)) as ui:
        gr.Markdown("# FaceAge\nUpload a photo, use the webcam or pick an example: every face gets a box and its "
                    "estimated age ± std (years).\n\n" + model_line(lineage), elem_id="model")
        with gr.Row():
            photo = gr.Image(label="Photo", sources=["upload", "webcam"], type="filepath", image_mode=None,
                             elem_id="photo")
            photo.preprocess = _uploaded_path
            result = gr.Image(label="Faces", format="png", interactive=False, elem_id="annotated")
        table = gr.Dataframe(headers=["face", "age", "age_std", "label", "box", "score"], label="Faces",
                             interactive=False, elem_id="faces")
        button = gr.Button("Estimate ages", variant="primary", elem_id="submit")
        gr.Examples(examples(), inputs=photo, label="Examples (public domain)", elem_id="examples")
        button.click(predict, inputs=photo, outputs=[result, table], api_name="predict")
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
        self.app = None  # the loaded ASGI app (a FastAPI holder with Gradio at /ui)
        self.error: BaseException | None = None
        self._loaded: asyncio.Event | None = None
        self._closing: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def configure(self, lineage: dict[str, Any], max_body_bytes: int) -> None:
        """Settings from the service's ``__init__``: the model's lineage and the upload cap."""
        self.lineage, self.max_body_bytes = lineage, max_body_bytes

    def _build(self):
        import gradio as gr
        from fastapi import FastAPI

        holder = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        # Gradio's own gr.mount_gradio_app: bentoml.gradio.mount_gradio_app (1.4.40) predates
        # Gradio 6, which sets the theme in launch()/gr.mount_gradio_app (else /ui answers 500),
        # and it would lift Gradio's upload cap.
        # The file cap leaves room for the multipart headers around the file in the body the
        # service caps at max_body_bytes: a file just under that passed Gradio's check and got a 413.
        gr.mount_gradio_app(holder, build_ui(self.lineage, self.max_body_bytes), path=UI_PATH,
                            max_file_size=max(self.max_body_bytes - UPLOAD_OVERHEAD, 1), ssr_mode=False,
                            show_error=True,
                            footer_links=["api", "settings"], run_history=False)
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
        except Exception as e:  # the API keeps serving; /ui says what went wrong
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


class UIMiddleware:
    """ASGI middleware: ``/ui`` goes to the :class:`LazyUI` (503 if it is not loaded within
    ``wait_s``), every other path to the service's app."""

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

            why = f"failed to load: {self.ui.error}" if self.ui.error else "is still loading; retry in a few seconds"
            await JSONResponse({"error": f"the UI {why}"}, status_code=503, headers={"Retry-After": "5"})(
                scope, receive, send)
