"""APPA-REAL in its release layout: fetch (URL, local zip or folder), validate, fingerprint.

Input: ``fetch_data.source``: the release zip's URL, a local ``.zip``, or a local folder,
laid out as the release is::

    gt_avg_{train,valid,test}.csv   file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age
    {train,valid,test}/NAME         the photo
    {train,valid,test}/NAME_face.jpg  the release's own 40%-margin face crop (optional)
    *.csv                           other label files (e.g. gender/race), copied as they are

Output: a folder with exactly that layout (the CSVs, every listed image and its
``_face.jpg`` when present) plus ``dataset.json`` (counts and a sha256 fingerprint of
every file). The folder appears only when complete and valid. A photo in a split's folder that its CSV
does not list has no age: it is left out, and a warning counts and names such photos. Files the desktop
writes by itself (``.DS_Store``, ``._NAME``, ``Thumbs.db``) are not data: not counted, copied or fingerprinted.
"""

from __future__ import annotations

import codecs
import csv
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import stat
import unicodedata
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from urllib.parse import urlparse
from urllib.request import url2pathname

from faceage.atomic import NO_SPACE, WriteError, errno_text, free_bytes, megabytes, place_in, scratch_dir, staged_dir
from faceage.download import (ChecksumError, ContentError, DownloadError, HTTPStatusError, UnreachableError, download,
                              file_digest)
from faceage.errors import FaceAgeError
from faceage.paths import downloads_dir, from_root

log = logging.getLogger(__name__)

SPLITS = ("train", "valid", "test")
COLUMNS = ("file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age")
FACE_SUFFIX = "_face.jpg"
DATASET_JSON = "dataset.json"
SHOW_MISSING = 5


class LayoutError(FaceAgeError, ValueError):
    """The source does not follow the APPA-REAL release layout; the message says where."""


class SourceMissingError(LayoutError):
    """Nothing is at the path given for a data source (as opposed to data there in the wrong layout)."""


class MissingPhotosError(LayoutError):
    """Photos a CSV lists are not in its split's folder (:func:`check_listed`)."""


@dataclass(frozen=True)
class Sample:
    """One row of ``gt_avg_{split}.csv``."""

    split: str
    file_name: str
    apparent_age: float
    apparent_age_std: float
    real_age: float


def csv_name(split: str) -> str:
    return f"gt_avg_{split}.csv"


def read_split(root: Path, split: str) -> list[Sample]:
    """Parses ``gt_avg_{split}.csv`` under ``root``.

    Spreadsheet exports are read as they come: a UTF-8 byte-order mark, UTF-16 (:func:`_csv_lines`), CRLF line
    ends, columns separated by ``;`` or a tab instead of ``,`` (told apart by the header; Excel's ``sep=;`` first
    line is honoured), decimal commas (``28,5``: a thousands separator cannot be meant, no age reaches 1,000) and
    the all-empty rows (``;;;;``) Excel writes below the data; a CSV typed by hand may put a space after each
    separator.

    Raises:
        LayoutError: Missing file or column, a row with more (non-empty) or fewer fields than the header, an age
            that is not a finite number of years from 0 to :data:`MAX_AGE_YEARS`, or a ``file_name`` that is not a
            plain file name in the split's folder (row number given).
    """
    path = root / csv_name(split)
    if not path.is_file():
        raise LayoutError(f"missing {csv_name(split)} in {root}")
    reader = _dict_reader(path, lambda header: sum(c in header for c in COLUMNS))
    header = _fieldnames(reader, path)
    if not header:
        raise LayoutError(f"{path} is empty: expected the header {','.join(COLUMNS)} and a row per image")
    absent = [c for c in COLUMNS if c not in header]
    if absent:
        how = f" (columns must be separated by {', '.join(map(repr, DELIMITERS[:-1]))} or a tab)" if len(header) == 1 else ""
        raise LayoutError(f"{path} lacks column(s) {absent}; expected columns {list(COLUMNS)}, found {header}{how}")
    samples, lines_of, names_of = [], {}, {}
    for row in _csv_rows(reader, path):
        line = reader.line_num  # a blank line is skipped and a quoted field may hold line breaks: not a row count
        if not row.get(None) and not any((v or "").strip() for v in row.values()):
            continue  # ";;;;": a row Excel saves because it was formatted, with nothing in it
        _check_fields(row, header, path, line, reader.reader.dialect.delimiter)
        ages = tuple(_age(row, column, path, line) for column in ("apparent_age_avg", "apparent_age_std", "real_age"))
        name = row["file_name"] or ""
        if name in ("", ".", "..") or "/" in name or "\\" in name:
            raise LayoutError(f"{path} line {line}: file_name {name!r} must name a file directly in {split}/")
        # A face's crop is <split>/<stem>.png: two rows with one stem (a repeated row, or face.jpg
        # beside face.jpeg) would be scored twice or share one crop under two labels. Stems are compared as
        # macOS and Windows compare file names (any letter case, any Unicode spelling): IMG.png and img.png
        # are one file there (a faces folder pulled to a Mac), and José in NFC and NFD is one photo anywhere.
        stem = unicodedata.normalize("NFC", Path(name).stem).casefold()
        if stem in lines_of:
            first = names_of[stem]
            # The same row pasted twice reads as "same name before its extension" alone: say it is one file, twice.
            if unicodedata.normalize("NFC", first) == unicodedata.normalize("NFC", name):
                why = "it is the same file listed twice: remove one row"
            elif unicodedata.normalize("NFC", Path(first).stem) != unicodedata.normalize("NFC", Path(name).stem) \
                    or unicodedata.normalize("NFC", first).casefold() == unicodedata.normalize("NFC", name).casefold():
                why = (f"names that differ only in letter case are one file on macOS and Windows, where their crops "
                       f"({split}/{Path(first).stem}.png and {split}/{Path(name).stem}.png) would overwrite each "
                       "other: rename one photo and its row")
            else:
                why = "each face needs its own name"
            raise LayoutError(f"{path} line {line}: {name!r} has the same name before its extension as the "
                              f"file_name on line {lines_of[stem]} ({first!r}): {why}")
        lines_of[stem], names_of[stem] = line, name
        samples.append(Sample(split, name, *ages))
    if not samples:
        raise LayoutError(f"{path} lists no images")
    return samples


