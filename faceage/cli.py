"""The ``faceage`` command: ``faceage predict PATH...`` estimates the age of every face in photos.

Input: image files and/or folders (their photos, by the suffixes of the formats Pillow opens
here, sorted by name; ``--recursive`` descends, following symlinked folders once each), and a
model: a checkpoint + detector folder (default ``models/model.pt`` + ``models/detector``, the
pipeline's outputs: the working folder's, else the project's, also from a subfolder; without ``--detector``, a checkpoint's is the ``detector/`` beside it when there is
one), a packaged model folder (``--model DIR`` holding ``model.pt`` + ``detector/``) or a packaged
BentoML model (``--bento face_age:latest``). A photo reached twice (named again, or through a link) is
read once.
Output: on stdout, a table (default), JSON (``--json``: one list) or CSV (``--csv``) with one entry per face,
printed as the photos are done, in the order of the paths (:class:`ResultWriter`); with ``--annotate DIR``, a PNG
per photo with each box and its "#n age ± std" label (a new file: ``<stem>.png``, or ``<stem>-N.png`` when that
name is taken; no existing file, input photos included, is ever replaced), and each entry names its copy
(``annotated``) or why there is none (``annotate_error``). The copies carry a PNG text chunk (``Software:
faceage``), and folder scans skip them, and the ``--annotate`` folder itself when it lies inside a scanned tree, so
a rerun does not read its own output as photos.
It uses :class:`faceage.predict.AgePredictor`, the predictor the
service runs. Exit status 0, or 1 when some path could not be read (missing, a broken link, not an
image, a folder that cannot be listed: each an error row; a photo that failed otherwise, out of memory while
decoded or detected, a detector's error, is one too) or some annotated copy could not be written (the others are
still reported), or stdout could not take the results (a full disk; a reader that
left, ``| head``, is no error); either ends the run there unless ``--annotate`` writes copies. Ctrl-C (or SIGTERM) leaves the photos done printed (complete rows, valid JSON),
says after how many of how many it stopped, and ends the process by that signal (a shell shows 130,
143), without a traceback. The photos of a batch are decoded and detected on a thread per usable core."""

from __future__ import annotations

import argparse
import codecs
import contextlib
import csv
import io
import json
import logging
import os
import re
import signal
import sys
import threading
import unicodedata
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
from PIL import Image, features

from faceage.errors import FaceAgeError, error_line
from faceage.images import DEFAULT_MAX_PIXELS, ImageDecodeError, ImageTooLarge, load_image
from faceage.logs import Terminated, die_of_signal, raise_on_sigterm, setup_logging
from faceage.predict import (CHECKPOINT_FILE, DEFAULT_MAX_DETECT_PIXELS, DETECTOR_DIR, AgePredictor, FaceAge,
                             FaceLocator, LocatedFaces, PredictorError, available_cores)

log = logging.getLogger(__name__)

# Photo formats a folder scan reads, by Pillow's format name (not every format Pillow opens: a
# folder of photos also holds PDFs, PostScript, icons and videos, which are not photos).
PHOTO_FORMATS = ("JPEG", "MPO", "PNG", "GIF", "WEBP", "AVIF", "HEIF", "BMP", "TIFF", "JPEG2000")
# The codec a format's plugin needs: these plugins register their suffixes even when Pillow was built
# without it (WebP's and AVIF's register them only when their library is there).
_FORMAT_CODECS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "zlib", "JPEG2000": "jpg_2000"}
# Formats another format's plugin opens (the JPEG plugin opens MPO files): not keys of ``Image.OPEN``.
_OPENED_AS = {"MPO": "JPEG"}
DEFAULT_DETECTOR = Path("models/detector")
ANNOTATED_MARK = ("Software", "faceage")  # the PNG text chunk (key, value) on every annotated copy
CHUNK_IMAGES = 8  # photos per forward pass: bounds memory, keeps the batch large enough
NAME_MAX = 255  # bytes in a file name on common file systems, when the folder does not say
STDIN = "-"  # a PATH that means the photo on standard input (`curl ... | faceage predict -`)


def photo_suffixes() -> frozenset[str]:
    """Lower-case file suffixes of the :data:`PHOTO_FORMATS` this Pillow can open (``.avif`` where it
    decodes AVIF): what a folder scan reads. The same for every run on one installation."""
    Image.init()  # loads every plugin: all their suffixes registered, ``Image.OPEN`` complete
    return frozenset(suffix for suffix, fmt in Image.registered_extensions().items()
                     if fmt in PHOTO_FORMATS and _OPENED_AS.get(fmt, fmt) in Image.OPEN
                     and (fmt not in _FORMAT_CODECS or features.check_codec(_FORMAT_CODECS[fmt])))


IMAGE_SUFFIXES = photo_suffixes()


@dataclass
class PhotoResult:
    """One photo's outcome: its faces, or the reason it could not be read."""

    path: Path
    width: int = 0
    height: int = 0
    faces: list[FaceAge] = field(default_factory=list)
    error: str | None = None
    annotate_error: str | None = None  # why its annotated copy could not be written (ages still valid)
    annotated: Path | None = None  # the annotated copy written for it (``--annotate``)

    def as_dict(self, annotate: bool = False) -> dict:
        """JSON-ready; ``age``/``age_std`` rounded to :data:`faceage.predict.AGE_DECIMALS`.

        Args:
            annotate: Also give ``annotated`` (the copy's path, or ``None``) and ``annotate_error``
                (why it could not be written, or ``None``), as a run with ``--annotate`` does.
        """
        if self.error is not None:
            entry = {"file": str(self.path), "error": self.error}
        else:
            entry = {"file": str(self.path), "width": self.width, "height": self.height,
                     "faces": [f.as_dict() for f in self.faces]}
        if annotate:
            entry["annotated"] = None if self.annotated is None else str(self.annotated)
            entry["annotate_error"] = self.annotate_error
        return entry


class UnlistedFolder(type(Path())):
    """A folder a scan could not list (a locked one), carrying the error that listing it raised: its row
    gives that error (:func:`_read_error`) without listing the folder again. Equal to the plain path."""

    error: OSError | None = None


