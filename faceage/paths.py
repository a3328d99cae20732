"""Where the project's shared local state lives: the repo root, also from inside a DVC temp run.

``dvc exp run --temp`` / ``--queue`` execute each experiment in a copy of the workspace under
``.dvc/tmp/exps/``, without its git-ignored folders. What runs should share (the MLflow store,
the download and external-crop caches) is therefore addressed from :func:`repo_root`, not the
working folder.
"""

from __future__ import annotations

import os
from pathlib import Path


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: the folder above ``.dvc/tmp/exps/...`` for DVC temp runs, else ``start``."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return path


def downloads_dir(start: str | Path | None = None) -> Path:
    """The download cache (``.cache/downloads`` at :func:`repo_root`): partial downloads resume from
    there, and a file fetched once serves every later run, temp runs included, offline."""
    return repo_root(start) / ".cache" / "downloads"


def from_root(given: str | Path, start: str | Path | None = None) -> Path:
    """A local path from ``params.yaml``: ``~`` expanded, a relative one taken from :func:`repo_root`,
    so ``../shared/...`` means the same folder in the workspace and in a ``dvc exp run --temp`` copy."""
    path = Path(given).expanduser()
    return path if path.is_absolute() else repo_root(start) / path
