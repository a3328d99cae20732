"""Age prediction on whole photos: detect -> crop -> one batched forward pass over every face.

Input: a checkpoint (``train`` output) and a detector folder (``fetch_detector`` output),
or a packaged BentoML model folder holding both (``model.pt`` + ``detector/``); then RGB
uint8 images from :func:`faceage.images.load_image`.
Output: for each image, a list of :class:`FaceAge` (box, age and its std in years, detector
score), largest face first.

The CLI, the BentoML service and the benchmark all build this one :class:`AgePredictor`.
Every setting comes from the checkpoint (detector kind and upsample count, crop margin and
size, network input size, mean/std), never from ``params.yaml``, and the steps are the
pipeline's own: :meth:`faceage.faces.FaceDetector.detect`, :func:`faceage.faces.crop_faces`
(the crop ``preprocess`` writes), then :func:`faceage.transforms.resize_crop` and
:func:`faceage.transforms.normalize` (the eval path of ``evaluate``).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from faceage.detector import MANIFEST, read_manifest
from faceage.download import file_digest
from faceage.errors import FaceAgeError
from faceage.faces import FaceBox, FaceDetector, crop_faces
from faceage.images import DEFAULT_MAX_PIXELS
from faceage.model import expected_age, load_checkpoint
from faceage.transforms import normalize, resize_crop

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "model.pt"  # names inside a packaged model folder (see faceage.packaging)
DETECTOR_DIR = "detector"
# Larger photos are downscaled for detection only (crops still come from the full image):
# HOG time and memory grow with pixels (a 20 MP photo upsampled once: ~9 s, 1 GB on one core).
# 3840x2160 (4K UHD) keeps every APPA-REAL-sized photo on the exact preprocess path.
DEFAULT_MAX_DETECT_PIXELS = 3840 * 2160


class PredictorError(FaceAgeError, RuntimeError):
    """The checkpoint and detector files do not belong together, or are missing."""


@dataclass(frozen=True)
class FaceAge:
    """One face: pixel box ``[x1, y1, x2, y2)``, predicted age and its std (years), detector score."""

    box: tuple[int, int, int, int]
    age: float
    age_std: float
    score: float

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready: ``{"box": [x1, y1, x2, y2], "age", "age_std", "score"}``."""
        return {"box": list(self.box), "age": self.age, "age_std": self.age_std, "score": self.score}


@dataclass(frozen=True)
class LocatedFaces:
    """Faces found in one image, before the age model: boxes and network-ready uint8 crops.

    ``batch`` is a uint8 tensor (N, 3, S, S), row i cut around ``boxes[i]``.
    """

    width: int
    height: int
    boxes: list[FaceBox]
    batch: torch.Tensor


