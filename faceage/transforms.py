"""Train and eval presets on uint8 (3, S, S) tensors: normalisation and training augmentation.

Input: resized crops from :func:`faceage.inputs.resize_crop` (the torch-free resize that
training, ``evaluate`` and the service share). Output: a float (3, S, S) tensor normalised with
the checkpoint's mean/std. :func:`faceage.inputs.resize_crop` + :func:`normalize` are the eval
path (the exported ONNX graph normalises the same way); training adds augmentation between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torchvision.transforms import v2


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float32 normalised, on the tensor's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return (batch.float() / 255.0 - m) / s


def train_augment(*, augment: bool = True) -> v2.Transform:
    """Random flip, small rotation/scale/shift and colour jitter on uint8 (3, S, S) tensors."""
    if not augment:
        return v2.Identity()
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
    ])
