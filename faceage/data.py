"""Datasets over the ``preprocess`` output: face crops with their ages, held in memory.

Input: the faces folder and its ``manifest.csv`` rows. Output: ``(uint8 (3, S, S) tensor,
apparent_age, apparent_age_std)`` items. Crops are decoded and resized once, up front, so an
epoch on CPU spends its time in the network, not in PNG decoding.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm import tqdm

from faceage.preprocess import read_faces_manifest
from faceage.transforms import resize_crop

log = logging.getLogger(__name__)


class FaceCrops(Dataset):
    """Face crops of one split, resized to ``image_size`` and kept as uint8 tensors.

    Args:
        faces_dir: The ``preprocess`` output folder.
        split: ``train``, ``valid`` or ``test``.
        image_size: Network input side in pixels.
        transform: Optional augmentation on uint8 (3, S, S) tensors.
    """

    def __init__(self, faces_dir: str | Path, split: str, image_size: int, transform=None):
        self.rows = read_faces_manifest(faces_dir, split)
        if not self.rows:
            raise ValueError(f"no face crops for split {split!r} in {faces_dir}")
        faces_dir = Path(faces_dir)
        self.images = torch.stack([
            resize_crop(np.asarray(Image.open(faces_dir / r["crop"]).convert("RGB")), image_size)
            for r in tqdm(self.rows, desc=f"load {split}", unit="img", leave=False)
        ])
        self.ages = torch.tensor([float(r["apparent_age"]) for r in self.rows])
        self.age_stds = torch.tensor([float(r["apparent_age_std"]) for r in self.rows])
        self.real_ages = torch.tensor([float(r["real_age"]) for r in self.rows])
        self.transform = transform

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image = self.images[i]
        if self.transform is not None:
            image = self.transform(image)
        return image, self.ages[i], self.age_stds[i]
