"""A checkpoint ready for inference: face crops -> calibrated age and its spread, for any backbone.

Input: a checkpoint (``train`` output), the ``fetch_detector`` folder (needed by ``dlib_face``
models for the face encoder), and face crops from :func:`faceage.faces.crop_faces`.
Output: per crop, the expected age (years) and the standard deviation of the predicted age
distribution at the checkpoint's calibrated temperature.

``evaluate``, the CLI and (exported to ONNX at packaging time, see :mod:`faceage.export`) the
service all run :class:`AgeGraph`: stored input (:mod:`faceage.inputs`) -> network input
(:func:`input_fn`) -> logits -> age, age_std and the age distribution. So a test-set number
describes exactly what is served.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from torch import nn

from faceage.inputs import INPUT_KINDS, input_kind, input_preparer
from faceage.model import MIN_AGE, expected_age, load_checkpoint
from faceage.ort_module import cpu_runner
from faceage.transforms import normalize


def input_fn(kind: str, mean, std):
    """How a stored batch becomes network input: normalised images, or the stored form as float.

    Args:
        kind: An input kind (:data:`faceage.inputs.INPUT_KINDS`): a checkpoint's ``meta["input"]``,
            or :func:`faceage.inputs.backbone_input` of the backbone being trained.
        mean: Per-channel mean for images.
        std: Per-channel std for images.
    """
    if INPUT_KINDS[kind].normalise:
        return lambda x: normalize(x, mean, std)
    return lambda x: x.float()


@torch.no_grad()
def predict_logits(model: nn.Module, inputs: torch.Tensor, prepare, device: torch.device,
                   batch_size: int = 128) -> torch.Tensor:
    """Logits for stored inputs (uint8 images or descriptors), in batches, on ``device``; returned on CPU."""
    model.eval()
    out = [model(prepare(inputs[i : i + batch_size].to(device))).float().cpu()
           for i in range(0, len(inputs), batch_size)]
    return torch.cat(out)


@contextmanager
def ieee_fp32(device: torch.device) -> Iterator[None]:
    """On CUDA, float32 convolutions and matrix products in IEEE fp32 for the duration, not TF32.

    cuDNN runs fp32 convolutions in TF32 by default on Ampere and later GPUs. That is fine for
    training, but ``evaluate`` must score the ages the CPU service serves: on an H200, TF32 moved
    ``evaluate``'s ages by up to 0.07 years (mean 0.006) from the same checkpoint's on CPU; in IEEE
    fp32 they agreed to 0.001 years (mean 0.00001). A no-op elsewhere.
    """
    if device.type != "cuda":
        yield
        return
    cudnn, matmul = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = cudnn, matmul


class AgeGraph(nn.Module):
    """The whole age computation as one module: stored input -> (age, age_std, age distribution).

    This is what ``evaluate`` runs and what :mod:`faceage.export` exports to ONNX, so the
    served graph and the evaluated one are the same code.

    Args:
        model: The checkpoint's network (logits over ages ``min_age..``).
        meta: The checkpoint's settings (``input`` kind, ``mean``/``std``, ``temperature``).
    """

    def __init__(self, model: nn.Module, meta: dict):
        super().__init__()
        self.model = model
        self.prepare = input_fn(input_kind(meta).name, meta.get("mean"), meta.get("std"))
        self.temperature = float(meta.get("temperature", 1.0))
        # Logit i is age min_age + i as the checkpoint records it; expected_age counts from MIN_AGE. Ignored, a
        # checkpoint over 10..100 (another version's, a hand-made one) answered every age 10 years too young.
        # The std does not move with the shift. No op is added at the usual 0, so exports stay byte-identical.
        self.age_offset = float(meta.get("min_age", MIN_AGE)) - MIN_AGE

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        logits = self.model(self.prepare(x)).float()
        mean, std = expected_age(logits, self.temperature)
        if self.age_offset:
            mean = mean + self.age_offset
        return mean, std, torch.softmax(logits, dim=1)


class AgeModel:
    """Loads a checkpoint once and predicts ages for batches of crops (torch).

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
        self.graph = AgeGraph(self.model, self.meta).eval()
        self.temperature = self.graph.temperature
        self.detector_dir = detector_dir
        self._prepare = None
        self._run = self.graph

    def accelerate(self, example: torch.Tensor) -> None:
        """On CPU, run the graph in ONNX Runtime from now on, checked against torch on ``example``
        (real stored inputs, 2+); on CUDA, or if the export is not usable, torch stays (logged)."""
        self._run = cpu_runner(self.graph, example[:8].to(self.device), self.device, "the age graph")

    def prepare(self, crops: list[np.ndarray]) -> torch.Tensor:
        """Crops -> the stored input form (:mod:`faceage.inputs`) as a tensor."""
        if self._prepare is None:  # dlib_face loads the face encoder here, on first use
            self._prepare = input_preparer(self.meta, self.detector_dir)
        return torch.from_numpy(self._prepare(list(crops)))

    @torch.no_grad()
    def predict_graph(self, inputs: torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Ages, stds (float64) and age distributions (float32, N x ages) for stored inputs."""
        if len(inputs) == 0:
            return np.zeros(0), np.zeros(0), np.zeros((0, 0), np.float32)
        with ieee_fp32(self.device):  # the ages the CPU service gives, also when evaluated on a GPU
            out = [self._run(inputs[i : i + batch_size].to(self.device)) for i in range(0, len(inputs), batch_size)]
        mean, std, probs = (torch.cat(parts).cpu() for parts in zip(*out))
        return mean.double().numpy(), std.double().numpy(), probs.numpy()

    def predict_inputs(self, inputs: torch.Tensor, batch_size: int = 128) -> tuple[np.ndarray, np.ndarray]:
        """Ages and stds (years, float64 arrays) for inputs from :meth:`prepare` or a dataset."""
        mean, std, _ = self.predict_graph(inputs, batch_size)
        return mean, std

    def predict_crops(self, crops: list[np.ndarray], *, idle: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Ages and stds (years) for uint8 crops, in one batched pass. ``idle`` (the cores are free)
        changes nothing here: it matters to :class:`faceage.onnx_model.OnnxAgeModel`'s threads."""
        return self.predict_inputs(self.prepare(crops))


def load_age_model(checkpoint: str | Path, detector_dir: str | Path | None, *, device: str | None = "cpu",
                   threads: int = 1) -> AgeModel:
    """The torch runtime of :class:`faceage.predict.AgePredictor`: ``threads`` is process-wide."""
    torch.set_num_threads(threads)
    return AgeModel(checkpoint, detector_dir, device=device)
