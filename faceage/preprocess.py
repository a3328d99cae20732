"""Detect and crop the subject's face in every APPA-REAL image, in parallel.

Input: a folder from :func:`faceage.appa_real.fetch_appa_real`, a detector folder from
:func:`faceage.detector.fetch_detector_files`, and :class:`PreprocessParams`.
Output folder::

    {train,valid,test}/NAME.png   size x size lossless crop of the subject's face
    chips.npz                     each crop's 5-point-aligned 64x64 chip for dlib's age network
                                  and 150x150 chip for its face-recognition network, cut from
                                  the same margin region before it is resized
                                  (:mod:`faceage.chips`; cheap: ~1 ms per face)
    manifest.csv                  split,file_name,crop,apparent_age,apparent_age_std,real_age,
                                  status,n_faces,left,top,right,bottom,score
    preprocess.json               the crop settings and detector sha256 (copied into checkpoints)

plus a metrics JSON with per-split counts of each ``status``:
``face`` (detected), ``release_crop`` / ``whole_image`` (no face: fallback used),
``no_face`` (no face, skipped), ``unreadable`` (the image could not be decoded, skipped).

Resumable: the crops are written into ``.NAME.partial`` beside the output folder (outside it: ``dvc repro``
deletes a stage's outputs before it runs it), each photo's chips and manifest row appended to a record there once
its crop is written. A run stopped half-way (Ctrl-C, a killed machine, a full disk) leaves that folder; the next
run of the same job (``job.json``: the same photos, crop settings and code) reuses every photo whose record is
whole and whose crop and source photo are as the record says, and crops the rest. The folder goes once the output
is placed; another job removes it and starts over. :mod:`faceage.external` crops an external set the same way
(:func:`resumable_output`), its partial folder beside its cache entry. Only a folder is taken as that partial folder:
a file or a link at its path is the user's, and stops the run with one line naming it (:func:`_make_partial`).
"""

from __future__ import annotations

import csv
import errno
import hashlib
import json
import logging
import os
import shutil
import struct
import sys
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import PIL
from PIL import Image
from tqdm import tqdm

from faceage.atomic import (NO_SPACE, WriteError, errno_text, free_bytes, link_target, megabytes, place_in,
                            staged_dir, write_text)
from faceage.appa_real import FACE_SUFFIX, Sample, csv_name, listed_file, read_dataset_info, validate_layout
from faceage.config import PreprocessParams
from faceage.errors import FaceAgeError
from faceage.cores import usable_cores
from faceage.chips import CHIPS_FILE, ChipExtractor, WorkerDiedError, map_in_processes, save_chips
from faceage.detector import (HOG_FILE, CNN_FILE, MANIFEST as DETECTOR_MANIFEST, SHAPE5_FILE, DetectorFilesError,
                              read_manifest)
from faceage.faces import (FaceDetector, choose_subject, cnn_look_side, margin_region, release_crop_region, resize_region,
                           whole_image_region)
from faceage.images import ImageDecodeError, load_image

log = logging.getLogger(__name__)

MANIFEST = "manifest.csv"
SETTINGS = "preprocess.json"
# In the folder the crops are written into (a resumable run's partial folder, beside the output; else the output's
# staging folder): each crop worker's note of the photo it is on, removed with it when the map ends.
INFLIGHT = ".crop-inflight"
# Beside the output folder: the crops, chips and rows of a run not finished yet (see the module docstring).
PARTIAL_SUFFIX = ".partial"
JOB = "job.json"  # in the partial folder: what job its work is for
RECORDS = "records"  # in the partial folder: one append-only file of records per crop process
# A record: header (magic, meta length, chips length), meta (JSON: row, source stats, crop sha256, chip layout),
# the chips' bytes, then the sha256 of all that. A record cut short or garbled (a power loss) fails its sha256.
_RECORD = struct.Struct("<4sII")
_MAGIC = b"FAR1"
# The modules whose code decides a crop's pixels, its chips or its row: an edit of one starts the work over.
CODE_MODULES = ("faceage.preprocess", "faceage.faces", "faceage.hog_pyramid", "faceage.chips", "faceage.images",
                "faceage.detector")
STATUSES = ("face", "release_crop", "whole_image", "no_face", "unreadable")
FIELDS = (
    "split", "file_name", "crop", "apparent_age", "apparent_age_std", "real_age",
    "status", "n_faces", "left", "top", "right", "bottom", "score",
)


@dataclass(frozen=True)
class _Task:
    split: str
    file_name: str
    image: str
    release_crop: str
    crop: str  # relative to the output folder
    apparent_age: float
    apparent_age_std: float
    real_age: float


_worker: dict = {}


def cnn_retry_settings(params: PreprocessParams, manifest: dict) -> dict:
    """The CNN's last look as the crops record it: its side (0: off; a CNN detector has no such
    look) and, when on, the sha256 of the CNN file it used, which the service must use too."""
    side = cnn_look_side(params.detector, params.cnn_retry_side)
    return {"cnn_retry_side": side, **({"cnn_retry_sha256": manifest["files"][CNN_FILE]} if side else {})}


