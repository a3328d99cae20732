"""Round 34: an interrupted crop of an external set (Ctrl-C, kill -9) goes on from where it stopped, as
``preprocess`` does (the same machinery: :func:`faceage.preprocess.resumable_output`): the work is kept in
``.<name>-<key>.partial`` beside the cache entry, and the rerun writes the entry an uninterrupted run writes.
The cache's pruning leaves a partial folder a run is cropping into, and removes a stale one.
"""

from __future__ import annotations

import fcntl
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faceage.external as external
from faceage.atomic import _host, lock_file
from faceage.external import KEEP_ENTRIES, external_faces
from faceage.sources import resolve_external
from tests.conftest import REPO, make_subset
from tests.unit.test_crops_r30 import fill_the_disk_at_save
from tests.unit.test_external import checkpoint_crop, make_set, noise
from tests.unit.test_external_r33 import HOUR, _age, _copies, _dead_pid, _entries
from tests.unit.test_preprocess_r33 import assert_same_output, interrupt_at_save, resumed


def _noise_set(tmp_path, n=6):
    folder = make_set(tmp_path / "set", {f"p{i}.jpg": noise(i, 48, 64) for i in range(n)})
    [ext] = resolve_external([str(folder)], tmp_path)
    return ext


def _whole(detector_dir):
    """Noise has no face: the whole_image fallback crops every photo (a crop, chips and a row each)."""
    return checkpoint_crop(detector_dir, no_face="whole_image")


def _partials(cache: Path) -> list[Path]:
    return sorted(p for p in cache.iterdir() if p.name.endswith(".partial"))


def _interrupted(tmp_path, detector_dir, monkeypatch, after=3):
    ext, crop, cache = _noise_set(tmp_path), _whole(detector_dir), tmp_path / "cache"
    interrupt_at_save(monkeypatch, after=after)
    with pytest.raises(KeyboardInterrupt):
        external_faces(ext, crop, detector_dir, cache, workers=1)
    monkeypatch.undo()
    return ext, crop, cache


def test_an_interrupted_crop_of_an_external_set_resumes_to_the_straight_entry(tmp_path, detector_dir,
                                                                             monkeypatch, caplog):
    ext, crop, cache = _interrupted(tmp_path, detector_dir, monkeypatch, after=3)
    [partial] = _partials(cache)  # the work done so far, kept beside the entry
    assert len(list((partial / "test").glob("*.png"))) == 4  # 3 whole, the 4th half-written when stopped
    assert not _entries(cache)

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    assert resumed(caplog) == [(3, 6, 3)]  # the half-written 4th is redone
    assert partial.name == f".{faces.name}.partial"
    assert not partial.exists()  # gone once the entry is placed
    assert sorted(p.name for p in cache.iterdir()) == sorted([faces.name, f".{faces.name}.lock"])

    straight = external_faces(ext, crop, detector_dir, tmp_path / "straight", workers=1)
    assert straight.name == faces.name
    assert_same_output(straight, faces)
    assert external.crop_counts(faces)["whole_image"] == 6


def test_other_crop_settings_do_not_take_up_the_work_and_a_straight_run_leaves_no_partial(tmp_path, detector_dir,
                                                                                         monkeypatch, caplog):
    ext, crop, cache = _interrupted(tmp_path, detector_dir, monkeypatch)
    [partial] = _partials(cache)
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    other = external_faces(ext, {**crop, "size": 48}, detector_dir, cache, workers=1)  # another key
    assert resumed(caplog) == [] and _partials(cache) == [partial]  # its own work is left for its own rerun
    assert Image.open(next((other / "test").glob("*.png"))).size == (48, 48)
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    assert resumed(caplog) == [(3, 6, 3)] and _partials(cache) == []
    assert faces != other


def test_the_same_key_with_an_edited_photo_list_starts_over(tmp_path, detector_dir, monkeypatch, caplog):
    """The job (job.json) guards the work, not only the entry's name: a label corrected keeps the key's pixels
    but is another photo list."""
    ext, crop, cache = _interrupted(tmp_path, detector_dir, monkeypatch)
    [partial] = _partials(cache)
    job = partial / "job.json"
    job.write_text(job.read_text().replace('"list_sha256": "', '"list_sha256": "0'))
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    assert resumed(caplog) == []
    assert any("starting over" in r.getMessage() and "photos" in r.getMessage() for r in caplog.records)
    assert_same_output(external_faces(ext, crop, detector_dir, tmp_path / "straight", workers=1), faces)


