"""Logging set-up shared by the stage CLIs and the ``faceage`` command."""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import traceback
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from faceage.errors import FaceAgeError, error_line


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the stage's main thread as Ctrl-C raises ``KeyboardInterrupt`` (see :func:`run_stage`);
    also another signal that stopped the stage (``signum``: :mod:`faceage.launch`'s SIGHUP, SIGQUIT), which
    :func:`run_stage` ends the process by."""

    def __init__(self, *args, signum: int = signal.SIGTERM):
        super().__init__(*args)
        self.signum = signum


def setup_logging(level: int = logging.INFO) -> None:
    """One line per message: time, level, module, text. Quietens chatty third-party loggers.

    A torchrun rank (``WORLD_SIZE`` > 1) prefixes its lines with ``[rank RANK]``; a ``WORLD_SIZE`` that is not a
    whole number (set for something else) is ignored here: it raised ValueError in every stage and the CLI."""
    # A torchrun rank says which it is: every rank logs (its errors, its warnings) to the same terminal.
    try:
        world_size = int(os.environ.get("WORLD_SIZE", "") or 1)
    except ValueError:
        world_size = 1
    rank = os.environ.get("RANK", "").strip() if world_size > 1 else ""
    prefix = f"[rank {rank}] ".replace("%", "%%") if rank else ""  # a literal in the format: `%` escaped
    logging.basicConfig(level=level, format=f"%(asctime)s %(levelname)s {prefix}%(name)s: %(message)s", force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def raise_on_sigterm():
    """From now on the first SIGTERM raises :class:`Terminated` in this process; a second one ends it
    at once (the clean-up can wait minutes on a tracking server that does not answer). A child forked
    from it (a data-loader worker) that inherits the handler dies of the signal as before. Returns the
    handler it replaced."""
    global _sigterm_received
    _sigterm_received = False
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_DFL)
        global _sigterm_received
        _sigterm_received = True
        raise Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


_sigterm_received = False  # set by :func:`raise_on_sigterm`'s handler: the stage is stopping because of SIGTERM


def _chain(error: BaseException):
    """``error`` and what it was raised from or during (``__cause__``, else ``__context__``), each once."""
    seen: set[int] = set()
    cause: BaseException | None = error
    while cause is not None and id(cause) not in seen:
        yield cause
        seen.add(id(cause))
        cause = cause.__cause__ or cause.__context__


def _stopping(error: BaseException) -> bool:
    """Whether ``error`` was raised while the stage stopped for SIGTERM: the handler fired, or a
    :class:`Terminated` (also :mod:`faceage.launch`'s, raised for torch's handler) is in its chain."""
    return any(isinstance(cause, Terminated) for cause in _chain(error)) or _sigterm_received


def die_of_signal(signum: int, message: str | None = None) -> None:
    """Logs ``message`` (if any) and ends the process by ``signum``'s default action: the status a shell and DVC
    expect of a process stopped by it (a shell's script or loop stops after a child that died of SIGINT, and goes
    on after one that exited 130: bash's "wait and cooperative exit"; Python itself dies of SIGINT after an
    uncaught ``KeyboardInterrupt``). Never returns."""
    if message:
        logging.getLogger("faceage").error("%s", message)
    _release_frames()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signum})  # delivered here where it was blocked
    raise SystemExit(128 + signum)  # (not reached)


def _release_frames() -> None:
    """Frees what the exception being handled (and those it was raised from or during) keeps alive, before the
    process dies of a signal: death by a signal runs no exit handlers, so an object that only a traceback's frames
    still held was never finalized. A signal landing in ``concurrent.futures``' own code as a stage's worker pool
    starts (its manager thread) left the pool's queues held by those frames, and the resource tracker warned of
    "5 leaked semaphore objects" under the stage's one line. Frames still running (the caller's) are left as they
    are."""
    error = sys.exc_info()[1]
    if error is None:
        return
    for cause in _chain(error):
        traceback.clear_frames(cause.__traceback__)
    import gc

    gc.collect()  # what sits in a reference cycle (a pool, its threads, its queues) goes only with the collector


def _die_of_sigterm(signum: int = signal.SIGTERM) -> None:
    """Logs that the stage stopped and ends the process by SIGTERM, or ``signum`` (:func:`die_of_signal`)."""
    die_of_signal(signum, f"stopped by {signal.Signals(signum).name}")


def _stop_signal(error: BaseException) -> int:
    """The signal a :class:`Terminated` in ``error``'s chain stands for; SIGTERM where there is none."""
    return next((cause.signum for cause in _chain(error) if isinstance(cause, Terminated)), signal.SIGTERM)


def _die_of_ctrl_c() -> None:
    """Logs that the stage stopped and ends the process by SIGINT (:func:`die_of_signal`), as Python does after an
    uncaught ``KeyboardInterrupt`` but without its traceback."""
    die_of_signal(signal.SIGINT, "interrupted (Ctrl-C)")


def _interrupted(error: BaseException) -> bool:
    """Whether ``error`` was raised while the stage stopped for Ctrl-C: a ``KeyboardInterrupt`` (not SIGTERM's
    :class:`Terminated`) is in its chain (a clean-up that failed after it)."""
    return any(isinstance(cause, KeyboardInterrupt) and not isinstance(cause, Terminated) for cause in _chain(error))


