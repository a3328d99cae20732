"""The ``embed`` stage: what the chosen ``train.backbone`` reads from the crops, and nothing else.

Input: the ``preprocess`` output, the ``fetch_detector`` folder and ``train.backbone``.
Output: one ``.npz`` holding

- ``dlib_face``: dlib face descriptors of every crop (:func:`faceage.face_encoder.embed_dataset`);
- ``dlib_age``: the 5-point-aligned 64x64 chips of every crop (:mod:`faceage.chips`), uint8;
- any image backbone: no features (``kind = "none"``): a CNN experiment does not pay ~4 min
  of descriptors it never reads.

DVC reruns the stage only when ``train.backbone`` (or the crops) change, and its run cache
restores an earlier backbone's features when an experiment switches back.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np

from faceage.chips import DLIB_AGE, chip_files
from faceage.detector import SHAPE5_FILE, read_manifest
from faceage.face_encoder import FACE_ENCODER, embed_dataset

log = logging.getLogger(__name__)


def compute_features(backbone: str, faces_dir: str | Path, model_dir: str | Path, out_path: str | Path,
                     workers: int = 0) -> int:
    """Writes the features ``backbone`` trains on into ``out_path`` (atomically).

    Args:
        backbone: ``train.backbone``.
        faces_dir: ``preprocess`` output.
        model_dir: ``fetch_detector`` output.
        out_path: The ``.npz`` to write.
        workers: Processes; 0 = one per core.

    Returns:
        The number of crops processed (0 for image backbones).
    """
    if backbone == FACE_ENCODER:
        return embed_dataset(faces_dir, model_dir, out_path, workers=workers)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.npz")
    if backbone == DLIB_AGE:
        from faceage.preprocess import read_crop_settings, read_faces_manifest

        crops = [r["crop"] for r in read_faces_manifest(faces_dir)]
        margin = read_crop_settings(faces_dir)["margin"]
        manifest = read_manifest(model_dir, verify=True)
        log.info("cutting %d aligned 64x64 chips for train.backbone=%s", len(crops), backbone)
        chips = chip_files(faces_dir, crops, model_dir, margin, workers)
        np.savez(tmp, kind=np.array(DLIB_AGE), crops=np.array(crops), chips=chips, margin=np.array(margin),
                 shape_predictor_sha256=np.array(manifest["files"][SHAPE5_FILE]))
    else:
        log.info("train.backbone=%s reads the crops themselves: no features computed", backbone)
        np.savez(tmp, kind=np.array("none"), crops=np.array([], dtype=str))
        crops = []
    os.replace(tmp, out_path)
    return len(crops)


def load_chips(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """``{crop path: (3, 64, 64) uint8 chip}`` and the settings they were cut with.

    Raises:
        ValueError: The file holds no chips (it was written for another ``train.backbone``).
    """
    with np.load(path) as z:
        if "chips" not in z.files:
            raise ValueError(f"{path} holds no aligned chips: rerun the embed stage with train.backbone={DLIB_AGE}")
        table = dict(zip(z["crops"].tolist(), z["chips"]))
        info = {"shape_predictor_sha256": str(z["shape_predictor_sha256"]), "margin": float(z["margin"])}
    return table, info