def available_cores() -> int:
    """CPU cores this process may run on (respects affinity masks and container CPU sets)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


class AgePredictor:
    """Predicts the age of every face in a photo with a trained checkpoint.

    Args:
        checkpoint: A ``faceage-checkpoint/1`` file.
        detector_dir: Folder with the dlib detector file the checkpoint was trained with
            (its sha256 must match ``crop.detector_sha256`` of the checkpoint).
        device: Torch device for the age model.
        threads: Torch intra-op threads; ``None`` uses every available core. Torch's setting
            is process-wide, so a process should build one predictor.
        max_pixels: Images with more pixels are refused by :func:`faceage.images.load_image`
            (callers pass it there; kept here so every entry point uses one value).
        max_detect_pixels: Images with more pixels are downscaled to this size for detection
            only; ``0`` or ``None`` detects at full resolution.

    Raises:
        PredictorError: The detector file is missing or differs from the checkpoint's.
        ValueError: Not a FaceAge checkpoint.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        detector_dir: str | Path,
        *,
        device: str | torch.device = "cpu",
        threads: int | None = None,
        max_pixels: int = DEFAULT_MAX_PIXELS,
        max_detect_pixels: int | None = DEFAULT_MAX_DETECT_PIXELS,
    ):
        checkpoint, detector_dir = Path(checkpoint), Path(detector_dir)
        if not checkpoint.is_file():
            raise PredictorError(f"checkpoint {checkpoint} not found")
        self.threads = threads or available_cores()
        torch.set_num_threads(self.threads)
        self.device = torch.device(device)
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        crop = self.meta["crop"]
        _check_detector(detector_dir, crop["detector_file"], crop["detector_sha256"])
        self.detector = FaceDetector(detector_dir, crop["detector"], int(crop["upsample"]))
        self.margin = float(crop["margin"])
        self.crop_size = int(crop["size"])
        self.image_size = int(self.meta["image_size"])
        self.max_pixels = max_pixels
        self.max_detect_pixels = max_detect_pixels or 0
        log.info("age model %s (%d px, val MAE %.2f, run %s) on %s with %d torch threads; detector %s "
                 "upsample %d, crop margin %.2f size %d", self.meta["backbone"], self.image_size,
                 self.meta.get("val_mae", float("nan")), self.meta.get("mlflow_run_id"), self.device,
                 self.threads, crop["detector"], self.detector.upsample, self.margin, self.crop_size)

    @classmethod
    def from_model_dir(cls, model_dir: str | Path, **kwargs: Any) -> AgePredictor:
        """Builds the predictor from a packaged model folder (``model.pt`` + ``detector/``)."""
        model_dir = Path(model_dir)
        return cls(model_dir / CHECKPOINT_FILE, model_dir / DETECTOR_DIR, **kwargs)

    def detect(self, image: np.ndarray) -> list[FaceBox]:
        """Face boxes in full-image pixels, largest first (downscaled detection above ``max_detect_pixels``)."""
        h, w = image.shape[:2]
        if not self.max_detect_pixels or h * w <= self.max_detect_pixels:
            return self.detector.detect(image)
        scale = math.sqrt(self.max_detect_pixels / (h * w))
        sw, sh = max(int(w * scale), 1), max(int(h * scale), 1)
        small = np.asarray(Image.fromarray(image).resize((sw, sh), Image.Resampling.BOX))
        fx, fy = w / sw, h / sh
        log.debug("detecting on %dx%d instead of %dx%d (max_detect_pixels=%d)", sw, sh, w, h, self.max_detect_pixels)
        boxes = [
            FaceBox(max(int(round(b.left * fx)), 0), max(int(round(b.top * fy)), 0),
                    min(int(round(b.right * fx)), w), min(int(round(b.bottom * fy)), h), b.score)
            for b in self.detector.detect(small)
        ]
        return sorted(boxes, key=lambda b: (-b.area, -b.score))

    def crops(self, image: np.ndarray, boxes: Sequence[FaceBox]) -> list[np.ndarray]:
        """The margin crops ``preprocess`` would write for these boxes: uint8 (size, size, 3) each."""
        return crop_faces(image, list(boxes), self.margin, self.crop_size)

    def locate(self, image: np.ndarray) -> LocatedFaces:
        """Detects and crops every face; the network-ready batch is uint8 (N, 3, S, S)."""
        boxes = self.detect(image)
        crops = [resize_crop(c, self.image_size) for c in self.crops(image, boxes)]
        batch = torch.stack(crops) if crops else torch.empty((0, 3, self.image_size, self.image_size),
                                                              dtype=torch.uint8)
        return LocatedFaces(width=int(image.shape[1]), height=int(image.shape[0]), boxes=boxes, batch=batch)

    @torch.inference_mode()
    def estimate(self, batch: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """Age mean and std (years) for a uint8 (N, 3, S, S) batch; float32 arrays of length N.

        Raises:
            ValueError: The batch is not uint8 (N, 3, image_size, image_size).
        """
        expected = (3, self.image_size, self.image_size)
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected or batch.dtype != torch.uint8:
            raise ValueError(f"face batch must be uint8 (N, {', '.join(map(str, expected))}), "
                             f"got {batch.dtype} {tuple(batch.shape)}")
        if len(batch) == 0:
            return np.zeros(0, np.float32), np.zeros(0, np.float32)
        x = normalize(batch.to(self.device), self.meta["mean"], self.meta["std"])
        mean, std = expected_age(self.model(x))
        return mean.float().cpu().numpy(), std.float().cpu().numpy()

    def predict(self, image: np.ndarray) -> list[FaceAge]:
        """Every face in one RGB uint8 image with its age, largest first; ``[]`` when there is none."""
        return self.predict_many([image])[0]

    def predict_many(self, images: Sequence[np.ndarray]) -> list[list[FaceAge]]:
        """:meth:`predict` for several images, with all their faces in one forward pass."""
        located = [self.locate(image) for image in images]
        mean, std = self.estimate(torch.cat([loc.batch for loc in located]))
        results, start = [], 0
        for loc in located:
            n = len(loc.boxes)
            results.append(assemble(loc.boxes, mean[start:start + n], std[start:start + n]))
            start += n
        return results

    def lineage(self) -> dict[str, Any]:
        """Where the model came from, as recorded in the checkpoint (run, data, code, val MAE)."""
        return {
            "mlflow_run_id": self.meta.get("mlflow_run_id"),
            "val_mae_years": self.meta.get("val_mae"),
            "data_sha256": self.meta.get("data_sha256"),
            "git_commit": self.meta.get("git_commit"),
            "backbone": self.meta.get("backbone"),
            "image_size": self.image_size,
        }


def assemble(boxes: Sequence[FaceBox], mean: np.ndarray, std: np.ndarray) -> list[FaceAge]:
    """Pairs boxes with the age model's outputs, row by row."""
    if not len(boxes) == len(mean) == len(std):
        raise ValueError(f"{len(boxes)} boxes but {len(mean)} ages and {len(std)} stds")
    return [FaceAge(box=tuple(b.as_list()), age=float(m), age_std=float(s), score=float(b.score))
            for b, m, s in zip(boxes, mean, std)]


def _check_detector(detector_dir: Path, filename: str, sha256: str) -> None:
    """The detector file must be the one the checkpoint's crops were made with."""
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
