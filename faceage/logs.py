"""Logging set-up shared by the stage CLIs and the ``faceage`` command."""

from __future__ import annotations

import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from urllib.parse import unquote, urlsplit

from faceage.errors import FaceAgeError


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the stage's main thread as Ctrl-C raises ``KeyboardInterrupt`` (see :func:`run_stage`)."""


def setup_logging(level: int = logging.INFO) -> None:
    """One line per message: time, level, module, text. Quietens chatty third-party loggers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _raise_on_sigterm() -> None:
    """From now on the first SIGTERM raises :class:`Terminated` in this process; a second one ends it
    at once (the clean-up can wait minutes on a tracking server that does not answer). A child forked
    from it (a data-loader worker) that inherits the handler dies of the signal as before."""
    pid = os.getpid()

    def handler(signum, frame):
        if os.getpid() != pid:
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        signal.signal(signum, signal.SIG_DFL)
        raise Terminated(f"signal {signum}")

    signal.signal(signal.SIGTERM, handler)


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
            dies of the signal as before. Only for stages whose clean-up is quick: one that waits for a
            process pool to drain would run on after the signal.
    """
    if interrupt_on_sigterm:
        _raise_on_sigterm()
    try:
        main()
    except FaceAgeError as e:
        line = f"{type(e).__name__}: {e}"
        logging.getLogger("faceage").error("%s", mask_tracking_secrets(line) or line)
        sys.exit(1)
    except Terminated:
        logging.getLogger("faceage").error("stopped by SIGTERM")
        os.kill(os.getpid(), signal.SIGTERM)  # the handler has put the default action back: dies of it
        raise  # (only if the signal were blocked)
    except Exception:
        # A bug's traceback, as Python prints it, unless it holds the tracking URI's credentials: MLflow's own
        # errors quote the URL as given ("API request to http://user:secret@host/api/2.0/... failed").
        masked = mask_tracking_secrets(traceback.format_exc())
        if masked is None:
            raise
        sys.stderr.write(masked)
        sys.exit(1)


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
