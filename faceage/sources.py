"""The data the pipeline reads from outside the repo, and a fingerprint of each for DVC.

DVC decides what to rerun from params and from files inside the repo. A local
``fetch_data.source`` (folder or zip) and the ``evaluate.external`` folders live outside it, so
an edited label or an added image there left ``dvc repro`` skipping ``fetch_data`` and
``evaluate`` and reporting stale results. The ``check_sources`` stage (``always_changed``) writes
a fingerprint of each on every run: the sha256 over every file's path and bytes
(:func:`faceage.appa_real.dataset_fingerprint`; a ``.DS_Store`` and the like, which the desktop
rewrites, left out), or of the zip. ``fetch_data`` depends on ``data/source.json`` and ``evaluate``
on ``data/external.json``: they rerun exactly when the bytes they read changed, and an unchanged
source reruns nothing else. A URL is pinned by ``fetch_data.md5`` (the download is checked against
it), so its fingerprint is the URL and the md5: no network access.

A ``train.pretrained`` weights file is fingerprinted the same way for ``train``
(``data/pretrained.json``).

A source that is not on this machine (a teammate who ``dvc pull``-ed the outputs, not the raw
data) keeps the fingerprint recorded for the same params, with a warning; with none recorded,
it fails with the message that names it. Relative local paths are taken from the repo root
(:func:`faceage.paths.from_root`), also inside ``dvc exp run --temp``/``--queue`` copies.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import unicodedata
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from faceage.appa_real import (LayoutError, SourceMissingError, check_listed, csv_name, data_files, dataset_fingerprint,
                               find_release_root, is_url, local_source, read_split, readable_digest, warn_unlisted)
from faceage.atomic import write_text
from faceage.paths import from_root

log = logging.getLogger(__name__)

EXTERNAL_SPLIT = "test"
SOURCE_FILE = "data/source.json"      # fetch_data's dependency
EXTERNAL_FILE = "data/external.json"  # evaluate's dependency
PRETRAINED_FILE = "data/pretrained.json"  # train's dependency
NAMED_WEIGHTS = ("imagenet", "none")  # train.pretrained values that are not files
NAME_MAX = 200  # characters of a set name: its longest metric key (external_<name>_mae_low_res_...) stays under 250
# Backbones whose weights come from the fetch_detector stage, never from a train.pretrained file
# (faceage.chips.DLIB_AGE, faceage.face_encoder.FACE_ENCODER; not imported: they pull in dlib).
DLIB_BACKBONES = ("dlib_age", "dlib_face")


class ExternalSetError(LayoutError):
    """An ``evaluate.external`` entry is missing or not in the release layout; the message names it."""


class ExternalSetMissingError(ExternalSetError, SourceMissingError):
    """Nothing is at an ``evaluate.external`` entry's path on this machine."""


class PretrainedMissingError(SourceMissingError):
    """Nothing is at the ``train.pretrained`` path on this machine."""


@dataclass(frozen=True)
class ExternalSet:
    """One cross-dataset test set: its metric name, the folder given and where it resolved."""

    name: str
    given: str
    path: Path


def external_name(path: str) -> str:
    """The metric-safe name of a set: its folder name, lower-case ASCII, other characters as ``_``
    (``utk-external`` -> ``utk_external``, ``visages-été`` -> ``visages_ete``).

    Letters with no Latin spelling (``photos-日本``, ``лица``) add a short hash of the folder name, so that
    two such sets keep apart (they were both ``photos``, or refused); so does a name longer than
    :data:`NAME_MAX`, as MLflow takes metric keys of at most 250 characters.
    """
    folder = Path(path.rstrip("/\\")).name
    letters = "".join(c for c in unicodedata.normalize("NFKD", folder) if not unicodedata.combining(c))
    # What has no ASCII spelling is a separator, as ASCII punctuation is ("utk–external": utkexternal)
    latin = "".join(c if c.isascii() else "_" for c in letters)
    name = re.sub(r"[^0-9A-Za-z]+", "_", latin).strip("_").lower()
    if folder and (latin != letters or len(name) > NAME_MAX):
        tag = hashlib.sha256(folder.encode("utf-8", "surrogateescape")).hexdigest()[:8]
        name = f"{name[:NAME_MAX - len(tag) - 1].rstrip('_') or 'set'}_{tag}"
    if not name:
        raise ExternalSetError(f"evaluate.external: cannot name a set after {path!r}")
    return name


