"""Round 34 second read: a full disk met when preprocess makes its partial folder (``.NAME.partial``, the first
thing a run writes) is the full-disk line (the free space, "free some space"), as it was before the partial folder
was checked, not "cannot be created: check the folders above it (one is a file, or missing)"."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

import faceage.preprocess as preprocess
from faceage.atomic import WriteError
from tests.unit.test_crops_r30 import make_release
from tests.unit.test_preprocess_r33 import NOISE, partial


def disk_full_at_partial_mkdir(monkeypatch) -> None:
    """``mkdir`` of a partial folder fails as on a full disk (a new folder needs a block)."""
    mkdir = Path.mkdir

    def full(self, *args, **kwargs):
        if self.name.endswith(preprocess.PARTIAL_SUFFIX) and not self.exists():
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", full)


def test_a_full_disk_at_the_partial_folder_is_the_full_disk_line(tmp_path, detector_dir, monkeypatch):
    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    out.parent.mkdir()
    disk_full_at_partial_mkdir(monkeypatch)
    with pytest.raises(WriteError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    line = str(e.value)
    assert "No space left on device" in line and "free some space" in line, line
    assert "is free in" in line, line  # the free space, as every full-disk line gives it
    assert "check the folders above it" not in line, line
    assert "kept in" not in line, line  # no crop was done, none is kept
    assert not out.exists() and not partial(out).exists()
