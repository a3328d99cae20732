"""Train and eval presets: crop (uint8 RGB) -> normalised tensor.

Input: a face crop from :func:`faceage.faces.crop_face` as an (H, W, 3) uint8 array, or a
(3, H, W) uint8 tensor. Output: a float (3, S, S) tensor normalised with the checkpoint's
mean/std. :func:`resize_crop` + :func:`normalize` are the eval path used by ``evaluate``
and by the service; training adds augmentation between the two.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F


def resize_crop(crop: np.ndarray | torch.Tensor, image_size: int) -> torch.Tensor:
    """(H, W, 3) uint8 array or (3, H, W) uint8 tensor -> (3, S, S) uint8 tensor, antialiased."""
    if isinstance(crop, np.ndarray):
        # Arrays viewed from PIL images are read-only; torch wants writable memory.
        t = torch.from_numpy(np.array(crop, copy=not crop.flags.writeable)).permute(2, 0, 1)
    else:
        t = crop
    if t.shape[-2:] != (image_size, image_size):
        t = F.resize(t, [image_size, image_size], antialias=True)
    return t.contiguous()


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
