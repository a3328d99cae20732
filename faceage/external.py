"""Cross-dataset test sets (``evaluate.external``): labelled faces from another collection, cropped
exactly as the model's training crops and scored like the test split.

Input: a folder in the release layout with at least ``gt_avg_test.csv`` and ``test/`` (no
``_face.jpg`` needed), a checkpoint's crop settings (``meta["crop"]``: detector, upsample,
margin, size, ``no_face``, detector sha256) and the ``fetch_detector`` folder.
Output: a faces folder laid out like ``preprocess``'s (``test/NAME.png``, ``manifest.csv``,
``chips.npz``, ``preprocess.json``; plus ``embeddings-<key>.npz`` for ``dlib_face`` models), so
:func:`faceage.data.load_split` reads it exactly as it reads the test split.

The crops are made by :func:`faceage.preprocess.crop_samples` (the pipeline's one detect + crop
+ ``no_face`` code) with preprocess's resume (:func:`faceage.preprocess.resumable_output`: a crop stopped
half-way, by Ctrl-C or kill -9, keeps its work in ``<cache>/.<name>-<key>.partial/`` and the next run of the
same job goes on from it) and cached under ``<cache>/<name>-<key>/``, where the key hashes the folder's bytes,
the crop settings, the crop code and the photo list as read (each photo's file and labels): a new detector, margin,
size or fallback, edited images, an edit of the crop code, or a change to how the CSV is read that changes the labels
read, give a new key; the same settings reuse the crops (detection and crop of 1,743 faces took 21.6 s on 2 cores in
round 22, ``benchmarks/bench_external_crops.py``). The ``dlib_face`` descriptors (minutes) are kept in the entry in
one file per key of the code that computed them (:data:`DESCRIPTOR_CODE_MODULES`) and the face-network files
(:func:`descriptors_key`): computed again after an edit of it, and two runs with other code at once each read their own.

The cache is kept from growing without end: each use of an entry (made or reused) touches its stamp file
:data:`LAST_USED`, and after a new entry is made only the :data:`KEEP_ENTRIES` most recently used entries of that
set are kept (:func:`prune_cache`); a sweep of ``-S preprocess.margin=...`` left one entry per value behind
before. A partial folder counts as an entry last used when it was last written to. An entry (or partial folder)
used in the last :data:`IN_USE_S` seconds, or locked by a run building in it, is never removed,
nor is anything in the cache folder that is not an entry of this layout. The whole folder may be deleted by hand
between runs; the next evaluation crops again.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import time
import zipfile
from pathlib import Path
from typing import Any

from faceage.appa_real import LayoutError, dataset_fingerprint, read_split
from faceage.atomic import (NO_SPACE, WriteError, clear_stale, errno_text, free_bytes, lock_file, locked, megabytes,
                            same_file, scratch_name)
from faceage.config import PreprocessParams
from faceage.errors import FaceAgeError
from faceage.chips import CHIPS_FILE, missing_crops
from faceage.detector import SHAPE5_FILE, read_manifest
from faceage.faces import crop_cnn_retry_side, crop_detector_files, crop_retry_pad
from faceage.preprocess import (MANIFEST, PARTIAL_SUFFIX, RECORDS, SETTINGS, code_fingerprint, count_statuses,
                                crop_samples, partial_dir, photos_sha256, read_faces_manifest, resumable_output)
from faceage.sources import EXTERNAL_SPLIT, ExternalSet, ExternalSetError, external_name

log = logging.getLogger(__name__)

EMBEDDINGS = "embeddings.npz"  # the one descriptors file of versions before round 35 (removed once old): now keyed
# The code that computes a set's dlib_face descriptors: faceage.face_encoder (the 5-point alignment and the network
# call), faceage.chips (the loop that reads each crop, and the face box inside a crop), faceage.detector (the model
# files' loading) and faceage.preprocess (which crops, and their margin, from the entry's manifest and settings; an
# edit of it also gives a new crop entry). faceage.face_net is not among them: it is the torch copy of the network
# inside dlib_age's fused head, which the descriptors never go through.
DESCRIPTOR_CODE_MODULES = ("faceage.face_encoder", "faceage.chips", "faceage.detector", "faceage.preprocess")
# Beside EMBEDDINGS in an entry of versions before round 35: the fingerprint of the code that computed them (the
# descriptors' file name holds it now); removed with EMBEDDINGS.
DESCRIPTOR_RECORD = "descriptors.json"
# 6: load_image converts a photo tagged with an ICC profile other than sRGB to sRGB (round 26);
# 5: photos over faces.MAX_DETECT_PIXELS are detected downscaled, as the service detects them (round 24);
# 4: the CNN's pixel cap and the whole-image fallback's size (round 22) change some crops; 3: chips.npz also
# holds the 150 px face-recognition chips; 2: preprocess writes chips.npz, cut from the unresampled margin
# regions (1: chips cut later from the crops)
FACES_FORMAT = 6
# The crop settings that decide the pixels of a crop (workers and data lineage do not).
CROP_KEYS = ("detector", "upsample", "retry_pad", "cnn_retry_side", "cnn_retry_sha256", "margin", "size", "no_face",
             "detector_file", "detector_sha256")
SET_SHA256 = "set_sha256"  # the cache entry's record of which version of the set's files it was cut from
# How many entries of one set the cache keeps (the most recently used; each may be hundreds of MB: utk-external's
# 1,743 crops and chips): enough to alternate between a few experiments' crop settings without cropping again
# (minutes each, the dlib_face descriptors more), few enough that a sweep over a crop setting does not fill the disk.
KEEP_ENTRIES = 4
# An entry used this recently is never removed, however many there are: another run (dvc queue start -j 2) may be
# reading its crops now, which it does without holding the entry's lock.
IN_USE_S = 30 * 60
LAST_USED = ".last_used"  # the stamp file in an entry, touched on each use: its mtime is the entry's last use


def crop_params(crop: dict[str, Any], workers: int = 0) -> PreprocessParams:
    """The ``preprocess`` settings a checkpoint's crops were made with (``meta["crop"]``)."""
    return PreprocessParams(detector=crop["detector"], upsample=int(crop["upsample"]),
                            retry_pad=crop_retry_pad(crop), cnn_retry_side=crop_cnn_retry_side(crop),
                            margin=float(crop["margin"]), size=int(crop["size"]),
                            no_face=crop.get("no_face", "release_crop"), workers=workers)