KILLED = """
import sys
from faceage.external import external_faces
from faceage.sources import resolve_external
[ext] = resolve_external([sys.argv[1]], sys.argv[1])
external_faces(ext, {crop!r}, sys.argv[2], sys.argv[3], workers={workers})
"""


def _kill_midway(folder: Path, crop: dict, detector_dir: Path, cache: Path, workers: int, at: int) -> None:
    """Runs the crop of ``folder`` in a new process and kills it and its workers (kill -9) once ``at`` crops are
    in its partial folder."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = KILLED.format(crop=crop, workers=workers)
    proc = subprocess.Popen([sys.executable, "-c", code, str(folder), str(detector_dir), str(cache)], env=env,
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and proc.poll() is None:
            if len(list(cache.glob(".*.partial/test/*.png"))) >= at:
                break
            time.sleep(0.01)
        assert proc.poll() is None, "the crop ended before it could be killed"
    finally:
        os.killpg(proc.pid, signal.SIGKILL)  # the run and its workers, as a killed machine stops them
        proc.wait(30)


def test_a_killed_crop_of_synthetic_photos_resumes(tmp_path, detector_dir, caplog):
    """kill -9 mid-crop; no shared data needed (noise photos, the whole_image fallback)."""
    folder = make_set(tmp_path / "set", {f"p{i:02d}.jpg": noise(i, 240, 320) for i in range(40)})
    [ext] = resolve_external([str(folder)], folder)
    crop, cache = _whole(detector_dir), tmp_path / "cache"
    _kill_midway(folder, crop, detector_dir, cache, workers=1, at=5)
    assert not _entries(cache) and len(_partials(cache)) == 1

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    [(reused, total, todo)] = resumed(caplog)
    assert total == 40 and reused >= 4 and reused + todo == total
    assert_same_output(external_faces(ext, crop, detector_dir, tmp_path / "straight", workers=1), faces)
    assert _partials(cache) == []


def test_a_killed_crop_of_real_photos_resumes_to_the_straight_entry(tmp_path, sample_dir, detector_dir, caplog):
    """kill -9 of an external set's crop and its two workers, on real faces of the sample (HOG, chips, crops)."""
    folder = make_subset(sample_dir, tmp_path / "set", {"test": 32})
    [ext] = resolve_external([str(folder)], folder)
    crop, cache = checkpoint_crop(detector_dir), tmp_path / "cache"
    _kill_midway(folder, crop, detector_dir, cache, workers=2, at=8)
    assert not _entries(cache) and len(_partials(cache)) == 1

    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    faces = external_faces(ext, crop, detector_dir, cache, workers=2)
    [(reused, total, todo)] = resumed(caplog)
    assert total == 32 and reused >= 6 and reused + todo == total
    straight = external_faces(ext, crop, detector_dir, tmp_path / "straight", workers=2)
    assert_same_output(straight, faces)
    assert external.crop_counts(faces)["face"] > 16  # real faces, found by the detector
    assert _partials(cache) == []


# --- the cache's pruning ------------------------------------------------------------------------------------------

def _age_partial(partial: Path, seconds_ago: float) -> None:
    t = time.time() - seconds_ago
    for p in [*partial.rglob("*"), partial]:
        os.utime(p, (t, t), follow_symlinks=False)


def test_a_stale_partial_is_pruned_and_one_in_use_is_left(tmp_path, detector_dir, monkeypatch, caplog):
    ext, crop, cache = _interrupted(tmp_path, detector_dir, monkeypatch)
    [stale] = _partials(cache)
    # another run cropping into a second partial now (it holds its entry's lock), also old by its files' times
    busy = stale.with_name(f".set-{'a' * 16}.partial")
    shutil.copytree(stale, busy)
    _age_partial(stale, 50 * HOUR)
    _age_partial(busy, 60 * HOUR)
    first = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)
    _age(first, 1 * HOUR)
    _copies(first, KEEP_ENTRIES, first_hours_ago=2)  # more recently used than either partial
    killed_removal = cache / f"..set-{'b' * 16}.partial-{_dead_pid()}@{_host()}-{'1' * 12}-evicted"
    killed_removal.mkdir()
    (killed_removal / "x.png").write_bytes(b"x")
    lock = os.open(lock_file(busy.with_name(f"set-{'a' * 16}")), os.O_RDWR | os.O_CREAT)
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
        with caplog.at_level(logging.INFO, logger="faceage.external"):
            external_faces(ext, {**crop, "margin": 0.35}, detector_dir, cache, workers=1)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)
    assert not stale.exists() and busy.is_dir() and not killed_removal.exists()
    assert not lock_file(stale.with_name(stale.name[1:-len(".partial")])).exists()  # its lock file went with it
    [line] = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert stale.name in line, line