def _check_fields(row: dict, header: list[str], path: Path, line: int, delimiter: str) -> None:
    """Raises LayoutError where ``row`` has more fields than the header (other than empty ones: Excel writes the empty
    cells past the last column it formatted) or lacks one of :data:`COLUMNS`. Read as they came, ``a.jpg,0,28,5,0,28``
    (a decimal comma left unquoted in a comma-separated file) was apparent age 28, std 5 and real age 0, the last field
    dropped, and nothing said; a short row was "non-numeric age in column real_age: None"."""
    extra = row.get(None) or []
    missing = [c for c in COLUMNS if row.get(c) is None]
    if missing:
        fields = len(header) - sum(row.get(c) is None for c in header)
        raise LayoutError(f"{path} line {line} has {fields} fields, but the header has {len(header)} columns: "
                          f"no {', '.join(missing)} (each row needs a field per column: leave one empty, not out)")
    if any((v or "").strip() for v in extra):
        why = ("a decimal comma in a comma-separated file must be quoted, \"28,5\", or written 28.5; so must a file "
               "name with a comma" if delimiter == "," else f"a field holding the separator {delimiter!r} must be "
               "quoted")
        raise LayoutError(f"{path} line {line} has {len(header) + len(extra)} fields, but the header has "
                          f"{len(header)} columns ({why}): it would be read shifted")


# No one has been recorded older than 122: a larger "age" is a birth year, months or a typo, and was trained on
# as a centenarian. Above the head's 100 is fine (UTKFace labels go to 116; evaluation scores them as they are).
MAX_AGE_YEARS = 130
DECIMAL_COMMA = re.compile(r"[+-]?\d+,\d+")


def _age(row: dict, column: str, path: Path, line: int) -> float:
    """``row[column]`` as years (an empty ``apparent_age_std`` is 0: no spread given)."""
    value = row[column]
    text = (value or "").strip()
    if column == "apparent_age_std" and not text:
        return 0.0
    if DECIMAL_COMMA.fullmatch(text):
        text = text.replace(",", ".")
    try:
        age = float(text)
    except ValueError as e:
        raise LayoutError(f"{path} line {line}: non-numeric age in column {column}: {value!r} (write a number of "
                          "years, e.g. 28.5 or 28,5, with no thousands separator or unit)") from e
    if not (math.isfinite(age) and 0 <= age <= MAX_AGE_YEARS):
        raise LayoutError(f"{path} line {line}: an age must be a finite number >= 0 and <= {MAX_AGE_YEARS} years, "
                          f"got {column}={value!r}")
    return age


def _csv_lines(path: Path) -> io.StringIO:
    """A CSV file's text for :mod:`csv` (line ends as they are), read as UTF-8 with or without a byte-order mark,
    or as UTF-16 where a UTF-16 byte-order mark opens it.

    UTF-16 is what Excel's "Unicode Text" (tab-separated) and Windows PowerShell 5.1's ``>`` (``ConvertTo-Csv ... >
    gt_avg_test.csv``) write: such a file was "not UTF-8 text (invalid start byte)", and the advice to re-encode it
    from cp1252 made it garbage. Its byte-order mark says which it is; UTF-8 cannot begin with those bytes.

    Raises:
        LayoutError: The file is not UTF-8 (a spreadsheet's plain "CSV" export on Windows is cp1252) nor UTF-16 with
            its byte-order mark, or cannot be read (one line naming it).
    """
    try:
        data = path.read_bytes()
    except OSError as e:  # mode 600 from another account: check_sources showed a traceback, fetch_data "copying failed"
        raise cannot_read(path, e) from e
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        encoding = "utf-16"  # the codec reads the mark for the byte order and drops it
    else:
        encoding, data = "utf-8", data.removeprefix(codecs.BOM_UTF8)
    try:
        return io.StringIO(data.decode(encoding), newline="")
    except UnicodeDecodeError as e:
        line = data[: e.start].decode(encoding, errors="replace").count("\n") + 1
        if encoding == "utf-16":
            raise LayoutError(f"{path} line {line} is not UTF-16 text, as its byte-order mark says ({e.reason}): "
                              "save it as \"CSV UTF-8\"") from e
        raise LayoutError(f"{path} line {line} is not UTF-8 text ({e.reason}): save it as \"CSV UTF-8\" "
                          "(or re-encode it, e.g. iconv -f cp1252 -t utf-8)") from e


def csv_text(path: Path) -> str:
    """A CSV file's whole text as the pipeline reads it (:func:`_csv_lines`: UTF-8 with or without a byte-order
    mark, or UTF-16 with one)."""
    return _csv_lines(path).getvalue()


# What spreadsheets separate columns with: "CSV"; "CSV" where the decimal mark is a comma (Excel in most of
# Europe); "Text (Tab delimited)".
DELIMITERS = (",", ";", "\t")
SEP_LINE = re.compile(r"sep=(.)\r?\n?")  # Excel's own hint line above the header


def _dict_reader(path: Path, score: Callable[[list[str]], int]) -> csv.DictReader:
    """A :class:`csv.DictReader` over ``path`` (:func:`_csv_lines`), separated by the one of :data:`DELIMITERS`
    that makes the header hold the columns looked for (``score``, more is better; a tie goes to ``,``).

    The header decides, not :class:`csv.Sniffer`: it guesses from the rows, where ``28,5`` holds a comma.
    """
    lines = _csv_lines(path)
    first = lines.readline()
    sep = SEP_LINE.fullmatch(first)
    if sep:  # the line is not the header: the reader starts below it
        delimiter = sep[1]
        begin = lines.tell()
    else:
        lines.seek(0)
        begin = 0

        def header(d: str) -> list[str]:
            try:
                return next(csv.reader(io.StringIO(first, newline=""), delimiter=d, skipinitialspace=True), [])
            except csv.Error:  # e.g. an unclosed quote: the reader below names the line
                return []
        delimiter = max(DELIMITERS, key=lambda d: score(header(d)))
    lines.seek(begin)
    # skipinitialspace: a CSV typed by hand as "file_name, num_ratings, ..." had no column "num_ratings"
    reader = _DictReader(lines, delimiter=delimiter, skipinitialspace=True)
    reader.skipped = 1 if sep else 0
    return reader