def cache_key(folder: Path, crop: dict[str, Any], shape_predictor_sha256: str = "",
              fingerprint: str | None = None, *, photos: str | None = None) -> str:
    """16 hex digits over the folder's bytes (every file), the pixel-deciding crop settings, the
    faces-folder format, the shape predictor that aligns the chips, the code that decodes, detects and
    crops (:func:`faceage.preprocess.code_fingerprint`, as a resumed preprocess checks it: crops cut before an edit
    of how a photo decodes were reused after it) and the photo list as read (``photos``).

    Args:
        fingerprint: The folder's :func:`dataset_fingerprint` when the caller has it already.
        photos: :func:`faceage.preprocess.photos_sha256` of the set's rows as :func:`read_split` reads them (each
            photo's file, crop and labels; what a resumed crop's ``job.json`` checks): the entry's ``manifest.csv``
            holds those labels, and the folder's bytes do not decide them alone (an edit of the CSV parsing kept the
            labels the old parser read). None: read here; a folder whose rows cannot be read (no set
            :func:`external_faces` crops: it reads them first, and stops on the error) is keyed without them.
    """
    if photos is None:
        try:
            photos = photos_sha256({EXTERNAL_SPLIT: read_split(folder, EXTERNAL_SPLIT)}, folder)
        except LayoutError:
            photos = ""
    h = hashlib.sha256((fingerprint or dataset_fingerprint(folder)).encode())
    h.update(json.dumps({k: crop.get(k) for k in CROP_KEYS}, sort_keys=True).encode())
    h.update(f"format {FACES_FORMAT} shape predictor {shape_predictor_sha256} code {code_fingerprint()}".encode())
    if photos:
        h.update(f" photos {photos}".encode())
    return h.hexdigest()[:16]


# What a crop worker's death (out of memory on a huge photo) tells the user to lower: evaluate reads no
# preprocess.workers, so "lower preprocess.workers" changed nothing here (and reran preprocess).
EXTERNAL_WORKERS = ("the cores evaluate crops external sets on (one worker per usable core: run it on fewer, "
                    "e.g. `taskset -c 0 dvc repro`)")


