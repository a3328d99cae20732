"""Round 34 second read of the external sets' resumable crops.

- A full disk met when the entry's partial folder is made is the full-disk line ("free some space and rerun"),
  not "cannot be created: check the folders above it (one is a file, or missing)".
- An entry another run's prune removes between the listing and the ranking does not stop this run's prune.
"""

from __future__ import annotations

import pytest

from faceage.atomic import WriteError
from faceage.external import external_faces
from tests.unit.test_external_r33 import _entries
from tests.unit.test_external_r34 import _noise_set, _partials, _whole
from tests.unit.test_preprocess_r34b import disk_full_at_partial_mkdir


def test_a_full_disk_at_the_partial_folder_is_the_full_disk_line(tmp_path, detector_dir, monkeypatch):
    ext, crop, cache = _noise_set(tmp_path), _whole(detector_dir), tmp_path / "cache"
    disk_full_at_partial_mkdir(monkeypatch)
    with pytest.raises(WriteError) as e:
        external_faces(ext, crop, detector_dir, cache, workers=1)
    line = str(e.value)
    assert "No space left on device" in line and "free some space and rerun" in line, line
    assert "check the folders above it" not in line, line
    assert _partials(cache) == [] and not _entries(cache)


def test_an_entry_another_run_removes_meanwhile_does_not_stop_the_prune(tmp_path, detector_dir, monkeypatch, caplog):
    """Two evaluations side by side (``dvc queue start -j 2``) prune the same set's entries at once: an entry the
    other run removed between the listing and the ranking was an OSError that skipped the whole prune (a warning,
    and nothing removed)."""
    import logging
    import os
    import shutil

    import faceage.external as external
    from tests.unit.test_external_r33 import HOUR, _age, _copies, _set
    from tests.unit.test_external import checkpoint_crop

    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    first = external_faces(ext, crop, detector_dir, cache, workers=1)
    _age(first, 1 * HOUR)
    copies = _copies(first, external.KEEP_ENTRIES + 2, first_hours_ago=2)
    taken = copies[-1]  # the oldest: the other run's pruner takes it
    listing = external.cache_entries

    def listed_then_taken(cache_dir, name):
        entries = listing(cache_dir, name)
        if taken.exists():
            os.replace(taken, taken.with_name(f".{taken.name}-1@x-evicted"))
            shutil.rmtree(taken.with_name(f".{taken.name}-1@x-evicted"))
        return entries

    monkeypatch.setattr(external, "cache_entries", listed_then_taken)
    caplog.set_level(logging.INFO, logger="faceage.external")
    removed = external.prune_cache(cache, "set", keep=first)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
    keep_others = external.KEEP_ENTRIES - 1  # beside the new entry
    assert removed == copies[keep_others:-1]  # the other old entries still go
    assert sorted(p.name for p in external.cache_entries(cache, "set")) == sorted(
        p.name for p in [first, *copies[:keep_others]])