class _DictReader(csv.DictReader):
    """A :class:`csv.DictReader` whose ``line_num`` counts the lines above where it began (``sep=;``)."""

    skipped = 0

    @property
    def line_num(self) -> int:
        return self.reader.line_num + self.skipped

    @line_num.setter
    def line_num(self, value: int) -> None:  # DictReader copies its reader's count here: derived above instead
        pass


def _fieldnames(reader: csv.DictReader, path: Path) -> list[str]:
    """The header of ``reader``'s file (see :func:`_csv_rows`)."""
    try:
        return reader.fieldnames or []
    except csv.Error as e:
        raise LayoutError(f"{path} line 1 cannot be read as CSV ({e})") from e


def _csv_rows(reader: csv.DictReader, path: Path) -> Iterator[dict]:
    """``reader``'s rows; a line :mod:`csv` cannot read is a LayoutError naming where its row began.

    A field that opens with a quote and never closes it runs on to the end of the file, and past
    131,072 characters (a release-sized CSV) csv raises "field larger than field limit".
    """
    began = reader.line_num + 1
    while True:
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as e:
            raise LayoutError(f"{path} line {began} cannot be read as CSV ({e}): a field that opens with a "
                              "quote (\") must end with one") from e
        began = reader.line_num + 1
        yield row


def validate_layout(root: str | Path) -> dict[str, list[Sample]]:
    """Checks the CSVs and that every listed image exists.

    Returns:
        ``{split: [Sample, ...]}``.

    Raises:
        LayoutError: Naming the first problem; missing images are listed (the first few).
    """
    root = Path(root)
    if not root.is_dir():
        raise LayoutError(f"{root} is not a folder")
    absent = [split for split in SPLITS if not (root / csv_name(split)).is_file()]
    if absent:  # all at once: a folder holding only train and test failed on valid, then on the next one
        raise LayoutError(f"missing {' and '.join(map(csv_name, absent))} in {root}: fetch_data.source needs the "
                          "release's three splits, train, valid and test, each a gt_avg_<split>.csv beside a "
                          "<split>/ folder of its photos")
    splits = {split: read_split(root, split) for split in SPLITS}
    by_nfc: dict[Path, dict[str, Path]] = {}
    for split, samples in splits.items():
        check_listed(root, split, samples, by_nfc)
    return splits


def check_listed(root: Path, split: str, samples: list[Sample], by_nfc: dict[Path, dict[str, Path]] | None = None,
                 where: str = "") -> None:
    """Checks that every photo ``gt_avg_{split}.csv`` lists is in ``root/split``.

    Args:
        where: Put before the message (e.g. ``"evaluate.external: 'x': "``).

    Raises:
        LayoutError: The split's folder is absent.
        MissingPhotosError: A listed photo is missing (the first few named).
    """
    folder = root / split
    by_nfc = {} if by_nfc is None else by_nfc  # one listing of the folder for all its names, not one per name
    if not folder.is_dir():
        raise LayoutError(f"{where}{csv_name(split)} lists {len(samples)} images, but there is no folder {folder}")
    missing = [s.file_name for s in samples if listed_file(folder, s.file_name, by_nfc) is None]
    if missing:
        # Made on a Mac or Windows, where names match whatever their case: on Linux they do not.
        try:
            by_case = {unicodedata.normalize("NFC", p.name).casefold(): p.name for p in folder.iterdir() if p.is_file()}
        except OSError:  # a folder that can be entered but not listed (mode 711): the missing photos are the news
            by_case = {}
        other_case = [(m, by_case[k]) for m in missing if (k := unicodedata.normalize("NFC", m).casefold()) in by_case]
        why = (f"; {len(other_case)} of them are there in another letter case (e.g. {other_case[0][0]!r} is "
               f"{other_case[0][1]!r}): names are case-sensitive here, unlike on macOS and Windows: spell them in "
               f"{csv_name(split)} as the files are" if other_case else "")
        below = _in_subfolders(folder, [m for m in missing if m not in dict(other_case)])
        if below:  # photos sorted into test/women/, test/men/: "missing" said nothing of where they are
            why += (f"; {len(below)} of them are in a subfolder of {split}/ (e.g. {below[0]!r}): the photos must be "
                    f"directly in {split}/ (a file_name names no folder)")
        raise MissingPhotosError(f"{where}{len(missing)} of {len(samples)} images listed in {csv_name(split)} are "
                                 f"missing from {folder}, e.g. {missing[:SHOW_MISSING]}{why}")


def _in_subfolders(folder: Path, names: list[str]) -> list[str]:
    """Where in the subfolders of ``folder`` the files ``names`` are (``sub/NAME``, compared as NFC), one per name
    found, in the order of ``names``. Links to folders are not followed."""
    wanted = {unicodedata.normalize("NFC", n) for n in names}
    found: dict[str, str] = {}
    for dirpath, _dirs, files in os.walk(folder, onerror=lambda e: None):
        if dirpath == str(folder):
            continue
        for f in files:
            key = unicodedata.normalize("NFC", f)
            if key in wanted and key not in found:
                found[key] = Path(dirpath, f).relative_to(folder).as_posix()
    return [found[k] for k in (unicodedata.normalize("NFC", n) for n in names) if k in found]


# What counts as a photo left out of a CSV (any case): the formats load_image reads. Hidden files (macOS's
# .DS_Store and ._NAME resource forks) and the release's NAME_face.jpg crops are not photos of their own.
PHOTO_SUFFIXES = frozenset({".jpg", ".jpeg", ".jfif", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".heic",
                            ".heif", ".avif"})