def external_faces(ext: ExternalSet, crop: dict[str, Any], detector_dir: str | Path, cache_dir: str | Path,
                   workers: int = 0) -> Path:
    """The set's faces folder (crops + manifest) for these crop settings, from the cache or made now.

    Args:
        ext: From :func:`faceage.sources.resolve_external`.
        crop: The checkpoint's crop settings (``meta["crop"]``).
        detector_dir: The ``fetch_detector`` folder; its detector file must be the checkpoint's.
        cache_dir: Where cropped sets are kept.
        workers: Detection processes; 0 = one per core.

    Raises:
        ExternalSetError: The detector folder does not hold the detector the checkpoint was trained with.
    """
    manifest = read_manifest(detector_dir, verify=True)  # one read: the crops and chips.npz record its sha256
    files = manifest["files"]
    for filename, sha256 in crop_detector_files(crop).items():
        if files.get(filename) != sha256:
            raise ExternalSetError(f"{detector_dir} holds {filename} with sha256 {files.get(filename)}, but the "
                                   f"checkpoint's crops were made with {sha256}")
    fingerprint = dataset_fingerprint(ext.path)
    # The rows as read now key the entry (its manifest.csv holds their labels), read once: the crops use the same.
    samples = {EXTERNAL_SPLIT: read_split(ext.path, EXTERNAL_SPLIT)}
    key = cache_key(ext.path, crop, files[SHAPE5_FILE], fingerprint, photos=photos_sha256(samples, ext.path))
    out = Path(cache_dir) / f"{ext.name}-{key}"
    # Runs side by side (dvc queue start -j 2) ask for the same entry: one crops, the others wait and reuse.
    with locked(out, f"cropping {ext.name} into {out}"):
        if (out / SETTINGS).is_file():
            problem = _entry_problem(out)
            if problem is None:
                log.info("external set %s: reusing the crops in %s", ext.name, out)
                _mark_used(out)  # under the lock: prune_cache takes it to remove an entry, and looks at the stamp again
                return out
            # Reused as it was, evaluate died on the missing crop with preprocess's advice (`dvc repro -f preprocess`),
            # which rebuilds nothing here. Cropped again into the same entry (replaced whole when done).
            log.warning("external set %s: the crop-cache entry %s is not whole (%s): cropping it again", ext.name,
                        out, problem)
        params = crop_params(crop, workers)
        log.info("external set %s: detecting and cropping %s (detector=%s, upsample=%d, margin=%g, size=%d, "
                 "no_face=%s)", ext.name, ext.path, params.detector, params.upsample, params.margin, params.size,
                 params.no_face)
        # preprocess's resumable crop: a crop stopped half-way (Ctrl-C, kill -9; minutes for utk-external) leaves
        # its work in the entry's partial folder, and the next run of the same job goes on from it.
        try:
            with resumable_output(out, [EXTERNAL_SPLIT]) as (tmp, partial):
                rows = crop_samples(samples, ext.path, detector_dir, tmp, params, workers_key=EXTERNAL_WORKERS,
                                    manifest=manifest, partial=partial, inputs={SET_SHA256: fingerprint},
                                    what=f"external set {ext.name}")
                settings = {**{k: crop.get(k) for k in CROP_KEYS}, "data_source": str(ext.path),
                            SET_SHA256: fingerprint, "counts": count_statuses(rows)[EXTERNAL_SPLIT]}
                (tmp / SETTINGS).write_text(json.dumps(settings, indent=2) + "\n")
        except OSError as e:
            if isinstance(e, FaceAgeError) or e.errno not in NO_SPACE:
                raise
            # A full disk: unlike Ctrl-C or a kill, the work done so far goes too (a hidden folder of a cache, which
            # the user would have to find to free the space; what is free after it is what a rerun has). Under the
            # entry's lock still: no run is cropping into it.
            shutil.rmtree(partial_dir(out), ignore_errors=True)
            raise WriteError(f"cropping external set {ext.name} into {out.parent} failed: {errno_text(e)}; "
                             f"{_free(out.parent)}: free some space and rerun (no partial crops kept)") from e
        _mark_used(out)
    prune_cache(Path(cache_dir), ext.name, out)
    return out


def _entry_problem(entry: Path) -> str | None:
    """What a complete-looking cache entry (its ``preprocess.json`` written last) lacks that evaluate reads: its
    ``manifest.csv``, a crop the manifest lists, or its ``chips.npz`` (deleted by hand, a cache copied in part);
    None when it lacks nothing. A stat per crop: milliseconds for a whole set."""
    try:
        rows = read_faces_manifest(entry, EXTERNAL_SPLIT)
    except FileNotFoundError:  # FacesMissingError
        return f"no {MANIFEST}"
    missing = missing_crops(entry, [r["crop"] for r in rows])
    if missing:
        return f"{len(missing)} crop(s) its {MANIFEST} lists are missing, first {missing[0]}"
    if not (entry / CHIPS_FILE).is_file():
        return f"no {CHIPS_FILE}"
    return None


def _mark_used(entry: Path) -> None:
    """Touches ``entry``'s :data:`LAST_USED` stamp. A cache this user cannot write (a team's shared one) is
    still read: its entries are simply not stamped."""
    try:
        (entry / LAST_USED).touch()
    except OSError as e:
        log.debug("could not mark %s as used: %s", entry, errno_text(e))


