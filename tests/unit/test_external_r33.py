"""Round 33: the external-set crop cache (``.cache/external/<name>-<key>/``) never shrank: every new crop setting,
detector or edit of a set left its old entry (the crops of up to thousands of faces) behind forever, so a sweep of
``dvc exp run -S preprocess.margin=...`` filled the disk silently. Now each use stamps its entry, and after a new
entry is made only the most recently used ones of that set are kept; entries in use and anything that is not an
entry stay."""

import fcntl
import logging
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path


import faceage.external as external
from faceage.atomic import _host
from faceage.external import KEEP_ENTRIES, LAST_USED, external_faces
from faceage.sources import resolve_external
from tests.unit.test_external import checkpoint_crop, make_set, noise

HOUR = 3600.0


def _set(tmp_path):
    [ext] = resolve_external([str(make_set(tmp_path / "set", {"a.jpg": noise(), "b.jpg": noise(1)}))], tmp_path)
    return ext


def _entries(cache: Path, name: str = "set") -> set[str]:
    return {p.name for p in cache.iterdir() if re.fullmatch(rf"{name}-[0-9a-f]{{16}}", p.name)}


def _age(entry: Path, seconds_ago: float) -> None:
    """Marks ``entry`` last used ``seconds_ago`` (as a hit that long ago left its stamp)."""
    stamp = entry / LAST_USED
    stamp.touch()
    t = time.time() - seconds_ago
    os.utime(stamp, (t, t))
    os.utime(entry / "preprocess.json", (t, t))


def _copies(entry: Path, n: int, first_hours_ago: float, step_hours: float = 1.0) -> list[Path]:
    """``n`` more entries of ``entry``'s set (its files under other keys), used ``step_hours`` apart, most recent
    first."""
    out = []
    for i in range(n):
        copy = entry.with_name(f"set-{i:016x}")
        shutil.copytree(entry, copy)
        _age(copy, (first_hours_ago + i * step_hours) * HOUR)
        out.append(copy)
    return out


def test_a_cache_hit_stamps_the_entry_as_used(detector_dir, tmp_path):
    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    assert (faces / LAST_USED).is_file()  # stamped when made
    _age(faces, 5 * HOUR)
    assert external_faces(ext, crop, detector_dir, cache, workers=1) == faces
    assert time.time() - (faces / LAST_USED).stat().st_mtime < 60  # and on every hit, not only when made


