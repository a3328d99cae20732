"""The ``faceage`` command: ``faceage predict PATH...`` estimates the age of every face in photos.

Input: image files and/or folders (their images, sorted by name; ``--recursive`` descends), and
a model: a checkpoint + detector folder (default ``models/model.pt`` + ``models/detector``, the
pipeline's outputs) or a packaged BentoML model (``--bento face_age:latest``).
Output: on stdout, a table (default), JSON (``--json``) or CSV (``--csv``) with one entry per
face; with ``--annotate DIR``, a PNG per photo with each box and its "age ± std" label (a new
file: ``<stem>.png``, or ``<stem>-N.png`` when that name is taken; no existing file, input photos
included, is ever replaced). It uses :class:`faceage.predict.AgePredictor`, the predictor the
service runs. Exit status 0, or 1 when some file could not be read or some annotated copy could
not be written (the others are still reported).
"""

from __future__ import annotations

import argparse
import codecs
import csv
import json
import logging
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from faceage.errors import FaceAgeError
from faceage.images import DEFAULT_MAX_PIXELS, ImageDecodeError, load_image
from faceage.logs import setup_logging
from faceage.predict import DEFAULT_MAX_DETECT_PIXELS, AgePredictor, FaceAge

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff", ".jfif"}
CHUNK_IMAGES = 8  # photos per forward pass: bounds memory, keeps the batch large enough
NAME_MAX = 255  # bytes in a file name on common file systems, when the folder does not say


@dataclass
class PhotoResult:
    """One photo's outcome: its faces, or the reason it could not be read."""

    path: Path
    width: int = 0
    height: int = 0
    faces: list[FaceAge] = field(default_factory=list)
    error: str | None = None
    annotate_error: str | None = None  # why its annotated copy could not be written (ages still valid)

    def as_dict(self) -> dict:
        if self.error is not None:
            return {"file": str(self.path), "error": self.error}
        return {"file": str(self.path), "width": self.width, "height": self.height,
                "faces": [f.as_dict() for f in self.faces]}


def collect_images(paths: Sequence[str | Path], recursive: bool = False) -> list[Path]:
    """Files as given, plus the images inside given folders (by suffix, sorted).

    Inside a given folder, hidden entries are skipped: names starting with ``.``, and everything
    under a subfolder whose name does. macOS's ``._IMG.JPG`` files carry metadata, not pixels, and
    caches such as ``.thumbs/`` hold copies, not photos. Files named explicitly are taken as given.

    Raises:
        FileNotFoundError: A path does not exist.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            found.extend(sorted(p for p in path.glob(pattern)
                                if not _hidden(p.relative_to(path)) and p.is_file()
                                and p.suffix.lower() in IMAGE_SUFFIXES))
        elif path.exists():
            found.append(path)
        else:
            raise FileNotFoundError(f"no such file or folder: {path}")
    return found


def _hidden(relative: Path) -> bool:
    """Whether a path inside a scanned folder is, or lies under, a hidden entry."""
    return any(part.startswith(".") for part in relative.parts)


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
    """Yields one :class:`PhotoResult` per path, in order; faces of a chunk share one forward pass.

    Args:
        predictor: The predictor.
        paths: Image files.
        annotate_dir: If given, an annotated PNG per readable photo is written there, under a new
            name (:func:`write_annotated`). A photo whose copy cannot be written keeps its ages and
            gets ``annotate_error``.

    Raises:
        FaceAgeError: ``annotate_dir`` is a file or cannot be created.
    """
    from tqdm import tqdm

    if annotate_dir is not None:
        prepare_annotate_dir(annotate_dir)
    with tqdm(total=len(paths), desc="predict", unit="img", disable=None, file=sys.stderr) as bar:
        for start in range(0, len(paths), CHUNK_IMAGES):
            results, images = [], {}
            for path in paths[start:start + CHUNK_IMAGES]:
                result = PhotoResult(path)
                try:
                    image = load_image(path, max_pixels=predictor.locator.max_pixels)
                except (ImageDecodeError, OSError) as e:
                    result.error = str(e)
                    log.warning("skipped %s: %s", path, e)
                else:
                    result.height, result.width = image.shape[:2]
                    images[len(results)] = image
                results.append(result)
            for i, faces in zip(images, predictor.predict_many(list(images.values()))):
                results[i].faces = faces
                if annotate_dir is not None:
                    try:
                        written = write_annotated(annotate_dir, results[i].path, images[i], faces)
                    except OSError as e:  # a full disk, an odd file system: the ages are still good
                        results[i].annotate_error = str(e)
                        log.warning("could not write the annotated copy of %s: %s", results[i].path, e)
                    else:
                        log.info("annotated %s -> %s", results[i].path, written)
            bar.update(len(results))
            yield from results


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
    from faceage.annotate import annotate, to_png

    data = to_png(annotate(image, faces))
    limit = _name_max(out_dir)
    n = 0
    while True:
        suffix = f"-{n}.png" if n else ".png"
        stem = path.stem
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
        except OSError:
            target.unlink(missing_ok=True)  # a truncated PNG is worse than none
            raise
        return target


def _name_max(folder: Path) -> int:
    """The longest file name, in bytes, that ``folder``'s file system accepts."""
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (AttributeError, OSError, ValueError):  # no pathconf (Windows), or the file system does not say
        return NAME_MAX