def _last_used(entry: Path) -> float:
    """When ``entry`` was last used: its stamp's mtime, or its ``preprocess.json``'s for an entry made before
    entries were stamped (when it was made). Raises OSError where neither can be read."""
    try:
        return (entry / LAST_USED).stat().st_mtime
    except FileNotFoundError:
        return (entry / SETTINGS).stat().st_mtime


def _is_entry(path: Path) -> bool:
    """Whether ``path`` (named ``<name>-<16 hex>``) is a complete cache entry of this layout: a folder (not a
    link) whose ``preprocess.json`` is an external set's record (a JSON object with the crop ``counts``)."""
    try:
        if path.is_symlink() or not path.is_dir():
            return False
        settings = json.loads((path / SETTINGS).read_text())
    except (OSError, ValueError):
        return False
    return isinstance(settings, dict) and isinstance(settings.get("counts"), dict)


def cache_entries(cache_dir: Path, name: str) -> list[Path]:
    """Set ``name``'s complete entries in ``cache_dir`` (``<name>-<16 hex>/`` holding its ``preprocess.json``),
    most recently used first. Anything else there (staging folders, lock files, the user's own files) is not
    listed."""
    pattern = re.compile(rf"{re.escape(name)}-[0-9a-f]{{16}}")
    try:
        found = [p for p in cache_dir.iterdir() if pattern.fullmatch(p.name) and _is_entry(p)]
    except OSError:
        return []
    used = {}
    for path in found:
        try:
            used[path] = _last_used(path)
        except OSError:  # removed meanwhile
            continue
    return sorted(used, key=used.__getitem__, reverse=True)


def prune_cache(cache_dir: Path, name: str, keep: Path | None = None) -> list[Path]:
    """Removes set ``name``'s cache entries beyond the :data:`KEEP_ENTRIES` most recently used, after a new
    entry (``keep``, always kept) was made, with one log line naming them and the space freed.

    The partial folders of crops stopped half-way (``.NAME-KEY.partial``) are ranked with the entries by their last
    write (a recent one stays for its rerun to resume); one whose entry is complete is removed whatever its rank.
    An entry used in the last :data:`IN_USE_S` seconds, or whose lock another process holds (building it, or
    computing its descriptors), is left; so is anything that is not an entry (:func:`cache_entries`). Staging
    folders that killed builds of this set's entries left are removed (:func:`faceage.atomic.clear_stale`; a
    running build's are left). Housekeeping never fails the run: a removal that fails is a warning.

    Returns:
        The entries removed.
    """
    try:
        _clear_stale_staging(cache_dir, name)
        entries = [e for e in cache_entries(cache_dir, name) if e != keep]
        # The work of crops stopped half-way (:func:`faceage.preprocess.partial_dir`): ranked with the entries by
        # their last write, so a recent one stays for its rerun to resume, and old ones do not pile up. One whose
        # entry was completed (killed while it was being removed) is left over, whatever its age.
        partials = {}
        for partial in _partials(cache_dir, name):
            try:
                partials[partial] = _partial_last_used(partial)
            except OSError:  # removed meanwhile (its run finished)
                continue
        leftover = [p for p in partials if _is_entry(_entry_of(p))]
        used = {p: t for p, t in partials.items() if p not in leftover}
        for entry in entries:
            try:
                used[entry] = _last_used(entry)
            except OSError:  # removed since it was listed (another run's prune: dvc queue start -j 2)
                continue
    except Exception as e:  # noqa: BLE001 - the run has its crops; housekeeping must not fail it
        log.warning("external set %s: could not look for old crop-cache entries in %s: %s", name, cache_dir, e)
        return []
    ranked = sorted(used, key=used.__getitem__, reverse=True)
    old = ranked[KEEP_ENTRIES - (1 if keep is not None else 0):] + leftover
    removed, in_use, freed = [], [], 0
    for entry in old:
        try:
            size = _remove_entry(entry)
        except Exception as e:  # noqa: BLE001 - ditto: a warning, the run goes on
            log.warning("external set %s: could not remove the old crop-cache entry %s: %s", name, entry,
                        errno_text(e) if isinstance(e, OSError) else e)
            continue
        if size == _IN_USE:
            in_use.append(entry.name)
        elif size != _GONE:
            removed.append(entry)
            freed += size
    if removed:
        log.info("external set %s: removed %d crop-cache entr%s not used recently from %s (%s); %s freed, keeping "
                 "the %d most recently used (faceage.external.KEEP_ENTRIES)%s", name, len(removed),
                 "y" if len(removed) == 1 else "ies", cache_dir, ", ".join(e.name for e in removed),
                 megabytes(freed), KEEP_ENTRIES, f"; left {', '.join(in_use)}: {_LEFT_WHY}" if in_use else "")
    elif in_use:
        log.info("external set %s: left the old crop-cache entr%s %s in %s: %s", name,
                 "y" if len(in_use) == 1 else "ies", ", ".join(in_use), cache_dir, _LEFT_WHY)
    return removed