def collect_images(paths: Sequence[str | Path], recursive: bool = False, *, skip_dir: Path | None = None
                   ) -> list[Path]:
    """Paths as given, plus the photos inside given folders (by suffix, sorted), each photo once.

    Inside a given folder, hidden entries are skipped: names starting with ``.``, and everything
    under a subfolder whose name does. macOS's ``._IMG.JPG`` files carry metadata, not pixels, and
    caches such as ``.thumbs/`` hold copies, not photos. Annotated copies this command wrote
    (:func:`is_annotated_copy`) are skipped too. A symbolic link with a photo's suffix whose target
    is gone is kept, so that its row reports it, and so is a folder that cannot be listed (a locked
    one). ``recursive`` follows symlinked folders, each real folder once (a link to an ancestor ends
    there).

    Paths named explicitly are taken as given, missing ones included (their rows say so). A photo
    reached twice (``real real/b.jpg ./real/b.jpg``, or through a link) is kept once, where it
    first appears.

    Args:
        paths: Files and folders, as on the command line.
        recursive: Also read the subfolders of given folders.
        skip_dir: The ``--annotate`` folder: a subfolder of a scanned folder that is this folder is
            not read. A given folder that is this folder is read, without its annotated copies.

    Returns:
        The paths, in order: each given path's, then the next's.
    """
    skip = None if skip_dir is None else _real(skip_dir)
    found: list[Path] = []
    seen: dict[Path, Path] = {}  # real path -> the path it is reported as
    for raw in paths:
        path = Path(raw)
        # os.path.isdir, not Path.is_dir: that raised on a path this user may not reach (EACCES, Python
        # 3.11), ending the command in a traceback; such a path is taken as given and its row says why.
        for photo in sorted(_scan_folder(path, recursive, skip)) if os.path.isdir(path) else [path]:
            real = _real(photo)
            if real not in seen:
                seen[real] = photo
                found.append(photo)
            elif photo != seen[real]:  # another name for it (a link): was left out without a word
                log.warning("%s is the photo %s (the same file): reported once, as %s", photo, real, seen[real])
    return found


def _scan_folder(top: Path, recursive: bool, skip: Path | None) -> Iterator[Path]:
    """The photos in ``top`` (and, ``recursive``, its subfolders but ``skip``), in no set order."""
    visited: set[Path] = set()
    pending = [top]
    while pending:
        folder = pending.pop()
        real = _real(folder)
        if real in visited:  # a symlinked folder met before: a loop, or the same photos again
            log.info("skipped %s: the folder %s was already read", folder, real)
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except OSError as e:  # a locked folder: its own error row (:func:`_read_error`), not a log line and exit 0
            unlisted = UnlistedFolder(folder)
            unlisted.error = e
            yield unlisted
            continue
        for entry in entries:
            path = folder / entry.name
            if entry.name.startswith("."):
                continue
            photo = Path(entry.name).suffix.lower() in IMAGE_SUFFIXES
            try:
                if entry.is_dir():  # follows a symlink
                    if recursive and _real(path) != skip:
                        pending.append(path)
                elif photo and (entry.is_file() and not is_annotated_copy(path)
                                or entry.is_symlink() and not os.path.exists(path)):  # a broken link: its row will say
                    yield path
            except OSError:  # a link into a folder this user may not enter (EACCES): a photo's row says so
                if photo:
                    yield path


def _real(path: Path) -> Path:
    """``path`` with every link resolved, as far as they go (a loop or a missing target is no error)."""
    return Path(os.path.realpath(path))


def is_annotated_copy(path: Path) -> bool:
    """Whether ``path`` is a PNG this command wrote: its text chunk :data:`ANNOTATED_MARK`.

    Only the header is read. A file that is not a PNG, or cannot be read, is not one.
    """
    if path.suffix.lower() != ".png":
        return False
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # load_image applies its own limit
            with Image.open(path) as im:  # the text chunks before the pixels land in ``info``
                return im.format == "PNG" and im.info.get(ANNOTATED_MARK[0]) == ANNOTATED_MARK[1]
    except Exception:  # Pillow raises whatever its parser trips on; the photo's own row will say
        return False


def prepare_annotate_dir(path: Path) -> None:
    """Creates the ``--annotate`` folder (and its parents) if needed.

    Raises:
        FaceAgeError: It names a file, or cannot be created or written to.
    """
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if path.exists() and not path.is_dir():
            raise FaceAgeError(f"--annotate {path} is a file, not a folder") from e
        raise FaceAgeError(f"--annotate: cannot create the folder {path}: {e.strerror or e}") from e
    if not os.access(path, os.W_OK | os.X_OK):
        raise FaceAgeError(f"--annotate: the folder {path} is not writable")


