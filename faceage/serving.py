"""Server concurrency around :class:`faceage.predict.AgePredictor`: worker processes and batching.

Input: a predictor's :class:`~faceage.predict.FaceLocator` settings and its ``estimate``
function. Output: awaitable, asyncio-friendly building blocks for the service:

- :class:`LocatorPool`: decode + detect + crop of encoded images in worker processes (one dlib
  detector each, every core busy; a decoder crash costs the pool, which is replaced, not the
  server; only a photo that crashes it on its own fails as its fault, and workers that cannot
  start, or are not up by :data:`START_TIMEOUT_S` (then killed), make :class:`DetectionUnavailable`, a 503, and
  the pool not ready);
- :class:`AgeBatcher`: adaptive batching of the age model across concurrent requests (a failing merged
  pass is run again one request at a time, so only the requests whose own faces fail get its error);
- :class:`ServingClosed` (a 503): what both answer once closed, the server shutting down.

Kept apart from :mod:`faceage.predict` (the domain steps), which the CLI and ``evaluate`` use
without any of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import functools
import gc
import logging
import multiprocessing
import multiprocessing.connection
import os
import signal
import threading
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from concurrent.futures import Future, ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

import numpy as np

from faceage.chips import exit_with_parent
from faceage.errors import FaceAgeError
from faceage.images import ImageTooLarge, load_image
from faceage.onnx_model import MAX_PASS_FACES
from faceage.predict import FaceLocator, LocatedFaces, available_cores

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_MAX_BATCH_FACES = 64
# Most faces in one forward pass of the age model (its memory): a request with more runs in passes of
# this many; the ONNX runtime's own cap (its arena keeps the memory of the largest pass: see there).
DEFAULT_MAX_PASS_FACES = MAX_PASS_FACES
# A pool whose workers died as they started is started again at most this often (requests get a
# 503 meanwhile): workers that cannot start (out of memory, a detector file gone) are not spawned
# again for every request.
RESTART_AFTER_S = 5.0
# The deadline of a pool's start (spawn, imports, detector load and warm-up of every worker): a pool not all up by
# then failed to start, and its workers are killed (one hung for ever, on a detector file of a hung network mount or
# a deadlock in its warm-up, kept the pool and every photo waiting for ever, and /readyz 200); its photos get a 503,
# /readyz too, and the pool is started again under RESTART_AFTER_S. Under BentoML's request timeout (120 s,
# service.py), so a photo that waits for a hung start gets that 503 and not the timeout's error. A cold start of
# the service takes about 10 s (README).
START_TIMEOUT_S = 60.0
# At shutdown, workers still busy with a photo after this long are killed (LocatorPool.close).
CLOSE_TIMEOUT_S = 10.0
# After a photo of at least this many pixels, a process gives the C heap's free pages back
# (release_memory): a 12 MP photo left its detection worker 115 MB larger, for good.
RELEASE_AFTER_PIXELS = 4_000_000


class ImageProcessingError(FaceAgeError, RuntimeError):
    """A worker process died while decoding or detecting faces in one image, on its second try with no
    other photo in flight on that pool: the image's own fault (HTTP 422)."""


class DetectionUnavailable(FaceAgeError, RuntimeError):
    """The detection workers cannot take a photo now, through no fault of the photo (HTTP 503, try again):
    they die as they start, or are not up by :data:`START_TIMEOUT_S` (one hung), or one died beside other
    photos while this one was retried."""


# What a photo is told when the detection pool was closed (ServingClosed.pool_closed): written once.
POOL_CLOSED = "the detection pool was closed (the server is shutting down)"


class ServingClosed(DetectionUnavailable):
    """The detection pool or the age batcher was closed (the server is shutting down): the request is not
    answered here, through no fault of its photo (HTTP 503 like :class:`DetectionUnavailable`, try again)."""

    @classmethod
    def pool_closed(cls, before: str = "") -> ServingClosed:
        """The detection pool's: ``"<POOL_CLOSED>[ before]: try again"``, e.g. ``before="before this photo was
        analysed"`` for a photo whose workers were stopped for the shutdown while it was in flight."""
        return cls(f"{POOL_CLOSED}{' ' + before if before else ''}: try again")


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    try:
        return ctypes.CDLL(None).malloc_trim  # glibc; musl and macOS have none
    except (OSError, AttributeError):
        return None


def release_memory() -> None:
    """Gives the C heap's free pages back to the system (glibc's ``malloc_trim``; elsewhere nothing).

    After a large photo, the buffers it freed stay in the process: glibc raises its mmap threshold
    to the size of the largest block freed (up to 32 MB), so the image pyramid's blocks come from
    the heap, and freeing them left a detection worker 115-150 MB larger after one 12-36 MP photo,
    and the server process 250 MB larger after ``/annotate`` of a 36 MP one (measured); this gives
    that back (10-15 ms).
    """
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