# Why an old entry was left. Not "in use by another run": an entry used minutes ago by a run long finished is left
# too (_remove_entry cannot tell it from one a run is still reading).
_LEFT_WHY = (f"used in the last {IN_USE_S // 60} min (faceage.external.IN_USE_S) or locked by a run making it: "
             "another run may be reading it")


def _clear_stale_staging(cache_dir: Path, name: str) -> None:
    """Removes the staging folders beside set ``name``'s entries that killed processes left: a crop killed
    midway (the partial crops of a whole set), or a removal killed midway."""
    # an entry's staging folder, or an entry, or a partial folder (``.NAME-KEY.partial``) being removed
    pattern = re.compile(rf"\.((?:\.)?{re.escape(name)}-[0-9a-f]{{16}}(?:{re.escape(PARTIAL_SUFFIX)})?)-\d+@.*")
    targets = {m[1] for m in map(pattern.fullmatch, (p.name for p in cache_dir.iterdir())) if m}
    for target in sorted(targets):
        clear_stale(cache_dir / target)


def _partials(cache_dir: Path, name: str) -> list[Path]:
    """Set ``name``'s partial folders in ``cache_dir`` (``.<name>-<16 hex>.partial``, real folders: not links)."""
    pattern = re.compile(rf"\.{re.escape(name)}-[0-9a-f]{{16}}{re.escape(PARTIAL_SUFFIX)}")
    return [p for p in cache_dir.iterdir()
            if pattern.fullmatch(p.name) and p.is_dir() and not p.is_symlink()]


def _entry_of(partial: Path) -> Path:
    """The cache entry a partial folder's crops are for (``.NAME.partial`` -> ``NAME``)."""
    return partial.with_name(partial.name[1:-len(PARTIAL_SUFFIX)])


def _partial_last_used(partial: Path) -> float:
    """When a crop last wrote into ``partial``: the latest mtime of the folder, what is in it, and its records
    files (appended to after each photo). Raises OSError where the folder cannot be read (removed meanwhile)."""
    latest = partial.stat().st_mtime
    for folder in (partial, partial / RECORDS):
        try:
            with os.scandir(folder) as it:
                for entry in it:
                    try:
                        latest = max(latest, entry.stat(follow_symlinks=False).st_mtime)
                    except OSError:
                        continue
        except (FileNotFoundError, NotADirectoryError):
            if folder == partial:
                raise
    return latest


_IN_USE, _GONE = "in use", "gone"  # what _remove_entry returns for an entry it left, and one removed meanwhile


def _remove_entry(entry: Path) -> int | str:
    """Removes one cache entry (or partial folder: under its entry's lock, its age its last write), unless another
    process holds its lock or used it in the last :data:`IN_USE_S`
    seconds (:data:`_IN_USE`). Returns the bytes freed (those that could not be deleted are warned about, not
    counted), or :data:`_GONE` for an entry removed meanwhile (by hand, or by another run).

    The entry is first renamed to a staging name (one step: a run looking for it from then on makes it again,
    and one killed during the slow deletion leaves a folder :func:`_clear_stale_staging` removes later),
    then deleted. Raises OSError where it cannot be renamed (another account's entry).
    """
    # A partial folder (.NAME.partial) is guarded by its entry's lock: a run crops into it holding that lock.
    partial = entry.name.startswith(".") and entry.name.endswith(PARTIAL_SUFFIX)
    owner = _entry_of(entry) if partial else entry
    last_used = _partial_last_used if partial else _last_used
    lock = lock_file(owner)  # faceage.atomic.locked's lock file for the entry
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no lock, the time since its last use alone protects it
        fcntl = None
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666) if fcntl else None
    try:
        if fd is not None:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return _IN_USE
            if not same_file(fd, lock):  # another run's removal deleted it meanwhile; a new one is another's now
                return _IN_USE if entry.exists() else _GONE
        try:  # looked at again under the lock: a hit since the listing stamped it (and held the lock to)
            if time.time() - last_used(entry) < IN_USE_S:
                return _IN_USE
            size = _disk_bytes(entry)
            aside = scratch_name(entry, "evicted")
            os.replace(entry, aside)
        except FileNotFoundError:
            if not entry.exists():
                if fd is not None and not (partial and owner.exists()):
                    lock.unlink(missing_ok=True)
                return _GONE
            raise
        # The lock file goes with its entry (one per entry ever made, else), deleted while it is locked: a run that
        # opened it and waits on it sees, once it gets it, that it is no longer the file at the path, and locks the
        # one there (faceage.atomic.locked), which a run arriving later locks too: one of them makes the entry again.
        if fd is not None and not (partial and owner.exists()):  # a partial's entry keeps its lock file
            lock.unlink(missing_ok=True)
    finally:
        if fd is not None:
            os.close(fd)  # releases the flock
    failed: list[str] = []
    _rmtree(aside, failed)
    failed = [f[len(str(aside)) + 1:] if f.startswith(f"{aside}{os.sep}") else f for f in failed]
    if failed:
        left = _disk_bytes(aside)
        log.warning("could not delete all of the old crop-cache entry %s (moved to %s, %s left there): %s; it is "
                    "tried again after the next new entry of the set", entry.name, aside.name, megabytes(left),
                    "; ".join(failed[:3]) + (f"; and {len(failed) - 3} more" if len(failed) > 3 else ""))
        return max(size - left, 0)
    return size


