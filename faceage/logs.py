"""Logging set-up shared by the stage CLIs and the ``faceage`` command."""

from __future__ import annotations

import logging


def setup_logging(level: int = logging.INFO) -> None:
    """One line per message: time, level, module, text. Quietens chatty third-party loggers."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    for noisy in ("alembic", "urllib3", "matplotlib", "PIL", "mlflow.store", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