async def drawn_then_released(analysis: Awaitable[tuple[Any, Any, np.ndarray]],
                              draw: Callable[[np.ndarray, Any], T]) -> tuple[Any, Any, T]:
    """Awaits ``analysis`` (``(located, faces, image)``: a photo's analysis with its decoded image), runs
    ``draw(image, faces)`` in a worker thread, drops the image and, after a photo of at least
    :data:`RELEASE_AFTER_PIXELS` pixels, gives the C heap's free pages back (:func:`release_memory`).

    The one place where the server process lets go of a decoded photo, for ``/annotate`` and the UI alike
    (``/annotate`` of a 36 MP photo left the server 250 MB larger, three 38 MP photos through the UI 318 MB;
    the UI had no release until round 25). The image never reaches the caller, so the caller holds no
    reference to it.

    Returns:
        ``(located, faces, draw's result)``.
    """
    located, faces, image = await analysis
    result = await asyncio.to_thread(draw, image, faces)
    large = image.shape[0] * image.shape[1] >= RELEASE_AFTER_PIXELS
    del image
    if large:
        await asyncio.to_thread(release_memory)
    return located, faces, result


# The locator of a worker process, built once by the pool's initializer, and the barrier at which
# the pool's start jobs meet (process globals: ProcessPoolExecutor can only hand state to its
# workers this way).
_child_locator: FaceLocator | None = None
_child_started: Any = None  # multiprocessing Barrier, one party per worker


_STOP_SIGNALS = {signal.SIGINT, signal.SIGTERM}


@contextlib.contextmanager
def _stop_signals_blocked() -> Iterator[None]:
    """Blocks SIGINT and SIGTERM in the calling thread while it spawns a pool's workers, which inherit the mask.

    A worker spends its first seconds importing (numpy, dlib, the faceage modules) before :func:`_init_child` ignores
    them: a Ctrl-C (the whole process group) in a server's first seconds killed the workers as they started, and
    the photos in flight got "the detection workers did not start" 503s during the shutdown. Blocked, a signal waits
    in the worker until its initializer ignores it (as multiprocessing's resource tracker is started); the server
    process itself still gets its own (another thread takes it, or it is delivered once unblocked: never lost).
    """
    old = signal.pthread_sigmask(signal.SIG_BLOCK, _STOP_SIGNALS)
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, old)


def _init_child(settings: dict[str, Any], started: Any = None) -> None:
    global _child_locator, _child_started
    # Ctrl-C (or ``kill -- -PGID``) signals the server's whole process group: the workers leave it to the server,
    # whose graceful shutdown still needs them for the photos in flight, and end when it closes the pool (or is
    # gone: exit_with_parent). Dying at once, they made those photos 503s ("the detection workers did not start")
    # and a new pool was spawned during the shutdown.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # Born with both blocked (_stop_signals_blocked): one that came as the worker started is discarded by SIG_IGN.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, _STOP_SIGNALS)
    exit_with_parent()
    _child_locator = FaceLocator(**settings)
    _child_locator.detector.warm_up()  # the worker's memory is all there before its first photo
    _child_started = started


def _child_started_all(timeout: float) -> int:
    """A pool's start job, one per worker: returns once every worker of the pool has its locator.

    Each waits at the pool's barrier, so the jobs run on distinct workers; sent before any photo,
    they keep photos off a pool until all its workers are up.
    """
    if _child_started is not None:
        _child_started.wait(timeout)
    return os.getpid()


# The setting of the server's pixel cap, named in its "image too large" message (as the body cap's names its own).
MAX_PIXELS_SETTING = "FACEAGE_MAX_PIXELS"