def _rmtree(path: Path, failed: list[str]) -> None:
    """``shutil.rmtree`` that goes on past a file it cannot delete, noting each failure in ``failed``."""
    def note(_func, name, exc_info):
        e = exc_info[1]
        # A file vanished meanwhile: gone is what was wanted. A folder left not empty: its file's failure says why.
        if not isinstance(e, FileNotFoundError) and getattr(e, "errno", None) != errno.ENOTEMPTY:
            failed.append(f"{name}: {errno_text(e) if isinstance(e, OSError) else e}")

    if sys.version_info >= (3, 12):  # onexc replaces onerror (deprecated) from 3.12
        shutil.rmtree(path, onexc=lambda func, name, e: note(func, name, (type(e), e, None)))
    else:
        shutil.rmtree(path, onerror=note)


def _disk_bytes(folder: Path) -> int:
    """The disk space ``folder``'s files take (what ``du`` counts; the files' sizes where blocks are not told)."""
    total = 0
    for root, _dirs, files in os.walk(folder):
        for f in files:
            try:
                st = os.lstat(os.path.join(root, f))
            except OSError:
                continue
            total += st.st_blocks * 512 if hasattr(st, "st_blocks") else st.st_size
    return total


def _free(folder: Path) -> str:
    """The free space in ``folder``, for a full-disk message (which must not fail in turn)."""
    free = free_bytes(folder)
    return f"{megabytes(free)} is free there" if free is not None else "the free space there could not be read"


def descriptors_key(code_sha256: str, encoder_sha256: str, shape_predictor_sha256: str) -> str:
    """16 hex digits over what decides a set's ``dlib_face`` descriptors beyond its crops: the code that computes
    them (:data:`DESCRIPTOR_CODE_MODULES`' fingerprint) and the two face-network files (face encoder, 5-point shape
    predictor). The key names the file they are kept in (:func:`descriptors_file`)."""
    h = hashlib.sha256(f"code {code_sha256} encoder {encoder_sha256} shape predictor {shape_predictor_sha256}".encode())
    return h.hexdigest()[:16]


def descriptors_file(faces_dir: Path, key: str) -> Path:
    """Where an entry keeps the descriptors of one :func:`descriptors_key`: ``embeddings-<key>.npz``."""
    return faces_dir / f"{_DESCRIPTORS_PREFIX}{key}.npz"


_DESCRIPTORS_PREFIX = "embeddings-"
_DESCRIPTORS_NAME = re.compile(rf"{re.escape(_DESCRIPTORS_PREFIX)}[0-9a-f]{{16}}\.npz")
_DESCRIPTORS_STAGING = re.compile(rf"(?:{re.escape(_DESCRIPTORS_PREFIX)}[0-9a-f]{{16}}\.npz|{re.escape(EMBEDDINGS)})"
                                  r"\.tmp\.npz")  # embed_dataset's staging files (this version's, and older ones')