def unlisted_photos(root: Path, split: str, samples: list[Sample]) -> list[str]:
    """The photos in ``root/split`` that ``gt_avg_{split}.csv`` does not list (sorted): with no age, they are left
    out of the data; this is what says so."""
    try:
        entries = [p.name for p in (root / split).iterdir() if p.is_file()]
    except OSError:
        return []
    listed = {unicodedata.normalize("NFC", s.file_name) for s in samples}
    return sorted(n for n in entries
                  if not n.startswith(".") and Path(n).suffix.lower() in PHOTO_SUFFIXES
                  and not n.endswith(FACE_SUFFIX) and unicodedata.normalize("NFC", n) not in listed)


def warn_unlisted(root: Path, splits: dict[str, list[Sample]], where: str = "", shown: str | Path | None = None
                  ) -> dict[str, int]:
    """Logs one warning per split whose folder holds photos its CSV does not list; returns their counts.

    Args:
        where: Put before the message (e.g. ``"evaluate.external: 'x': "``).
        shown: How to name ``root`` (a zip's unzipped copy is deleted: the message names the zip).
    """
    counts = {}
    for split, samples in splits.items():
        left_out = unlisted_photos(root, split, samples)
        if left_out:
            counts[split] = len(left_out)
            many = len(left_out) > 1
            log.warning("%s%d photo%s in %s %s not listed in %s and left out (no age for %s), e.g. %s: add a row "
                        "for each to use it", where, len(left_out), "s" if many else "", Path(shown or root) / split,
                        "are" if many else "is", csv_name(split), "them" if many else "it", left_out[:SHOW_MISSING])
    return counts


def listed_file(folder: Path, name: str, by_nfc: dict[Path, dict[str, Path]] | None = None) -> Path | None:
    """The file a CSV lists as ``name`` in ``folder``, or None.

    An accented letter has two spellings in Unicode: é, or e and a combining accent. macOS writes the second
    (NFD) in the zips its Archive Utility makes and in folders copied from HFS+, while a CSV typed or written by
    a script holds the first (NFC), and Linux compares the bytes: such an image was "missing". A name not found
    as it is spelled is looked up by its NFC form among ``folder``'s files (listed once per folder into
    ``by_nfc``).
    """
    path = folder / name
    if path.is_file():
        return path
    if name.isascii():  # one spelling only
        return None
    by_nfc = {} if by_nfc is None else by_nfc
    if folder not in by_nfc:
        try:
            by_nfc[folder] = {unicodedata.normalize("NFC", p.name): p for p in folder.iterdir() if p.is_file()}
        except OSError:  # no such folder: nothing is listed in it
            by_nfc[folder] = {}
    return by_nfc[folder].get(unicodedata.normalize("NFC", name))


def find_release_root(folder: Path, unzipped: bool = False) -> Path:
    """The folder holding ``gt_avg_train.csv``: ``folder`` itself or one level below (zip layout).

    Args:
        unzipped: ``folder`` is a zip's unzipped copy (bounded: searched to any depth for the message below).

    Raises:
        LayoutError: None there, or more than one; where the only one is deeper (``zip -r x.zip /home/ana/appa``
            stores ``home/ana/appa/...``), the message names where it is (in a folder: within 3 levels).
    """
    if (folder / csv_name("train")).exists():
        return folder
    candidates = sorted(p.parent for p in folder.glob(f"*/{csv_name('train')}"))
    if len(candidates) == 1:
        return candidates[0]
    if candidates:
        raise LayoutError(f"{folder} holds {len(candidates)} releases ({', '.join(c.name for c in candidates)}): "
                          "point fetch_data.source at the one to use")
    found = folder.rglob(csv_name("train")) if unzipped else (
        p for depth in ("*/*", "*/*/*") for p in folder.glob(f"{depth}/{csv_name('train')}"))
    deeper = [p.parent.relative_to(folder).as_posix() for p in found
              if not any(part == "__MACOSX" or part.startswith(".") for part in p.relative_to(folder).parts)]
    where = (f"; it is in {sorted(deeper)[0]}/: point fetch_data.source at that folder (for a zip: unzip it, or "
             "zip the release again from inside its folder)" if len(deeper) == 1 else "")
    if not unzipped and folder.name in SPLITS and (folder.parent / csv_name(folder.name)).is_file():
        # a split's photos given for the release (".../appa-real-release/train"): said only "no gt_avg_train.csv"
        where = f"; it is the photos' folder of the release at {folder.parent}: point fetch_data.source at that folder"
    raise LayoutError(f"no {csv_name('train')} found in {folder} or its immediate subfolders{where}")


def _copy_release(root: Path, splits: dict[str, list[Sample]], out: Path, link: bool = False) -> None:
    """Puts the release's CSVs, listed photos and their ``_face.jpg`` from ``root`` into ``out``.

    Args:
        link: ``root`` is a zip's unzipped copy, deleted afterwards: its files become the output's (hard links,
            :func:`_place`) instead of being copied: the release was written to disk twice, and the disk held it
            three times (zip, unzipped copy, output). A user's folder is always copied: the output must not share
            its files.
    """
    place = _place(link)
    # Extra label files beside the ground truth (e.g. gender/race annotations) travel along.
    for extra in root.glob("*.csv"):
        # ._labels.csv (macOS's resource fork of labels.csv) is not labels
        if extra.name not in {csv_name(s) for s in SPLITS} and not is_system_file(extra.name):
            place(extra, out / extra.name)
    by_nfc: dict[Path, dict[str, Path]] = {}
    for split, samples in splits.items():
        place(root / csv_name(split), out / csv_name(split))
        (out / split).mkdir()
        for s in samples:
            # Under the CSV's spelling of the name (see listed_file), which preprocess reads the rows by.
            place(listed_file(root / split, s.file_name, by_nfc), out / split / s.file_name)
            face = listed_file(root / split, s.file_name + FACE_SUFFIX, by_nfc)
            if face is not None:
                place(face, out / split / (s.file_name + FACE_SUFFIX))


