"""Logging set-up shared by the stage CLIs and the ``faceage`` command."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable

from faceage.errors import FaceAgeError


def setup_logging(level: int = logging.INFO) -> None:
    """One line per message: time, level, module, text. Quietens chatty third-party loggers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def run_stage(main: Callable[[], None]) -> None:
    """Runs a stage's ``main``; a :class:`FaceAgeError` becomes one clear log line and exit code 1.

    DVC stops at the failing stage either way; the user sees what to fix instead of a
    traceback. Any other exception is a bug and propagates with its traceback.
    """
    try:
        main()
    except FaceAgeError as e:
        logging.getLogger("faceage").error("%s: %s", type(e).__name__, e)
        sys.exit(1)