def resolve_external(paths: tuple[str, ...] | list[str], root: str | Path | None = None) -> list[ExternalSet]:
    """Resolves ``evaluate.external`` entries (relative ones from the repo root) and checks their layout.

    Args:
        paths: The ``evaluate.external`` entries.
        root: Where relative entries start (default: :func:`faceage.paths.repo_root`).

    Returns:
        One :class:`ExternalSet` per entry, in order.

    Raises:
        ExternalSetError: A folder is missing, lacks ``gt_avg_test.csv`` or a listed image,
            or two entries have the same name.
    """
    sets = []
    for given in paths:
        path = from_root(given, root).resolve()
        if not path.is_dir():
            # A file there (a zip, as fetch_data.source takes) is not "not found": say what it is.
            found = "is a file, not a folder" if path.exists() else "not found"
            raise (ExternalSetError if path.exists() else ExternalSetMissingError)(
                f"evaluate.external: {given!r} {found} (resolved to {path}); it must be a folder with "
                "gt_avg_test.csv and test/ (set evaluate.external=[] to skip cross-dataset evaluation)")
        try:
            samples = read_split(path, EXTERNAL_SPLIT)
        except LayoutError as e:
            # A zip unzipped with its own top folder: the set is one level down (fetch_data looks there itself).
            below = [] if (path / csv_name(EXTERNAL_SPLIT)).is_file() else sorted(
                p.parent for p in path.glob(f"*/{csv_name(EXTERNAL_SPLIT)}"))
            hint = f": the set seems to be one folder down, at {below[0]}: give that path" if len(below) == 1 else ""
            if path.name == EXTERNAL_SPLIT and (path.parent / csv_name(EXTERNAL_SPLIT)).is_file():
                # the photos' folder given for the set (".../utk-external/test/"): "missing" read as no set at all
                hint = f": it is the photos' folder of the set at {path.parent}: give that path"
            raise ExternalSetError(f"evaluate.external: {given!r}: {e}{hint}") from e
        where = f"evaluate.external: {given!r}: "
        try:  # names a Mac spelled apart match (appa_real.listed_file)
            check_listed(path, EXTERNAL_SPLIT, samples, where=where)
        except LayoutError as e:
            raise ExternalSetError(str(e)) from e
        warn_unlisted(path, {EXTERNAL_SPLIT: samples}, where=where)
        sets.append(ExternalSet(external_name(given), given, path))
    seen: dict[str, ExternalSet] = {}
    for s in sets:  # the entries that clash, by their spelling in params: a list of names did not say which
        first = seen.setdefault(s.name, s)
        if first is s:
            continue
        if first.path == s.path:  # resolved: a relative and an absolute spelling, a trailing /, a symlink
            raise ExternalSetError(f"evaluate.external lists the folder {s.path} twice ({first.given!r} and "
                                   f"{s.given!r}): remove one")
        raise ExternalSetError(f"evaluate.external: two sets share a name: {first.given!r} and {s.given!r} are both "
                               f"{s.name!r} (the folder's name, lower-cased, names its MLflow metrics): rename one "
                               "folder, or link to it under another name")
    names = [s.name for s in sets]
    clash = sorted(n for n in names if n.endswith("_baseline") and n[:-len("_baseline")] in names)
    if clash:  # set X's external_X_baseline_mae is set X_baseline's MAE in MLflow, which the champion guard reads
        raise ExternalSetError(f"evaluate.external: sets {clash[0][:-len('_baseline')]!r} and {clash[0]!r} would log "
                               f"the same MLflow metric (external_{clash[0]}_mae is also the first one's baseline "
                               "MAE): rename one folder")
    return sets


def source_fingerprint(source: str, md5: str = "") -> dict[str, Any]:
    """What ``fetch_data`` would read from ``fetch_data.source``, as a small JSON-able record.

    A URL: the URL and ``md5`` (its download is checked against it; nothing is fetched here). A
    local folder: the file count and :func:`faceage.appa_real.dataset_fingerprint` of the release in it (the
    folder itself, or the one below it that holds the release, as fetch_data reads it). A local file
    (zip): its size and sha256. The record holds no absolute path or time stamp, so the same bytes
    give the same record on every machine.

    Raises:
        LayoutError: A local source does not exist (the message names it and where it resolved).
    """
    record: dict[str, Any] = {"source": source, "md5": md5}
    if is_url(source):
        return {**record, "kind": "url"}
    local = local_source(source)
    if local.is_dir():
        # The folder fetch_data reads (the release one level down, :func:`find_release_root`): the whole of a
        # ~/Downloads holding appa-real-release/ was hashed on every run, its zip too, and any new file in it
        # reran fetch_data. A folder that is not in the layout is hashed whole: fetch_data says what is wrong.
        try:
            local = find_release_root(local)
        except LayoutError:
            pass
        files = len(data_files(local))  # as the fingerprint counts them: a new .DS_Store is no new data
        return {**record, "kind": "folder", "files": files, "sha256": dataset_fingerprint(local)}
    return {**record, "kind": "file", "bytes": local.stat().st_size, "sha256": readable_digest(local)}


