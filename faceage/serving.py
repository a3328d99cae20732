"""Server concurrency around :class:`faceage.predict.AgePredictor`: worker processes and batching.

Input: a predictor's :class:`~faceage.predict.FaceLocator` settings and its ``estimate``
function. Output: awaitable, asyncio-friendly building blocks for the service:

- :class:`LocatorPool`: decode + detect + crop of encoded images in worker processes (one dlib
  detector each, every core busy; a decoder crash costs the pool, which is replaced, not the
  server, and only the photo that crashes it twice fails);
- :class:`AgeBatcher`: adaptive batching of the age model across concurrent requests.

Kept apart from :mod:`faceage.predict` (the domain steps), which the CLI and ``evaluate`` use
without any of this.
"""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any

import numpy as np

from faceage.errors import FaceAgeError
from faceage.images import load_image
from faceage.predict import FaceLocator, LocatedFaces, available_cores

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_FACES = 64


class ImageProcessingError(FaceAgeError, RuntimeError):
    """A worker process died while decoding or detecting faces in one image (twice: its own fault)."""


# The locator of a worker process, built once by the pool's initializer (a process global:
# ProcessPoolExecutor can only hand state to its workers this way).
_child_locator: FaceLocator | None = None


def _init_child(settings: dict[str, Any]) -> None:
    global _child_locator
    _child_locator = FaceLocator(**settings)
    _child_locator.detector.warm_up()  # the worker's memory is all there before its first photo