def run_stage(main: Callable[[], None], *, interrupt_on_sigterm: bool = False) -> None:
    """Runs a stage's ``main``; a :class:`FaceAgeError` becomes one clear log line and exit code 1.

    DVC stops at the failing stage either way; the user sees what to fix instead of a
    traceback. Any other exception is a bug and propagates with its traceback; where the traceback
    holds ``MLFLOW_TRACKING_URI``'s credentials, it is printed masked instead and the exit code is 1,
    as Python's own.

    Args:
        main: The stage.
        interrupt_on_sigterm: SIGTERM (``kill``, ``timeout``, a CI job cancelled, a container stopped) is
            raised as :class:`Terminated`, a ``KeyboardInterrupt``, so the stage cleans up as after Ctrl-C
            (``train`` ends its MLflow run KILLED: killed outright, it stayed RUNNING), then the process
            dies of the signal as before, also where the clean-up itself fails (its error is logged: one line,
            or a bug's own traceback). Once ``main`` has returned or raised, SIGTERM has its usual action again.
            Ctrl-C, with or without this, runs the stage's clean-up and ends the process with one line,
            "interrupted (Ctrl-C)", by SIGINT (a shell shows 130; DVC "exited with -2"), as a clean-up that fails
            after it does (its line or traceback first).
            Only for stages whose clean-up is quick: one that waits for a process pool to drain would run on
            after the signal.
    """
    previous = signal.getsignal(signal.SIGTERM)
    # Ctrl-C (the terminal's SIGINT, to the whole foreground group) raises KeyboardInterrupt in main: its clean-up
    # (``finally``, ``with``) runs as it propagates; here it ends as one line and death by SIGINT, not Python's
    # traceback. Once main has ended, a Ctrl-C while the error line is written ends the process at once.
    plain_ctrl_c = signal.getsignal(signal.SIGINT) is signal.default_int_handler and \
        threading.current_thread() is threading.main_thread()
    if interrupt_on_sigterm:
        raise_on_sigterm()
    try:
        try:
            try:
                main()
            except ImportError as e:
                # A Ctrl-C inside a C extension's start-up (pybind11's dlib: "ImportError: initialization failed",
                # raised from the KeyboardInterrupt) is the Ctrl-C: stages import their heavy modules in main.
                if isinstance(e.__cause__, KeyboardInterrupt):
                    raise e.__cause__ from None
                raise
            finally:
                if interrupt_on_sigterm:
                    # The stage's own clean-up has run. From here on SIGTERM has its usual action (DVC's, a shell's:
                    # the process ends of it at once): raised as Terminated in the handlers below (while the error
                    # line was written) or at exit (MLflow's atexit end_run), nothing caught it, and the process
                    # printed chained tracebacks and exited 1, or 0, instead of by the signal.
                    signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)
                if plain_ctrl_c:
                    signal.signal(signal.SIGINT, signal.SIG_DFL)
        except Terminated as e:
            _die_of_sigterm(e.signum)
        except KeyboardInterrupt:  # Ctrl-C (or launch's, torch's handler having stopped the workers)
            _die_of_sigterm() if _sigterm_received else _die_of_ctrl_c()
        except FaceAgeError as e:
            line = error_line(e)  # one line: a hint raised on a second line is joined to it
            logging.getLogger("faceage").error("%s", mask_tracking_secrets(line) or line)
            if _stopping(e):  # the clean-up after SIGTERM failed (a tracking server that does not answer)
                _die_of_sigterm(_stop_signal(e))
            if _interrupted(e):  # the clean-up after Ctrl-C failed: still stopped by Ctrl-C, not a failed stage
                _die_of_ctrl_c()
            sys.exit(1)
        except Exception as e:
            # A bug's traceback, as Python prints it, unless it holds the tracking URI's credentials: MLflow's own
            # errors quote the URL as given ("API request to http://user:secret@host/api/2.0/... failed").
            if _stopping(e) or _interrupted(e):  # a bug in the clean-up after a signal: its own traceback alone
                text = "".join(traceback.format_exception(e, chain=False))
                sys.stderr.write(mask_tracking_secrets(text) or text)
                _die_of_sigterm(_stop_signal(e)) if _stopping(e) else _die_of_ctrl_c()
            masked = mask_tracking_secrets(traceback.format_exc())
            if masked is None:
                raise
            sys.stderr.write(masked)
            sys.exit(1)
    finally:
        if plain_ctrl_c:  # a caller in the same process (a test) keeps Python's Ctrl-C
            signal.signal(signal.SIGINT, signal.default_int_handler)


def masked_netloc(netloc: str) -> str:
    """A URL's network location as logs show it: a password masked (``user:***@host``), and a user part alone
    (a token, ``TOKEN@host``) too (``***@host``); one without a user part as it is."""
    if "@" not in netloc:
        return netloc
    userinfo, _, host = netloc.rpartition("@")
    user, has_password, _ = userinfo.partition(":")
    return f"{user}:***@{host}" if has_password else f"***@{host}"


def mask_tracking_secrets(text: str) -> str | None:
    """``text`` with the user part of ``MLFLOW_TRACKING_URI`` masked (:func:`masked_netloc`, as
    :func:`faceage.tracking.display_uri` shows the URI), the password also where it stands alone (raw or
    percent-decoded); None when ``text`` holds none of them."""
    netloc = urlsplit(os.environ.get("MLFLOW_TRACKING_URI", "")).netloc
    if "@" not in netloc:
        return None
    userinfo = netloc.rpartition("@")[0] + "@"
    user, has_password, password = userinfo[:-1].partition(":")
    secret = password if has_password else user
    masked = text.replace(userinfo, masked_netloc(userinfo))
    for form in {secret, unquote(secret)}:
        if len(form) >= 4:  # a very short one would mask ordinary words: the URL form above covers it
            masked = masked.replace(form, "***")
    return masked if masked != text else None
