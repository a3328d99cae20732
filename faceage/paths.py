"""Where the project's shared local state lives: the repo root, also from inside a DVC temp run.

``dvc exp run --temp`` / ``--queue`` execute each experiment in a copy of the workspace under
``.dvc/tmp/exps/``, without its git-ignored folders. What runs should share (the MLflow store,
the download and external-crop caches) is therefore addressed from :func:`repo_root`, not the
working folder.
From a subfolder of the project (``cd reports && python -m faceage.recipe``) the root is the nearest folder
above holding ``dvc.yaml`` or ``params.yaml`` (DVC looks up the same way, for its ``.dvc`` folder): taken as
the working folder, the store and the caches were made anew inside the subfolder.
"""

from __future__ import annotations

import os
from pathlib import Path


# What marks the project's root folder: the pipeline and its params (a DVC temp run's copy holds them too)
PROJECT_FILES = ("dvc.yaml", "params.yaml")


def repo_root(start: str | Path | None = None) -> Path:
    """The project root: the folder above ``.dvc/tmp/exps/...`` for DVC temp runs, else the nearest folder from
    ``start`` (default: the working folder) up holding :data:`PROJECT_FILES`, else ``start`` itself (outside any
    project, as the service runs from a bento's folder)."""
    path = Path(start or os.getcwd()).resolve()
    parts = path.parts
    for i in range(len(parts) - 2):
        if parts[i : i + 3] == (".dvc", "tmp", "exps"):
            return Path(*parts[:i])
    return next((folder for folder in (path, *path.parents)
                 if any((folder / name).is_file() for name in PROJECT_FILES)), path)


def downloads_dir(start: str | Path | None = None) -> Path:
    """The download cache (``.cache/downloads`` at :func:`repo_root`): partial downloads resume from
    there, and a file fetched once serves every later run, temp runs included, offline."""
    return repo_root(start) / ".cache" / "downloads"


def from_root(given: str | Path, start: str | Path | None = None) -> Path:
    """A local path from ``params.yaml``: ``~`` expanded, a relative one taken from :func:`repo_root`,
    so ``../shared/...`` means the same folder in the workspace and in a ``dvc exp run --temp`` copy."""
    path = Path(given).expanduser()
    return path if path.is_absolute() else repo_root(start) / path