def predict_photos(predictor: AgePredictor, paths: Sequence[Path], annotate_dir: Path | None = None
                   ) -> Iterator[PhotoResult]:
    """Yields one :class:`PhotoResult` per path, in order; faces of a chunk are batched together
    (:meth:`faceage.predict.AgePredictor.estimate`).

    Args:
        predictor: The predictor.
        paths: Image files.
        annotate_dir: If given, an annotated PNG per readable photo is written there, under a new
            name (:func:`write_annotated`). A photo whose copy cannot be written keeps its ages and
            gets ``annotate_error``. Interrupted (Ctrl-C here, or closed by its caller), the copies
            written for the photos not yet yielded are removed: a copy is left for each photo whose
            result the caller holds.

    Raises:
        FaceAgeError: ``annotate_dir`` is a file or cannot be created.
    """
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    if annotate_dir is not None:
        prepare_annotate_dir(annotate_dir)
    # A thread per core, each photo detected on one of them; one thread (one core, or a predictor whose locator
    # cannot be copied): one photo at a time, detected by predict_many on two threads where two cores are free.
    threads = min(detection_threads(), len(paths)) if isinstance(predictor, AgePredictor) else 1
    chunk = max(CHUNK_IMAGES, threads)  # every thread has a photo (8 up to 8 cores: the forward passes as before)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="faceage-detect") if threads > 1 else None
    own = threading.local()

    def read(path: Path) -> tuple[PhotoResult, np.ndarray | None, LocatedFaces | None]:
        """Decodes one photo, and in a pool thread locates its faces with that thread's own locator (dlib's
        detector is not thread-safe)."""
        image = _read_photo(path, predictor.locator.max_pixels)
        if isinstance(image, PhotoResult):  # its error row
            return image, None, None
        result = PhotoResult(path, width=image.shape[1], height=image.shape[0])
        if pool is None:
            return result, image, None
        try:
            if getattr(own, "locator", None) is None:
                own.locator = FaceLocator(**predictor.locator.settings())
            located = own.locator.locate(image, crops=False, parallel=False)
        except Exception as e:  # a dlib RuntimeError, a MemoryError: this photo's row, not the end of the run
            return PhotoResult(path, error=_photo_failed(path, "detecting its faces", e)), None, None
        # The pixels are kept only to draw on: a batch of up to --max-pixels photos is not held twice over.
        return result, image if annotate_dir is not None else None, located

    try:
        with tqdm(total=len(paths), desc="predict", unit="img", disable=None, file=sys.stderr) as bar:
            for start in range(0, len(paths), chunk):
                batch = paths[start:start + chunk]
                # In order, whichever thread finishes first: the rows (and the forward pass) are the one-thread run's.
                done = list(map(read, batch) if pool is None else pool.map(read, batch))
                found = {i: (image, loc) for i, (result, image, loc) in enumerate(done) if result.error is None}
                yield from _finish_chunk(predictor, [result for result, _, _ in done], found, annotate_dir, bar)
    finally:  # Ctrl-C: the photos under way are dropped (a thread cannot be stopped mid-detection; none waits)
        if pool is not None:
            pool.shutdown(wait=False, cancel_futures=True)


def detection_threads() -> int:
    """Photos decoded and detected at once: one per usable core (:func:`faceage.predict.available_cores`),
    as the service's detection workers and ``evaluate``'s crop workers use them."""
    return available_cores()


def _read_photo(path: Path, max_pixels: int) -> np.ndarray | PhotoResult:
    """The photo at ``path`` (RGB uint8), or its error row when it cannot be read."""
    try:
        if isinstance(path, UnlistedFolder) and path.error is not None:
            raise path.error  # the scan's own error: not the "Is a directory" of opening it
        if str(path) == STDIN and (unusable := _stdin_problem()) is not None:
            raise ImageDecodeError(unusable)
        return load_image("/dev/stdin" if str(path) == STDIN else path, max_pixels=max_pixels)
    except (ImageDecodeError, OSError) as e:
        result = PhotoResult(path, error=_read_error(path, e, max_pixels))
        log.warning("skipped %s: %s", path, result.error)
        return result
    except Exception as e:  # a MemoryError (load_image lets it through): this photo's row, the others still run
        return PhotoResult(path, error=_photo_failed(path, "reading it", e))


def _photo_failed(path: Path, doing: str, error: Exception) -> str:
    """The row's message for a photo that failed otherwise than unreadable (out of memory, a detector's error), said
    in one warning line; the traceback is logged at debug level. Such a photo ended the whole run in a traceback,
    every result so far lost; Ctrl-C, SIGTERM and SystemExit are no ``Exception`` and still stop it."""
    message = f"failed while {doing}: {_described(error)}" + (" (out of memory)" if isinstance(error, MemoryError)
                                                                   else "")
    log.warning("skipped %s: %s", path, message)
    log.debug("the failure of %s", path, exc_info=error)
    return message


def _finish_chunk(predictor: AgePredictor, results: list[PhotoResult],
                  found: dict[int, tuple[np.ndarray | None, LocatedFaces | None]], annotate_dir: Path | None, bar
                  ) -> Iterator[PhotoResult]:
    """The ages of a chunk's photos (one forward pass), their annotated copies, then each result in order.

    Args:
        results: The chunk's rows, in order.
        found: For each photo read (by its row's index), its pixels (where it is to be located here, or drawn on)
            and its faces when they were located already (all or none of them).
    """
    handed = 0
    try:
        for i, faces in _chunk_ages(predictor, results, found).items():
            results[i].faces = faces
            if annotate_dir is not None:
                try:
                    written = write_annotated(annotate_dir, results[i].path, found[i][0], faces)
                except Exception as e:  # a full disk, an odd file system, no memory to draw: the ages are still good
                    results[i].annotate_error = str(e) if isinstance(e, OSError) else _described(e)
                    log.warning("could not write the annotated copy of %s: %s", results[i].path,
                                results[i].annotate_error)
                else:
                    results[i].annotated = written
                    log.info("annotated %s -> %s", results[i].path, written)
        bar.update(len(results))
        for result in results:
            handed += 1  # before the yield: closed there, the caller holds this one
            yield result
    except BaseException:  # Ctrl-C, or GeneratorExit: no copy of a photo whose result is not out
        _remove_copies(results[handed:])
        raise


def _chunk_ages(predictor: AgePredictor, results: list[PhotoResult],
                found: dict[int, tuple[np.ndarray | None, LocatedFaces | None]]) -> dict[int, list[FaceAge]]:
    """The faces of each photo of ``found`` (by its row's index) in one pass (:func:`_finish_chunk`), detected here
    first where they were not yet. Should that pass fail, each photo runs alone, and a photo that fails alone gets
    its error row (as the service's ``/predict_batch`` does): one photo's detector error or MemoryError ended the
    whole run in a traceback, the results of every chunk done lost."""
    located = all(loc is not None for _, loc in found.values())  # else detected here, in predict_many
    doing = "estimating its ages" if located else "detecting its faces or estimating their ages"

    def ages(indices: list[int]) -> list[list[FaceAge]]:
        if located:
            return predictor.predict_located([found[i][1] for i in indices])
        return predictor.predict_many([found[i][0] for i in indices])

    if not found:
        return {}
    try:
        return dict(zip(found, ages(list(found))))
    except Exception as e:
        if len(found) == 1:
            results[next(iter(found))].error = _photo_failed(results[next(iter(found))].path, doing, e)
            return {}
        log.warning("the ages of %d photos together failed (%s); running each photo alone", len(found), _described(e))
    alone = {}
    for i in found:
        try:
            alone[i] = ages([i])[0]
        except Exception as e:
            results[i].error = _photo_failed(results[i].path, doing, e)
    return alone