def _place(link: bool) -> Callable[[Path, Path], None]:
    """A function putting a file at a new path: a hard link where ``link`` (the same bytes, not written again),
    else (and from the first link the file system refuses: no hard links there, a link limit) a copy."""
    linking = link

    def place(src: Path, dst: Path) -> None:
        nonlocal linking
        if dst.exists() and os.path.samefile(src, dst):  # a.jpg_face.jpg listed as a photo and as a.jpg's face
            return
        if linking:
            try:
                os.link(src, dst)
                return
            except OSError as e:
                if e.errno in NO_SPACE:  # a full disk: a copy would need more, not less
                    raise
                log.debug("cannot hard-link %s (%s): copying the release instead", src, errno_text(e))
                linking = False
        shutil.copyfile(src, dst)
    return place


# What zipfile extracts; others (Deflate64 from Windows Explorer, PPMd from 7-Zip) raise NotImplementedError.
EXTRACTABLE = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
UTF8_NAME_FLAG = 0x800  # general-purpose flag bit 11: the name is UTF-8
ENCRYPTED_FLAG = 0x1


def _safe_extract(zip_path: Path, dest: Path, code_page_names: list[str] | None = None) -> list[str]:
    """Extracts ``zip_path`` into ``dest``, refusing paths that would land outside it; returns the names of the
    symbolic links it skipped.

    A zip made with ``zip -y`` or macOS's Archive Utility holds a symbolic link as the path it points to:
    extracted, that text stood in for a photo (fetch_data passed, preprocess found it undecodable). Links
    are not extracted: one the CSVs list is missing, and the error says why (:func:`_materialise`).

    Zips written on Windows by PowerShell's ``Compress-Archive`` (.NET) separate folders with
    ``\\``; those names are read as folders here too. Info-ZIP's ``zip`` (Linux, macOS) stores UTF-8
    names without the flag that says so, which :mod:`zipfile` reads as cp437 (``José`` became
    ``Jos├⌐``): a name not flagged UTF-8 whose bytes are UTF-8 is read as UTF-8, as ``unzip`` does.

    Other names not flagged UTF-8 are read as cp437, right for Windows Explorer's zips in the US and
    Western Europe but not for a tool that wrote the ANSI code page (cp1252 ``José`` reads ``JosΘ``) or
    another country's: those names (as read) are added to ``code_page_names``, for the message when a
    photo the CSV lists is then missing.
    """
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            for member in members:
                name = _utf8_name(member).replace("\\", "/")
                if name.startswith("/") or ".." in PurePosixPath(name).parts:
                    raise LayoutError(f"{zip_path} holds an unsafe path: {member.filename!r}")
                if member.flag_bits & ENCRYPTED_FLAG:
                    raise LayoutError(f"{zip_path} is encrypted ({name} needs a password): unzip it with its "
                                      "password and point fetch_data.source at the folder")
                if member.compress_type not in EXTRACTABLE:
                    raise LayoutError(f"{zip_path} uses compression method {member.compress_type} for {name}, "
                                      "which Python cannot extract (Deflate64 or PPMd?): unzip it with another "
                                      "tool and point fetch_data.source at the folder")
                if code_page_names is not None and not name.isascii() and not member.flag_bits & UTF8_NAME_FLAG \
                        and name == member.filename.replace("\\", "/"):  # not UTF-8: read as cp437
                    code_page_names.append(name)
                member.filename = name
            _check_no_file_is_a_folder(zip_path, [m.filename for m in members])
            links = [m.filename for m in members if stat.S_ISLNK(m.external_attr >> 16)]
            for member in members:
                if member.filename not in links:
                    zf.extract(member, dest)
            return links
    except (zipfile.BadZipFile, zlib.error, EOFError) as e:  # zlib.error, EOFError: damaged compressed data
        raise LayoutError(f"{zip_path} is not a valid zip file: {e}") from e


def _check_no_file_is_a_folder(zip_path: Path, names: list[str]) -> None:
    """Refuses a zip in which one path is both a file and a folder (``test`` and ``test/a.jpg``).

    No file system holds both, and extracting one after the other failed with a bare
    ``NotADirectoryError`` or ``IsADirectoryError`` from :mod:`zipfile`, naming neither entry.

    Raises:
        LayoutError: Naming the path.
    """
    files = {name for name in names if not name.endswith("/")}
    for name in names:
        parts = PurePosixPath(name).parts
        for depth in range(1, len(parts) if not name.endswith("/") else len(parts) + 1):
            folder = "/".join(parts[:depth])
            if folder in files:
                raise LayoutError(f"{zip_path} holds {folder!r} both as a file and as a folder (of {name!r}): "
                                  "no file system can hold both; repack it without one of them")


def _utf8_name(member: zipfile.ZipInfo) -> str:
    """``member``'s name, read as UTF-8 where its bytes are UTF-8 though the zip does not flag them so."""
    if member.flag_bits & UTF8_NAME_FLAG:
        return member.filename
    try:
        return member.filename.encode("cp437").decode("utf-8")
    except (UnicodeEncodeError, UnicodeDecodeError):  # not UTF-8: cp437, as the zip format says
        return member.filename