def test_old_entries_go_after_a_new_one_is_made_keeping_the_most_recently_used(detector_dir, tmp_path, caplog):
    """The entries least recently used (not least recently made) go, with one line naming them and the space."""
    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    first = external_faces(ext, crop, detector_dir, cache, workers=1)  # made first ...
    copies = _copies(first, KEEP_ENTRIES + 1, first_hours_ago=2)
    _age(first, 3 * HOUR)
    assert external_faces(ext, crop, detector_dir, cache, workers=1) == first  # ... but used since: a hit
    _age(first, 1 * HOUR)  # (an hour ago, past the in-use window, so only the order keeps it)
    other = make_set(tmp_path / "other", {"a.jpg": noise()})  # another set's old entry is not this set's to count
    [other_ext] = resolve_external([str(other)], tmp_path)
    other_entry = external_faces(other_ext, crop, detector_dir, cache, workers=1)
    _age(other_entry, 50 * HOUR)

    with caplog.at_level(logging.INFO, logger="faceage.external"):
        new = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)

    kept = {new.name, first.name} | {c.name for c in copies[:KEEP_ENTRIES - 2]}
    assert len(kept) == KEEP_ENTRIES and _entries(cache) == kept
    gone = sorted(c.name for c in copies[KEEP_ENTRIES - 2:])
    assert len(gone) == 3 and other_entry.is_dir()
    assert not [p for p in cache.iterdir() if any(g in p.name for g in gone)]  # nor their lock or staging files
    [line] = [r.getMessage() for r in caplog.records if "removed" in r.getMessage()]
    assert all(g in line for g in gone) and re.search(r"[\d.]+ MB freed", line), line
    assert f"keeping the {KEEP_ENTRIES} most recently used" in line and str(cache) in line
    # The kept entries still read as before: the next use of the first settings is a hit.
    assert external_faces(ext, crop, detector_dir, cache, workers=1) == first


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_entries_in_use_staging_folders_and_foreign_files_stay(detector_dir, tmp_path):
    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    first = external_faces(ext, crop, detector_dir, cache, workers=1)
    copies = _copies(first, KEEP_ENTRIES + 3, first_hours_ago=2)
    _age(first, 1 * HOUR)
    just_used, locked_entry, unstamped = copies[-3], copies[-2], copies[-1]
    _age(just_used, 60)  # a hit a minute ago: another run may be reading its crops now
    (unstamped / LAST_USED).unlink()  # made by an older version: its preprocess.json's time is its last use
    lock = os.open(cache / f".{locked_entry.name}.lock", os.O_RDWR | os.O_CREAT)  # another process building in it
    fcntl.flock(lock, fcntl.LOCK_EX)
    host = _host()
    building = cache / f".set-{'a' * 16}-{os.getpid()}@{host}-{'0' * 12}"  # a running build's staging folder
    killed = cache / f".set-{'b' * 16}-{_dead_pid()}@{host}-{'1' * 12}"  # one a killed build left
    for d in (building, killed):
        d.mkdir()
        (d / "x.png").write_bytes(b"x")
    foreign = {"notes.txt": "file", "set-backup": "dir", f"set-{'c' * 15}": "dir", f"set-{'d' * 16}": "dir",
               f"set-{'e' * 16}.zip": "file", "set-0123456789ABCDEF": "dir"}
    for name, kind in foreign.items():
        (cache / name).mkdir() if kind == "dir" else (cache / name).write_text("mine")
    (cache / f"set-{'d' * 16}" / "readme.txt").write_text("no preprocess.json: not an entry")
    os.symlink(first, cache / f"set-{'f' * 16}")  # a link named like an entry: the link is not ours either
    old = time.time() - 100 * HOUR
    for name in [*foreign, f"set-{'d' * 16}"]:
        os.utime(cache / name, (old, old))

    try:
        new = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)
    finally:
        fcntl.flock(lock, fcntl.LOCK_UN)
        os.close(lock)

    assert new.is_dir() and first.is_dir()
    assert just_used.is_dir() and locked_entry.is_dir()  # in use: left, though not among the most recent
    assert not unstamped.exists()  # the oldest made, never used since
    # Kept: the new one, the one used a minute ago, first, and the most recently used copies up to KEEP_ENTRIES.
    assert [c.is_dir() for c in copies[:KEEP_ENTRIES - 3]] == [True] * (KEEP_ENTRIES - 3)
    assert [c.exists() for c in copies[KEEP_ENTRIES - 3:-3]] == [False] * 3
    assert building.is_dir() and not killed.exists()
    assert all((cache / name).exists() for name in foreign)
    assert (cache / f"set-{'f' * 16}").is_symlink() and first.is_dir()


