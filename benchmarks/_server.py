"""Starting and stopping the servers the benchmarks measure (``bench_service``, ``load_test``,
``bench_container``), in one place.

``bentoml serve`` runs in its own session, so nothing stops it but the benchmark's clean-up:
:func:`exit_on_sigterm` turns SIGTERM into ``SystemExit`` and the ``finally`` blocks that stop it run
(SIGTERM's default action ends the process without them). Its service worker (and the worker's
detection pool) runs in a process group of its own, which a signal to the server's group does not
reach: :meth:`Server.stop` signals the group, then every descendant still running. Its stderr goes to a
temporary file, and a failed start shows its last lines.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterator

import requests


class ServerError(RuntimeError):
    """The server exited or was not ready in time."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def exit_on_sigterm() -> None:
    """SIGTERM raises ``SystemExit(143)`` in the main thread, so ``finally`` blocks stop the servers.
    A second SIGTERM during that clean-up ends the process at once."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, handler)


@contextlib.contextmanager
def sigterm_exits() -> Iterator[None]:
    """:func:`exit_on_sigterm` for the block (or the function it decorates), then the handler there was before.

    For the benchmarks without a server that still hold something a plain SIGTERM would leave behind: a
    temporary folder (the fetched detector, a crop cache), processes of their own (``bench_omp_wait``'s busy
    ones spun for ever). Put back afterwards: a test that calls ``main()`` in its own process keeps its handler.
    Outside the main thread (where no handler can be set) the block runs as it is."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.getsignal(signal.SIGTERM)
    exit_on_sigterm()
    try:
        yield
    finally:
        if previous is not None:  # (None: a handler set outside Python, which cannot be put back from here)
            signal.signal(signal.SIGTERM, previous)


def wait_ready(url: str, alive: Callable[[], bool], timeout_s: float, start: float | None = None) -> float:
    """Seconds from ``start`` (default: now, ``time.monotonic``) to the first 200 on ``url``/readyz,
    polled every 50 ms.

    Raises:
        ServerError: ``alive()`` turned false, or no 200 within ``timeout_s``.
    """
    start = time.monotonic() if start is None else start
    while time.monotonic() - start < timeout_s:
        if not alive():
            raise ServerError("exited before it was ready")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                return time.monotonic() - start
        except requests.RequestException:  # not listening yet
            pass
        time.sleep(0.05)
    raise ServerError(f"not ready after {timeout_s} s")


def wait_ui(url: str, timeout_s: float = 150) -> None:
    """Waits until the service's Gradio UI has loaded: ``GET url/ui/`` (the service imports Gradio in the
    background once ``/readyz`` answers, seconds of CPU, and holds a ``/ui`` request until it is loaded).

    Measuring before it shared the cores with that import: the first requests timed it, and a memory
    figure read then counted Gradio's import as growth. A service without a UI (an error, a 404, a
    timeout) is not an error: there is nothing to wait for. (The service answers within 120 s, loaded or not.)"""
    with contextlib.suppress(requests.RequestException):
        requests.get(url + "/ui/", timeout=timeout_s)


class Server:
    """A command in its own process group (session), its stderr kept in a temporary file.

    Args:
        argv: The command.
        env: Its environment (default: this process's).
    """

    def __init__(self, argv: list[str], env: dict[str, str] | None = None):
        self.argv = argv
        self._log = tempfile.TemporaryFile()
        self.proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=self._log,
                                     start_new_session=True)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def stop(self, timeout_s: float = 30) -> str:
        """SIGTERM to the whole group (SIGKILL after ``timeout_s``), then to every descendant still running;
        returns the last lines of its stderr.

        Why the descendants: ``bentoml serve``'s worker and its detection pool run in a process group of
        their own. The server stops them on SIGTERM, but a server killed after ``timeout_s`` left them
        running, orphaned, on the port. A group that is already gone (the server exited by itself) is
        not an error."""
        descendants = self._descendants()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        _end(descendants, grace_s=min(timeout_s, 10))
        return self.stderr_tail()

    def _descendants(self) -> list:
        """The server's processes below it (``psutil.Process``), whatever their process group."""
        import psutil

        try:
            return psutil.Process(self.proc.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            return []

    def stderr_tail(self, lines: int = 20, max_bytes: int = 16384) -> str:
        """The last ``lines`` lines of what it wrote to stderr so far."""
        if self._log.closed:
            return ""
        self._log.flush()
        size = self._log.seek(0, os.SEEK_END)
        self._log.seek(max(0, size - max_bytes))
        text = self._log.read().decode(errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        self._log.close()


def _end(procs: list, grace_s: float) -> None:
    """SIGTERM to each of ``procs`` (``psutil.Process``) still running, SIGKILL to those left after ``grace_s``."""
    import psutil

    alive = [p for p in procs if p.is_running()]  # (is_running also rules out a reused pid)
    for p in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.terminate()
    _, left = psutil.wait_procs(alive, timeout=grace_s)
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=5)


def bentoml_serve(tag: str, timeout_s: float = 180) -> tuple[Server, str, float]:
    """``bentoml serve tag`` (the ``bentoml`` beside this Python) on a free 127.0.0.1 port:
    (server, base URL, seconds from process start to the first 200 on ``/readyz``).

    Raises:
        SystemExit: It exited or was not ready in time; the message ends with its stderr's last lines.
    """
    port = free_port()
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).parent / "bentoml"
    url = f"http://127.0.0.1:{port}"
    start = time.monotonic()
    server = Server([str(bentoml), "serve", tag, "--host", "127.0.0.1", "--port", str(port)], env)
    try:
        ready_s = wait_ready(url, server.alive, timeout_s, start)
    except ServerError as e:
        code = server.proc.poll()
        tail = server.stop()
        server.close()
        raise SystemExit(f"bentoml serve {tag} {e}" + ("" if code is None else f" (exit code {code})")
                         + (f"; its stderr ended with:\n{tail}" if tail else "; it wrote nothing to stderr")) from None
    except BaseException:
        server.stop()
        server.close()
        raise
    return server, url, ready_s


def map_threads(fn: Callable, jobs: list, workers: int) -> list:
    """``list(map(fn, jobs))`` on ``workers`` threads. On an exception (SIGTERM's ``SystemExit``, Ctrl-C)
    the queued jobs are dropped without waiting for them, so the caller's clean-up (stopping the
    server) runs at once instead of after every queued request."""
    pool = ThreadPoolExecutor(workers)
    try:
        results = list(pool.map(fn, jobs))
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return results