def crop_settings(params: PreprocessParams, manifest: dict) -> dict:
    """The settings that decide a crop's pixels, as ``preprocess.json`` (and so a checkpoint's
    ``meta["crop"]``) records them: detector, both looks, margin, size, ``no_face`` and the detector
    file's sha256. ``preprocess`` writes them; whatever crops like the pipeline (an external set,
    a benchmark) builds them here, so the two cannot differ.

    Args:
        params: The ``preprocess`` section.
        manifest: The ``fetch_detector`` folder's manifest (:func:`faceage.detector.read_manifest`).
    """
    detector_file = HOG_FILE if params.detector == "hog" else CNN_FILE
    return {
        "margin": params.margin,
        "size": params.size,
        "detector": params.detector,
        "upsample": params.upsample,
        "retry_pad": params.retry_pad,
        **cnn_retry_settings(params, manifest),
        "detector_file": detector_file,
        "detector_sha256": manifest["files"][detector_file],
        "no_face": params.no_face,
    }


def _init_worker(model_dir: str, params: PreprocessParams, out_dir: str, inflight_dir: str | None = None,
                 records_dir: str | None = None) -> None:
    _worker["detector"] = FaceDetector(model_dir, params.detector, params.upsample, params.retry_pad,
                                       params.cnn_retry_side)
    _worker["chips"] = ChipExtractor(model_dir, params.margin)
    _worker["params"] = params
    _worker["out"] = Path(out_dir)
    # A worker process notes the photo it is on in a file named by its pid: when one dies (a crash in dlib,
    # the out-of-memory killer) the error can name the photo, which a rerun would die on again.
    _worker["inflight"] = Path(inflight_dir) / str(os.getpid()) if inflight_dir else None
    # Its own file of records (a resumable run): appended to by this process alone, so no record interleaves.
    _worker["records"] = (open(Path(records_dir) / f"{os.getpid()}-{uuid.uuid4().hex[:12]}.rec", "ab")
                          if records_dir else None)


def _close_worker() -> None:
    """Closes the records file of the crop loop run in this process (``preprocess.workers=1``)."""
    records = _worker.pop("records", None)
    if records is not None:
        records.close()


def _process(task: _Task) -> dict:
    if _worker.get("inflight") is not None:
        _worker["inflight"].write_text(f"{task.split}/{task.file_name}", encoding="utf-8")
    try:
        records = _worker.get("records")
        # read before the photo is: a photo rewritten while it is cropped does not match its record later
        stats = _source_stats(task) if records is not None else None
        row = _crop_one(task)
        if records is not None:
            _append_record(records, row, stats, _worker["out"])
        return row
    except Exception as e:
        # An error that stops the run (dlib on an odd photo, a full disk) named no photo of the thousands:
        # the note travels with it from a worker process and prints under its traceback.
        e.add_note(f"while cropping {task.split}/{task.file_name} ({task.image})")
        raise


def _file_stat(path: str) -> list[int] | None:
    try:
        st = os.stat(path)
    except OSError:  # not there (no release crop), or unreadable: either way what the crop saw
        return None
    return [st.st_size, st.st_mtime_ns]


def _source_stats(task: _Task) -> list:
    """Size and mtime of the files a photo's crop is read from: its photo and its release crop."""
    return [_file_stat(task.image), _file_stat(task.release_crop)]


def _append_record(f, row: dict, stats: list, crop_dir: Path) -> None:
    """Appends ``row`` (with its chips) to a records file, after its crop was written: the photo is done.

    The crop's sha256 goes with it: a crop that did not reach the disk whole (a power loss before the page
    cache was written) does not match, and the photo is cropped again. Not fsynced, for the same reason: a
    check on resume costs nothing on the normal path; an fsync per photo would.
    """
    meta = {k: v for k, v in row.items() if k not in ("chip", "face_chip")}
    chips = [np.ascontiguousarray(row[k]) for k in ("chip", "face_chip") if k in row]
    crop = hashlib.sha256((crop_dir / row["crop"]).read_bytes()).hexdigest() if chips else None
    body = json.dumps({"row": meta, "stats": stats, "crop_sha256": crop,
                       "chips": [[c.dtype.str, list(c.shape)] for c in chips]}).encode()
    blob = b"".join(c.tobytes() for c in chips)
    frame = _RECORD.pack(_MAGIC, len(body), len(blob)) + body + blob
    f.write(frame + hashlib.sha256(frame).digest())
    f.flush()  # in the kernel's hands: a killed process (not a power loss) loses none of it