def external_embeddings(faces_dir: Path, detector_dir: str | Path, workers: int = 0) -> Path:
    """``dlib_face`` descriptors of a cropped set, cached beside its crops.

    Kept in one file per :func:`descriptors_key` (the face-network files' sha256 and the code of
    :data:`DESCRIPTOR_CODE_MODULES`, fingerprinted by :func:`faceage.preprocess.code_fingerprint`): an edit of that
    code reruns ``embed`` and ``train`` under ``dvc repro``, and the set is scored with the new code's descriptors;
    and two evaluations of the set at the same moment with other code or files (two worktrees sharing the cache,
    ``dvc queue start -j 2``) each read their own file. The path returned is read after the entry's lock is let go:
    with one file for every key, a run computing other descriptors replaced it before it was read, and the
    set was scored with the other run's descriptors. A file of another key is removed only when not used in the
    last :data:`IN_USE_S` seconds and beyond the :data:`KEEP_ENTRIES` most recently used (:func:`_prune_descriptors`).

    Raises:
        faceage.atomic.WriteError: The disk filled up while they were written (nothing partial is kept).
        faceage.preprocess.FacesMissingError: (a ``FileNotFoundError``) A crop of the entry is gone (since
            :func:`external_faces`, which crops an entry lacking one again, handed it out).
        faceage.chips.WorkerDiedError: A worker died (out of memory); the message names what to lower.
    """
    from faceage.face_encoder import embed_dataset, load_embeddings
    from faceage.detector import RECOGNITION_FILE, SHAPE5_FILE

    files = read_manifest(detector_dir)["files"]
    code = code_fingerprint(DESCRIPTOR_CODE_MODULES)
    key = descriptors_key(code, files[RECOGNITION_FILE], files[SHAPE5_FILE])
    path = descriptors_file(faces_dir, key)
    with locked(faces_dir, f"the face descriptors of {faces_dir}"):
        if path.is_file():
            try:
                _, info = load_embeddings(path)
                same_files = (info["encoder_sha256"], info["shape_predictor_sha256"]) == (files[RECOGNITION_FILE],
                                                                                          files[SHAPE5_FILE])
            except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:  # garbled (disk error, edit)
                same_files = False
                # the error's kind, not its text: the loader's advice (rerun embed) is not this cache's
                log.warning("the face descriptors %s cannot be read (%s): computing them again", path,
                            type(e).__name__)
            if same_files:
                _touch(path)  # its last use: what _prune_descriptors ranks by
                _mark_used(faces_dir)  # the minutes spent on them count as use: prune_cache leaves the entry
                return path
        log.info("external set %s: computing the face descriptors of its crops in %s (key %s: the code of %s and "
                 "the face-network files)", _set_name(faces_dir), faces_dir, key, ", ".join(DESCRIPTOR_CODE_MODULES))
        staging = path.with_name(path.name + ".tmp.npz")  # embed_dataset's staging file, replaced into path
        try:
            # A worker's death names what evaluate runs on, not the embed stage's setting, which it does not read;
            # a crop gone since external_faces handed the entry out (by hand) gets this cache's advice, not
            # "rerun preprocess", which rebuilds nothing here
            embed_dataset(faces_dir, detector_dir, path, workers, workers_key=EXTERNAL_WORKERS, crops_advice={
                "what": "not a whole crop-cache entry",
                "fix": f"rerun evaluate, which crops external set {_set_name(faces_dir)} into it again"})
        except OSError as e:
            staging.unlink(missing_ok=True)  # in the shared cache entry: no later run would remove it
            if isinstance(e, FaceAgeError) or e.errno not in NO_SPACE:
                raise
            raise WriteError(f"writing the face descriptors of external set {_set_name(faces_dir)} "
                             f"into {faces_dir} failed: {errno_text(e)}; {_free(faces_dir)}: free "
                             "some space and rerun (no partial file kept)") from e
        _mark_used(faces_dir)
        _prune_descriptors(faces_dir, path)
    return path


def _set_name(faces_dir: Path) -> str:
    """The set an entry (``<name>-<key>``) holds the crops of."""
    return faces_dir.name.rsplit("-", 1)[0]


def _touch(path: Path) -> None:
    """Sets ``path``'s mtime to now (its last use); a cache this user cannot write is still read."""
    try:
        os.utime(path)
    except OSError as e:
        log.debug("could not mark %s as used: %s", path, errno_text(e))


def _prune_descriptors(faces_dir: Path, keep: Path) -> None:
    """Removes the descriptor files of other keys from an entry beyond the :data:`KEEP_ENTRIES` most recently used
    (``keep`` counted), never one used in the last :data:`IN_USE_S` seconds (another run may have been handed it and
    not read it yet); and the single ``embeddings.npz`` with its :data:`DESCRIPTOR_RECORD` of earlier versions, by
    the same rule; and the staging files of runs killed while writing descriptors. Under the entry's lock (held by
    whoever writes descriptors in it). Housekeeping: a failure is logged, never raised."""
    try:
        others = {}
        for p in faces_dir.iterdir():
            if _DESCRIPTORS_STAGING.fullmatch(p.name):  # a killed run's: none is written without the entry's lock
                p.unlink(missing_ok=True)
            elif p != keep and (_DESCRIPTORS_NAME.fullmatch(p.name) or p.name == EMBEDDINGS):
                try:
                    others[p] = p.stat(follow_symlinks=False).st_mtime
                except OSError:
                    continue
        ranked = sorted(others, key=others.__getitem__, reverse=True)
        now = time.time()
        for p in ranked[KEEP_ENTRIES - 1:]:
            if now - others[p] >= IN_USE_S:
                p.unlink(missing_ok=True)
                if p.name == EMBEDDINGS:
                    (faces_dir / DESCRIPTOR_RECORD).unlink(missing_ok=True)
    except OSError as e:
        log.warning("external set %s: could not remove old face descriptors from %s: %s", _set_name(faces_dir),
                    faces_dir, errno_text(e))


