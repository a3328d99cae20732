"""ONNX export of a checkpoint, checked against torch on real crops before anyone serves it.

Input: a FaceAge checkpoint (any backbone: torchvision CNNs, the ``dlib_face`` head, and any
module whose checkpoint names a :mod:`faceage.inputs` kind) and real face crops (the
``preprocess`` output). Output: an ONNX file whose graph is :class:`faceage.inference.AgeGraph`
(stored input -> ``age``, ``age_std``, ``probs``) with a dynamic batch axis; the checkpoint's
settings travel inside it as the metadata entry ``faceage`` (JSON), so the file describes
itself like the checkpoint does; and a report of the check: the largest absolute difference of
the age distribution (and of age and age_std) between ONNX Runtime and torch on the crops, which
must stay within ``tolerance`` (1e-4) or the export is refused.

Everything the graph does not do, input preparation (resize, or dlib descriptors), happens in
:mod:`faceage.inputs` on both sides, so only the network is compared.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceage.errors import FaceAgeError
from faceage.inference import AgeModel
from faceage.ort_module import exportable_pools

log = logging.getLogger(__name__)

OPSET = 17
TOLERANCE = 1e-4  # max abs difference of the age distribution, ONNX Runtime vs torch
# Max abs difference of age and age_std (years): the parity the CLI (torch) and the service (ONNX) promise. The
# distribution's tolerance does not bound them: age sums 101 ages times their probabilities, and age_std comes
# from the tempered distribution, which ``probs`` (temperature 1) does not show.
AGE_TOLERANCE_YEARS = 1e-3
INPUT_NAME = "input"
OUTPUT_NAMES = ("age", "age_std", "probs")
META_KEY = "faceage"  # ONNX metadata entry holding the checkpoint's settings (JSON)


class ExportError(FaceAgeError, RuntimeError):
    """The exported graph disagrees with the torch model, or no real crops were given."""


def _json_ready(value: Any) -> Any:
    return json.loads(json.dumps(value, default=lambda v: v.tolist() if hasattr(v, "tolist") else str(v)))


def export_onnx(checkpoint: str | Path, detector_dir: str | Path | None, crops: list[np.ndarray],
                out_path: str | Path, *, tolerance: float = TOLERANCE,
                age_tolerance: float = AGE_TOLERANCE_YEARS) -> dict[str, Any]:
    """Exports the checkpoint's :class:`~faceage.inference.AgeGraph` and checks it on ``crops``.

    The graph is traced with the TorchScript-based exporter (``dynamo=False``): the dynamo
    exporter needs ``onnxscript`` and was not needed for these plain CNN/MLP graphs.

    Args:
        checkpoint: The FaceAge checkpoint.
        detector_dir: The detector folder (face-encoder files for ``dlib_face``).
        crops: Real uint8 face crops (at least 2) to check the export on.
        out_path: The ``.onnx`` file to write: replaced only once the check passed (a refused export leaves the
            file there as it was), so a concurrent export or reader never sees an unchecked or partial graph.
        tolerance: Largest allowed absolute difference of the age distribution.
        age_tolerance: Largest allowed absolute difference of age and of age_std (years).

    Returns:
        The check: ``{"onnx_opset", "onnx_check_faces", "onnx_max_abs_diff_probs",
        "onnx_max_abs_diff_age", "onnx_max_abs_diff_age_std", "onnx_tolerance"}``.

    Raises:
        ExportError: Fewer than 2 crops, a difference of the distribution above ``tolerance``, or of age or
            age_std above ``age_tolerance`` (in the batch of every crop or in the one-face pass).
    """
    if len(crops) < 2:
        raise ExportError(f"the ONNX check needs real face crops, got {len(crops)}: pass the preprocess output")
    age_model = AgeModel(checkpoint, detector_dir, device="cpu")
    inputs = age_model.prepare(crops)
    out_path = Path(out_path)
    # Written and checked in a temporary file beside out_path, which it replaces only once it passed: written in
    # place, a refused export deleted the graph already there (a served model.onnx), and a second export to the
    # same path, or a reader, met this one's unchecked, half-written bytes.
    # A unique name (not mkstemp's: its file is private, 0600, and the served copy would keep that mode)
    staged = out_path.with_name(f".{out_path.name}.{uuid.uuid4().hex}.tmp")
    try:
        report = _export_checked(age_model, inputs, checkpoint, detector_dir, staged, tolerance, age_tolerance)
        with open(staged, "rb") as f:  # on disk before the rename makes it the graph: not an empty file after a crash
            os.fsync(f.fileno())
        os.replace(staged, out_path)
    finally:
        staged.unlink(missing_ok=True)
    return report


def _export_checked(age_model: AgeModel, inputs: torch.Tensor, checkpoint: str | Path,
                    detector_dir: str | Path | None, out_path: Path, tolerance: float,
                    age_tolerance: float) -> dict[str, Any]:
    """:func:`export_onnx`'s export to ``out_path`` and its check (raises as it does)."""
    import onnx

    example = inputs[:2].contiguous()
    with warnings.catch_warnings(), exportable_pools(age_model.graph, example):
        warnings.simplefilter("ignore")  # the legacy exporter's deprecation and tracer notes
        torch.onnx.export(age_model.graph, (example,), str(out_path), input_names=[INPUT_NAME],
                          output_names=list(OUTPUT_NAMES), opset_version=OPSET, dynamo=False,
                          dynamic_axes={INPUT_NAME: {0: "faces"}, **{n: {0: "faces"} for n in OUTPUT_NAMES}})
    proto = onnx.load(str(out_path))
    onnx.checker.check_model(proto)
    entry = proto.metadata_props.add()
    entry.key, entry.value = META_KEY, json.dumps(_json_ready(age_model.meta))
    onnx.save(proto, str(out_path))

    from faceage.onnx_model import OnnxAgeModel

    served = OnnxAgeModel(out_path, detector_dir, threads=1)
    # Every crop in one batch (another size than the traced one) and one face alone.
    want = age_model.predict_graph(inputs)
    got = served.run(inputs.numpy())
    alone = served.run(inputs[:1].numpy())
    # np.max, not max(): Python's max(x, nan) is x, so a NaN of the one-face pass alone passed the check below
    diff = {name: float(np.max([np.abs(np.asarray(g, np.float64) - np.asarray(w, np.float64)).max(),
                                np.abs(np.asarray(a, np.float64) - np.asarray(w[:1], np.float64)).max()]))
            for name, g, a, w in zip(OUTPUT_NAMES, got, alone, want)}
    report = {"onnx_opset": OPSET, "onnx_check_faces": len(inputs), "onnx_max_abs_diff_probs": diff["probs"],
              "onnx_max_abs_diff_age": diff["age"], "onnx_max_abs_diff_age_std": diff["age_std"],
              "onnx_tolerance": tolerance}
    log.info("ONNX export of %s checked on %d real faces: max |diff| probs %.2e, age %.2e, age_std %.2e",
             age_model.meta["backbone"], len(inputs), diff["probs"], diff["age"], diff["age_std"])
    if not diff["probs"] <= tolerance:
        raise ExportError(f"the ONNX graph of {checkpoint} differs from torch by {diff['probs']:.3g} in the age "
                          f"distribution on {len(inputs)} real faces (tolerance {tolerance})")
    for name in ("age", "age_std"):
        if not diff[name] <= age_tolerance:  # NaN too
            raise ExportError(f"the ONNX graph of {checkpoint} differs from torch by {diff[name]:.3g} years in "
                              f"{name} on {len(inputs)} real faces (tolerance {age_tolerance} years)")
    return report