def _described(error: BaseException) -> str:
    """``Type: message`` (the type alone when the message is empty, as a MemoryError's often is)."""
    return type(error).__name__ + (f": {text}" if (text := str(error).strip()) else "")


def _remove_copies(results: Sequence[PhotoResult]) -> None:
    """Removes the annotated copies written for ``results``, which their caller never got (an interrupted run):
    its message counts only the photos printed, and a rerun would write them again under new names."""
    for result in results:
        if result.annotated is None:
            continue
        try:
            result.annotated.unlink(missing_ok=True)
        except OSError as e:
            log.warning("could not remove the annotated copy %s of the unfinished %s: %s", result.annotated,
                        result.path, e.strerror or e)
        else:
            log.info("removed the annotated copy %s of the unfinished %s", result.annotated, result.path)
        result.annotated = None


def _stdin_problem() -> str | None:
    """Why standard input cannot give the photo that ``-`` names, or None. A terminal was read as the photo: the
    command sat silent until Ctrl-D ("empty image"); a closed one was "no such file or folder: -"."""
    how = f"`curl -s URL | faceage predict {STDIN}`, or `faceage predict {STDIN} < photo.jpg`"
    try:
        os.fstat(0)
    except OSError:
        return f"standard input is closed: pipe a photo in ({how})"
    if os.isatty(0):
        return f"standard input is a terminal, not a photo: pipe one in ({how})"
    return None


def _as_url(path: Path) -> str | None:
    """The URL a PATH argument was typed as (``scheme://...``, which :class:`~pathlib.Path` made ``scheme:/...``),
    or None."""
    match = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]+):/+(.+)", str(path))  # 2+ letters: not a drive, C:/
    return f"{match[1]}://{match[2]}" if match else None


def _read_error(path: Path, error: Exception, max_pixels: int | None = None) -> str:
    """The row's message for a photo that could not be read: a missing path, or a symbolic link
    whose target is gone, in words rather than as the ``[Errno 2]`` of opening it; for a folder a
    scan could not list (:class:`UnlistedFolder`), the error the scan met (rather than the ``Is a
    directory`` of opening it as a photo); for a photo over ``max_pixels`` (``--max-pixels``), the
    value of the option that reads it (``load_image``'s words name no setting: the service adds its own)."""
    if isinstance(error, ImageTooLarge) and max_pixels is not None and error.limit == max_pixels:
        if error.pixels is not None:
            return f"{error}: pass --max-pixels {error.pixels} to read it"
        if not isinstance(error.__cause__, Image.DecompressionBombError):  # past Pillow's own cap, no value reads it
            return f"{error}: raise --max-pixels to read it"
    if isinstance(path, UnlistedFolder) and path.error is not None:
        return f"cannot read the folder {path}: {path.error.strerror or path.error}"
    # Not for EACCES: os.path.exists is False for a path this user may not reach, which was then "no such file".
    if isinstance(error, OSError) and not isinstance(error, PermissionError) and not os.path.exists(path):
        if os.path.islink(path):
            return f"broken symbolic link: {path} -> {os.readlink(path)}"
        # `faceage predict https://...`: Path made "https:/..." of it, and its query string's "?" is no pattern.
        if (url := _as_url(path)) is not None:
            return (f"no such file or folder: {path} (a URL: faceage predict reads files; pipe the photo in "
                    f"instead: curl -s '{url}' | faceage predict {STDIN})")
        # `faceage predict "photos/*.JPG"`: quoted, or it matched no file. Not "[": real names hold brackets.
        if any(c in str(path) for c in "*?"):
            return (f"no such file or folder: {path} (a pattern the shell passed as typed: it was quoted, or matches "
                    "no file; leave it unquoted, and mind the case of the suffix)")
        return f"no such file or folder: {path}"
    return str(error)


def write_annotated(out_dir: Path, path: Path, image, faces: list[FaceAge]) -> Path:
    """Writes ``image`` with its faces drawn as a new PNG in ``out_dir``, named after ``path``.

    The name is ``<stem>.png``, else the first free ``<stem>-N.png``: each candidate is created
    exclusively, so no existing file is replaced, whether an input photo (``--annotate`` may be
    the photos' own folder), an earlier run's output or this run's copy of a same-named photo
    from another folder. The stem is shortened to keep the name within the file system's limit.

    Returns:
        The file written.

    Raises:
        OSError: It could not be written (nothing is left behind).
    """
    from faceage.annotate import annotate

    data = annotated_png(annotate(image, faces))
    limit = _name_max(out_dir)
    n = 0
    while True:
        suffix = f"-{n}.png" if n else ".png"
        stem = "stdin" if str(path) == STDIN else path.stem
        while len(os.fsencode(stem + suffix)) > limit:  # bytes, as the file system counts them
            stem = stem[:-1]
        target = out_dir / (stem + suffix)
        try:
            out = open(target, "xb")
        except FileExistsError:
            n += 1
            continue
        try:
            with out:
                out.write(data)
        except BaseException:  # a full disk, or Ctrl-C: a truncated PNG is worse than none
            target.unlink(missing_ok=True)
            raise
        return target