def external_chips(faces_dir: Path) -> Path:
    """``dlib_age`` aligned chips of a cropped set: ``crop_samples`` cut them beside its crops."""
    return faces_dir / CHIPS_FILE


def set_version(faces_dir: Path, folder: Path) -> str:
    """The :func:`dataset_fingerprint` of the set's files the crops in ``faces_dir`` were cut from (read
    from the cache entry; hashed again only for entries written before they recorded it, or for an entry
    removed since it was read: by hand, or by another run's :func:`prune_cache` after :data:`IN_USE_S`)."""
    try:
        recorded = json.loads((faces_dir / SETTINGS).read_text()).get(SET_SHA256)
    except FileNotFoundError:
        recorded = None
    return recorded or dataset_fingerprint(folder)


def crop_counts(faces_dir: Path) -> dict[str, int]:
    """How the set's images fared: ``n_images``, ``n_faces`` (scored), and each status count."""
    counts = json.loads((faces_dir / SETTINGS).read_text())["counts"]
    return {"n_images": sum(counts.values()), "n_faces": len(read_faces_manifest(faces_dir, EXTERNAL_SPLIT)), **counts}


EXTERNAL_SHA256_TAG = "evaluate.external_sha256"  # {set name: dataset_fingerprint} of a run's latest evaluation


def external_versions(tags: dict[str, str] | None) -> dict[str, str]:
    """``{set name: fingerprint of the set's files}`` a run's external MAEs were measured on (its tag
    :data:`EXTERNAL_SHA256_TAG`); ``{}`` for a run evaluated before the tag existed."""
    try:
        versions = json.loads((tags or {}).get(EXTERNAL_SHA256_TAG, "{}"))
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def external_maes(metrics: dict[str, float], tags: dict[str, str] | None = None) -> dict[str, float]:
    """``{set name: MAE}`` from a run's MLflow metrics (evaluate logs ``external_<name>_mae`` and ``_n_faces``).

    Args:
        metrics: The run's metrics.
        tags: The run's tags: when they hold ``evaluate.external`` (the latest evaluation's sets), only
            those sets count. MLflow cannot delete a metric, so a set dropped from ``evaluate.external``
            in a later re-evaluation of the run keeps its old ``external_<name>_*`` metrics there.

    A set whose latest ``external_<name>_n_faces`` is 0 (or not a number) is left out: evaluate then logs its
    counts alone, and the ``_mae`` still there is an earlier evaluation's, which packaging compared as current.
    """
    names = [k[len("external_"):-len("_n_faces")] for k in metrics
             if k.startswith("external_") and k.endswith("_n_faces") and some_faces(metrics[k])]
    current = _tagged_sets((tags or {}).get("evaluate.external"))
    if current is not None:
        names = [n for n in names if n in current]
    return {n: float(metrics[f"external_{n}_mae"]) for n in sorted(names) if f"external_{n}_mae" in metrics}


def some_faces(n_faces: Any) -> bool:
    """Whether a set's ``n_faces`` (its ``metrics.json`` entry's, or the ``external_<name>_n_faces`` metric) counts at
    least one scored face (0, NaN, a missing or non-numeric value: none). The one rule for "no face scored": evaluate
    logs such a set's counts alone (:func:`faceage.evaluation.external_mlflow_metrics`), the model card shows ``-``
    for its metrics, and the champion guard leaves its MAE out (:func:`external_maes`)."""
    try:
        return float(n_faces) > 0
    except (TypeError, ValueError):
        return False


def _tagged_sets(tag: str | None) -> set[str] | None:
    """The set names an ``evaluate.external`` tag lists, or None where it says nothing of them (no tag, or
    one that is not a JSON list: a hand-edited or cut-short tag raised a traceback in every reader of the
    run, the champion guard's included; a JSON string was read letter by letter). An entry no set is named
    after (not a path, or ``/``) is left out."""
    if tag is None:
        return None
    try:
        paths = json.loads(tag)
    except (TypeError, ValueError):
        paths = None
    if not isinstance(paths, list):
        log.warning("the run's MLflow tag evaluate.external is not a JSON list of paths (%.80r): counting every "
                    "external set it has metrics for", tag)
        return None
    names = set()
    for path in paths:
        try:
            names.add(external_name(path))
        except (AttributeError, TypeError, ExternalSetError):
            continue
    return names