def _decode_and_locate(locator: FaceLocator, data: bytes, with_image: bool, crops: bool,
                       parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
    try:
        image = load_image(data, max_pixels=locator.max_pixels)
    except ImageTooLarge as e:
        # The pixel cap's message names the server's setting (load_image's own serves the CLI too, whose setting is
        # --max-pixels); not where Pillow's own cap is the lower one ("Pillow decodes no more"): ours is moot.
        if e.limit == locator.max_pixels:
            raise ImageTooLarge(f"{e} ({MAX_PIXELS_SETTING})", e.pixels, e.limit) from e
        raise
    return locator.locate(image, crops=crops, parallel=parallel), (image if with_image else None)


def _child_locate(data: bytes, with_image: bool, crops: bool,
                  parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
    if _child_locator is None:
        raise RuntimeError("locator process was not initialised")
    located, image = _decode_and_locate(_child_locator, data, with_image, crops, parallel)
    if located.width * located.height >= RELEASE_AFTER_PIXELS:
        if image is None:
            release_memory()  # nothing of the photo is left but its faces
        else:  # the image leaves once this returns: give its memory back then
            timer = threading.Timer(1.0, release_memory)
            timer.daemon = True
            timer.start()
    return located, image


def _suspect(job: Future) -> bool:
    """Whether a photo's job may have killed its pool's worker: still running or queued, or failed with the pool."""
    if not job.done():
        return True
    return not job.cancelled() and isinstance(job.exception(), BrokenProcessPool)


class _Workers:
    """One pool of worker processes: its executor, its start jobs, the photo jobs sent to it."""

    def __init__(self, processes: int, settings: dict[str, Any], start_timeout_s: float | None = None):
        # The start's deadline: the pool's own (FACEAGE_START_TIMEOUT_S), else the module's default, read now.
        self.start_timeout_s = START_TIMEOUT_S if start_timeout_s is None else start_timeout_s
        context = multiprocessing.get_context("spawn")
        self.barrier = context.Barrier(processes)
        # spawn, not fork: forking a process that already runs torch/OpenMP threads can deadlock.
        self.executor = ProcessPoolExecutor(max_workers=processes, mp_context=context, initializer=_init_child,
                                            initargs=(settings, self.barrier))
        self.born = time.monotonic()
        # Submitted first, one per worker: all of them start now (each submit spawns one), and no photo runs before
        # they are all up; spawned with the stop signals blocked (_stop_signals_blocked).
        with _stop_signals_blocked():
            self.started = [self.executor.submit(_child_started_all, self.start_timeout_s) for _ in range(processes)]
        self.jobs: set[Future] = set()
        # Every worker this pool spawned (one per start job, above): those the deadline kills.
        self.processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.timed_out: TimeoutError | None = None  # set at the deadline when the workers were not all up
        # Whether the deadline killed the workers (then stop() has none to kill), or stop() has begun (then the
        # deadline leaves the workers to it); one or the other, under this lock.
        self._killed = self._stopping = False
        self._kill_lock = threading.Lock()
        # Kept from here, not left to the workers' barrier (which only times out in workers that started): a worker
        # hung in its initializer never takes a start job, so with one worker (or all hung) nothing ever failed.
        self._stopped = threading.Event()
        self._deadline = threading.Thread(target=self._watch_start, name="faceage-start-deadline", daemon=True)
        self._deadline.start()

    def _watch_start(self) -> None:
        """The deadline's thread: ends once the pool is up (or stopped), or runs :meth:`_start_deadline` at it.

        A thread that polls (0.2 s), not a ``threading.Timer`` or done-callbacks on the start jobs: both keep a
        reference cycle back to this pool once it is up, and the pool (with its barrier's named semaphores) then
        outlived :meth:`stop` until a garbage collection that a server killed by its signal never runs.
        """
        deadline = self.born + self.start_timeout_s
        while not self._stopped.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.up():
                return
            if self.start_error() is not None and not self._alive():
                # Failed with no worker left (all died in their initializer: a detector file gone): nothing to kill.
                # Kept to the deadline, it held the replaced pool (one more every RESTART_AFTER_S) and then logged a
                # hang and a kill that never happened. No worker is left for stop() to kill.
                with self._kill_lock:
                    if not self._stopping:
                        self._killed = True
                return
            if time.monotonic() >= deadline:
                self._start_deadline()
                return

    def _alive(self) -> list[Any]:
        """This pool's worker processes still running (their sentinels not ready: no ``waitpid`` here, which would
        reap them behind the executor's back)."""
        processes = {}
        for process in self.processes:
            with contextlib.suppress(ValueError):  # closed: ended
                processes[process.sentinel] = process
        ended = set(multiprocessing.connection.wait(list(processes), timeout=0))
        return [process for sentinel, process in processes.items() if sentinel not in ended]

    def _start_deadline(self) -> None:
        """At :data:`START_TIMEOUT_S` after the pool was made (its deadline's thread): a pool not all up by then failed
        to start (:attr:`timed_out`, unless it failed already), and its workers are killed.

        SIGKILL, as nothing else ends them: a worker hung in its initializer never reads the executor's shutdown
        sentinel and ignores SIGTERM (:func:`_init_child`; the executor's own clean-up of a broken pool sends that,
        then waits for it for ever). Killed, the executor breaks: the start jobs and the photos waiting for them fail
        with ``BrokenProcessPool`` now (a 503: :meth:`LocatorPool.locate`), and their slots are freed.
        """
        with self._kill_lock:
            if self.up() or self._stopping:
                return
            self._killed = True
            alive = self._alive()
            if not alive:  # they all died already (their executor reports why): no hang, nothing to kill
                return
            if self.start_error() is None:
                self.timed_out = TimeoutError(f"not all up within {self.start_timeout_s:.0f} s "
                                              f"(FACEAGE_START_TIMEOUT_S): killed")
            log.error("the detection workers were not all up %.0f s after their pool was made "
                      "(FACEAGE_START_TIMEOUT_S); killing %d worker process(es)", self.start_timeout_s, len(alive))
            # All of them, those waiting at the barrier too (not released first: one could take a photo before its
            # kill).
            for process in alive:
                with contextlib.suppress(OSError, ValueError):  # ended already, or closed by the executor
                    process.kill()

    def start_error(self) -> BaseException | None:
        """Why the workers did not all start (one died, they timed out at the barrier, or the pool's deadline passed:
        :meth:`_start_deadline`); ``None`` while they start or once up."""
        if self.timed_out is not None:
            return self.timed_out
        for job in self.started:
            if job.done():
                if job.cancelled():
                    return BrokenProcessPool("the pool was shut down while its workers started")
                if job.exception() is not None:
                    return job.exception()
        return None

    def up(self) -> bool:
        """Whether every worker started."""
        return all(job.done() for job in self.started) and self.start_error() is None

    def broken(self) -> BrokenProcessPool | None:
        """Why the pool is broken (a worker died), once its executor has seen it; ``None`` while it works."""
        why = getattr(self.executor, "_broken", False)  # set by the executor's manager thread (CPython 3.8+)
        return BrokenProcessPool(str(why)) if why else None

    def submit(self, *args: Any) -> Future:
        """Sends a photo to ``_child_locate``, tracked (:meth:`others`). Raises ``BrokenProcessPool`` when broken."""
        job = self.executor.submit(_child_locate, *args)
        self.jobs = {j for j in self.jobs if _suspect(j)}
        self.jobs.add(job)
        return job

    def stop(self, timeout: float) -> None:
        """Shuts the pool down and waits, at most ``timeout`` seconds, for its workers to end (then kills them) and
        for the executor's manager thread, which holds the queues, to let go of them; the queues' semaphores are
        then released (:meth:`LocatorPool.close`)."""
        executor = self.executor
        manager = getattr(executor, "_executor_manager_thread", None)  # CPython 3.9+; set to None by shutdown
        processes = list((getattr(executor, "_processes", None) or {}).values())
        with self._kill_lock:
            self._stopping = True
            self._stopped.set()
            # A pool that is not up has no photo on its workers (none runs before all are up): they are killed now,
            # those still starting and those waiting for them at the start barrier, not left to its timeout. Never
            # released with Barrier.abort(): its notify waits for every waiter to acknowledge the wake-up, and one
            # killed while it waited there (the OOM killer, a kill -9) never does: the server's shutdown hung for ever.
            starting = [] if self.up() or self._killed else self._alive()
            for process in starting:
                with contextlib.suppress(OSError, ValueError):  # ended already, or closed by the executor
                    process.kill()
        if starting:
            log.info("closed while its workers started: killed %d detection worker process(es)", len(starting))
        executor.shutdown(wait=False, cancel_futures=True)
        deadline = time.monotonic() + timeout
        if manager is not None:
            manager.join(max(0.0, deadline - time.monotonic()))
            if manager.is_alive():  # a worker still busy with a photo: it is not waited for any longer
                log.warning("the detection workers did not stop within %.0f s; killing them", timeout)
                for process in processes:
                    process.kill()
                manager.join(5.0)
        if self._deadline is not threading.current_thread():
            self._deadline.join(1.0)  # it ends at once now; until then it holds this pool
        del executor, manager, processes
        gc.collect()  # what is left in reference cycles is released now, not at a collection that never comes

    def others(self, job: Future) -> int:
        """Other photos that were in flight when the pool broke under ``job`` (any of them may have broken it)."""
        return sum(1 for j in self.jobs if j is not job and _suspect(j))


class _PoolBroke(Exception):
    """A photo's job failed with its pool; ``others``: photos in flight beside it (``None``: it never
    reached a worker)."""

    def __init__(self, error: BrokenProcessPool, others: int | None):
        super().__init__(str(error))
        self.error = error
        self.others = others


class LocatorPool:
    """Decode + detect + crop of encoded images in worker processes, awaitable from asyncio.

    Each worker has its own detector (dlib's is not thread-safe), all cores can detect at
    once, and a decoder or detector that crashes on a hostile file takes down a worker, not
    the server. With ``processes=0`` the work runs in a thread of this process, one image at
    a time. The workers start (and warm up) in the background as the pool is made.

    A worker that dies (a crash, the OOM killer) breaks the whole pool and every photo in
    flight on it, whichever one caused it. The pool is replaced (and warmed) once, and each
    of those photos is tried again on the new one, one at a time. A photo that breaks the new
    pool with no other photo in flight there is the one at fault: it alone fails
    (:class:`ImageProcessingError`, 422). One that breaks it beside other photos (new requests
    go on meanwhile) cannot be told from them: :class:`DetectionUnavailable` (503, try again),
    not blamed. Workers that die as they start (before any photo reaches them), or that are not
    all up :data:`START_TIMEOUT_S` after the pool was made (one hung loading its detector: they
    are killed), are a server fault: :class:`DetectionUnavailable` too for the photos waiting for
    them and for those sent until a pool starts again, :meth:`ready` is ``False`` (``/readyz``),
    and the pool is started again at most every :data:`RESTART_AFTER_S`.

    A photo reaches the executor only once a worker is free for it (the executor's own queue cannot be cancelled),
    so one whose request is cancelled while it waits (its client gone: :func:`faceage.http.while_connected`, or
    BentoML's timeout) never runs; one a worker already runs goes on.

    A photo detects on two threads (:meth:`faceage.faces.FaceDetector.detect`, the same faces in
    about half the time) while at most half the cores have a photo: one photo at a time on two
    cores uses both, and under load each photo keeps to one core.

    Args:
        locator: The locator whose :meth:`FaceLocator.settings` the workers rebuild.
        processes: Number of worker processes (0: in-process).
        start_timeout_s: The deadline of each pool's start (``FACEAGE_START_TIMEOUT_S``); ``None``:
            :data:`START_TIMEOUT_S`.
    """

    def __init__(self, locator: FaceLocator, processes: int, start_timeout_s: float | None = None):
        if processes < 0:
            raise ValueError(f"processes must be >= 0, got {processes}")
        self.locator = locator
        self.processes = processes
        self.start_timeout_s = start_timeout_s
        self._workers: _Workers | None = None
        self._closed = False
        self._start_failed = False  # the newest pool seen to finish its start did not start
        self._lock = asyncio.Lock()  # in-process mode: one detection at a time (one shared detector)
        # ... held by the working thread itself: a request cancelled mid-detection (BentoML's timeout) leaves the
        # asyncio lock while its thread runs on, and the next photo's full-size decode ran beside it.
        self._image_lock = threading.Lock()
        # Photos that were in flight when a pool broke: their second try runs alone among them.
        self._retry_lock = asyncio.Lock()
        self._in_flight = 0
        # Photos sent to the executor and not yet done: at most one per worker (_run).
        self._slots = asyncio.Semaphore(max(processes, 1))
        # close() runs in a worker thread (the service's shutdown hook), the rest on the event loop's thread: which
        # pool is in place, and whether the pool is closed, change together under this lock, so that a pool made
        # (_replace) or a photo sent (_run) as close() runs is never left to a pool that close() did not stop.
        self._swap = threading.Lock()
        self.cores = available_cores()
        if processes:
            self._workers = self._start()

    def _start(self) -> _Workers:
        return _Workers(self.processes, self.locator.settings(), self.start_timeout_s)

    @property
    def busy(self) -> bool:
        """Whether a photo is being decoded or searched for faces (or waits for a worker) now."""
        return self._in_flight > 0

    def ready(self) -> bool:
        """Whether photos can be detected (``/readyz``): ``False`` once closed, and while the workers cannot
        start (the newest pool's died, or were not all up by :data:`START_TIMEOUT_S`) until a pool starts again.

        The first pool still starting counts as ready (photos wait for it, up to its deadline); one started
        again after a failed start does not (photos get a 503 meanwhile). Asking restarts a pool that failed to
        start once :data:`RESTART_AFTER_S` have passed, and replaces one whose worker died while idle (killed,
        the OOM killer), so a probe heals a pool no request reaches: before, the next photo paid the restart.
        """
        if self._closed:
            return False
        if not self.processes:
            return True
        try:
            workers = self._current()
        except DetectionUnavailable:
            return False
        broken = workers.broken()
        if broken is not None and workers.up():  # died once up (a pool that fails its start: _current's throttle)
            self._replace(workers, broken)
        return not self._start_failed

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
            ImageProcessingError: The worker process died on this image, on its second try too,
                with no other photo in flight (the pool is replaced).
            DetectionUnavailable: The workers do not start (they die, or are not up by
                :data:`START_TIMEOUT_S`), or died beside other photos on this photo's second try: not the
                photo's fault (try again).
            ServingClosed: The pool was closed (a :class:`DetectionUnavailable`: 503).
        """
        self._in_flight += 1
        try:
            return await self._locate(data, with_image, crops)
        except DetectionUnavailable as e:
            if self._closed and not isinstance(e, ServingClosed):  # the workers stopped for the shutdown, not broken
                raise ServingClosed.pool_closed("before this photo was analysed") from e
            raise
        finally:
            self._in_flight -= 1

    def parallel(self) -> bool:
        """Whether the photo just admitted should detect on two threads: at most half the cores have one."""
        return 2 * self._in_flight <= self.cores

    async def _locate(self, data: bytes, with_image: bool, crops: bool) -> tuple[LocatedFaces, np.ndarray | None]:
        parallel = self.parallel()
        if not self.processes:
            if self._closed:
                raise ServingClosed.pool_closed()
            async with self._lock:
                located, image = await asyncio.to_thread(self._decode_and_locate_alone, data, with_image, crops,
                                                         parallel)
            if image is None and located.width * located.height >= RELEASE_AFTER_PIXELS:
                await asyncio.to_thread(release_memory)  # as a worker does (_child_locate); with the image: its caller
            return located, image
        workers = self._current()
        try:
            return await self._run(workers, data, with_image, crops, parallel)
        except _PoolBroke as e:
            self._replace(workers, e.error)
            error = workers.start_error()
            if error is not None:  # its pool never started (its workers died, or hung past the deadline): a 503 now
                raise _not_started(error) from e.error
        async with self._retry_lock:
            for _ in range(3):
                workers = self._current()
                await self._started(workers)
                if workers is not self._workers:
                    continue  # another photo broke it while it started: on to the new one
                try:
                    return await self._run(workers, data, with_image, crops, parallel)
                except _PoolBroke as e:
                    self._replace(workers, e.error)
                    if e.others is None:
                        continue  # broken before this photo reached it
                    if e.others:
                        raise DetectionUnavailable(
                            f"a detection worker died twice while this {len(data)}-byte image was in flight, the "
                            f"second time beside {e.others} other photo(s): not known to be this image's fault, "
                            f"try again") from e.error
                    raise ImageProcessingError(f"a worker process died while decoding or detecting faces in this "
                                               f"{len(data)}-byte image") from e.error
            raise DetectionUnavailable("the detection workers kept dying before this image reached them: try again")

    def _decode_and_locate_alone(self, data: bytes, with_image: bool, crops: bool,
                                 parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
        with self._image_lock:  # one image at a time, whatever happened to the request that sent it
            return _decode_and_locate(self.locator, data, with_image, crops, parallel)

    async def _run(self, workers: _Workers, data: bytes, with_image: bool, crops: bool,
                   parallel: bool) -> tuple[LocatedFaces, np.ndarray | None]:
        # A photo goes to the executor only once a worker is free for it (a slot: one per worker, held until its job
        # ends in the worker). The executor hands its workers' queue up to workers + 1 photos at once, which can no
        # longer be cancelled: the photos of requests cancelled while they waited (their client gone, BentoML's
        # timeout) ran anyway, behind the busy workers. Waiting here, a cancelled photo never runs.
        await self._slots.acquire()
        try:
            with self._swap:  # not closed (its executor shut down: a RuntimeError, a 500) between check and submit
                if workers is not self._workers:  # replaced (or closed) while this photo waited: never reached one
                    raise BrokenProcessPool("the pool was replaced before this photo reached a worker")
                job = workers.submit(data, with_image, crops, parallel)
        except BaseException as e:
            self._slots.release()
            if isinstance(e, BrokenProcessPool):
                raise _PoolBroke(e, None) from e
            raise
        loop = asyncio.get_running_loop()
        job.add_done_callback(lambda _: _call_soon(loop, self._slots.release))
        try:
            result = await asyncio.wrap_future(job)
        except BrokenProcessPool as e:
            raise _PoolBroke(e, workers.others(job)) from e
        except asyncio.CancelledError:
            if not _cancelled_here():
                # The job itself was cancelled, not the request: the pool was shut down (closed, or replaced) with
                # the photo still waiting for a worker. The caller saw a cancellation it never asked for (no
                # answer at all); now the photo goes on as one whose pool broke before it reached a worker.
                raise _PoolBroke(BrokenProcessPool("the pool was shut down before this photo reached a worker"),
                                 None) from None
            # The request went (BentoML's timeout) while its photo was in a worker, which goes on: the job, and the
            # decoded photo it will hold, is forgotten once it ends (on the loop's thread), not at the next submit.
            loop = asyncio.get_running_loop()
            job.add_done_callback(lambda j: _suspect(j) or _call_soon(loop, workers.jobs.discard, j))
            raise
        # Done and not broken, it is no suspect for a later break: forgotten now, not at the next photo's submit,
        # since the job holds its result (the decoded photo, 58 MB for 20 MP, kept until the next request).
        workers.jobs.discard(job)
        return result

    def _current(self) -> _Workers:
        """The pool to send a photo to; one whose workers did not start is started again after :data:`RESTART_AFTER_S`.

        Raises:
            DetectionUnavailable: The workers did not start (died, or not up by :data:`START_TIMEOUT_S`), less than
                :data:`RESTART_AFTER_S` ago; or the pool started since then is not up yet.
            ServingClosed: The pool was closed.
        """
        workers = self._workers
        if workers is None:
            raise ServingClosed.pool_closed()
        error = workers.start_error()
        if error is not None:
            self._replace(workers, error)
            if self._workers is workers:
                raise _not_started(error)
            workers = self._workers
            if workers is None:  # closed meanwhile (close() runs in a worker thread): _replace made no new pool
                raise ServingClosed.pool_closed()
        if workers.up():
            self._start_failed = False
        elif self._start_failed:
            # Started again after the last pool failed to start: not ready (/readyz 503), so a photo gets its 503 now
            # rather than waiting up to START_TIMEOUT_S for a start that may hang again.
            raise DetectionUnavailable("the detection workers are starting again (the last ones did not start): try "
                                       "again in a few seconds")
        return workers

    async def _started(self, workers: _Workers) -> None:
        """Waits until every worker of ``workers`` is up (a photo's second try runs on a pool known to start).

        Raises:
            DetectionUnavailable: They died or timed out as they started.
        """
        try:
            await asyncio.shield(asyncio.gather(*(asyncio.wrap_future(job) for job in workers.started)))
        except Exception as e:
            self._replace(workers, e)
            raise _not_started(workers.start_error() or e) from e
        self._start_failed = False

    def _replace(self, broken: _Workers, error: BaseException) -> None:
        """Puts a new, warming pool in place of ``broken``, unless that was done already (or the pool is closed).

        Every photo in flight on a broken pool gets here; the first replaces it and the others
        find the replacement in place (no await between the check and the swap, so they cannot
        interleave): one new pool per break, not one per photo. A pool whose workers did not start
        stays in place until :data:`RESTART_AFTER_S` after it was made (:meth:`_current` answers 503).
        """
        with self._swap:  # close() (in its thread) either stops the new pool or comes first and no pool is made
            if self._closed or self._workers is not broken:
                return
            start_error = broken.start_error()
            if start_error is not None:
                self._start_failed = True
                if time.monotonic() - broken.born < RESTART_AFTER_S:
                    return
                log.error("the detection workers did not start (%s); starting a new pool of %d",
                          _describe(start_error), self.processes)
            else:
                log.error("a detection worker died (%s); starting a new pool of %d", error, self.processes)
            self._workers = self._start()
        broken.executor.shutdown(wait=False, cancel_futures=True)

    def close(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Stops the worker processes, and waits (at most ``timeout`` seconds, then kills them) until they and the
        pool's queues are gone: blocking, call it in a worker thread from asyncio.

        Why wait: uvicorn ends its shutdown by raising SIGTERM (or SIGINT) again on the server process, which dies
        without ``atexit`` or a garbage collection; the queues the executor's manager thread still held then kept
        their named semaphores, and ``bentoml serve`` ended with "resource_tracker: There appear to be 5 leaked
        semaphore objects to clean up at shutdown" (and ``/dev/shm`` kept them).
        """
        with self._swap:
            self._closed = True
            workers, self._workers = self._workers, None
        if workers is not None:
            workers.stop(timeout)


def _cancelled_here() -> bool:
    """Whether the running task was asked to cancel (its own request went), not just handed a cancelled future."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def _call_soon(loop: asyncio.AbstractEventLoop, callback: Callable[..., Any], *args: Any) -> None:
    """``callback(*args)`` on ``loop``'s thread, from any thread; nothing once the loop is closed."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the loop is closed: the server is gone
        pass


def _describe(error: BaseException) -> str:
    return str(error) or type(error).__name__


def _not_started(error: BaseException) -> DetectionUnavailable:
    """A photo's 503 when its pool's workers did not start (they died, or were not up by :data:`START_TIMEOUT_S`)."""
    return DetectionUnavailable(f"the detection workers did not start ({_describe(error)}): try again in a few seconds")


class AgeBatcher:
    """Adaptive batching of the age model across concurrent requests (asyncio).

    While the model is idle, a request's faces run at once: no added latency. Requests that
    arrive while a batch runs queue up and go together in the next forward pass (up to
    ``max_batch_faces``), so batches grow with the load.

    No forward pass holds more than ``max_pass_faces`` faces: a request with more (a crowd photo,
    or ``/predict_batch`` of 16) runs alone in passes of that many, and between two of them the
    requests that arrived meanwhile take their pass (a one-face photo waits for one pass of the
    crowd, not for all of them); cancelled, it runs no further pass. In one pass, the 1,152 faces
    of one ``/predict_batch`` request took the server process from 1 to 5 GB, which ONNX Runtime's
    arena then kept (about 3.7 MB a face for the fused ``dlib_age`` graph).

    A forward pass that fails (the model raises, or answers a row count other than its faces')
    fails only the requests whose own faces fail: a pass of several requests is run again one
    request at a time, each in a pass of its own (still one pass per turn, ahead of the requests that
    arrived since), and the error goes to those that fail alone. :meth:`close` (the server shutting
    down) answers every request still waiting.

    Args:
        estimate: ``face inputs -> (mean, std)``, e.g. :meth:`AgePredictor.estimate` of
            ``LocatedFaces.inputs`` (crops, or ``dlib_age`` chips); it runs in a
            worker thread (input preparation included).
        max_batch_faces: Most faces of several requests merged into one forward pass (a request's
            faces are split across passes only when they are more than ``max_pass_faces``).
        on_batch: Called with each forward pass's face count (for metrics).
        max_pass_faces: Most faces per forward pass: a larger request runs in passes of this many.
    """

    def __init__(self, estimate: Callable[[list[np.ndarray]], tuple[np.ndarray, np.ndarray]],
                 max_batch_faces: int = DEFAULT_MAX_BATCH_FACES, on_batch: Callable[[int], None] | None = None,
                 max_pass_faces: int = DEFAULT_MAX_PASS_FACES):
        if max_batch_faces < 1 or max_pass_faces < 1:
            raise ValueError(f"max_batch_faces and max_pass_faces must be >= 1, got {max_batch_faces} and "
                             f"{max_pass_faces}")
        self._estimate = estimate
        self.max_batch_faces = max_batch_faces
        self.max_pass_faces = max_pass_faces
        self._on_batch = on_batch
        self._pending: list[_AgeJob] = []
        self._running = False
        self._closed = False
        self._task: asyncio.Task | None = None  # a reference keeps the drain task from being collected

    async def __call__(self, crops: Sequence[np.ndarray], *, alone: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Age mean and std of one request's faces (``LocatedFaces.inputs``); ``alone``: in passes of their own, never
        merged with other requests' faces (a retry of faces whose merged pass failed: merged again, they failed again).

        Raises:
            ServingClosed: The batcher was closed (the server is shutting down) before this request's
                faces all ran.
            Exception: What the age model raised for this request's faces in a pass of their own.
        """
        if self._closed:
            raise ServingClosed("the age model's batcher was closed (the server is shutting down): try again")
        if len(crops) == 0:
            return np.zeros(0), np.zeros(0)
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._pending.append(_AgeJob(list(crops), future, alone))
        if not self._running:
            self._running = True
            self._task = loop.create_task(self._drain())
        return await future

    def close(self) -> None:
        """Stops batching (the server is shutting down): the queued requests, and the later passes of one split
        over several, fail with :class:`ServingClosed` now; the pass that runs answers its requests; new ones
        are refused. Idempotent."""
        self._closed = True
        self._fail(self._pending, self._closed_error)
        self._pending = []

    @staticmethod
    def _closed_error() -> ServingClosed:
        return ServingClosed("the age model's batcher was closed (the server is shutting down) before this "
                             "request's faces ran: try again")

    @staticmethod
    def _fail(jobs: Sequence[_AgeJob], error: Callable[[], BaseException]) -> None:
        """Answers ``jobs`` with ``error()``, a new exception each (one instance raised in several requests' tasks
        would collect all their tracebacks)."""
        for job in jobs:
            if not job.future.done():  # a cancelled request (client gone) leaves its future done
                job.future.set_exception(error())

    async def _drain(self) -> None:
        jobs: list[_AgeJob] = []
        try:
            while self._pending and not self._closed:
                # A request cancelled while it waited (BentoML's request timeout), or between the passes of its
                # faces, costs no further forward pass.
                self._pending = [job for job in self._pending if not job.future.done()]
                if not self._pending:
                    break
                jobs, inputs, cut = self._next_pass()
                try:
                    if self._on_batch is not None:
                        self._on_batch(len(inputs))
                    mean, std = await asyncio.to_thread(self._estimate, inputs)
                    mean, std = _rows(mean, std, len(inputs))
                except Exception as e:
                    self._failed(jobs, e)
                    jobs = []
                    continue
                start = 0
                for job in jobs:
                    n = len(inputs) if cut else len(job.left)
                    job.done(mean[start:start + n], std[start:start + n])
                    start += n
                    if job.left:
                        self._pending.append(job)  # a split request: to the end of the queue, for its next pass
                jobs = []
            if self._closed:  # the later passes of a split request, or a request that arrived as the pass ran
                self._fail(self._pending, self._closed_error)
                self._pending = []
        except BaseException:
            # The task itself stopped (cancelled as the event loop shuts down, or something unforeseen): nothing
            # would ever answer the requests of the pass it ran, or those queued behind it.
            self._closed = True
            self._fail([*jobs, *self._pending], lambda: ServingClosed("the age model's batcher stopped (the server "
                                                                      "is shutting down): try again"))
            self._pending = []
            raise
        finally:
            self._running = False

    def _next_pass(self) -> tuple[list[_AgeJob], list[np.ndarray], bool]:
        """Takes the next pass's requests off the queue: ``(jobs, their faces in this pass, cut)``; ``cut``: the
        pass is the next ``max_pass_faces`` faces of one request with more."""
        # A request with more faces than a pass holds runs alone, one pass at a time, and goes back
        # to the end of the queue between its passes: requests that arrived meanwhile take the next
        # pass, not the one after its last (a one-face photo behind a crowd of 1,152 faces waited 18).
        head = self._pending[0]
        cut = len(head.left) > self.max_pass_faces
        if cut or head.alone:
            self._pending.pop(0)
            return [head], head.left[:self.max_pass_faces], cut
        jobs, faces, most = [], 0, min(self.max_batch_faces, self.max_pass_faces)
        while self._pending and not self._pending[0].alone and (
                not jobs or faces + len(self._pending[0].left) <= most):
            jobs.append(self._pending.pop(0))
            faces += len(jobs[-1].left)
        return jobs, [c for job in jobs for c in job.left], False

    def _failed(self, jobs: list[_AgeJob], error: Exception) -> None:
        """A pass raised: alone, its request gets the error; merged, its requests run again one per pass (at the
        head of the queue, in their order) so that only those whose own faces fail get an error."""
        live = [job for job in jobs if not job.future.done()]
        if len(jobs) <= 1:  # the request's own faces, alone in the pass
            self._fail(live, lambda: error)
            return
        # Counted on the pass's requests, not on those still waiting: one left in a merged pass whose other requests
        # were cancelled as it ran (their clients gone) got the error of faces that may have been theirs.
        if self._closed:  # no pass is left to tell whose faces fail: not known to be theirs (503, try again)
            self._fail(live, self._closed_error)
            return
        if not live:
            return
        log.warning("a forward pass of %d faces from %d requests failed (%s); running each request still waiting "
                    "(%d) alone", sum(len(job.left) for job in jobs), len(jobs), _describe(error), len(live))
        for job in live:
            job.alone = True
        self._pending[:0] = live


def _rows(mean: Any, std: Any, faces: int) -> tuple[np.ndarray, np.ndarray]:
    """The age model's answer for ``faces`` faces as arrays of one row per face.

    Raises:
        ValueError: It has another number of rows (a row routed to the wrong face, or one never answered).
    """
    mean, std = np.asarray(mean), np.asarray(std)
    if mean.ndim == 0 or std.ndim == 0 or len(mean) != faces or len(std) != faces:
        raise ValueError(f"the age model answered ages of shape {mean.shape} and stds of shape {std.shape} for "
                         f"{faces} faces, expected one row per face")
    return mean, std


class _AgeJob:
    """One request's faces in :class:`AgeBatcher`: those still to run (``left``) and the rows of those that ran;
    ``alone``: the request takes its passes on its own (it was in a merged pass that failed, or asked to)."""

    def __init__(self, inputs: list[np.ndarray], future: asyncio.Future, alone: bool = False):
        self.left, self.future = inputs, future
        self.alone = alone
        self.means: list[np.ndarray] = []
        self.stds: list[np.ndarray] = []

    def done(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Takes the rows of the next ``len(mean)`` faces; with the last ones, answers the request."""
        self.left = self.left[len(mean):]
        self.means.append(mean)
        self.stds.append(std)
        if not self.left and not self.future.done():  # a cancelled request (client gone) leaves its future done
            self.future.set_result((np.concatenate(self.means), np.concatenate(self.stds)))
