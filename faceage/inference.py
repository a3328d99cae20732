"""A checkpoint ready for inference: face crops -> calibrated age and its spread, for any backbone.

Input: a checkpoint (``train`` output), the ``fetch_detector`` folder (needed by ``dlib_face``
models for the face encoder), and face crops from :func:`faceage.faces.crop_faces`.
Output: per crop, the expected age (years) and the standard deviation of the predicted age
distribution at the checkpoint's calibrated temperature.

``evaluate`` and the service's predictor both go through :class:`AgeModel`, so a test-set
number describes exactly what is served: image backbones resize + normalise the crop
(:mod:`faceage.transforms`); ``dlib_face`` embeds it with :class:`faceage.face_encoder.DlibFaceEncoder`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceage.chips import DLIB_AGE, ChipExtractor
from faceage.face_encoder import FACE_ENCODER, DlibFaceEncoder
from faceage.model import expected_age, load_checkpoint
from faceage.transforms import normalize, resize_crop


def input_fn(backbone: str, mean, std):
    """How a stored batch becomes network input: normalised images, or descriptors as they are."""
    if backbone == FACE_ENCODER:
        return lambda x: x.float()
    return lambda x: normalize(x, mean, std)


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, prepare, device: torch.device,
                   batch_size: int = 128) -> torch.Tensor:
    """Logits for stored inputs (uint8 images or descriptors), in batches, on ``device``; returned on CPU."""
    model.eval()
    out = [model(prepare(inputs[i : i + batch_size].to(device))).float().cpu()
           for i in range(0, len(inputs), batch_size)]
    return torch.cat(out)


class AgeModel:
    """Loads a checkpoint once and predicts ages for batches of crops.

    Args:
        checkpoint: Path of a FaceAge checkpoint.
        detector_dir: The ``fetch_detector`` folder (used by ``dlib_face`` checkpoints).
        device: Torch device; ``None`` picks CUDA when available, else CPU.
    """

    def __init__(self, checkpoint: str | Path, detector_dir: str | Path | None = None,
                 device: str | torch.device | None = None):
        self.device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        self.model, self.meta = load_checkpoint(checkpoint, self.device)
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.uses_encoder = self.meta["backbone"] == FACE_ENCODER
        self.detector_dir = detector_dir
        self._encoder: DlibFaceEncoder | None = None
        self._chips: ChipExtractor | None = None

    @property
    def encoder(self) -> DlibFaceEncoder:
        """The face encoder of a ``dlib_face`` checkpoint, loaded on first use."""
        if self._encoder is None:
            if self.detector_dir is None:
                raise ValueError(f"a {FACE_ENCODER} checkpoint needs the detector folder (face encoder files)")
            self._encoder = DlibFaceEncoder(self.detector_dir, self.meta["crop"]["margin"])
        return self._encoder

    @property
    def chips(self) -> ChipExtractor:
        """The chip extractor of a ``dlib_age`` checkpoint (the ``embed`` stage's), loaded on first use."""
        if self._chips is None:
            if self.detector_dir is None:
                raise ValueError(f"a {DLIB_AGE} checkpoint needs the detector folder (shape predictor)")
            self._chips = ChipExtractor(self.detector_dir, self.meta["crop"]["margin"])
        return self._chips

    def prepare(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Crops -> the stored input form: uint8 (N, 3, S, S) images or aligned chips, or float (N, 2, 128) descriptors."""
        if self.uses_encoder:
            return torch.from_numpy(self.encoder.embed_many(crops))
        if self.meta["backbone"] == DLIB_AGE:
            return torch.from_numpy(self.chips.chips(crops))
        size = self.meta["image_size"]
        if not crops:
            return torch.zeros((0, 3, size, size), dtype=torch.uint8)
        return torch.stack([resize_crop(c, size) for c in crops])

    @torch.no_grad()
    def predict_inputs(self, inputs: torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Ages and stds (years, float64 arrays) for inputs from :meth:`prepare` or a dataset."""
        if len(inputs) == 0:
            return np.zeros(0), np.zeros(0)
        prepare = input_fn(self.meta["backbone"], self.meta["mean"], self.meta["std"])
        mean, std = expected_age(predict_logits(self.model, inputs, prepare, self.device, batch_size), self.temperature)
        return mean.double().numpy(), std.double().numpy()

    def predict_crops(self, crops: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Ages and stds (years) for uint8 crops, in one batched pass."""
        return self.predict_inputs(self.prepare(crops))