def tree_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, symlinked folders followed: what a reader of its paths sees.

    ``Path.rglob`` does not enter a symlinked folder (Python < 3.13), so a set whose ``test/`` links
    to the user's photos had no image in its fingerprint. Each real folder is read once, by the first
    path that reaches it (folders in name order): a link back to a folder already read (a loop, or
    the folder itself) adds nothing, and a link to a folder above (``test -> ..``) reads it once.

    A ``folder`` that does not exist has no files.

    Raises:
        LayoutError: A folder under ``folder`` (or ``folder`` itself) cannot be listed (:func:`cannot_read`):
            skipped, its files were left out of the fingerprint, and changes to them never re-ran the pipeline.
    """
    def unreadable(e: OSError) -> None:
        if isinstance(e, FileNotFoundError) and os.fspath(e.filename or "") == os.fspath(folder):
            return  # no such folder: nothing in it, as before
        raise cannot_read(Path(e.filename or folder), e) from e

    files = []
    seen = {os.path.realpath(folder)}
    for dirpath, dirnames, filenames in os.walk(folder, onerror=unreadable, followlinks=True):
        dirnames.sort()  # which of two paths to one folder counts must not depend on the file system's order
        keep = []
        for d in dirnames:
            real = os.path.realpath(os.path.join(dirpath, d))
            if real not in seen:
                seen.add(real)
                keep.append(d)
        dirnames[:] = keep
        files += [Path(dirpath, f) for f in filenames if os.path.isfile(os.path.join(dirpath, f))]
    return sorted(files)


# Files the desktop writes into any folder it shows or copies: Finder's view settings (rewritten when the folder
# is merely opened), the AppleDouble ._NAME beside each file copied to a non-Mac disk, Explorer's thumbnail cache.
SYSTEM_FILES = frozenset({".DS_Store", "Thumbs.db", "ehthumbs.db", "desktop.ini", "Icon\r"})


def is_system_file(name: str) -> bool:
    """Whether ``name`` is a file macOS or Windows writes by itself (:data:`SYSTEM_FILES`, ``._NAME``), not data."""
    return name in SYSTEM_FILES or name.startswith("._")


def data_files(folder: Path) -> list[Path]:
    """:func:`tree_files` without :func:`is_system_file` ones: the files whose bytes are the data."""
    return [p for p in tree_files(folder) if not is_system_file(p.name)]


def dataset_fingerprint(folder: Path) -> str:
    """sha256 over every data file's relative path and sha256 (:func:`data_files`): one id for the data's exact bytes.

    Files the desktop writes (:func:`is_system_file`) are left out: opening a source folder in Finder rewrote its
    ``.DS_Store``, and with it the fingerprint, so ``dvc repro`` copied the release again and re-evaluated.
    """
    h = hashlib.sha256()
    for p in data_files(folder):
        if p.name != DATASET_JSON:
            # surrogateescape: a name that is not UTF-8 (a Windows zip's Latin-1 name) is hashed as its bytes on disk;
            # .encode() raised UnicodeEncodeError, a traceback from evaluate.external. A UTF-8 name hashes as before.
            h.update(f"{p.relative_to(folder).as_posix()}\0{readable_digest(p)}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()


def readable_digest(path: Path, algorithm: str = "sha256", where: str = "") -> str:
    """:func:`~faceage.download.file_digest` of a source's file (a photo, a zip, a weights file).

    Args:
        where: Put before the message (e.g. ``"train.pretrained='x.pth': "``).

    Raises:
        LayoutError: The file cannot be read (:func:`cannot_read`).
    """
    try:
        return file_digest(path, algorithm)
    except OSError as e:
        raise cannot_read(path, e, where) from e


def cannot_read(path: Path, e: OSError, where: str = "") -> LayoutError:
    """The one line for a source's file that cannot be read (copied from another account with mode 600), where
    check_sources and fetch_data stopped with a PermissionError's traceback or blamed something else."""
    how = ("a folder: make it and its files readable (chmod -R a+rX)" if os.path.isdir(path)  # never raises
           else "make it readable (chmod a+r)")
    return LayoutError(f"{where}cannot read {path}: {errno_text(e)}: {how}")


def _is_zip(path: Path) -> bool:
    """:func:`zipfile.is_zipfile`, which answers False for a file it cannot open: such a source was called
    "neither a folder nor a zip file".

    Raises:
        LayoutError: ``path`` cannot be read (:func:`cannot_read`).
    """
    try:
        with open(path, "rb"):
            pass
    except OSError as e:
        raise cannot_read(path, e) from e
    return zipfile.is_zipfile(path)


def is_url(source: str) -> bool:
    """Whether ``fetch_data.source`` is a URL (else a local zip or folder)."""
    return urlparse(source).scheme in ("http", "https")


def local_source(source: str) -> Path:
    """A local ``fetch_data.source``, resolved (relative: from the repo root, :func:`faceage.paths.from_root`;
    ``file:///abs/path`` is that path).

    Raises:
        SourceMissingError: Nothing is there.
        LayoutError: A URL of a scheme that is not fetched (``ftp://``, ``s3://``).
    """
    scheme = urlparse(source).scheme
    if scheme == "file":  # file:///abs/path (spaces as %20): the path it names
        local = Path(url2pathname(urlparse(source).path))
    elif scheme and "://" in source:  # ftp://, s3:// were "not found" under the repo root (C:\\data, a:b are paths)
        raise LayoutError(f"fetch_data.source {source!r}: {scheme!r} URLs are not fetched; use an http:// or https:// "
                          "URL, or download it and give the local .zip or folder")
    else:
        local = from_root(source)
    if not local.exists():
        raise SourceMissingError(f"fetch_data.source {source!r} does not exist (resolved to {local}; expected a URL, "
                          "a .zip or a folder; a relative path is taken from the repo root)")
    return local


def cached_download(url: str, md5: str, cache_dir: str | Path | None = None) -> Path:
    """Where the zip from ``url`` is kept in the download cache.

    With an md5 the file is known by its name (the md5 says whether a cached copy is the one
    wanted, whichever mirror it came from). Without one, the name carries a hash of the URL, so
    another URL whose file has the same name is not mistaken for it.
    """
    name = Path(urlparse(url).path).name or "appa-real-release.zip"
    if not md5:
        stem, dot, ext = name.rpartition(".")
        tag = hashlib.sha256(url.encode()).hexdigest()[:12]
        name = f"{stem}-{tag}.{ext}" if dot else f"{name}-{tag}"
    return Path(cache_dir or downloads_dir()) / name


def _not_a_zip(path: Path) -> str | None:
    """Why a downloaded file is not the release's zip (no md5 to say so), or None."""
    if zipfile.is_zipfile(path):
        return None
    with open(path, "rb") as f:
        head = f.read(60)
    return f"something that is not a zip file (it begins {head!r})"