def _read_records(folder: Path) -> Iterator[dict]:
    """Every whole record in the records files under ``folder``: ``{"row", "stats", "crop_sha256"}``, the row
    with its chips. A file's records end at the first one cut short or garbled."""
    for path in sorted(folder.glob("*.rec")) if folder.is_dir() and not folder.is_symlink() else ():
        if not path.is_file():
            continue
        with open(path, "rb") as f:
            while len(header := f.read(_RECORD.size)) == _RECORD.size:
                magic, n_meta, n_chips = _RECORD.unpack(header)
                if magic != _MAGIC:
                    break
                rest = f.read(n_meta + n_chips + 32)
                if len(rest) != n_meta + n_chips + 32 or hashlib.sha256(header + rest[:-32]).digest() != rest[-32:]:
                    break
                record = json.loads(rest[:n_meta])
                offset = n_meta
                for key, (dtype, shape) in zip(("chip", "face_chip"), record.pop("chips")):
                    n = int(np.prod(shape)) * np.dtype(dtype).itemsize
                    record["row"][key] = np.frombuffer(rest[offset:offset + n], dtype=dtype).reshape(shape)
                    offset += n
                yield record


def _crop_one(task: _Task) -> dict:
    detector: FaceDetector = _worker["detector"]
    p: PreprocessParams = _worker["params"]
    row = {k: v for k, v in asdict(task).items() if k in FIELDS}
    row.update(n_faces=0, left="", top="", right="", bottom="", score="")
    try:
        image = load_image(task.image)
    except ImageDecodeError as e:
        row.update(status="unreadable", crop="", error=str(e))
        return row
    boxes = detector.detect(image)
    row["n_faces"] = len(boxes)
    subject = choose_subject(boxes, image.shape[1], image.shape[0])
    if subject is not None:
        region = margin_region(image, subject, p.margin)
        row.update(status="face", left=subject.left, top=subject.top, right=subject.right,
                   bottom=subject.bottom, score=round(subject.score, 4))
    elif p.no_face == "release_crop" and os.path.isfile(task.release_crop):
        try:
            face = load_image(task.release_crop)
        except ImageDecodeError as e:  # the photo itself decoded: it has no face, and no usable fallback
            row.update(status="no_face", crop="", error=f"release crop: {e}")
            return row
        # The release crop already has its 40% margin: padded square (re-framed at another margin).
        region = release_crop_region(face, p.margin)
        row["status"] = "release_crop"
    elif p.no_face == "whole_image":
        region = whole_image_region(image)
        row["status"] = "whole_image"
    else:
        row.update(status="no_face", crop="")
        return row
    # compress_level=1: PNG stays lossless, and writing is ~5x faster than the default.
    Image.fromarray(resize_region(region, p.size)).save(_worker["out"] / task.crop, compress_level=1)
    # from the unresampled region (faceage.chips): the age chip and the face-recognition chip
    row["chip"], row["face_chip"] = _worker["chips"].chips_of(region)
    return row


def preprocess_dataset(
    data_dir: str | Path, detector_dir: str | Path, out_dir: str | Path, params: PreprocessParams
) -> dict:
    """Crops every image's subject face and writes the manifest (see module docstring).

    Args:
        data_dir: The fetched release folder.
        detector_dir: The ``fetch_detector`` folder.
        out_dir: Output folder; replaced only when every image has been processed.
        params: Detector, margin, crop size, no-face fallback, worker count.

    Returns:
        Metrics: ``{split: {status: count}, "total": {...}, "detection_rate": float}``.

    The crops done so far are kept beside ``out_dir`` (:func:`partial_dir`) until the output is placed: a run
    stopped half-way (Ctrl-C, a kill, a full disk) is resumed by the next run of the same job (module docstring).

    Raises:
        faceage.atomic.WriteError: The disk (or a quota) filled up while the crops were written: one
            line naming ``out_dir`` and the space free; ``out_dir`` is left as it was, the crops done so far kept.
    """
    data_dir, out_dir = Path(data_dir), Path(out_dir)
    splits = validate_layout(data_dir)
    dataset = read_dataset_info(data_dir)
    # One read, verified: the crop settings (preprocess.json) and chips.npz record the sha256 of this read.
    manifest = read_manifest(detector_dir, verify=True)
    partial = partial_dir(out_dir)
    staged: list[Path] = []
    inputs = {"data_source": dataset["source"], "data_sha256": dataset["sha256"]}
    try:
        with resumable_output(out_dir, splits) as (tmp, partial):
            staged.append(tmp)
            rows, settings = _crop_samples(splits, data_dir, detector_dir, tmp, params, manifest, partial=partial,
                                           inputs=inputs)
            (tmp / SETTINGS).write_text(json.dumps({**settings, **inputs}, indent=2) + "\n")
    except OSError as e:
        if isinstance(e, FaceAgeError) or e.errno not in NO_SPACE:
            raise
        raise _no_space_error(e, data_dir, out_dir, [*staged, partial]) from e
    metrics = count_statuses(rows)
    log.info(_summary(rows, metrics, params.no_face))
    return metrics


