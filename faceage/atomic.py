"""Atomic folder outputs: build beside the destination, swap in only when complete.

A stage killed half-way leaves its previous output (or none) and a hidden temporary folder
that is removed on the next failure or success, never a half-written output.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_dir(out_dir: str | Path) -> Iterator[Path]:
    """Yields an empty folder next to ``out_dir``; on success it replaces ``out_dir``.

    On any exception the staged folder is deleted and ``out_dir`` is left untouched.
    """
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        yield tmp
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