def _materialise(source: str, local: Path, out_dir: Path) -> dict:
    """Validates the release in ``local`` (a folder or zip) and copies it into ``out_dir`` atomically.

    Raises:
        LayoutError: Not in the release layout.
        WriteError: An OSError while extracting or copying (:func:`_write_error`).
    """
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    doing, hidden = "copying", []  # what was being done when an OSError came; the hidden folders it wrote in
    try:
        with scratch_dir(out_dir, "zip") as unzipped, staged_dir(out_dir) as staged:
            hidden += [unzipped, staged]
            if local.is_dir():
                root = find_release_root(local)
                splits = validate_layout(root)
            elif _is_zip(local):
                doing = "extracting"
                code_page_names: list[str] = []
                links = _safe_extract(local, unzipped, code_page_names)
                doing = "copying"
                try:
                    root = find_release_root(unzipped, unzipped=True)
                    splits = validate_layout(root)
                except LayoutError as e:
                    # The unzipped copy is deleted on the way out: the message names the zip (and paths in it).
                    why = (f"\n{len(links)} entries of the zip are symbolic links, which a zip holds as the path they "
                           f"point to, not the file (e.g. {links[:SHOW_MISSING]}): zip the files themselves "
                           "(zip -r without -y) or point fetch_data.source at the folder" if links else "")
                    # A name read in the wrong code page is a listed photo missing, not a CSV or folder missing.
                    if code_page_names and isinstance(e, MissingPhotosError):
                        why += (f"\n{len(code_page_names)} names in the zip are not UTF-8 and were read as cp437, the "
                                f"zip format's default (e.g. {code_page_names[:SHOW_MISSING]}): a zip made on Windows "
                                "may hold names in another code page (cp1252 'José' reads 'JosΘ'); unzip it with a "
                                "tool that knows which (7-Zip, or unzip -O cp1252) and point fetch_data.source at the "
                                "folder")
                    raise type(e)(str(e).replace(str(unzipped), str(local)) + why) from e
            else:
                raise LayoutError(f"fetch_data.source {source!r} is neither a folder nor a zip file")
            warn_unlisted(root, splits, shown=str(root).replace(str(unzipped), str(local)))
            _copy_release(root, splits, staged, link=not local.is_dir())  # a zip: its unzipped copy's own files
            info = {
                "source": source,
                "counts": {split: len(samples) for split, samples in splits.items()},
                "release_face_crops": sum(
                    1 for split, samples in splits.items() for s in samples
                    if (staged / split / (s.file_name + FACE_SUFFIX)).is_file()
                ),
                "sha256": dataset_fingerprint(staged),
            }
            (staged / DATASET_JSON).write_text(json.dumps(info, indent=2) + "\n")
    except OSError as e:
        if isinstance(e, FaceAgeError):
            raise
        # Raised after scratch_dir and staged_dir removed what was written: the free space read is what a rerun has.
        raise _write_error(e, doing, hidden, local, out_dir) from e
    return info


def _write_error(e: OSError, doing: str, hidden: list[Path], local: Path, out_dir: Path) -> WriteError:
    """One line for an OSError met while ``doing`` (extracting or copying) ``local`` for ``out_dir``.

    A full disk also gets the space the fetch needs: the release unpacked once (from a zip too: the output takes
    the unzipped copy's files, :func:`_copy_release`) against what is free.
    """
    where = f"extracting {local} for {out_dir}" if doing == "extracting" else f"copying {local} into {out_dir}"
    message = f"{where} failed: {errno_text(e)}{place_in(e.filename, hidden)}"
    if e.errno in NO_SPACE:
        try:
            if local.is_dir():
                need = sum(p.stat().st_size for p in tree_files(local))
            else:
                with zipfile.ZipFile(local) as zf:
                    need = sum(m.file_size for m in zf.infolist())
        except (OSError, LayoutError, zipfile.BadZipFile):  # the estimate is a courtesy: the error stands without it
            need = None
        free = free_bytes(out_dir.parent)
        if need is not None and free is not None:
            message += (f"; it needs about {megabytes(need)} free in {out_dir.parent}, {megabytes(free)} is free: "
                        "free some space there and rerun")
        else:
            message += f"; free some space in {out_dir.parent}"
    return WriteError(message)


# The way round a download that failed, at the end of its message.
LOCAL_COPY = ("point fetch_data.source at a local copy of the release (its .zip or the unzipped folder): dvc exp run -S "
              "fetch_data.source=/abs/path/appa-real-release.zip")


def fetch_appa_real(source: str, out_dir: str | Path, *, md5: str = "", mirrors: tuple[str, ...] | list[str] = (),
                    cache_dir: str | Path | None = None) -> dict:
    """Materialises APPA-REAL from ``source`` into ``out_dir``, validated, atomically.

    Args:
        source: The release zip's URL, a local ``.zip`` path, or a local folder (relative: from the repo
            root, :func:`faceage.paths.from_root`; a ``file://`` URL names a local one).
        out_dir: Destination folder; it is replaced only after validation succeeds.
        md5: Expected md5 of a downloaded or local zip ("" skips the check).
        mirrors: Other URLs of the zip, tried in order when a URL ``source`` fails.
        cache_dir: Where downloads are kept (partial ones are resumed from there); default
            :func:`faceage.paths.downloads_dir`.

    Returns:
        The contents of ``dataset.json``: source, per-split counts, ``sha256`` fingerprint.

    Raises:
        LayoutError: The source is missing, not a zip/folder, or not in the release layout.
        faceage.download.DownloadError: The download failed or its checksum differs.
    """
    out_dir = Path(out_dir)
    if is_url(source):
        where = "fetch_data.source and fetch_data.mirrors" if mirrors else "fetch_data.source"
        try:
            # Without a checksum, an error page sent with 200 OK is refused as a wrong checksum would be:
            # deleted (nothing else would ever evict it), and the next URL asked.
            local = download(source, cached_download(source, md5, cache_dir), md5=md5 or None, mirrors=mirrors,
                             check=None if md5 else _not_a_zip)
        except ChecksumError as e:  # e.g. a zip of the user's own, checked against the release's md5 left in params
            raise ChecksumError(f"{e} (fetch_data.md5={md5}: for a zip other than the release's, set it to that "
                                "zip's md5, or skip the check: -S fetch_data.md5=)") from e
        except ContentError as e:
            raise LayoutError(f"{e} (set fetch_data.md5 to pin the bytes)") from e
        except HTTPStatusError as e:  # every server was reached: "without a connection" misled
            raise HTTPStatusError(f"{e}\nThe server was reached but did not send the file: check the URL in "
                                  f"{where}, or {LOCAL_COPY}") from e
        except UnreachableError as e:  # no URL was reached
            raise UnreachableError(f"{e}\nWithout a connection to the release's hosts, {LOCAL_COPY}") from e
        except DownloadError as e:  # a server answered (busy, a redirect loop), or some did and others were not reached
            answered = ("Check fetch_data.source and fetch_data.mirrors against what each URL answered above (and the "
                        "connection to any that was not reached)" if mirrors
                        else "Check fetch_data.source against the failure above")
            raise DownloadError(f"{e}\n{answered}, or {LOCAL_COPY}") from e
    else:
        local = local_source(source)
        if local.is_file() and md5:
            got = readable_digest(local, "md5")
            if got != md5.lower():
                raise ChecksumError(f"md5 of {local} is {got}, expected fetch_data.md5={md5} (the release's zip); "
                                    "for a zip made otherwise, skip the check: -S fetch_data.md5=")
    try:
        info = _materialise(source, local, out_dir)
    except LayoutError as e:
        if not (is_url(source) and not md5):
            raise
        # Without fetch_data.md5 nothing says which bytes are right, and the cached copy would be used
        # again on every run: a zip damaged in transit (or resumed across a change on the server) failed
        # forever, with nothing saying where it was kept.
        local.unlink(missing_ok=True)
        raise LayoutError(f"{e}\nThe copy downloaded from {source} was deleted, and the next run fetches it "
                          "again (set fetch_data.md5 to pin the bytes)") from e
    log.info("APPA-REAL ready in %s: %s (sha256 %s)", out_dir, info["counts"], info["sha256"][:12])
    return info


