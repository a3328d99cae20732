"""Age prediction on whole photos: detect -> crop -> one batched forward pass over every face.

Input: a checkpoint (``train`` output) and a detector folder (``fetch_detector`` output), or
a packaged model folder holding both (``model.pt`` + ``detector/``, see
:mod:`faceage.packaging`); then RGB uint8 images from :func:`faceage.images.load_image`,
or encoded image bytes.
Output: for each image, a list of :class:`FaceAge` (box, age and its std in years, detector
score), largest face first, ties to the most central (:func:`faceage.faces.subject_order`: the first face is the one
``preprocess`` and ``evaluate`` score); ``[]`` when there is no face.

The CLI, the BentoML service and the benchmark all build this one :class:`AgePredictor`.
Every setting comes from the checkpoint (detector kind and upsample count, crop margin and
size, network input size, mean/std), never from ``params.yaml``, and the steps are the
pipeline's own: :meth:`faceage.faces.FaceDetector.detect`, :func:`faceage.faces.margin_region`
resized to the crop ``preprocess`` writes (and, for ``dlib_age``, the aligned chip cut from the
same region, as ``preprocess`` cuts it), then :class:`faceage.inference.AgeModel` (the model
``evaluate`` scores).

The age model runs in torch (:class:`faceage.inference.AgeModel`, ``runtime="torch"``: the CLI,
``evaluate``) or as the ONNX graph exported at packaging time (:class:`faceage.onnx_model.OnnxAgeModel`,
``runtime="onnx"``: the service, which imports no torch); both prepare inputs with
:mod:`faceage.inputs` and compute the same :class:`faceage.inference.AgeGraph`.

A predictor is not thread-safe: dlib's detector releases the GIL and keeps scratch state, so
two threads detecting with one detector corrupt memory. Use one per thread, or a lock. Server
concurrency (detection worker processes, cross-request batching) lives in :mod:`faceage.serving`.
"""

from __future__ import annotations

import importlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from faceage.cores import usable_cores
from faceage.detector import MANIFEST, read_manifest
from faceage.download import file_digest
from faceage.errors import FaceAgeError
from faceage.faces import (MAX_DETECT_PIXELS, FaceBox, FaceDetector, crop_cnn_retry_side, crop_detector_files,
                           crop_retry_pad, margin_region, resize_region)
from faceage.images import DEFAULT_MAX_PIXELS
from faceage.inputs import CHIP_KINDS, DLIB_CHIP_PAIR, CheckpointSettingsError, input_kind

# torch (via faceage.inference) is imported only where a torch model is built: the service and
# its detection worker processes import this module and never need it.

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"  # names inside a packaged model folder (see faceage.packaging)
ONNX_FILE = "model.onnx"
DETECTOR_DIR = "detector"
# The age model's runtime module, imported by name when a predictor is built, so that importing
# this module never imports torch: "torch" for the CLI and evaluate, "onnx" for the service. Each
# module has ``load_age_model(path, detector_dir, *, device, threads)``.
RUNTIMES = {"torch": "faceage.inference", "onnx": "faceage.onnx_model"}
# Larger photos are downscaled for detection only; crops still come from the full image. The
# default is preprocess's (faceage.faces.MAX_DETECT_PIXELS): another value serves other boxes on
# photos over it than the ones training and evaluate cut.
DEFAULT_MAX_DETECT_PIXELS = MAX_DETECT_PIXELS
# Ages in JSON (the CLI's, the service's): the float32 digits past this change with the other faces that share a
# forward pass (the CLI's other photos, the service's other requests), so the same photo would answer differently.
# Rounding hides most of that, not all: a value within ~2e-6 of a rounding boundary can still flip its last digit.
AGE_DECIMALS = 4
# The ``meta["crop"]`` keys a predictor reads (FaceLocator, check_detector_file); older optional ones
# (``retry_pad``, ``cnn_retry_side``) have defaults (faceage.faces.crop_retry_pad, crop_cnn_retry_side).
CROP_SETTINGS = ("detector", "upsample", "margin", "size", "detector_file", "detector_sha256")


class PredictorError(FaceAgeError, RuntimeError):
    """The checkpoint and detector files are missing or do not belong together."""


