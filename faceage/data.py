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

from faceage.errors import FaceAgeError
from faceage.preprocess import read_faces_manifest
from faceage.inputs import resize_crop

log = logging.getLogger(__name__)


class SplitDataError(FaceAgeError, ValueError):
    """A split the datasets cannot be built from: it has no face crops, or the ``embed`` stage's output
    lacks some of them. A user-fixable error (one line from a stage, not a traceback)."""


def split_rows(faces_dir: str | Path, split: str) -> list[dict]:
    """The manifest rows of ``split`` that have a crop.

    Raises:
        SplitDataError: None has (every image of the split skipped by ``preprocess``, or an empty split).
    """
    rows = read_faces_manifest(faces_dir, split)
    if not rows:
        raise SplitDataError(f"no face crops for split {split!r} in {faces_dir}: preprocess kept none of its "
                             "images (no face found with no_face=skip, or unreadable; see reports/preprocess.json)")
    return rows


class FaceCrops(Dataset):
    """Face crops of one split, resized to ``image_size`` and kept as uint8 tensors.

    Args:
        faces_dir: The ``preprocess`` output folder.
        split: ``train``, ``valid`` or ``test``.
        image_size: Network input side in pixels.
        transform: Optional augmentation on uint8 (3, S, S) tensors.

    Raises:
        SplitDataError: The split has no crops.
        faceage.preprocess.FacesMissingError: (a ``FileNotFoundError``) No ``manifest.csv`` in ``faces_dir``, or
            crops it lists are not there (checked before any is loaded).
    """

    def __init__(self, faces_dir: str | Path, split: str, image_size: int, transform=None):
        from faceage.chips import check_crops

        self.rows = split_rows(faces_dir, split)
        faces_dir = Path(faces_dir)
        check_crops(faces_dir, [r["crop"] for r in self.rows])  # one line, before the load (PIL's traceback after it)
        # Filled in place: stacking a list of the resized crops held the split twice while it loaded.
        images = np.empty((len(self.rows), 3, image_size, image_size), np.uint8)
        for i, r in enumerate(tqdm(self.rows, desc=f"load {split}", unit="img", leave=False)):
            images[i] = resize_crop(np.asarray(Image.open(faces_dir / r["crop"]).convert("RGB")), image_size)
        self.images = torch.from_numpy(images)
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


class FaceEmbeddings(Dataset):
    """Precomputed face descriptors of one split (the ``embed`` stage's output) with their ages.

    Args:
        faces_dir: The ``preprocess`` output folder (for the manifest rows).
        split: ``train``, ``valid`` or ``test``.
        embeddings_path: The ``.npz`` written by :func:`faceage.face_encoder.embed_dataset`.
        augment: Items pick the crop's or its mirror image's descriptor at random.

    ``images`` holds both views, (N, 2, 128); models average their predictions over them.
    """

    def __init__(self, faces_dir: str | Path, split: str, embeddings_path: str | Path, augment: bool = False):
        from faceage.face_encoder import load_embeddings

        self.rows = split_rows(faces_dir, split)
        table, self.info = load_embeddings(embeddings_path)
        missing = [r["crop"] for r in self.rows if r["crop"] not in table]
        if missing:
            raise SplitDataError(f"{len(missing)} crops have no embedding in {embeddings_path} (e.g. {missing[:3]}): "
                                 "rerun the embed stage")
        self.images = torch.from_numpy(np.stack([table[r["crop"]] for r in self.rows]))  # (N, 2 views, 128)
        self.augment = augment
        self.ages = torch.tensor([float(r["apparent_age"]) for r in self.rows])
        self.age_stds = torch.tensor([float(r["apparent_age_std"]) for r in self.rows])
        self.real_ages = torch.tensor([float(r["real_age"]) for r in self.rows])

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        # Training sees one view, the mirror image half of the time (flip augmentation).
        view = int(torch.randint(self.images.shape[1], (1,))) if self.augment else 0
        return self.images[i, view], self.ages[i], self.age_stds[i]


class FaceChips(FaceCrops):
    """The ``embed`` stage's 64x64 aligned chips of one split (``train.backbone=dlib_age``), with their ages.

    Args:
        faces_dir: The ``preprocess`` output folder (for the manifest rows).
        split: ``train``, ``valid`` or ``test``.
        features_path: The ``.npz`` written by :func:`faceage.features.compute_features`.
        transform: Optional augmentation on uint8 (3, 64, 64) tensors.
        pairs: Items are (3, 214, 150) chip pairs (age chip + face chip, :func:`faceage.chips.make_pair`),
            the input of ``train.head=fused``.
    """

    def __init__(self, faces_dir: str | Path, split: str, features_path: str | Path, transform=None,
                 pairs: bool = False):
        from faceage.chips import load_chips

        self.rows = split_rows(faces_dir, split)
        # This split's chips only: chips.npz holds every split's, and their pairs were all built to load one.
        table, self.info = load_chips(features_path, pairs=pairs, crops=[r["crop"] for r in self.rows])
        missing = [r["crop"] for r in self.rows if r["crop"] not in table]
        if missing:
            raise SplitDataError(f"{len(missing)} crops have no chip in {features_path} (e.g. {missing[:3]}): "
                                 "rerun the embed stage")
        self.images = torch.from_numpy(np.stack([table[r["crop"]] for r in self.rows]))  # (N, 3, 64, 64) uint8 (or pairs)
        self.ages = torch.tensor([float(r["apparent_age"]) for r in self.rows])
        self.age_stds = torch.tensor([float(r["apparent_age_std"]) for r in self.rows])
        self.real_ages = torch.tensor([float(r["real_age"]) for r in self.rows])
        self.transform = transform


def load_split(faces_dir: str | Path, split: str, backbone: str, image_size: int,
               embeddings_path: str | Path | None = None, transform=None, augment: bool = False,
               pairs: bool = False) -> Dataset:
    """The dataset a backbone trains/evaluates on: image crops (``transform`` applied), face
    descriptors for ``dlib_face`` (``augment`` picks a random view), or aligned chips for ``dlib_age``
    (``pairs``: chip pairs, the input of its ``fused`` head)."""
    from faceage.chips import DLIB_AGE
    from faceage.face_encoder import FACE_ENCODER

    if backbone == DLIB_AGE:
        if embeddings_path is None:
            raise ValueError(f"backbone {DLIB_AGE} needs the embed stage's aligned chips (embeddings_path)")
        return FaceChips(faces_dir, split, embeddings_path, transform=transform, pairs=pairs)
    if backbone == FACE_ENCODER:
        if embeddings_path is None:
            raise ValueError(f"backbone {FACE_ENCODER} needs the embed stage's output (embeddings_path)")
        return FaceEmbeddings(faces_dir, split, embeddings_path, augment=augment)
    return FaceCrops(faces_dir, split, image_size, transform=transform)
