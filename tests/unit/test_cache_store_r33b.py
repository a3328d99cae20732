"""Round 33, second read of the external crop cache's pruning (:func:`faceage.external.prune_cache`).

Removing an old entry unlinked its lock file ``.<entry>.lock``. A run that had opened that file to wait for the
entry (it wants those crop settings again) then held its lock on the unlinked file, and a third run asking for the
same entry made a new lock file and locked it too: two runs both building the same entry at once, each believing it
held its lock (``faceage.atomic.locked`` does not check that its file is still the one at the path).
"""

import json
import os
import threading
import time
from pathlib import Path

from faceage.external import KEEP_ENTRIES, LAST_USED, SETTINGS, prune_cache

HOUR = 3600.0


def _entry(cache: Path, i: int, hours_ago: float) -> Path:
    """A complete entry of set ``set`` (its record with the crop counts, one crop), last used ``hours_ago``."""
    entry = cache / f"set-{i:016x}"
    entry.mkdir(parents=True)
    (entry / SETTINGS).write_text(json.dumps({"counts": {"n_images": 1, "n_faces": 1}}))
    (entry / "a.png").write_bytes(b"x" * 100)
    t = time.time() - hours_ago * HOUR
    (entry / LAST_USED).touch()
    for f in (entry / LAST_USED, entry / SETTINGS):
        os.utime(f, (t, t))
    return entry


def test_a_run_waiting_on_a_removed_entry_still_excludes_the_next_run(detector_dir, tmp_path, monkeypatch, caplog):
    """Run P removes the old entry E while run A waits on E's lock (A wants E's crop settings again); A then makes
    E again, and run B, asking for E meanwhile, waits for A and reuses its crops instead of cropping beside it."""
    import logging
    import shutil

    import faceage.external as external
    from faceage.external import external_faces
    from faceage.sources import resolve_external
    from tests.unit.test_external import checkpoint_crop, make_set, noise

    [ext] = resolve_external([str(make_set(tmp_path / "set", {"a.jpg": noise(), "b.jpg": noise(1)}))], tmp_path)
    crop, cache = checkpoint_crop(detector_dir), tmp_path / "cache"
    old = external_faces(ext, crop, detector_dir, cache, workers=1)
    for i in range(KEEP_ENTRIES):  # more recently used entries of other settings: old is the one to go
        t = time.time() - (1 + i) * HOUR
        copy = old.with_name(f"set-{i:016x}")
        shutil.copytree(old, copy)
        os.utime(copy / LAST_USED, (t, t))
    t = time.time() - 50 * HOUR
    os.utime(old / LAST_USED, (t, t))

    # P pauses while it holds E's lock (it measures E first), until A is waiting on that lock.
    p_holds, go = threading.Event(), threading.Event()
    real_disk_bytes = external._disk_bytes

    def paused_disk_bytes(folder):
        p_holds.set()
        assert go.wait(20)
        return real_disk_bytes(folder)

    monkeypatch.setattr(external, "_disk_bytes", paused_disk_bytes)
    # A's cropping takes a while (a real set's takes minutes), so that B asks while A makes E.
    real_crop = external.crop_samples

    def slow_crop(*args, **kwargs):
        time.sleep(1.5)
        return real_crop(*args, **kwargs)

    monkeypatch.setattr(external, "crop_samples", slow_crop)
    results = {}

    def run(name, fn):
        results[name] = fn()

    with caplog.at_level(logging.INFO, logger="faceage"):
        pruner = threading.Thread(target=run, args=("P", lambda: external.prune_cache(cache, "set")))
        pruner.start()
        assert p_holds.wait(20)
        a = threading.Thread(target=run, args=("A", lambda: external_faces(ext, crop, detector_dir, cache, workers=1)))
        a.start()
        time.sleep(0.5)  # A has opened E's lock file and waits on it
        go.set()
        pruner.join(20)
        assert results["P"] == [old] or results["P"] == []  # removed (or left, with a warning: never both)
        time.sleep(0.3)  # A holds E's lock now and crops
        b = threading.Thread(target=run, args=("B", lambda: external_faces(ext, crop, detector_dir, cache, workers=1)))
        b.start()
        a.join(60)
        b.join(60)
    assert results["A"] == results["B"] == old and (old / SETTINGS).is_file()
    cropped = [r for r in caplog.records if "detecting and cropping" in r.getMessage()]
    assert len(cropped) == 1, "two runs cropped the same entry at once, each holding its lock"


def test_the_line_for_entries_left_says_why_they_were_left(tmp_path, caplog):
    """An entry past the count that was used minutes ago (by a run long finished) is left, but nothing says another
    run is using it: the line gives the rule that kept it, whose setting is named."""
    import logging

    cache = tmp_path / "cache"
    entries = [_entry(cache, i, hours_ago=(i + 1) / 60) for i in range(KEEP_ENTRIES + 1)]  # 1 ... 5 minutes ago
    with caplog.at_level(logging.INFO, logger="faceage.external"):
        assert prune_cache(cache, "set") == []
    assert all(e.is_dir() for e in entries)
    [line] = [r.getMessage() for r in caplog.records if entries[-1].name in r.getMessage()]
    assert "in use by another run" not in line
    assert "used in the last 30 min" in line and "faceage.external.IN_USE_S" in line
