"""The ``embed`` stage: what the chosen ``train.backbone`` reads from the crops, and nothing else.

Input: the ``preprocess`` output, the ``fetch_detector`` folder and ``train.backbone``.
Output: one ``.npz`` holding

- ``dlib_face``: dlib face descriptors of every crop (:func:`faceage.face_encoder.embed_dataset`);
- ``dlib_age``: the 5-point-aligned 64x64 chips (and 150x150 face-recognition chips, which the
  ``fused`` head reads) of every crop, uint8, as ``preprocess`` cut them from the photo's own
  pixels (:mod:`faceage.chips`; read from its ``chips.npz``, nothing recomputed);
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

from faceage.chips import (CHIPS_FILE, DLIB_AGE, FeaturesKindError, FeaturesMissingError, load_chips, load_face_chips,
                           save_chips)
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

    Raises:
        faceage.preprocess.FacesMissingError: (a ``FileNotFoundError``) ``faces_dir`` is no preprocess output, or
            (``dlib_age``) has no ``chips.npz``.
        faceage.chips.FeaturesKindError: (a ``ValueError``, ``dlib_age``) Its ``chips.npz`` does not match the
            manifest or the ``fetch_detector`` folder's shape predictor.
    """
    if backbone == FACE_ENCODER:
        return embed_dataset(faces_dir, model_dir, out_path, workers=workers)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    if backbone == DLIB_AGE:
        from faceage.preprocess import FacesMissingError, read_faces_manifest

        crops = [r["crop"] for r in read_faces_manifest(faces_dir)]
        source = Path(faces_dir) / CHIPS_FILE
        try:
            table, info = load_chips(source)
        except FeaturesMissingError as e:
            # open_features' one line (the file, and `dvc repro -f preprocess`), as the stage's error: chips.npz is
            # part of the preprocess output, so a FacesMissingError (callers catch that type, a FileNotFoundError)
            raise FacesMissingError(str(e)) from None
        faces = load_face_chips(source)
        missing = [c for c in crops if c not in table or c not in faces]
        if missing:
            raise FeaturesKindError(f"{source} has no chip (or face chip) for {len(missing)} crop(s) of the "
                                    f"manifest (first: {missing[0]}); run `dvc repro -f preprocess`")
        expected = read_manifest(model_dir, verify=True)["files"][SHAPE5_FILE]
        if info["shape_predictor_sha256"] != expected:
            raise FeaturesKindError(f"{source} was cut with another shape predictor (sha256 "
                                    f"{info['shape_predictor_sha256']}, {model_dir} holds {expected}); run "
                                    "`dvc repro -f preprocess`")
        log.info("%d aligned 64x64 and 150x150 chips (cut by preprocess) for train.backbone=%s", len(crops), backbone)
        save_chips(out_path, crops, [table[c] for c in crops], info["margin"], info["shape_predictor_sha256"],
                   face_chips=[faces[c] for c in crops])
        return len(crops)
    log.info("train.backbone=%s reads the crops themselves: no features computed", backbone)
    tmp = out_path.with_name(out_path.name + ".tmp.npz")
    np.savez(tmp, kind=np.array("none"), crops=np.array([], dtype=str))
    os.replace(tmp, out_path)
    return 0