def write_table(results: Sequence[PhotoResult], out: TextIO) -> None:
    """A fixed-width table: one row per face; photos without faces or unreadable get one row."""
    rows = [("file", "face", "age", "age_std", "box", "score", "note")]
    for r in results:
        if r.error is not None:
            rows.append((str(r.path), "-", "", "", "", "", f"error: {r.error}"))
        elif not r.faces:
            rows.append((str(r.path), "-", "", "", "", "", "no face"))
        for i, f in enumerate(r.faces, 1):
            rows.append((str(r.path), str(i), f"{f.age:.1f}", f"{f.age_std:.1f}", " ".join(map(str, f.box)),
                         f"{f.score:.3f}", ""))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]))]
    for row in rows:
        out.write("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() + "\n")


def write_csv(results: Sequence[PhotoResult], out: TextIO) -> None:
    """CSV: ``file,face,x1,y1,x2,y2,age,age_std,score,error``; one row per face (or per faceless photo)."""
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["file", "face", "x1", "y1", "x2", "y2", "age", "age_std", "score", "error"])
    for r in results:
        if r.error is not None or not r.faces:
            writer.writerow([r.path, "", "", "", "", "", "", "", "", r.error or ""])
        for i, f in enumerate(r.faces, 1):
            writer.writerow([r.path, i, *f.box, f"{f.age:.3f}", f"{f.age_std:.3f}", f"{f.score:.4f}", ""])


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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="faceage", description="FaceAge: face-age estimation.")
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("predict", help="estimate the age of every face in photos",
                            description="Estimate the age of every face in photos (files or folders).")
    p.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders")
    p.add_argument("--recursive", action="store_true", help="also read images in subfolders")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON (one object per photo)")
    fmt.add_argument("--csv", action="store_true", help="print CSV (one row per face)")
    p.add_argument("--annotate", metavar="DIR", type=Path, help="write an annotated PNG per photo into DIR")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", type=Path, default=Path("models/model.pt"), help="checkpoint (default: %(default)s)")
    src.add_argument("--bento", metavar="TAG", help="use a packaged BentoML model instead, e.g. face_age:latest")
    p.add_argument("--detector", type=Path, default=Path("models/detector"),
                   help="detector folder for --model (default: %(default)s)")
    p.add_argument("--max-pixels", type=_int_at_least(1), default=DEFAULT_MAX_PIXELS, help="refuse larger images")
    p.add_argument("--max-detect-pixels", type=_int_at_least(0), default=DEFAULT_MAX_DETECT_PIXELS,
                   help="downscale larger images for detection only; 0 = never (default: %(default)s)")
    p.add_argument("--threads", type=_int_at_least(1), help="torch threads (default: half the cores)")
    p.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    return parser


def load_predictor(args: argparse.Namespace) -> AgePredictor:
    """The predictor from ``--bento`` or ``--model``/``--detector``.

    Raises:
        FaceAgeError: The tag is malformed or not in the store, or the checkpoint is missing or
            not a FaceAge checkpoint (:class:`faceage.model.CheckpointError`).
    """
    options = {"threads": args.threads, "max_pixels": args.max_pixels, "max_detect_pixels": args.max_detect_pixels}
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
            raise FaceAgeError(f"BentoML model {args.bento!r} not found: run `make bento` first ({e})") from e
        return AgePredictor.from_model_dir(stored.path, **options)
    if not args.model.is_file():
        raise FaceAgeError(f"checkpoint {args.model} not found: run `dvc repro`, or pass --model PATH "
                           "or --bento face_age:latest")
    return AgePredictor(args.model, args.detector, **options)


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
    _robust_stdout()
    try:
        paths = collect_images(args.paths, args.recursive)
        if not paths:
            raise FaceAgeError(f"no images found in {', '.join(args.paths)}")
        if args.annotate is not None:  # before the model loads: a bad folder fails at once
            prepare_annotate_dir(args.annotate)
        results = list(predict_photos(load_predictor(args), paths, args.annotate))
    except (FaceAgeError, FileNotFoundError) as e:
        log.error("%s", e)
        return 1
    try:
        if args.json:
            json.dump([r.as_dict() for r in results], sys.stdout, indent=2)
            sys.stdout.write("\n")
        elif args.csv:
            write_csv(results, sys.stdout)
        else:
            write_table(results, sys.stdout)
        sys.stdout.flush()
    except BrokenPipeError:  # `faceage predict ... | head`: the reader left; not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 1 if any(r.error is not None or r.annotate_error is not None for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
