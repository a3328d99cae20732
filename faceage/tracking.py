"""MLflow tracking: where runs go, how they start, resume and get tagged.

The store is ``MLFLOW_TRACKING_URI`` when set, else ``sqlite:///<repo root>/mlflow.db``
by absolute path, so runs of ``dvc exp run --temp`` / ``--queue`` (which execute in a copy
under ``.dvc/tmp/exps``) land in the same database as ``dvc repro``.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from faceage.atomic import locked
from faceage.paths import repo_root

log = logging.getLogger(__name__)

EXPERIMENT = "face-age"
DVC_EXPERIMENT_TAG = "dvc_experiment"  # the DVC experiment a run trained in (``dvc exp run`` names it)
# HEAD of the latest resume of a run that ran another commit than the one it started at (tag ``git_commit``)
RESUMED_AT_COMMIT_TAG = "resumed_at_commit"


@contextmanager
def mlflow_env(name: str, value: str) -> Iterator[None]:
    """Sets an environment variable (MLflow reads its settings there) for the duration, then restores it.

    ``MLFLOW_TRACKING_URI`` also sets MLflow's process-wide tracking URI (``mlflow.set_tracking_uri``,
    which :func:`setup_mlflow` calls) for the duration and puts the previous one back after: MLflow
    reads that URI before the variable, so one set before the block would hide ``value`` and one set
    inside it (by ``setup_mlflow``) would outlive the block.
    """
    old = os.environ.get(name)
    uri_context = nullcontext()
    if name == "MLFLOW_TRACKING_URI":
        # MLflow's own save/set/restore of the global URI (what its test fixture ``tracking_uri_mock`` uses).
        try:
            from mlflow.tracking._tracking_service.utils import _use_tracking_uri
        except ImportError:  # a later MLflow without it: the variable alone, as before
            _use_tracking_uri = None
        if _use_tracking_uri is not None:
            uri_context = _use_tracking_uri(value)
    try:
        with uri_context:
            os.environ[name] = value
            yield
    finally:
        if old is None:  # after the URI's restore, which also writes the variable
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def tracking_uri() -> str:
    """``MLFLOW_TRACKING_URI`` if set, else the absolute ``sqlite:///.../mlflow.db`` of the repo."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (absolute, or relative to the working folder), else None."""
    return Path(uri.removeprefix("sqlite:///")).resolve() if uri.startswith("sqlite:///") else None


def setup_mlflow():
    """Points MLflow at :func:`tracking_uri` and the ``face-age`` experiment; returns the module.

    MLflow creates and migrates a sqlite store's tables on a process's first access, and two
    processes doing that at once (``dvc queue start -j 2`` on a fresh clone) fail, one of them
    leaving a store every later run fails on. So the first access and the experiment's creation
    happen under a lock beside the database (``.mlflow.db.lock``); later writes need none.
    """
    import mlflow

    uri = tracking_uri()
    mlflow.set_tracking_uri(uri)
    db = sqlite_path(uri)
    if db is None:
        mlflow.set_experiment(EXPERIMENT)
        return mlflow
    with locked(db, f"opening the MLflow store {db}"):
        if mlflow.get_experiment_by_name(EXPERIMENT) is None:
            # Keep artifacts beside the database, not wherever the first run happened to start.
            mlflow.create_experiment(EXPERIMENT, artifact_location=(db.parent / "mlruns").as_uri())
        mlflow.set_experiment(EXPERIMENT)
    return mlflow


def git_commit(cwd: str | Path | None = None) -> str:
    """The current git commit, or ``"unknown"`` outside a repository."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_file(path: str | Path, run_id: str, experiment_id: str) -> None:
    """Records which MLflow run a ``train`` produced, for ``evaluate`` and packaging."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    info = {"run_id": run_id, "experiment_id": experiment_id, "experiment": EXPERIMENT}
    Path(path).write_text(json.dumps(info, indent=2) + "\n")


def read_run_file(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())