def annotated_png(image: np.ndarray) -> bytes:
    """PNG bytes of an annotated RGB uint8 image (:func:`faceage.annotate.to_png`) with the text chunk
    :data:`ANNOTATED_MARK`, by which a later folder scan knows it is not a photo."""
    from faceage.annotate import to_png

    return to_png(image, dict([ANNOTATED_MARK]))


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system accepts."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
        return NAME_MAX


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _printable(text: str) -> str:
    """``text`` with its control characters escaped (``\\n``, ``\\t``, ``\\x1b``): a file name holding a
    newline would otherwise split its row in two, the second looking like a row of its own; an escape
    sequence would drive the terminal. Other characters, a name's undecodable bytes included, stay."""
    return "".join(_CONTROL_ESCAPES.get(c) or (f"\\x{ord(c):02x}" if unicodedata.category(c) == "Cc" else c)
                   for c in text)


def write_table(results: Sequence[PhotoResult], out: TextIO, annotate: bool = False) -> None:
    """A fixed-width table: one row per face; photos without faces or unreadable get one row.

    With ``annotate``, an ``annotated`` column (before ``note``) names each photo's copy, and the note
    says why a copy could not be written. Control characters in a cell (a file name's newline) are
    escaped (:func:`_printable`); JSON and CSV keep names as they are.
    """
    _write_all("table", results, out, annotate)


def write_csv(results: Sequence[PhotoResult], out: TextIO, annotate: bool = False) -> None:
    """CSV: ``file,face,x1,y1,x2,y2,age,age_std,score,error``; one row per face (or per faceless photo).

    With ``annotate``, two more columns: ``annotated`` (the photo's copy) and ``annotate_error``
    (why it could not be written); a run without ``--annotate`` keeps the ten columns.
    """
    _write_all("csv", results, out, annotate)


def _write_all(fmt: str, results: Sequence[PhotoResult], out: TextIO, annotate: bool) -> None:
    """Every result at once, through the :class:`ResultWriter` a run prints with as photos are done."""
    writer = ResultWriter(fmt, out, annotate)
    for result in results:
        writer.add(result)
    writer.finish()


class ResultWriter:
    """Prints results in one format as they come, so that a long run shows (and leaves, when it is killed) the
    photos done: it printed nothing until every photo was done. Each photo's rows are written and flushed at once.

    The output is what printing every result at the end gave: ``json`` is one list (the document ``--json``
    promises, laid out as ``json.dump(indent=2)`` wrote it, ``]`` printed by :meth:`finish`), not JSON Lines; ``csv``
    its header, then each row. A ``table`` is printed a batch of :data:`CHUNK_IMAGES` photos at a time, its columns
    sized by the rows printed so far (``file`` by every path, when given): a later batch's wider cell (a box of a
    larger photo) widens its column from there on. Up to :data:`CHUNK_IMAGES` photos, the table is the one that
    printing all rows at once gave. Nothing (not even a header) is printed before the first result.

    Args:
        fmt: ``table``, ``csv`` or ``json``.
        out: Where to print.
        annotate: Give each photo's annotated copy (as a run with ``--annotate`` does).
        paths: Every path the run reports, to size the table's ``file`` column once for all.
    """

    def __init__(self, fmt: str, out: TextIO, annotate: bool = False, paths: Sequence[Path] = ()):
        if fmt not in ("table", "csv", "json"):
            raise ValueError(f"fmt can be 'table', 'csv' or 'json', but got {fmt!r}")
        self.fmt, self.out, self.annotate = fmt, out, annotate
        self.count = 0  # results given to add
        self._header = ["file", "face", "age", "age_std", "box", "score", *(("annotated",) if annotate else ()),
                        "note"]
        self._widths = [len(h) for h in self._header]
        self._widths[0] = max([self._widths[0], *(len(_printable(str(p))) for p in paths)])
        self._pending: list[tuple[str, ...]] = []  # table rows not printed yet
        self._pending_photos = 0

    def add(self, result: PhotoResult) -> None:
        """Prints ``result`` (a table: once its batch is complete).

        Raises:
            OSError: ``out`` could not take it (:class:`BrokenPipeError`: its reader left).
        """
        first = self.count == 0
        self.count += 1
        if self.fmt == "json":
            # The entry as json.dump(indent=2) of the whole list lays it out, written in one piece: a Ctrl-C comes
            # between entries, and the list closed by finish() is valid JSON.
            entry = json.dumps(result.as_dict(self.annotate), indent=2)
            self.out.write(("[\n" if first else ",\n") + "\n".join("  " + line for line in entry.splitlines()))
        elif self.fmt == "csv":
            text = io.StringIO()
            writer = csv.writer(text, lineterminator="\n")
            if first:
                writer.writerow(["file", "face", "x1", "y1", "x2", "y2", "age", "age_std", "score", "error",
                                 *(["annotated", "annotate_error"] if self.annotate else [])])
            writer.writerows(self._csv_rows(result))
            self.out.write(text.getvalue())
        else:
            self._pending.extend(self._table_rows(result))
            self._pending_photos += 1
            if self._pending_photos < CHUNK_IMAGES:
                return
            self._print_table()
        self.out.flush()

    def finish(self) -> None:
        """Prints what is left: a table's last batch, the end of the JSON list (``[]`` when no result came).

        Raises:
            OSError: As :meth:`add`.
        """
        if self.fmt == "json":
            self.out.write("[]\n" if self.count == 0 else "\n]\n")
        elif self.fmt == "table" and self._pending_photos:
            self._print_table()
        self.out.flush()

    def _print_table(self) -> None:
        rows = ([tuple(self._header)] if self.count == self._pending_photos else []) + self._pending
        self._pending, self._pending_photos = [], 0
        self._widths = [max(w, *(len(row[c]) for row in rows)) for c, w in enumerate(self._widths)]
        self.out.write("".join("  ".join(cell.ljust(w) for cell, w in zip(row, self._widths)).rstrip() + "\n"
                               for row in rows))

    def _table_rows(self, r: PhotoResult) -> list[tuple[str, ...]]:
        copy = (str(r.annotated or ""),) if self.annotate else ()
        failed = f"not annotated: {r.annotate_error}" if r.annotate_error is not None else ""
        rows = []
        if r.error is not None:
            rows.append((str(r.path), "-", "", "", "", "", *copy, f"error: {r.error}"))
        elif not r.faces:
            rows.append((str(r.path), "-", "", "", "", "", *copy, "; ".join(filter(None, ("no face", failed)))))
        for i, f in enumerate(r.faces, 1):
            rows.append((str(r.path), str(i), f"{f.age:.1f}", f"{f.age_std:.1f}", " ".join(map(str, f.box)),
                         f"{f.score:.3f}", *copy, failed))
        return [tuple(map(_printable, row)) for row in rows]

    def _csv_rows(self, r: PhotoResult) -> list[list]:
        copy = [r.annotated or "", r.annotate_error or ""] if self.annotate else []
        rows = []
        if r.error is not None or not r.faces:
            rows.append([r.path, "", "", "", "", "", "", "", "", r.error or "", *copy])
        for i, f in enumerate(r.faces, 1):
            rows.append([r.path, i, *f.box, f"{f.age:.3f}", f"{f.age_std:.3f}", f"{f.score:.4f}", "", *copy])
        return rows