def read_demographics(folder: str | Path, split: str | None = None) -> dict[str, dict[str, str]]:
    """Gender/race labels from extra CSVs of the release folder, when it has any.

    A column counts when its name contains ``gender`` or ``race``; codes are decoded with a
    legend in the header such as ``utk_gender(0=male,1=female)``. A file name names a photo of one
    split (APPA-REAL numbers each split's files anew), so with ``split`` the rows of a file that has a
    ``split`` column are read for that split only (a row with an empty one counts for every split):
    keyed by name alone, a test face took the labels of the train face of the same name. So is a file whose
    name names one split (APPA-REAL's annotations come as ``allcategories_train.csv``, ``..._valid``, ``..._test``).
    Columns about the raters (the release's per-rating ``gt_<split>.csv`` has ``worker_gender``) are not
    labels of the face.

    Returns:
        ``{file_name: {"gender": "female", "race": "Asian"}}`` (empty when no labels exist).
    """
    out: dict[str, dict[str, str]] = {}
    for path in sorted(Path(folder).glob("*.csv")):
        if path.name.startswith("gt_avg_"):
            continue
        named = _named_split(path)
        if split is not None and named is not None and named != split:
            continue
        try:
            labels_of = _read_labels(path, split)
        except LayoutError as e:  # e.g. macOS's "._labels.csv" beside a copied folder: not labels
            log.warning("%s; its gender/race labels (if any) are not read", e)
            continue
        for name, labels in labels_of.items():  # gender in one file, race in another: both
            out.setdefault(name, {}).update(labels)
    return out


def _read_labels(path: Path, split: str | None = None) -> dict[str, dict[str, str]]:
    """One labels file's ``{file_name: {"gender": ..., "race": ...}}``, of ``split`` where it has a ``split``
    column (see :func:`read_demographics`).

    Raises:
        LayoutError: The file is not UTF-8 or not readable as CSV.
    """
    out: dict[str, dict[str, str]] = {}
    reader = _dict_reader(path, lambda header: 100 * any(c in ("file_name", "file") for c in header)
                          + sum(a in c.lower() for c in header for a in ("gender", "race")))
    header = _fieldnames(reader, path)
    key = next((c for c in ("file_name", "file") if c in header), None)
    # worker_gender (gt_test.csv: one row per rating) is the rater's: read as the face's, every test face of the
    # release took its last rater's gender, and evaluate's per-gender MAE was per rater gender
    columns = {c: a for c in header for a in ("gender", "race")
               if a in c.lower() and not any(who in c.lower() for who in RATER_WORDS)}
    if key is None or not columns:
        return out
    legends = {c: _legend(c) for c in columns}
    for row in _csv_rows(reader, path):
        if split is not None and "split" in header and (row["split"] or "").strip() not in ("", split):
            continue
        labels = out.setdefault(row[key], {})
        for column, attribute in columns.items():
            # A short row (no value at all) or an empty cell: no label, the face counts as "unknown".
            value = (row[column] or "").strip()
            if value:
                labels[attribute] = legends[column].get(value, value)
    return out


# Words that make a gender/race column describe who rated the face, not the face
RATER_WORDS = ("worker", "rater", "annotator", "labeler", "labeller")


def _named_split(path: Path) -> str | None:
    """The split a labels file's name names as a word of its own (``allcategories_test.csv``: test), or None
    (none, or more than one: ``allcategories_trainvalidtest.csv``, ``train_and_test.csv``)."""
    named = {w for w in re.split(r"[^a-z0-9]+", path.stem.lower()) if w in SPLITS}
    return named.pop() if len(named) == 1 else None


def _legend(column: str) -> dict[str, str]:
    """``"race(0=White,1=Black)"`` -> ``{"0": "White", "1": "Black"}``."""
    if "(" not in column or "=" not in column or ")" not in column[column.index("("):]:
        return {}
    inner = column[column.index("(") + 1 : column.rindex(")")]
    return dict(part.split("=", 1) for part in inner.split(",") if "=" in part)


def read_dataset_info(folder: str | Path) -> dict:
    """Reads ``dataset.json`` written by :func:`fetch_appa_real`."""
    return json.loads((Path(folder) / DATASET_JSON).read_text())