def _summary(rows: list[dict], metrics: dict, no_face: str) -> str:
    """The run's one summary line: faces found (and how many photos held more than one, of which one face was
    cropped), the fallback used, and the photos skipped (with why, where the fallback had nothing to use)."""
    total = metrics["total"]
    several = sum(1 for r in rows if r["status"] == "face" and int(r["n_faces"]) > 1)
    found = f"detected a face in {total['face']} of {len(rows)} images"
    if several:  # a group photo's other faces are in no crop: manifest.csv's n_faces says which photos
        found += (f" ({several} of them with more than one face: the largest cropped, ties to the most central; "
                  "n_faces in manifest.csv)")
    fallback = ("no fallback (preprocess.no_face=skip)" if no_face == "skip"
                else f"fallback {no_face} for {total['release_crop'] + total['whole_image']}")
    faceless = str(total["no_face"])
    # A row with an error had a release crop that could not be read (warned above); one without had none at all:
    # a data set of the user's own has no NAME_face.jpg, and every photo without a face was skipped.
    missing = sum(1 for r in rows if r["status"] == "no_face" and "error" not in r) if no_face == "release_crop" else 0
    if missing:
        faceless += f", {missing} without a release crop (NAME_face.jpg) to fall back on"
    return (f"{found}; {fallback}; skipped {total['no_face'] + total['unreadable']} (no face: {faceless}, "
            f"unreadable: {total['unreadable']})")


@contextmanager
def resumable_output(out_dir: Path, splits) -> Iterator[tuple[Path, Path]]:
    """Yields ``(tmp, partial)``: a staging folder that replaces ``out_dir`` whole when the block ends
    (:func:`faceage.atomic.staged_dir`), and :func:`partial_dir`, held (:func:`_holding`), for the block to crop
    into with :func:`crop_samples` (``partial=``), which goes on from the work an interrupted run of the same job
    left there (module docstring). When the block ends, each split's crops move from ``partial`` into ``tmp``
    (renames), ``tmp`` is placed, and ``partial`` goes; when it raises, ``partial`` keeps the work done so far.
    ``preprocess``'s output and an external set's cache entry (:mod:`faceage.external`) alike.

    Args:
        out_dir: The folder to write.
        splits: The split names the block crops (their folders are moved in).

    Raises:
        faceage.atomic.WriteError: Something other than a folder of this user's stands at :func:`partial_dir`
            (a file, a link, another user's folder), or it cannot be made (:func:`_make_partial`).
    """
    partial = partial_dir(out_dir)
    with _holding(partial, out_dir):  # removed under the lock: a run waiting for it must not take it up meanwhile
        with staged_dir(out_dir) as tmp:
            yield tmp, partial
            # Last, so that nothing after it can fail for want of room: the crops move in (renames, no copy).
            for split in splits:
                os.replace(partial / split, tmp / split)
            # (killed from here until the folder is gone: the next run finds the crops gone, and redoes them)
        shutil.rmtree(partial, ignore_errors=True)


def _no_space_error(e: OSError, data_dir: Path, out_dir: Path, staged: list[Path]) -> WriteError:
    """One line for a full disk (or quota) met while writing the crops of ``data_dir`` for ``out_dir``.

    Raised after :func:`faceage.atomic.staged_dir` removed its staging folder (``out_dir`` is as it was): the
    free space read then is what a rerun has. The crops done so far stay in :func:`partial_dir`.
    """
    why = errno_text(e) + place_in(e.filename, staged)
    free = free_bytes(out_dir.parent)
    free = (f"{megabytes(free)} is free in {out_dir.parent}" if free is not None
            else f"the free space in {out_dir.parent} could not be read")
    # (no partial folder: the disk was full before the first crop, when it was to be made)
    kept = (f"; the crops done so far are kept in {partial_dir(out_dir)}, and the rerun goes on from them"
            if partial_dir(out_dir).is_dir() else "")
    return WriteError(f"writing the crops of {data_dir} into {out_dir} failed: {why}; {free}: free some space there "
                      f"and rerun ({out_dir} was left as it was{kept})")


def partial_dir(out_dir: str | Path) -> Path:
    """Where :func:`preprocess_dataset` keeps the work of a run not finished yet: ``.NAME.partial`` beside
    ``out_dir`` (not a :func:`faceage.atomic.scratch_name`, which the next build removes)."""
    out_dir = Path(out_dir)
    return out_dir.parent / f".{out_dir.name}{PARTIAL_SUFFIX}"