def test_a_recent_partial_is_kept_for_its_rerun(tmp_path, detector_dir, monkeypatch, caplog):
    """A crop killed minutes ago, then another setting evaluated: the killed one's work is still there to resume."""
    ext, crop, cache = _interrupted(tmp_path, detector_dir, monkeypatch)
    [partial] = _partials(cache)
    _age_partial(partial, 60)
    first = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)
    _copies(first, KEEP_ENTRIES + 1, first_hours_ago=0.5)
    external_faces(ext, {**crop, "margin": 0.35}, detector_dir, cache, workers=1)
    assert partial.is_dir()
    caplog.set_level(logging.INFO, logger="faceage.preprocess")
    external_faces(ext, crop, detector_dir, cache, workers=1)
    assert resumed(caplog) == [(3, 6, 3)]


def test_a_file_at_an_entrys_partial_path_is_one_line_and_left(tmp_path, detector_dir):
    from faceage.errors import FaceAgeError
    from faceage.external import cache_key
    from faceage.detector import read_manifest

    ext, crop, cache = _noise_set(tmp_path), _whole(detector_dir), tmp_path / "cache"
    key = cache_key(ext.path, crop, read_manifest(detector_dir)["files"]["shape_predictor_5_face_landmarks.dat"])
    cache.mkdir()
    mine = cache / f".set-{key}.partial"
    mine.write_text("mine")
    with pytest.raises(FaceAgeError, match="is a file") as e:
        external_faces(ext, crop, detector_dir, cache, workers=1)
    assert str(mine) in str(e.value) and "\n" not in str(e.value)
    assert mine.read_text() == "mine"


def test_noise_photos_are_cropped_identically_with_one_worker_or_two(tmp_path, detector_dir):
    """(The resumed entry above is compared with a straight run with the same worker count; the worker count is
    not part of the job, so a rerun with fewer workers resumes too.)"""
    ext, crop = _noise_set(tmp_path), _whole(detector_dir)
    one = external_faces(ext, crop, detector_dir, tmp_path / "one", workers=1)
    two = external_faces(ext, crop, detector_dir, tmp_path / "two", workers=2)
    assert_same_output(one, two)
    assert np.asarray(Image.open(next((one / "test").glob("*.png")))).shape == (64, 64, 3)


def test_a_folder_or_dangling_link_at_an_entrys_lock_path_is_one_line_and_left(tmp_path, detector_dir):
    """faceage.atomic.locked opens ``.NAME.lock`` beside the entry: a folder there was an IsADirectoryError
    traceback, and a dangling link a FileNotFoundError one (or, where its target's folder exists, a file made
    through it, outside the cache)."""
    from faceage.errors import FaceAgeError
    from faceage.external import cache_key
    from faceage.detector import read_manifest

    ext, crop, cache = _noise_set(tmp_path), _whole(detector_dir), tmp_path / "cache"
    key = cache_key(ext.path, crop, read_manifest(detector_dir)["files"]["shape_predictor_5_face_landmarks.dat"])
    cache.mkdir()
    lock = cache / f".set-{key}.lock"
    lock.mkdir()
    (lock / "mine.txt").write_text("mine")
    with pytest.raises(FaceAgeError, match="is not a file") as e:
        external_faces(ext, crop, detector_dir, cache, workers=1)
    assert str(lock) in str(e.value) and "\n" not in str(e.value)
    assert (lock / "mine.txt").read_text() == "mine"
    shutil.rmtree(lock)
    lock.symlink_to(tmp_path / "elsewhere" / "lock")
    (tmp_path / "elsewhere").mkdir()
    with pytest.raises(FaceAgeError, match="symbolic link") as e:
        external_faces(ext, crop, detector_dir, cache, workers=1)
    assert lock.is_symlink() and not (tmp_path / "elsewhere" / "lock").exists()


def test_a_full_disk_removes_the_partial_crops_and_says_so(tmp_path, detector_dir, monkeypatch):
    """Unlike Ctrl-C or a kill, a full disk drops the work done so far: it sits in a hidden folder of the cache,
    which the user would have to find to free the space (and the README says no partial file is left)."""
    from faceage.atomic import WriteError

    ext, crop, cache = _noise_set(tmp_path), _whole(detector_dir), tmp_path / "cache"
    fill_the_disk_at_save(monkeypatch, 2)
    with pytest.raises(WriteError, match="no partial crops kept"):
        external_faces(ext, crop, detector_dir, cache, workers=1)
    assert _partials(cache) == [] and not _entries(cache)