@dataclass(frozen=True)
class FaceAge:
    """One face: pixel box ``[x1, y1, x2, y2)``, predicted age and its std (years), detector score."""

    box: tuple[int, int, int, int]
    age: float
    age_std: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"box": [x1, y1, x2, y2], "age", "age_std", "score"}``, the ages rounded to
        :data:`AGE_DECIMALS` (the CLI's JSON, the service's answers). A value that is not finite (a broken
        model's NaN) is ``None``: ``json`` wrote it as the bare word ``NaN``, which strict JSON readers refuse."""
        return {"box": list(self.box), "age": _json_number(self.age, AGE_DECIMALS),
                "age_std": _json_number(self.age_std, AGE_DECIMALS), "score": _json_number(self.score)}


def _json_number(value: float, decimals: int | None = None) -> float | None:
    """``value`` rounded to ``decimals`` (``None``: as it is), or ``None`` when it is not finite (JSON has no NaN)."""
    if not math.isfinite(value):
        return None
    return value if decimals is None else round(value, decimals)


@dataclass(frozen=True)
class LocatedFaces:
    """The faces of one image before the age model: boxes (largest first, ties to the most central) and
    their crops.

    ``crops[i]`` is the uint8 (size, size, 3) margin crop around ``boxes[i]``, exactly what
    ``preprocess`` writes for a training image (``None`` when they were not asked for and the age
    model reads chips); ``chips[i]`` (locators built with ``chip_dir``) its aligned chip, exactly
    what ``preprocess`` writes to ``chips.npz``.
    """

    width: int
    height: int
    boxes: list[FaceBox]
    crops: list[np.ndarray] | None
    chips: list[np.ndarray] | None = None

    @property
    def inputs(self) -> list[np.ndarray]:
        """What the age model reads per face: the chips when they were cut, else the crops."""
        if self.chips is not None:
            return self.chips
        assert self.crops is not None, "a locator without chips always cuts the crops"
        return self.crops


def available_cores() -> int:
    """CPU cores this process may run on: its affinity (container CPU sets), capped by a container's
    CPU quota (:func:`faceage.cores.usable_cores`)."""
    return usable_cores()


def default_torch_threads() -> int:
    """Half the cores, at least one: the age model's share of the work.

    A photo holds a few faces at a few hundred pixels, so intra-op threads gain little, while
    threads beyond the free cores make OpenMP spin: on 2 busy cores, 2 threads took 400-1200 ms
    per photo where 1 thread took 30-90 ms (measured). Detection needs the other cores.
    """
    return max(1, available_cores() // 2)


def default_threads(runtime: str) -> int:
    """Intra-op threads of the age model when none are asked for: every core for ONNX Runtime,
    :func:`default_torch_threads` for torch.

    ONNX Runtime's threads here do not spin (:func:`faceage.onnx_model.cpu_session`). With 2
    threads, one face of the fused ``dlib_age`` graph took 20 ms against 32 ms with one on 2 idle
    cores, and 32 against 40 ms while two processes kept both cores busy with HOG detection
    (round 12, median of 20-40 runs).
    """
    return available_cores() if runtime == "onnx" else default_torch_threads()


class FaceLocator:
    """Detection and crop with a checkpoint's settings: image -> :class:`LocatedFaces`.

    Args:
        detector_dir: Folder holding the dlib detector file.
        kind: ``"hog"`` or ``"cnn"`` (the checkpoint's ``crop.detector``).
        upsample: Upsampling passes before detection (``crop.upsample``).
        retry_pad: Border for the second look when no face is found (``crop.retry_pad``; see
            :class:`faceage.faces.FaceDetector`).
        cnn_retry_side: Side of the CNN detector's last look (``crop.cnn_retry_side``; 0: none).
        margin: Context per side, a fraction of the box (``crop.margin``).
        crop_size: Side of the crop in pixels (``crop.size``).
        max_detect_pixels: Larger images are downscaled for detection only; 0 disables.
        max_pixels: Encoded images with more pixels are refused (decompression bombs).
        chip_dir: A folder with the 5-point shape predictor: also cut each face's ``dlib_age``
            chip (:mod:`faceage.chips`) from its margin region; ``None``: crops only.
        pairs: Cut chip pairs (age chip + face-recognition chip, :meth:`faceage.chips.ChipExtractor.pair`)
            instead of age chips (``chip_dir`` needed).
    """

    def __init__(self, detector_dir: str | Path, *, kind: str, upsample: int, margin: float, crop_size: int,
                 retry_pad: float = 0.0, cnn_retry_side: int = 0, max_detect_pixels: int = DEFAULT_MAX_DETECT_PIXELS,
                 max_pixels: int = DEFAULT_MAX_PIXELS, chip_dir: str | Path | None = None, pairs: bool = False):
        if max_detect_pixels < 0 or max_pixels < 1:
            raise ValueError(f"max_detect_pixels must be >= 0 and max_pixels >= 1, "
                             f"got {max_detect_pixels} and {max_pixels}")
        self.detector = FaceDetector(detector_dir, kind, upsample, retry_pad, cnn_retry_side, max_detect_pixels)
        self.margin = float(margin)
        self.crop_size = int(crop_size)
        self.max_detect_pixels = int(max_detect_pixels)
        self.max_pixels = int(max_pixels)
        self.chipper = None
        if pairs and chip_dir is None:
            raise ValueError("pairs=True cuts chips: it needs chip_dir (the folder with the shape predictor)")
        if chip_dir is not None:
            from faceage.chips import ChipExtractor

            chipper = ChipExtractor(chip_dir, self.margin)
            self.chipper = chipper.pair if pairs else chipper.chip
        self._settings = {"detector_dir": str(detector_dir), "kind": kind, "upsample": int(upsample),
                          "retry_pad": float(retry_pad), "cnn_retry_side": int(cnn_retry_side),
                          "margin": self.margin, "crop_size": self.crop_size,
                          "max_detect_pixels": self.max_detect_pixels, "max_pixels": self.max_pixels,
                          "chip_dir": None if chip_dir is None else str(chip_dir), "pairs": bool(pairs)}

    def settings(self) -> dict[str, Any]:
        """Keyword arguments that rebuild this locator (in another process)."""
        return dict(self._settings)

    def detect(self, image: np.ndarray, *, parallel: bool = False) -> list[FaceBox]:
        """Face boxes in full-image pixels in :func:`~faceage.faces.subject_order` (largest first, ties to the most
        central: the first is the face ``preprocess`` and ``evaluate`` score), by :class:`FaceDetector` as
        ``preprocess`` detects them (a photo over ``max_detect_pixels`` downscaled); ``parallel``: see :meth:`locate`."""
        return self.detector.detect(image, parallel=parallel)

    def locate(self, image: np.ndarray, *, crops: bool = True, parallel: bool = False) -> LocatedFaces:
        """Detects every face of an RGB uint8 image and cuts its crop (and chip), as ``preprocess`` does.

        ``crops=False`` skips the margin crops when the age model reads chips (they are cut
        regardless for a model that reads crops): ``LocatedFaces.crops`` is then ``None``. That
        saves ~1.5 ms a face (a 224 px resize) and their transfer from a detection worker.
        ``parallel=True`` detects on two threads (:meth:`faceage.faces.FaceDetector.detect`): the
        same faces, sooner when a second core is free.
        """
        boxes = self.detect(image, parallel=parallel)
        regions = [margin_region(image, b, self.margin) for b in boxes]
        chips = None if self.chipper is None else [self.chipper(r) for r in regions]
        cut = [resize_region(r, self.crop_size) for r in regions] if crops or chips is None else None
        return LocatedFaces(width=int(image.shape[1]), height=int(image.shape[0]), boxes=boxes, crops=cut,
                            chips=chips)



class AgePredictor:
    """Predicts the age of every face in a photo with a trained checkpoint.

    Detection and crop use the checkpoint's settings (:class:`FaceLocator`); ages come from
    :class:`faceage.inference.AgeModel`, the model ``evaluate`` scores (same input
    preparation, same calibrated temperature), for image and face-descriptor backbones alike.
    Not thread-safe (see the module docstring): one predictor per thread, or a lock.

    Args:
        checkpoint: A FaceAge checkpoint, or (``runtime="onnx"``) its exported ``.onnx`` graph.
        detector_dir: Folder with the dlib detector file the checkpoint was trained with (its
            sha256 must equal the checkpoint's ``crop.detector_sha256``), and the face-encoder
            files for a ``dlib_face`` checkpoint.
        runtime: ``"torch"`` (:class:`faceage.inference.AgeModel`) or ``"onnx"``
            (:class:`faceage.onnx_model.OnnxAgeModel`, no torch).
        device: Torch device for the age model (torch runtime).
        threads: Intra-op threads of the age model; ``None``: :func:`default_threads`.
            For torch the setting is process-wide.
        max_pixels: Encoded images with more pixels are refused.
        max_detect_pixels: Larger images are downscaled for detection only; 0 disables.
        parallel_detection: Detect on two threads (:meth:`FaceLocator.locate`; the same faces);
            ``None``: when this process may use two cores or more. The service's detection
            workers decide per photo instead (:class:`faceage.serving.LocatorPool`).

    Raises:
        PredictorError: The checkpoint or the detector file is missing, or the detector
            file differs from the checkpoint's.
        ValueError: Not a FaceAge checkpoint (or exported graph), an unknown runtime, or ``threads`` < 1;
            :class:`faceage.inputs.CheckpointSettingsError` (also a ``FaceAgeError``) for a checkpoint whose
            settings name an unknown input kind or lack one the predictor reads (:func:`missing_settings`).
    """

    def __init__(self, checkpoint: str | Path, detector_dir: str | Path, *, runtime: str = "torch",
                 device: str = "cpu", threads: int | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                 max_detect_pixels: int = DEFAULT_MAX_DETECT_PIXELS, parallel_detection: bool | None = None):
        checkpoint, detector_dir = Path(checkpoint), Path(detector_dir)
        if not checkpoint.is_file():
            raise PredictorError(f"checkpoint {checkpoint} not found")
        if runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, got {runtime!r}")
        if threads is not None and threads < 1:
            raise ValueError(f"threads must be >= 1 or None, got {threads}")
        self.threads = threads or default_threads(runtime)
        self.parallel_detection = available_cores() >= 2 if parallel_detection is None else bool(parallel_detection)
        loader = importlib.import_module(RUNTIMES[runtime]).load_age_model
        self.age_model = loader(checkpoint, detector_dir, device=device, threads=self.threads)
        self.runtime = runtime
        self.meta = self.age_model.meta
        missing = missing_settings(self.meta)
        if missing:  # a KeyError traceback before, or (image_size, mean) a failure at the first face
            raise CheckpointSettingsError(f"{checkpoint} lacks the setting{'s' * (len(missing) > 1)} "
                                          f"{', '.join(missing)}: not a checkpoint this FaceAge version can serve "
                                          "(made by another version?); retrain it, or use the version that made it")
        crop = self.meta["crop"]
        for filename, sha256 in crop_detector_files(crop).items():
            check_detector_file(detector_dir, filename, sha256)
        input_name = input_kind(self.meta).name
        self.locator = FaceLocator(detector_dir, kind=crop["detector"], upsample=int(crop["upsample"]),
                                   margin=crop["margin"], crop_size=crop["size"], retry_pad=crop_retry_pad(crop),
                                   cnn_retry_side=crop_cnn_retry_side(crop),
                                   max_detect_pixels=max_detect_pixels, max_pixels=max_pixels,
                                   chip_dir=detector_dir if input_name in CHIP_KINDS else None,
                                   pairs=input_name == DLIB_CHIP_PAIR)
        log.info("age model %s (val MAE %.2f, MLflow run %s) on %s, %d threads; detector %s upsample %d "
                 "retry_pad %g cnn_retry_side %d; crop margin %.2f size %d", self.meta["backbone"],
                 self.meta.get("val_mae", float("nan")), self.meta.get("mlflow_run_id"), self.age_model.device,
                 self.threads, crop["detector"], int(crop["upsample"]), self.locator.detector.retry_pad,
                 self.locator.detector.cnn_retry_side, self.locator.margin, self.locator.crop_size)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, *, runtime: str = "torch", **kwargs: Any) -> AgePredictor:
        """Builds the predictor from a packaged model folder (``model.pt``/``model.onnx`` + ``detector/``)."""
        model_dir = Path(model_dir)
        weights = model_dir / (ONNX_FILE if runtime == "onnx" else CHECKPOINT_FILE)
        return cls(weights, model_dir / DETECTOR_DIR, runtime=runtime, **kwargs)

    def estimate(self, inputs: Sequence[np.ndarray], *, idle: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Age mean and std (years) of faces (:attr:`LocatedFaces.inputs`), in batched forward passes (at most
        :data:`faceage.onnx_model.MAX_PASS_FACES` faces each in ONNX Runtime): two float arrays.

        ``idle=True``: the caller knows nothing else runs on the cores (the service, with no photo
        in detection), so the ONNX runtime may use its spinning threads; same ages either way.
        """
        if len(inputs) == 0:
            return np.zeros(0), np.zeros(0)
        return self.age_model.predict_crops(list(inputs), idle=idle)

    def warm_up(self) -> None:
        """One pass over a blank face (both thread modes), so the first request does not pay for lazy loading."""
        blank = np.zeros((self.locator.crop_size, self.locator.crop_size, 3), np.uint8)
        chipper = self.locator.chipper
        for idle in (False, True):
            self.estimate([blank if chipper is None else chipper(blank)], idle=idle)

    def predict(self, image: np.ndarray) -> list[FaceAge]:
        """Every face of one RGB uint8 image with its age, largest first (ties to the most central); ``[]``
        when there is none."""
        return self.predict_many([image])[0]

    def predict_many(self, images: Sequence[np.ndarray]) -> list[list[FaceAge]]:
        """:meth:`predict` for several images, their faces batched together (:meth:`estimate`)."""
        return self.predict_located([self.locator.locate(image, crops=False, parallel=self.parallel_detection)
                                     for image in images])

    def predict_located(self, located: Sequence[LocatedFaces]) -> list[list[FaceAge]]:
        """The ages of faces already located (by this predictor's locator, or one built from its
        :meth:`FaceLocator.settings`, as the CLI's detection threads do), in one batched :meth:`estimate`."""
        mean, std = self.estimate([c for loc in located for c in loc.inputs])
        return split_results(located, mean, std)

    def lineage(self) -> dict[str, Any]:
        """Where the model came from, as the checkpoint records it."""
        return {
            "mlflow_run_id": self.meta.get("mlflow_run_id"),
            "val_mae_years": self.meta.get("val_mae"),
            "data_sha256": self.meta.get("data_sha256"),
            "git_commit": self.meta.get("git_commit"),
            "backbone": self.meta.get("backbone"),
        }


def missing_settings(meta: dict[str, Any]) -> list[str]:
    """The settings a predictor reads that ``meta`` (a checkpoint's) lacks, as ``key`` or ``crop.key``.

    Raises:
        faceage.inputs.CheckpointSettingsError: ``meta`` names an unknown input kind.
    """
    missing = [key for key in input_kind(meta).settings if key not in meta]
    crop = meta.get("crop")
    if not isinstance(crop, dict):
        return ["crop", *missing]
    missing += [f"crop.{key}" for key in CROP_SETTINGS if key not in crop]
    if crop_cnn_retry_side(crop) and "cnn_retry_sha256" not in crop:
        missing.append("crop.cnn_retry_sha256")
    return missing


def split_results(located: Sequence[LocatedFaces], mean: np.ndarray, std: np.ndarray) -> list[list[FaceAge]]:
    """Hands the rows of one batched forward pass back to their images.

    Raises:
        ValueError: The number of rows differs from the number of faces.
    """
    total = sum(len(loc.boxes) for loc in located)
    if not total == len(mean) == len(std):
        raise ValueError(f"{total} faces but {len(mean)} ages and {len(std)} stds")
    results, start = [], 0
    for loc in located:
        rows = range(start, start + len(loc.boxes))
        results.append([FaceAge(box=tuple(b.as_list()), age=float(mean[i]), age_std=float(std[i]),
                                score=float(b.score)) for b, i in zip(loc.boxes, rows)])
        start += len(loc.boxes)
    return results


def check_detector_file(detector_dir: str | Path, filename: str, sha256: str) -> None:
    """Checks that ``detector_dir/filename`` is the detector the checkpoint's crops were made with.

    Raises:
        PredictorError: The file is missing, or its sha256 (or the manifest's) differs.
    """
    detector_dir = Path(detector_dir)
    path = detector_dir / filename
    if not path.is_file():
        raise PredictorError(f"detector file {path} not found (the checkpoint was trained with {filename})")
    if (detector_dir / MANIFEST).is_file():
        recorded = read_manifest(detector_dir)["files"].get(filename)
        if recorded is not None and recorded != sha256:
            raise PredictorError(f"{detector_dir / MANIFEST} lists {filename} with sha256 {recorded}, "
                                 f"but the checkpoint was trained with {sha256}")
    got = file_digest(path)
    if got != sha256:
        raise PredictorError(f"{path} has sha256 {got}, but the checkpoint was trained with {sha256}")