def _int_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse ``type``: an integer >= ``minimum``; anything else is a usage error naming the option."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    return parse


# `faceage predict --help`'s last paragraph: where a new user looks first (the README says the same).
PREDICT_EXIT_STATUS = (
    "exit status: 0 when every photo was read (photos without a face included; a reader that leaves, `| head`, is "
    "no error, and ends the run unless --annotate writes copies); 1 when a photo could not be read (its row says why; the others are still reported), an annotated "
    "copy could not be written, the results could not be printed, or nothing could run (no model, no photo); 2 "
    "for a usage error; 130 (SIGINT) after Ctrl-C, 143 (SIGTERM) after a SIGTERM (kill, timeout), the photos done "
    "printed.")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceage", description="FaceAge: face-age estimation.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="estimate the age of every face in photos",
                            description="Estimate the age of every face in photos (files or folders).",
                            epilog=PREDICT_EXIT_STATUS)
    p.add_argument("paths", nargs="+", metavar="PATH", help=f"image files or folders ({STDIN}: the photo on standard input)")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    fmt = p.add_mutually_exclusive_group()
    # The schema, where a new user scripting over the output looks for it (the README says the same).
    fmt.add_argument("--json", action="store_true",
                     help='print JSON: a list with one object per photo, in the order of the PATHs (a folder\'s '
                          'photos sorted by name): {"file", "width", "height", "faces": [{"box": [x1, y1, x2, y2], '
                          '"age", "age_std", "score"}, ...]} (faces largest first; ages in years, 4 decimals), or '
                          '{"file", "error"} for a photo that could not be read; --annotate adds "annotated" and '
                          '"annotate_error"')
    fmt.add_argument("--csv", action="store_true", help="print CSV (one row per face)")
    p.add_argument("--annotate", metavar="DIR", type=Path, help="write an annotated PNG per photo into DIR")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path,
                     help="checkpoint, or a packaged model folder (model.pt + detector/) (default: models/model.pt, "
                          "the working folder's, else the project's, also from a subfolder of it)")
    src.add_argument("--bento", metavar="TAG", help="use a packaged BentoML model instead, e.g. face_age:latest")
    p.add_argument("--detector", type=Path,
                   help=f"detector folder for a --model checkpoint (default: the {DETECTOR_DIR}/ folder beside "
                        f"the checkpoint, else {DEFAULT_DETECTOR}; a model folder or --bento brings its own)")
    p.add_argument("--max-pixels", type=_int_at_least(1), default=DEFAULT_MAX_PIXELS,
                   help="refuse larger images (default: %(default)s)")
    p.add_argument("--max-detect-pixels", type=_int_at_least(0), default=DEFAULT_MAX_DETECT_PIXELS,
                   help="downscale larger images for detection only; 0 = never (default: %(default)s)")
    p.add_argument("--threads", type=_int_at_least(1), help="torch threads (default: half the cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def load_predictor(args: argparse.Namespace) -> AgePredictor:
    """The predictor from ``--bento`` or ``--model``/``--detector``.

    ``--model`` may name a packaged model folder (``model.pt`` + ``detector/``, as ``stages/package.py``
    stores it): it is read with :meth:`AgePredictor.from_model_dir`.

    Raises:
        FaceAgeError: The tag is malformed or not in the model store (a bento's tag says so), the
            checkpoint is missing or not a FaceAge checkpoint (:class:`faceage.model.CheckpointError`),
            a folder given as ``--model`` is not a packaged model, or ``--detector`` comes with a
            packaged model (``--bento``, a model folder), which brings its own.
    """
    options = {"threads": args.threads, "max_pixels": args.max_pixels, "max_detect_pixels": args.max_detect_pixels}
    if args.bento and args.detector is not None:  # was ignored: ages from a detector other than the one named
        raise FaceAgeError(f"--detector {args.detector} with --bento {args.bento}: a packaged model brings its own "
                           f"{DETECTOR_DIR}/; leave --detector out")
    if args.bento:
        import bentoml

        try:
            tag = bentoml.Tag.from_taglike(args.bento)
        except ValueError as e:
            raise FaceAgeError(f"--bento {args.bento!r} is not a BentoML model tag such as face_age:latest "
                               f"({e})") from e
        try:
            stored = bentoml.models.get(tag)
        except bentoml.exceptions.NotFound as e:
            raise FaceAgeError(_model_not_found(args.bento, e)) from e
        return AgePredictor.from_model_dir(stored.path, **options)
    if args.model is None:
        args.model = default_checkpoint()
    if args.model.is_dir():
        check_model_dir(args.model, args.detector)
        return AgePredictor.from_model_dir(args.model, **options)
    version = store_pointer(args.model)
    if version is not None:
        raise FaceAgeError(f"--model {args.model} is the BentoML store's pointer to its latest version, not a "
                           f"checkpoint: pass --model {version} (the model folder it names) or --bento "
                           f"{args.model.parent.name}:latest")
    if not args.model.is_file():
        raise FaceAgeError(f"checkpoint {args.model} not found: run `dvc repro`, or pass --model PATH "
                           "(a checkpoint, or a packaged model folder) or --bento face_age:latest")
    if args.detector is not None and not args.detector.is_dir():  # a typo read as "detector file .../x.svm not found"
        raise FaceAgeError(f"--detector {args.detector} is not a folder: pass the detector folder the model was "
                           f"trained with (the fetch_detector output, {DEFAULT_DETECTOR})")
    detector = args.detector or default_detector(args.model)
    try:
        return AgePredictor(args.model, detector, **options)
    except PredictorError as e:
        if args.detector is None and not detector.is_dir():  # the default was guessed: say how to name one
            raise FaceAgeError(f"{e}: no {DETECTOR_DIR}/ beside {args.model} nor in the working folder; pass "
                               "--detector DIR (the fetch_detector output it was trained with)") from e
        raise


def store_pointer(path: Path) -> Path | None:
    """The model folder a BentoML store's ``latest`` file names, when ``path`` is one, else None.

    ``~/bentoml/models/face_age/`` holds each version's folder and a file ``latest`` with the newest
    version's name: ``--model .../face_age/latest`` looks like a model, and stopped with "not a FaceAge
    checkpoint: not a torch file" instead of naming the folder to pass.
    """
    if path.name != "latest" or not path.is_file():
        return None
    try:
        with open(path, "rb") as f:
            version = f.read(256).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    folder = path.parent / version
    if not version or "/" in version or not (folder / CHECKPOINT_FILE).is_file():
        return None
    return folder


def default_checkpoint() -> Path:
    """``--model`` when not given: the working folder's ``models/model.pt`` where there is one (a packaged export or
    a ``dvc exp run --temp`` copy inside the project is run from its own folder), else the project's
    (:func:`faceage.paths.repo_root`: the nearest folder up holding ``dvc.yaml``/``params.yaml``), shown from the
    working folder. From a subfolder (``cd reports``) it was the subfolder's alone: "checkpoint models/model.pt not
    found" beside the pipeline's checkpoint."""
    from faceage.paths import repo_root

    here = Path("models") / CHECKPOINT_FILE
    if here.exists():
        return here
    return Path(os.path.relpath(repo_root() / "models" / CHECKPOINT_FILE))


def default_detector(checkpoint: Path) -> Path:
    """The detector folder of a ``--model`` checkpoint given without ``--detector``: the ``detector/``
    beside it (``models/model.pt`` -> ``models/detector``, from whatever folder the command runs in),
    else :data:`DEFAULT_DETECTOR` (relative to the working folder). Before, it was always the latter:
    ``--model /repo/models/model.pt`` run outside the repo stopped with ``detector file
    models/detector/... not found``."""
    beside = checkpoint.parent / DETECTOR_DIR
    return beside if beside.is_dir() else DEFAULT_DETECTOR


def check_model_dir(folder: Path, detector: Path | None) -> None:
    """Checks that a ``--model`` folder is a packaged model (``model.pt`` + ``detector/``).

    Raises:
        FaceAgeError: It lacks either, or ``--detector`` was given too (the folder's own is used).
    """
    missing = [name for name, present in ((CHECKPOINT_FILE, (folder / CHECKPOINT_FILE).is_file()),
                                          (f"{DETECTOR_DIR}/", (folder / DETECTOR_DIR).is_dir())) if not present]
    if missing:
        raise FaceAgeError(f"--model {folder} is a folder without {' and '.join(missing)}: pass a checkpoint "
                           f"file, or a packaged model folder ({CHECKPOINT_FILE} + {DETECTOR_DIR}/, such as "
                           "~/bentoml/models/face_age/<version>)")
    if detector is not None:
        raise FaceAgeError(f"--detector {detector} with the model folder {folder}: the folder brings its own "
                           f"{DETECTOR_DIR}/; leave --detector out")


def _model_not_found(given: str, error: Exception) -> str:
    """The message for a ``--bento`` tag that is not in the model store: a bento's tag (``bentoml
    build`` prints it, and the bento is often named like its model) is named as such, with the tags of
    the models it uses."""
    import bentoml

    try:
        bento = bentoml.bentos.get(given)
    except bentoml.exceptions.BentoMLException:  # not a bento either (or an unreadable one)
        return f"BentoML model {given!r} not found: run `make bento` first ({error})"
    models = [f"--bento {m.tag}" for m in bento.info.all_models]
    return (f"--bento {given!r} is a bento, not a model: pass a model's tag (`bentoml models list`), such as "
            f"the models it uses: {', '.join(models) or 'none'}")


def _encode_path_bytes(error: UnicodeError) -> tuple[str | bytes, int]:
    """Codec error handler for stdout: a file name's undecodable bytes are written back as they
    were (``surrogateescape``), so a path printed can be used again; any other character the
    output encoding lacks becomes an escape (``backslashreplace``) instead of an error."""
    try:
        return codecs.lookup_error("surrogateescape")(error)
    except UnicodeError:
        return codecs.lookup_error("backslashreplace")(error)


codecs.register_error("faceage.paths", _encode_path_bytes)


def _robust_stdout() -> None:
    """Makes printing any file name safe: names need not be valid in stdout's encoding (Linux file
    names are bytes; ``caf\\xe9.jpg`` from a Latin-1 system is not UTF-8), and a failure there would
    come after all the work."""
    reconfigure = getattr(sys.stdout, "reconfigure", None)
    if reconfigure is not None and sys.stdout.errors == "strict":
        reconfigure(errors="faceage.paths")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    setup_logging(logging.INFO if args.verbose else logging.WARNING)
    if sys.stdout is None:  # started with stdout closed (`>&-`): was a traceback once every photo was done
        log.error("stdout is closed: the results would have nowhere to go; redirect it instead (> results.txt, or "
                  "> /dev/null to keep only --annotate's copies)")
        return 1
    _robust_stdout()
    # SIGTERM (`timeout`, `kill`, a cancelled CI job) stops it as Ctrl-C does: it ended the process at once, every
    # photo done lost and nothing said. A second SIGTERM ends it at once (raise_on_sigterm).
    previous = raise_on_sigterm()
    try:
        return _run(args)
    finally:  # a caller in this process (a test, a script calling main) keeps its own handler
        signal.signal(signal.SIGTERM, previous)


def _stopped_by(error: KeyboardInterrupt) -> tuple[int, str]:
    """The signal that stopped the run (SIGINT for Ctrl-C, or :class:`faceage.logs.Terminated`'s) and its words."""
    if isinstance(error, Terminated):
        return error.signum, f"stopped by {signal.Signals(error.signum).name}"
    return signal.SIGINT, "interrupted (Ctrl-C)"


def _run(args: argparse.Namespace) -> int:
    """:func:`main` once the arguments are parsed and stdout is ready."""
    paths: list[Path] = []
    out: _Stdout | None = None
    try:
        paths = collect_images(args.paths, args.recursive, skip_dir=args.annotate)
        if not paths:
            raise FaceAgeError(_no_images(args.paths, args.recursive, args.annotate))
        if args.annotate is not None:  # before the model loads: a bad folder fails at once
            prepare_annotate_dir(args.annotate)
        predictor = load_predictor(args)
        out = _Stdout(ResultWriter("json" if args.json else "csv" if args.csv else "table", sys.stdout,
                                   args.annotate is not None, paths))
        # Closed at once on Ctrl-C, not whenever it is collected: it removes the copies of the photos not printed.
        with contextlib.closing(predict_photos(predictor, paths, args.annotate)) as rows:
            for result in rows:
                out.add(result)  # once stdout failed, the run goes on for --annotate's copies, its rows unprinted
                if out.unprinted is not None and args.annotate is None:
                    # Nothing more can be printed, and nothing else is made: the photos left (thousands, `| head`)
                    # were detected for nobody. A reader that left is no error (status 0), a full disk is (1).
                    (log.error if out.status else log.debug)("stopped after %d of %d photos: %s", out.done,
                                                             len(paths), out.unprinted)
                    break
                if out.done == len(paths):  # the end (a table's last rows) printed before the progress bar's last
                    out.finish()
        out.finish()
    except (FaceAgeError, FileNotFoundError) as e:
        log.error("%s", error_line(e, with_type=False))  # one line, a hint raised on a second one joined to it
        return 1
    except KeyboardInterrupt as e:  # Ctrl-C (or SIGTERM): was a traceback, and the photos already done were lost
        signum, message = _stopped_by(e)
    else:
        return out.status
    # The photos done are printed (as they were done; a table's last batch and the end of the JSON list now), as
    # complete rows (valid JSON), and the process dies of the signal, as Ctrl-C's should: a shell's loop over folders
    # stops, and the status tells the output is partial.
    if out is not None and out.done:
        try:
            out.finish()
            message += f" after {out.done} of {len(paths)} photos: " + (
                "their results are printed, the others' not" if out.unprinted is None else
                f"their results could not all be printed ({out.unprinted}), the others' not computed")
        except KeyboardInterrupt:  # a second Ctrl-C while the results are written
            message += f" after {out.done} of {len(paths)} photos, while their results were printed"
    elif paths:
        message += f" before the first of {len(paths)} photos was done: nothing printed"
    die_of_signal(signum, message)
    return 128 + signum  # (not reached: die_of_signal ends the process)


class _Stdout:
    """A :class:`ResultWriter` on stdout that keeps the exit status (see :func:`main`) and, once stdout fails, why:
    a reader that left (``| head``) is no error; a full disk (``> out.json``) is one line, not a traceback. Either
    way stdout becomes /dev/null, which Python flushes again at exit, and the results that follow are counted only."""

    def __init__(self, writer: ResultWriter):
        self.writer = writer
        self.done = 0  # results given
        self.status = 0
        self.unprinted: str | None = None  # why the results could not all be printed
        self._finished = False
        try:
            self._terminal = sys.stdout.isatty()
        except (AttributeError, OSError, ValueError):
            self._terminal = False

    def add(self, result: PhotoResult) -> None:
        self.done += 1
        if result.error is not None or result.annotate_error is not None:
            self.status = 1
        self._write(self.writer.add, result)

    def finish(self) -> None:
        """Prints the end of the output, once (a Ctrl-C after a normal end does not print it again)."""
        if not self._finished:
            self._finished = True
            self._write(self.writer.finish)

    def _write(self, write: Callable, *args) -> None:
        if self.unprinted is not None:
            return
        from tqdm import tqdm

        try:
            # On a terminal, the progress bar (stderr) is cleared for the rows and drawn again below them: a row
            # printed as photos are done began on the bar's line. Rows going to a file leave the bar alone.
            with tqdm.external_write_mode(file=sys.stdout) if self._terminal else contextlib.nullcontext():
                write(*args)
        except BrokenPipeError:  # `faceage predict ... | head`: the reader left; not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.unprinted = "broken pipe: the output's reader left"
        except OSError as e:  # a full disk (`> out.json`): one line, as for --annotate's copies, not a traceback
            log.error("could not write the results to stdout: %s", e.strerror or e)
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            self.unprinted, self.status = f"stdout: {e.strerror or e}", 1


def _no_images(given: Sequence[str], recursive: bool, annotate: Path | None) -> str:
    """The error for paths that hold no photo; for folders whose subfolders hold some (a collection's root,
    ``utk-external/`` with its ``test/``), how many there are and the flag that reads them: "no images found"
    alone read as if the folder were empty."""
    message = f"no images found in {', '.join(given)}"
    if not recursive:
        # The scan itself, not collect_images: that warns of each photo reached twice as "reported once" (nothing
        # is reported here), and a subfolder that cannot be listed is no photo.
        skip = None if annotate is None else _real(annotate)
        below = len({_real(photo) for folder in given if os.path.isdir(folder)
                     for photo in _scan_folder(Path(folder), True, skip) if not isinstance(photo, UnlistedFolder)})
        if below:
            message += (f" (their subfolders hold {below} photo{'s' * (below > 1)}: add --recursive to read them)")
    return message


if __name__ == "__main__":
    sys.exit(main())
