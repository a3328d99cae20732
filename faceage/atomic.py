"""Atomic folder outputs: build beside the destination, swap in only when complete.

A stage killed half-way leaves its previous output (or none) and a hidden temporary folder
that is removed on the next failure or success, never a half-written output. Outputs that
several processes may ask for at once (``dvc queue start -j 2`` runs two pipelines side by side)
are built under :func:`locked`: the first process builds, the others wait and reuse.
"""

from __future__ import annotations

import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

log = logging.getLogger(__name__)


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder next to ``out_dir``; on success it replaces ``out_dir``.

    On any exception the staged folder is deleted and ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    # A plain mkdir, not mkdtemp: the swap keeps the folder's mode, and mkdtemp's is private (0700);
    # this one gets the mode any folder made here gets (the umask's), as its subfolders have.
    tmp = out_dir.parent / f".{out_dir.name}-{uuid.uuid4().hex[:12]}"
    tmp.mkdir()
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


@contextmanager
def locked(target: str | Path, what: str = "") -> Iterator[None]:
    """Holds an exclusive lock on ``target`` against other processes, for building it once.

    The lock is an advisory ``flock`` on the hidden file ``.<name>.lock`` beside ``target`` (not
    inside: a staged folder replaces ``target`` whole), released when the holder exits or dies, so a
    killed process never leaves a stale lock. Where ``fcntl`` is missing (Windows) it does not lock.

    Args:
        target: What is built under the lock (a file or folder; it need not exist yet).
        what: What is being done, for the log line when another process holds the lock.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        yield
        return
    path = target.with_name(f".{target.name}.lock")
    with open(path, "a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process to finish %s (lock %s)", what or f"with {target}", path)
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