def test_a_removal_that_fails_is_a_warning_not_a_failed_run(detector_dir, tmp_path, monkeypatch, caplog):
    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    first = external_faces(ext, crop, detector_dir, cache, workers=1)
    _age(first, 1 * HOUR)
    copies = _copies(first, KEEP_ENTRIES + 1, first_hours_ago=2)
    refused, half, vanished = copies[-1], copies[-2], copies[-3]
    real_replace, real_unlink, real_stat = os.replace, os.unlink, external._last_used

    def replace(src, dst, *args, **kwargs):  # a folder this user may not move (another account's entry)
        if Path(src).name == refused.name:
            raise PermissionError(13, "Permission denied", str(src))
        return real_replace(src, dst, *args, **kwargs)

    def unlink(path, *args, **kwargs):  # one file inside that cannot be deleted
        if Path(path).name == "manifest.csv" and kwargs.get("dir_fd") is not None:
            raise PermissionError(13, "Permission denied", str(path))
        return real_unlink(path, *args, **kwargs)

    looks = []

    def last_used(entry):  # removed by hand (or another run) between the listing and its removal
        t = real_stat(entry)
        looks.append(entry.name)
        if entry.name == vanished.name and looks.count(entry.name) == 2:  # looked at again before removing it
            real_replace(entry, tmp_path / "moved away")
        return t

    monkeypatch.setattr(os, "replace", replace)
    monkeypatch.setattr(os, "unlink", unlink)
    monkeypatch.setattr(external, "_last_used", last_used)
    with caplog.at_level(logging.INFO, logger="faceage.external"):
        new = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)
    monkeypatch.undo()

    assert (new / "preprocess.json").is_file()  # the run got its crops
    assert refused.is_dir() and not vanished.exists() and not half.exists()
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(refused.name in w and "Permission denied" in w for w in warnings), warnings
    assert any(half.name in w and "manifest.csv" in w for w in warnings), warnings
    assert all("\n" not in w for w in warnings) and not any(vanished.name in w for w in warnings), warnings
    # The half-deleted one is finished off after the next new entry (its remover has ended).
    [aside] = [p for p in cache.iterdir() if p.name.startswith(f".{half.name}-")]
    os.rename(aside, aside.with_name(aside.name.replace(f"-{os.getpid()}@", f"-{_dead_pid()}@")))
    external_faces(ext, {**crop, "margin": 0.35}, detector_dir, cache, workers=1)
    assert not [p for p in cache.iterdir() if half.name in p.name]


def test_a_hit_on_a_cache_this_user_cannot_write_still_reads_it(detector_dir, tmp_path, monkeypatch):
    """A team's shared, read-only cache: the stamp cannot be written, which must not stop the run."""
    from pathlib import Path as P

    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    real_touch = P.touch

    def touch(self, *args, **kwargs):
        if self.name == LAST_USED:
            raise PermissionError(13, "Permission denied", str(self))
        return real_touch(self, *args, **kwargs)

    monkeypatch.setattr(P, "touch", touch)
    assert external_faces(ext, crop, detector_dir, cache, workers=1) == faces


def test_set_version_survives_its_entry_being_removed(detector_dir, tmp_path):
    """evaluate reads the entry's record of the set's version last, after scoring; an entry removed meanwhile
    (by hand, or by another run) no longer fails the evaluation at its very end."""
    from faceage.appa_real import dataset_fingerprint
    from faceage.external import set_version

    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    recorded = set_version(faces, ext.path)
    shutil.rmtree(faces)
    assert set_version(faces, ext.path) == recorded == dataset_fingerprint(ext.path)


def test_entries_used_in_the_last_minutes_stay_however_many(detector_dir, tmp_path):
    """Runs side by side on many settings at once (``dvc queue start -j 4``): each may still be reading its entry."""
    ext, crop, cache = _set(tmp_path), checkpoint_crop(detector_dir), tmp_path / "cache"
    first = external_faces(ext, crop, detector_dir, cache, workers=1)
    recent = _copies(first, KEEP_ENTRIES + 1, first_hours_ago=0.02, step_hours=0.02)  # 1, 2, 3 ... minutes ago
    stale = first.with_name(f"set-{'9' * 16}")
    shutil.copytree(first, stale)
    _age(stale, 30 * HOUR)
    _age(first, 40 * HOUR)
    new = external_faces(ext, {**crop, "margin": 0.3}, detector_dir, cache, workers=1)
    assert _entries(cache) == {new.name, *(r.name for r in recent)}


def test_the_cache_key_changes_with_the_code_that_decodes_and_crops(tmp_path, monkeypatch):
    """Crops cut before an edit of how a photo decodes (faceage.images: this round's PNG colour chunks) or is
    detected and cropped were reused after it: the key held the data, the settings and the format number only."""
    import faceage.external as external
    import faceage.preprocess as preprocess

    folder = tmp_path / "set"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"photo")
    key = external.cache_key(folder, {}, "sp")
    assert external.cache_key(folder, {}, "sp") == key  # stable while the code is
    monkeypatch.setattr(external, "code_fingerprint", lambda: preprocess.code_fingerprint() + " edited")
    assert external.cache_key(folder, {}, "sp") != key