def _decode_and_locate(locator: FaceLocator, data: bytes, with_image: bool, crops: bool,
                       parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
    image = load_image(data, max_pixels=locator.max_pixels)
    return locator.locate(image, crops=crops, parallel=parallel), (image if with_image else None)


def _child_locate(data: bytes, with_image: bool, crops: bool,
                  parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
    if _child_locator is None:
        raise RuntimeError("locator process was not initialised")
    return _decode_and_locate(_child_locator, data, with_image, crops, parallel)


def _child_ping() -> int:
    return os.getpid()


class LocatorPool:
    """Decode + detect + crop of encoded images in worker processes, awaitable from asyncio.

    Each worker has its own detector (dlib's is not thread-safe), all cores can detect at
    once, and a decoder or detector that crashes on a hostile file takes down a worker, not
    the server. With ``processes=0`` the work runs in a thread of this process, one image at
    a time.

    A worker that dies (a crash, the OOM killer) breaks the whole pool and every photo in
    flight on it, whichever one caused it. The pool is replaced (and warmed) once, and each
    of those photos is tried again on the new one, one at a time, so that a photo that breaks
    the pool a second time is the one at fault: it alone fails (:class:`ImageProcessingError`).

    A photo detects on two threads (:meth:`faceage.faces.FaceDetector.detect`, the same faces in
    about half the time) while at most half the cores have a photo: one photo at a time on two
    cores uses both, and under load each photo keeps to one core.

    Args:
        locator: The locator whose :meth:`FaceLocator.settings` the workers rebuild.
        processes: Number of worker processes (0: in-process).
    """

    def __init__(self, locator: FaceLocator, processes: int):
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.locator = locator
        self.processes = processes
        self._executor: ProcessPoolExecutor | None = None
        self._lock = asyncio.Lock()  # in-process mode: one detection at a time (one shared detector)
        # Photos that were in flight when a pool broke: their second try runs alone, so that a
        # break then is that photo's own doing, not its neighbour's.
        self._retry_lock = asyncio.Lock()
        self._in_flight = 0
        self.cores = available_cores()
        if processes:
            self._executor = self._start()

    def _start(self) -> ProcessPoolExecutor:
        # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock.
        return ProcessPoolExecutor(max_workers=self.processes, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_child, initargs=(self.locator.settings(),))

    def warm_up(self) -> None:
        """Starts every worker now (in the background), so the first requests do not wait for it."""
        if self._executor is not None:
            for _ in range(self.processes):
                self._executor.submit(_child_ping)

    @property
    def busy(self) -> bool:
        """Whether a photo is being decoded or searched for faces (or waits for a worker) now."""
        return self._in_flight > 0

    async def locate(self, data: bytes, *, with_image: bool = False,
                     crops: bool = True) -> tuple[LocatedFaces, np.ndarray | None]:
        """Decodes encoded image bytes in memory and locates their faces.

        Args:
            data: The encoded image.
            with_image: Also return the decoded RGB image (to draw on); else ``None``.
            crops: Also cut the margin crops when the age model reads chips
                (:meth:`faceage.predict.FaceLocator.locate`).

        Raises:
            faceage.images.ImageDecodeError: The bytes are not a decodable image (or too large).
            ImageProcessingError: The worker process died on this image, on its second try too
                (the pool is replaced).
        """
        self._in_flight += 1
        try:
            return await self._locate(data, with_image, crops)
        finally:
            self._in_flight -= 1

    def parallel(self) -> bool:
        """Whether the photo just admitted should detect on two threads: at most half the cores have one."""
        return 2 * self._in_flight <= self.cores

    async def _locate(self, data: bytes, with_image: bool, crops: bool) -> tuple[LocatedFaces, np.ndarray | None]:
        parallel = self.parallel()
        if self._executor is None:
            async with self._lock:
                return await asyncio.to_thread(_decode_and_locate, self.locator, data, with_image, crops, parallel)
        executor = self._executor
        try:
            return await self._run(executor, data, with_image, crops, parallel)
        except BrokenProcessPool as e:
            self._replace(executor, e)
        async with self._retry_lock:
            executor = self._executor
            if executor is None:
                raise RuntimeError("the detection pool was closed")
            try:
                return await self._run(executor, data, with_image, crops, parallel)
            except BrokenProcessPool as e:
                self._replace(executor, e)
                raise ImageProcessingError(f"a worker process died while decoding or detecting faces in this "
                                           f"{len(data)}-byte image") from e

    @staticmethod
    async def _run(executor: ProcessPoolExecutor, data: bytes, with_image: bool, crops: bool,
                   parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
        return await asyncio.get_running_loop().run_in_executor(executor, _child_locate, data, with_image, crops,
                                                                parallel)

    def _replace(self, broken: ProcessPoolExecutor, error: BrokenProcessPool) -> None:
        """Puts a new, warmed pool in place of ``broken``, unless that was done already (or the pool is closed).

        Every photo in flight on a broken pool gets here; the first replaces it and the others
        find the replacement in place (no await between the check and the swap, so they cannot
        interleave): one new pool per break, not one per photo.
        """
        if self._executor is not broken:
            return
        log.error("a detection worker died (%s); starting a new pool of %d", error, self.processes)
        self._executor = self._start()
        self.warm_up()  # as the first pool: its workers load their detector before the photos retried on it
        broken.shutdown(wait=False, cancel_futures=True)

    def close(self) -> None:
        """Stops the worker processes."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None


class AgeBatcher:
    """Adaptive batching of the age model across concurrent requests (asyncio).

    While the model is idle, a request's faces run at once: no added latency. Requests that
    arrive while a batch runs queue up and go together in the next forward pass (up to
    ``max_batch_faces``), so batches grow with the load.

    Args:
        estimate: ``face inputs -> (mean, std)``, e.g. :meth:`AgePredictor.estimate` of
            ``LocatedFaces.inputs`` (crops, or ``dlib_age`` chips); it runs in a
            worker thread (input preparation included).
        max_batch_faces: Most faces per forward pass (one request's faces are never split).
        on_batch: Called with each batch's face count (for metrics).
    """

    def __init__(self, estimate: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
                 max_batch_faces: int = DEFAULT_MAX_BATCH_FACES, on_batch: Callable[[int], None] | None = None):
        if max_batch_faces < 1:
            raise ValueError(f"max_batch_faces must be >= 1, got {max_batch_faces}")
        self._estimate = estimate
        self.max_batch_faces = max_batch_faces
        self._on_batch = on_batch
        self._pending: list[tuple[list[np.ndarray], asyncio.Future]] = []
        self._running = False
        self._task: asyncio.Task | None = None  # a reference keeps the drain task from being collected

    async def __call__(self, crops: Sequence[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Age mean and std of one request's faces (``LocatedFaces.inputs``)."""
        if len(crops) == 0:
            return np.zeros(0), np.zeros(0)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append((list(crops), future))
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())
        return await future

    async def _drain(self) -> None:
        try:
            while self._pending:
                jobs, faces = [], 0
                while self._pending and (not jobs or faces + len(self._pending[0][0]) <= self.max_batch_faces):
                    jobs.append(self._pending.pop(0))
                    faces += len(jobs[-1][0])
                if self._on_batch is not None:
                    self._on_batch(faces)
                try:
                    mean, std = await asyncio.to_thread(self._estimate, [c for crops, _ in jobs for c in crops])
                except Exception as e:  # hand the failure to every waiting request
                    for _, future in jobs:
                        if not future.done():
                            future.set_exception(e)
                    continue
                start = 0
                for crops, future in jobs:
                    if not future.done():  # a cancelled request (client gone) leaves its future done
                        future.set_result((mean[start:start + len(crops)], std[start:start + len(crops)]))
                    start += len(crops)
        finally:
            self._running = False