def external_fingerprint(paths: tuple[str, ...] | list[str]) -> dict[str, Any]:
    """The ``evaluate.external`` sets' record: each set's name, folder as given and bytes' fingerprint.

    Raises:
        ExternalSetError: A set is missing or not in the release layout (:func:`resolve_external`).
        LayoutError: A file or folder of a set cannot be read (:func:`faceage.appa_real.dataset_fingerprint`;
            one line naming it, as :class:`ExternalSetError` is).
    """
    sets = [{"name": s.name, "source": s.given, "sha256": dataset_fingerprint(s.path)}
            for s in resolve_external(paths)]
    return {"sources": list(paths), "sets": sets}


def weights_file(pretrained: str, backbone: str = "") -> Path | None:
    """The file ``train.pretrained`` names (a relative path is the repo root's), or None where it names
    none: ``imagenet`` and ``none``, and any value for dlib's networks (their files are fetch_detector's)."""
    if pretrained in NAMED_WEIGHTS or backbone in DLIB_BACKBONES:
        return None
    return from_root(pretrained)


def pretrained_fingerprint(pretrained: str, backbone: str = "") -> dict[str, Any]:
    """``train.pretrained``'s record: a weights file's size and sha256, so that new weights at the same
    path retrain (DVC saw only the path: the model trained on the old weights stayed). ``imagenet`` and
    ``none`` are names, recorded as they are (torchvision's file for a backbone is fixed by its release);
    so is any value for dlib's networks, which read no file of it (``dlib_age``: anything but ``none``
    is dlib's weights).

    Raises:
        PretrainedMissingError: No file at the path (a relative one is taken from the repo root).
        LayoutError: The file cannot be read (one line naming the param and the file).
    """
    record: dict[str, Any] = {"pretrained": pretrained}
    path = weights_file(pretrained, backbone)
    if path is None:
        return {**record, "kind": pretrained if pretrained in NAMED_WEIGHTS else "dlib"}
    if not path.is_file():
        raise PretrainedMissingError(f"train.pretrained={pretrained!r}: no such weights file (resolved to {path}); "
                                     f"use {' or '.join(map(repr, NAMED_WEIGHTS))} or a path to a .pth file")
    digest = readable_digest(path, where=f"train.pretrained={pretrained!r}: ")
    return {**record, "kind": "file", "bytes": path.stat().st_size, "sha256": digest}


def refresh(path: str | Path, fingerprint: Callable[[], dict[str, Any]], given: dict[str, Any]) -> dict[str, Any]:
    """Writes ``fingerprint()`` to ``path`` (the same bytes when nothing changed, so DVC reruns nothing).

    Args:
        path: The record file (a ``persist`` output of ``check_sources``).
        fingerprint: Computes the record; it raises :class:`~faceage.appa_real.SourceMissingError`
            when the data are not here, and :class:`LayoutError` when they are here but not valid.
        given: The params the record is for (keys of the record): where the data are missing, a
            recorded fingerprint with these values is kept, with a warning.

    Returns:
        The record now in ``path``.

    Raises:
        LayoutError: The data are here but not valid (an edit broke them: the old record must not
            stand for them), or not here and no fingerprint is recorded for these params.
    """
    path = Path(path)
    try:
        record = fingerprint()
    except SourceMissingError as e:
        previous = _read_record(path)
        if previous and all(previous.get(k) == v for k, v in given.items()):
            log.warning("%s; keeping the fingerprint recorded in %s (the outputs that depend on it come from "
                        "the DVC cache, and the stages that read the data cannot rerun on this machine)", e, path)
            return previous
        raise
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(record, indent=2, sort_keys=True) + "\n"
    if not path.is_file() or path.read_text() != text:
        write_text(path, text)  # atomic: a write cut short left a record no later run could read
    return record


def _read_record(path: Path) -> dict:
    """The fingerprint recorded in ``path``; ``{}`` when there is none or it cannot be read as one."""
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return record if isinstance(record, dict) else {}

