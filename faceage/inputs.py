"""Network inputs from face crops, without torch: one definition for training, evaluate and serving.

Input: uint8 (S, S, 3) face crops from :func:`faceage.faces.crop_faces` (or ``dlib_age``
chips, below) and a checkpoint's
settings (``meta``). Output: the *stored input form* of the checkpoint's ``meta["input"]`` kind,
a numpy array whose first axis is the face:

- ``image``: uint8 (N, 3, size, size), the crop resized with PIL (bilinear, antialiased when
  shrinking); normalisation happens inside the network's graph (:class:`faceage.inference.AgeGraph`);
- ``dlib_face_embedding``: float32 (N, 2, 128) dlib face descriptors of the crop and its mirror
  image (:class:`faceage.face_encoder.DlibFaceEncoder`, computed outside the graph);
- ``dlib_age_chip``: uint8 (N, 3, 64, 64) chips aligned with the 5-point shape predictor,
  cut from the unresampled margin region by ``preprocess`` (``chips.npz``) and by
  :class:`faceage.predict.FaceLocator` (:mod:`faceage.chips`), never from a resized crop; the
  preparation only stacks them; normalised inside the graph like images;
- ``dlib_chip_pair``: uint8 (N, 3, 214, 150): each face's age chip and its 150 px chip for dlib's
  face-recognition network, cut from the same landmarks (:func:`faceage.chips.make_pair`), the
  input of ``dlib_age``'s ``fused`` head; both networks run inside the graph.

The datasets (``train``/``evaluate``), the torch :class:`faceage.inference.AgeModel` and the ONNX
Runtime model of the service (:mod:`faceage.onnx_model`) all prepare inputs here, so the served
numbers are the evaluated ones. A new input kind needs only one :class:`InputKind` in
:data:`INPUT_KINDS`: its preparation, dtype, whether the network normalises it, and the detector
files it reads; export, packaging and serving are generic over it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from faceage.detector import RECOGNITION_FILE, SHAPE5_FILE
from faceage.errors import FaceAgeError

IMAGE = "image"
DLIB_FACE_EMBEDDING = "dlib_face_embedding"
DLIB_AGE_CHIP = "dlib_age_chip"
DLIB_CHIP_PAIR = "dlib_chip_pair"
CHIP_KINDS = (DLIB_AGE_CHIP, DLIB_CHIP_PAIR)  # cut from the margin region by faceage.chips, not resized crops


class CheckpointSettingsError(FaceAgeError, ValueError):
    """A checkpoint's settings (``meta``) name an input kind this version does not know, or lack one it reads:
    a checkpoint of another FaceAge version, or a hand-made one."""


def resize_crop(crop: np.ndarray, image_size: int) -> np.ndarray:
    """(H, W, 3) uint8 crop -> (3, S, S) uint8 array (PIL bilinear, antialiased when shrinking).

    Raises:
        ValueError: ``crop`` is not a non-empty RGB uint8 array, as :func:`faceage.faces.crop_faces` cuts. Cast
            (``dtype=np.uint8``), a float crop in [0, 1] became a black face that got a confident age, and a grey or
            RGBA one failed in numpy ("axes don't match array") or reached the network with 4 channels; the
            descriptor and chip inputs refuse them too.
    """
    crop = np.asarray(crop)
    if crop.dtype != np.uint8 or crop.ndim != 3 or crop.shape[2] != 3 or not crop.shape[0] * crop.shape[1]:
        raise ValueError(f"input {IMAGE!r} takes a non-empty RGB uint8 face crop (H, W, 3), as "
                         f"faceage.faces.crop_faces cuts; got shape {crop.shape} of {crop.dtype}")
    if crop.shape[:2] != (image_size, image_size):
        crop = np.asarray(Image.fromarray(crop).resize((image_size, image_size), Image.Resampling.BILINEAR))
    return np.ascontiguousarray(crop.transpose(2, 0, 1))


@dataclass(frozen=True)
class InputKind:
    """How one ``meta["input"]`` kind turns crops into network input.

    Attributes:
        name: The ``meta["input"]`` value.
        build: ``(meta, detector_dir) -> prepare``, where ``prepare(crops) -> np.ndarray`` (N first).
            Heavy resources (e.g. dlib networks) are loaded here, once per model.
        dtype: The stored input's numpy dtype (the ONNX graph's input type).
        normalise: The network takes the stored input normalised with the checkpoint's mean/std
            (uint8 images), else as float, as it is (:func:`faceage.inference.input_fn`).
        files: Files of the ``fetch_detector`` folder that ``build`` reads (packaged with the model).
        settings: The ``meta`` keys that ``build`` and the graph's input step read.
    """

    name: str
    build: Callable[[dict[str, Any], Path | None], Callable[[list[np.ndarray]], np.ndarray]]
    dtype: type
    normalise: bool = False
    files: tuple[str, ...] = ()
    settings: tuple[str, ...] = ()


def _image_preparer(meta: dict[str, Any], detector_dir: Path | None) -> Callable[[list[np.ndarray]], np.ndarray]:
    size = int(meta["image_size"])

    def prepare(crops: list[np.ndarray]) -> np.ndarray:
        if not crops:
            return np.zeros((0, 3, size, size), np.uint8)
        return np.stack([resize_crop(c, size) for c in crops])

    return prepare


def _embedding_preparer(meta: dict[str, Any], detector_dir: Path | None) -> Callable[[list[np.ndarray]], np.ndarray]:
    from faceage.face_encoder import DlibFaceEncoder

    if detector_dir is None:
        raise ValueError(f"input {DLIB_FACE_EMBEDDING!r} needs the detector folder (face encoder files)")
    return DlibFaceEncoder(detector_dir, meta["crop"]["margin"]).embed_many


def _chip_preparer(meta: dict[str, Any], detector_dir: Path | None) -> Callable[[list[np.ndarray]], np.ndarray]:
    from faceage.chips import stack_chips

    return stack_chips


def _pair_preparer(meta: dict[str, Any], detector_dir: Path | None) -> Callable[[list[np.ndarray]], np.ndarray]:
    from faceage.chips import stack_pairs

    return stack_pairs


INPUT_KINDS: dict[str, InputKind] = {
    IMAGE: InputKind(IMAGE, _image_preparer, np.uint8, normalise=True, settings=("image_size", "mean", "std")),
    DLIB_FACE_EMBEDDING: InputKind(DLIB_FACE_EMBEDDING, _embedding_preparer, np.float32,
                                   files=(SHAPE5_FILE, RECOGNITION_FILE)),
    DLIB_AGE_CHIP: InputKind(DLIB_AGE_CHIP, _chip_preparer, np.uint8, normalise=True, files=(SHAPE5_FILE,),
                             settings=("mean", "std")),
    DLIB_CHIP_PAIR: InputKind(DLIB_CHIP_PAIR, _pair_preparer, np.uint8, normalise=True, files=(SHAPE5_FILE,),
                              settings=("mean", "std")),
}


def backbone_input(backbone: str, head: str | None = None) -> str:
    """The input kind a ``train.backbone`` (and ``dlib_age`` head) reads: dlib descriptors, dlib_age
    chips (chip pairs for the ``fused`` head), or images (CNNs)."""
    from faceage.chips import DLIB_AGE
    from faceage.face_encoder import FACE_ENCODER

    if backbone == DLIB_AGE and head == "fused":  # faceage.dlib_age.HEAD_FUSED (that module needs torch)
        return DLIB_CHIP_PAIR
    return {FACE_ENCODER: DLIB_FACE_EMBEDDING, DLIB_AGE: DLIB_AGE_CHIP}.get(backbone, IMAGE)


def input_kind(meta: dict[str, Any]) -> InputKind:
    """The checkpoint's input kind (``meta["input"]``; older checkpoints: from the backbone).

    Raises:
        CheckpointSettingsError: An unknown kind, e.g. a newer version's (the message lists the known ones);
            a ``ValueError`` and a :class:`~faceage.errors.FaceAgeError`, so the CLI says it in one line.
    """
    name = meta.get("input")
    if not name:
        backbone = meta.get("backbone", "")
        if not isinstance(backbone, str):  # a list or an object is unhashable: a TypeError traceback in the CLI
            raise CheckpointSettingsError(f"checkpoint backbone {backbone!r} is not a name; its input kind is unknown")
        name = backbone_input(backbone)
    if not isinstance(name, str) or name not in INPUT_KINDS:
        raise CheckpointSettingsError(f"checkpoint input kind {name!r} is unknown; "
                                      f"known: {', '.join(sorted(INPUT_KINDS))}")
    return INPUT_KINDS[name]


def reads_pairs(meta: dict[str, Any]) -> bool:
    """Whether the checkpoint reads chip pairs (``dlib_age``'s fused head): its datasets load them."""
    return input_kind(meta).name == DLIB_CHIP_PAIR


def input_preparer(meta: dict[str, Any], detector_dir: str | Path | None = None
                   ) -> Callable[[list[np.ndarray]], np.ndarray]:
    """``crops -> stored input`` for a checkpoint (see the module docstring)."""
    return input_kind(meta).build(meta, Path(detector_dir) if detector_dir is not None else None)