@contextmanager
def _holding(folder: Path, out_dir: Path) -> Iterator[None]:
    """Makes ``folder`` if need be and holds an exclusive ``flock`` on it (no lock file left behind) while the
    block runs: two runs into one output (by hand, beside ``dvc repro``) would crop into, and remove, one
    partial folder. The second waits; a folder the first removed meanwhile is made anew and locked again.
    Where folders cannot be locked (Windows, some network file systems) it does not lock."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        _make_partial(folder, out_dir)
        yield
        return
    while True:
        _make_partial(folder, out_dir)
        try:
            fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
        except FileNotFoundError:  # removed meanwhile (the run before finished): made anew
            continue
        except OSError as e:  # made a file or a link meanwhile: said as it is now
            _make_partial(folder, out_dir)
            raise _partial_error(folder, out_dir, f"cannot be opened ({errno_text(e)})",
                                 "remove it and rerun") from e
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                log.info("waiting for another preprocess run that writes %s (lock on %s)", out_dir, folder)
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError:
                log.debug("not locking %s: its file system does not lock folders", folder)
            try:
                now = os.stat(folder)
            except FileNotFoundError:
                continue
            held = os.fstat(fd)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                yield
                return
        finally:
            os.close(fd)


def _partial_error(folder: Path, out_dir: Path, problem: str, remedy: str) -> WriteError:
    return WriteError(f"{folder} {problem}: the crops of an unfinished run of {out_dir} are kept in a folder of that "
                      f"name (to resume it); {remedy}")


def _make_partial(folder: Path, out_dir: Path) -> None:
    """Makes the partial folder ``folder`` (and the folders above it) where it is not there.

    Only a folder is taken as preprocess's own: it never makes a file or a link at that path, so one there is the
    user's, named in one line and left as it is (a file was a ``FileExistsError`` traceback; a link to a folder
    would have had its files removed by a run of another job, and its crops renamed across file systems).

    Raises:
        faceage.atomic.WriteError: A file or a link stands there, the folder cannot be made (a folder above it
            this user cannot write), or it is a folder this user cannot write (another user's, one left by
            ``sudo dvc repro``).
        OSError: A full disk (or quota) (:data:`faceage.atomic.NO_SPACE`), raised as it is: the caller's full-disk
            line gives the free space and says to free some.
    """
    if folder.is_symlink():
        state = "" if folder.exists() else ", which does not exist"
        raise _partial_error(folder, out_dir, f"is a symbolic link (to {link_target(folder)}{state})",
                             "remove the link (what it points to is not touched) and rerun")
    if folder.exists() and not folder.is_dir():
        kind = "a file" if folder.is_file() else "not a folder"
        raise _partial_error(folder, out_dir, f"is {kind}", "move it away (or delete it) and rerun")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if isinstance(e, FileExistsError) and (folder.exists() or folder.is_symlink()):
            return _make_partial(folder, out_dir)  # a file made there meanwhile: said as it is now
        if e.errno in NO_SPACE:  # a full disk (a new folder needs a block): the caller's full-disk line says it
            raise
        # (a FileExistsError for a file standing where a folder above it goes)
        remedy = (f"make {folder.parent} writable for this user" if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS)
                  else "check the folders above it (one is a file, or missing)")
        raise _partial_error(folder, out_dir, f"cannot be created ({errno_text(e)})",
                             f"{remedy}, or write the output elsewhere") from e
    if not os.access(folder, os.R_OK | os.W_OK | os.X_OK):
        try:
            owner = f" (owned by uid {folder.stat().st_uid}; this user is uid {os.geteuid()})"
        except (OSError, AttributeError):  # pragma: no cover - Windows has no uid
            owner = ""
        raise _partial_error(folder, out_dir, f"is a folder this user cannot write{owner}",
                             "remove it (as its owner, e.g. with sudo) and rerun, or rerun as its owner")


def code_fingerprint(modules: Sequence[str] = CODE_MODULES) -> str:
    """sha256 over the source of ``modules`` and the versions of dlib, Pillow and numpy.

    Args:
        modules: The modules whose code decides an output. Default :data:`CODE_MODULES`: the code that decides a
            crop's bytes, its chips and its row. :mod:`faceage.external` also fingerprints the code that computes a
            set's face descriptors with it (:data:`faceage.external.DESCRIPTOR_CODE_MODULES`).
    """
    import dlib

    h = hashlib.sha256(f"dlib {dlib.__version__} pillow {PIL.__version__} numpy {np.__version__}\n".encode())
    for name in modules:
        __import__(name)
        h.update(f"{name}\0".encode() + Path(sys.modules[name].__file__).read_bytes())
    return h.hexdigest()


def _tasks(splits: dict[str, list[Sample]], data_dir: Path) -> list[_Task]:
    """One crop task per listed photo: where the photo is, where its crop goes, its labels."""
    by_nfc: dict[Path, dict[str, Path]] = {}
    return [
        _Task(
            s.split, s.file_name,
            # The file the CSV lists, also where a Mac spelled its accents apart (an external set read in place).
            str(listed_file(data_dir / s.split, s.file_name, by_nfc) or data_dir / s.split / s.file_name),
            # its release crop too (an NFD-named image's _face.jpg is NFD-named beside it: it fell to no_face)
            str(listed_file(data_dir / s.split, s.file_name + FACE_SUFFIX, by_nfc)
                or data_dir / s.split / (s.file_name + FACE_SUFFIX)),
            f"{s.split}/{Path(s.file_name).stem}.png",
            s.apparent_age, s.apparent_age_std, s.real_age,
        )
        for samples in splits.values() for s in samples
    ]


def _photo_list_sha256(tasks: list[_Task], data_dir: Path) -> str:
    """sha256 of the photo list as the crops record it: each photo's split, name, file (relative to ``data_dir``),
    crop and labels, in order."""
    photos = [[t.split, t.file_name, os.path.relpath(t.image, data_dir), t.crop, t.apparent_age,
               t.apparent_age_std, t.real_age] for t in tasks]
    return hashlib.sha256(json.dumps(photos).encode()).hexdigest()


def photos_sha256(splits: dict[str, list[Sample]], data_dir: str | Path) -> str:
    """The digest of the photos :func:`crop_samples` would crop for ``splits`` (each photo's place, crop and labels,
    as read): what ``job.json`` records as ``photos.list_sha256``, so a resumed crop and whatever keys crops by it
    (:func:`faceage.external.cache_key`) agree on when the photos or their labels changed. The labels as read, not
    the code that reads them: an edit of the CSV parser that reads the same rows changes nothing.

    Args:
        splits: ``{split: [Sample, ...]}`` (:func:`faceage.appa_real.read_split`).
        data_dir: The folder holding ``<split>/<file_name>``.
    """
    return _photo_list_sha256(_tasks(splits, Path(data_dir)), Path(data_dir))


def _job(settings: dict, shape_predictor_sha256: str, tasks: list[_Task], data_dir: Path, inputs: dict) -> dict:
    """What a partial folder's work is for, as ``job.json`` records it: the crop settings, the photos (the data
    set's fingerprint, each photo's place and labels) and the code. A run resumes only the same job."""
    job = {
        "crop settings": {**settings, "shape_predictor_sha256": shape_predictor_sha256},
        "photos": {**inputs, "count": len(tasks), "list_sha256": _photo_list_sha256(tasks, data_dir)},
        "code": {"sha256": code_fingerprint()},
    }
    return json.loads(json.dumps(job))  # as read back from job.json (lists, not tuples)


def _resume(partial: Path, job: dict, tasks: list[_Task], splits, what: str = "preprocess") -> dict[int, dict]:
    """The rows (with chips) of the photos ``partial`` holds done for ``job``, by index in ``tasks``; the
    folder readied for the rest: stray crops (half-written, or of a record that no longer holds) removed, or,
    for another job, everything removed and ``job.json`` written. ``what`` names the job in its log lines."""
    try:
        before = json.loads((partial / JOB).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        before = None
    if before != job:
        if before is not None:
            changed = [k for k in job if not isinstance(before, dict) or before.get(k) != job[k]]
            log.info("%s: starting over: %s holds the crops of another such job (changed: %s); removing them",
                     what, partial, ", ".join(changed) or "its format")
        for entry in list(partial.iterdir()):
            shutil.rmtree(entry) if entry.is_dir() and not entry.is_symlink() else entry.unlink()
        write_text(partial / JOB, json.dumps(job, indent=2) + "\n")
        return {}
    index = {(t.split, t.file_name): i for i, t in enumerate(tasks)}
    done: dict[int, dict] = {}
    for record in _read_records(partial / RECORDS):
        row = record["row"]
        i = index.get((row.get("split"), row.get("file_name")))
        if i is None or i in done or record["stats"] != _source_stats(tasks[i]):
            continue
        if record["crop_sha256"] is not None:
            if row["crop"] != tasks[i].crop:
                continue
            try:
                if hashlib.sha256((partial / row["crop"]).read_bytes()).hexdigest() != record["crop_sha256"]:
                    continue
            except OSError:
                continue
        done[i] = row
    keep = {row["crop"] for row in done.values() if row["crop"]}
    for entry in list(partial.iterdir()):
        folder = entry.is_dir() and not entry.is_symlink()  # a link is removed, never followed
        if entry.name in splits and folder:
            for crop in entry.iterdir():
                if f"{entry.name}/{crop.name}" not in keep:
                    shutil.rmtree(crop) if crop.is_dir() and not crop.is_symlink() else crop.unlink()
        elif entry.name != JOB and not (entry.name == RECORDS and folder):  # a killed run's in-flight notes
            shutil.rmtree(entry) if folder else entry.unlink()
    log.info("resuming %s from %s: reusing %d of %d photos done before, %d to go", what, partial, len(done),
             len(tasks), len(tasks) - len(done))
    return done


def crop_samples(splits: dict[str, list[Sample]], data_dir: Path, detector_dir: str | Path, out_dir: Path,
                 params: PreprocessParams, workers_key: str = "preprocess.workers", *,
                 manifest: dict | None = None, partial: Path | None = None, inputs: dict | None = None,
                 what: str = "preprocess") -> list[dict]:
    """Detects and crops every listed image into ``out_dir/<split>/`` and writes ``manifest.csv`` and ``chips.npz``.

    The one detect + crop + ``no_face`` policy of the pipeline: ``preprocess`` runs it on the
    release, :mod:`faceage.external` on cross-dataset test sets.

    Args:
        splits: ``{split: [Sample, ...]}`` from :func:`faceage.appa_real.validate_layout` / ``read_split``.
        data_dir: The folder holding ``<split>/<file_name>`` (and optional ``_face.jpg`` crops).
        detector_dir: The ``fetch_detector`` folder.
        out_dir: An existing, empty folder.
        params: Detector, margin, crop size, no-face fallback, worker count.
        workers_key: The setting a worker-died error tells the user to lower.
        manifest: The detector folder's manifest as the caller read (and verified) it, so that ``chips.npz``
            records the sha256 of that read; ``None``: read here.
        partial: :func:`resumable_output`'s partial folder: the crops go there (it moves them in), with a record
            of each photo done, and the photos it already holds done for this job are reused; ``None``: the crops
            go into ``out_dir``, nothing is kept.
        inputs: What identifies the photos beyond their list (the data set's source and fingerprint): part of the
            job, so only a run on the same photos resumes.
        what: The job its log lines name ("preprocess"; :mod:`faceage.external`: "external set NAME").

    Returns:
        The manifest rows (one per image, with its ``status``).

    Raises:
        faceage.detector.DetectorFilesError: The detector folder's manifest lists no sha256 for a file the
            crops read (checked before any work: the crop settings and ``chips.npz`` record those sha256).
    """
    return _crop_samples(splits, data_dir, detector_dir, out_dir, params,
                         read_manifest(detector_dir) if manifest is None else manifest, workers_key,
                         partial=partial, inputs=inputs, what=what)[0]


def _crop_samples(splits: dict[str, list[Sample]], data_dir: Path, detector_dir: str | Path, out_dir: Path,
                  params: PreprocessParams, manifest: dict, workers_key: str = "preprocess.workers", *,
                  partial: Path | None = None, inputs: dict | None = None,
                  what: str = "preprocess") -> tuple[list[dict], dict]:
    """:func:`crop_samples` with the detector folder's ``manifest`` as its caller read it; also returns the
    :func:`crop_settings` of the crops (built once, from that read, before any work).

    With ``partial`` (an existing folder, :func:`partial_dir`) the crops go there, not into ``out_dir`` (the
    caller moves them in), with a record of each photo done, and the photos it already holds done for this job
    are reused (:func:`_resume`); ``inputs`` (the data set's source and fingerprint) go into the job."""
    detector_files = manifest["files"]
    try:  # every sha256 the crop settings and chips.npz record, looked up by the rules that record them
        settings, _ = crop_settings(params, manifest), detector_files[SHAPE5_FILE]
    except KeyError as e:
        raise DetectorFilesError(f"{Path(detector_dir) / DETECTOR_MANIFEST} lists no {e.args[0]}, which the crops "
                                 "read (unverified, and unrecorded in the crop settings): run the fetch_detector "
                                 "stage again (dvc repro -f fetch_detector)") from None
    tasks = _tasks(splits, Path(data_dir))
    done: dict[int, dict] = {}
    crop_dir, records = out_dir, None
    if partial is not None:
        job = _job(settings, detector_files[SHAPE5_FILE], tasks, Path(data_dir), inputs or {})
        done = _resume(partial, job, tasks, splits, what)
        crop_dir, records = partial, partial / RECORDS
        records.mkdir(exist_ok=True)
    for split in splits:
        (crop_dir / split).mkdir(exist_ok=partial is not None)
    todo = [t for i, t in enumerate(tasks) if i not in done]
    workers = params.workers or usable_cores()
    init = (str(detector_dir), params, str(crop_dir))
    # The processes that run: map_in_processes starts one per photo at most, and none runs without a photo (a
    # resumed run with 1 photo to go said "with 16 worker(s)").
    started = min(workers, len(todo))
    if what == "preprocess":
        log.info("cropping %d images with %d worker(s) (preprocess.workers=%d, detector=%s, upsample=%d)",
                 len(todo), started, params.workers, params.detector, params.upsample)
    else:  # evaluate crops an external set with its own worker count, not preprocess.workers
        log.info("%s: cropping %d images with %d worker(s) (detector=%s, upsample=%d)", what, len(todo), started,
                 params.detector, params.upsample)
    if not todo:
        new_rows = []
    elif workers == 1:
        _init_worker(*init, None, records and str(records))
        try:
            new_rows = [_process(t) for t in tqdm(todo, desc="crop", unit="img")]
        finally:
            _close_worker()
    else:
        # Beside the crops, not under the temp dir: a full or unusable /tmp stopped preprocess (a full one as "no
        # space left" in the output folder, which had room). Gone before the folder is swapped in.
        inflight = crop_dir / INFLIGHT
        inflight.mkdir()
        try:
            new_rows = map_in_processes(_process, todo, workers, _init_worker,
                                        (*init, str(inflight), records and str(records)), desc="crop",
                                        unit="img", workers_key=workers_key)
        except WorkerDiedError as e:
            photos = sorted(filter(None, (f.read_text(encoding="utf-8") for f in inflight.iterdir())))
            if not photos:  # it died before its first photo
                raise
            csvs = " or ".join(sorted({csv_name(photo.split("/", 1)[0]) for photo in photos}))
            # preprocess crops fetch_data's copy of the release, which a rerun rewrites from the source (DVC
            # restores an edited output): a photo taken out of that copy's CSV was back, and killed the rerun again
            where = (f"in the data source (fetch_data.source), not in the copy under {data_dir}, which fetch_data "
                     "rewrites" if what == "preprocess" else f"in {data_dir}")
            raise WorkerDiedError(f"{e}. The workers were cropping (or had last cropped) {photos} under "
                                  f"{data_dir}: if a rerun dies on the same photo, that photo kills it; take it "
                                  f"out of {csvs} {where}") from e
        finally:
            shutil.rmtree(inflight, ignore_errors=True)
    fresh = iter(new_rows)
    rows = [done[i] if i in done else next(fresh) for i in range(len(tasks))]
    for row in rows:
        if row["status"] == "unreadable":
            log.warning("skipped unreadable image %s/%s: %s", row["split"], row["file_name"], row["error"])
        elif "error" in row:  # no face, and the fallback could not be read
            log.warning("skipped %s/%s: no face found, and its %s", row["split"], row["file_name"], row["error"])
    with open(out_dir / MANIFEST, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    cut = [r for r in rows if "chip" in r]
    save_chips(out_dir / CHIPS_FILE, [r["crop"] for r in cut], [r.pop("chip") for r in cut], params.margin,
               detector_files[SHAPE5_FILE], face_chips=[r.pop("face_chip") for r in cut])
    return rows, settings


def count_statuses(rows: list[dict]) -> dict:
    """Per-split and total counts of each status, and the share of images with a face found."""
    metrics: dict = {split: dict.fromkeys(STATUSES, 0) for split in dict.fromkeys(r["split"] for r in rows)}
    total = dict.fromkeys(STATUSES, 0)
    for r in rows:
        metrics[r["split"]][r["status"]] += 1
        total[r["status"]] += 1
    metrics["total"] = total
    metrics["detection_rate"] = round(total["face"] / max(len(rows), 1), 4)
    return metrics


class FacesMissingError(FaceAgeError, FileNotFoundError):
    """A ``preprocess`` output (``manifest.csv``, ``preprocess.json``) is not where a stage reads it: one line
    naming the folder, what is missing and what to run. Also a ``FileNotFoundError``, which callers that catch
    ``OSError`` around these readers (:mod:`faceage.recipe`, :mod:`faceage.packaging`) rely on."""


def _missing_faces(faces_dir: str | Path, name: str) -> FacesMissingError:
    """The error for ``faces_dir/name`` not found: whether the folder is absent, not a folder, or lacks the file.

    ``dvc repro`` runs a stage only once its deps are there; a stage run by hand (``python stages/embed.py``,
    from a clone without ``data/faces``, or from another folder with relative paths) died with a
    ``FileNotFoundError`` traceback on the first file it read.
    """
    folder = Path(faces_dir)
    shown = folder.absolute()  # a relative path is read from the current folder: a stage run from another one
    fix = "run `dvc repro preprocess` first, or pass the folder it wrote (--faces)"
    if not folder.exists():
        error = FacesMissingError(f"no preprocess output at {shown} ({name} missing): {fix}")
    elif not folder.is_dir():
        error = FacesMissingError(f"{shown} is not a folder, so not a preprocess output ({name} missing): {fix}")
    else:
        error = FacesMissingError(f"{shown} has no {name}: not a preprocess output, or one cut short; run "
                                  "`dvc repro -f preprocess`, or pass the folder preprocess wrote (--faces)")
    return error


def read_faces_manifest(faces_dir: str | Path, split: str | None = None) -> list[dict]:
    """Rows of ``manifest.csv`` that have a crop (optionally of one split).

    Raises:
        FacesMissingError: ``faces_dir`` holds no ``manifest.csv`` (no preprocess output there).
    """
    try:
        f = open(Path(faces_dir) / MANIFEST, newline="", encoding="utf-8")
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: faces_dir is a file
        raise _missing_faces(faces_dir, MANIFEST) from None
    with f:
        return [r for r in csv.DictReader(f) if r["crop"] and (split is None or r["split"] == split)]


def read_crop_settings(faces_dir: str | Path) -> dict:
    """The crop settings ``preprocess`` used (margin, size, detector and its sha256).

    Raises:
        FacesMissingError: ``faces_dir`` holds no ``preprocess.json`` (no preprocess output there).
    """
    try:
        text = (Path(faces_dir) / SETTINGS).read_text()
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: faces_dir is a file
        raise _missing_faces(faces_dir, SETTINGS) from None
    return json.loads(text)
