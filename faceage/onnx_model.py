"""The served age model: an exported ONNX graph in ONNX Runtime, without torch.

Input: the ``.onnx`` file :mod:`faceage.export` wrote at packaging time (graph + the checkpoint's
settings as metadata), the detector folder (face-encoder files for ``dlib_face``) and uint8 face
crops. Output: per crop, the age (years) and its calibrated std, like
:class:`faceage.inference.AgeModel`, whose graph this is: inputs are prepared by the same
:mod:`faceage.inputs` code, so served and evaluated numbers agree (to float rounding).

One ``InferenceSession`` per model (per process), with explicit thread counts, and with more than
one thread a second one whose threads spin (built on first idle use); both allocate from one arena.
"""

from __future__ import annotations

import json
from functools import cache, cached_property
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from faceage.errors import FaceAgeError
from faceage.inputs import input_kind, input_preparer

META_KEY = "faceage"  # faceage.export.META_KEY (not imported: that module needs torch)
# Most faces in one forward pass (:meth:`OnnxAgeModel.predict_crops`): ONNX Runtime's arena keeps the memory
# of the largest pass a session ever ran (2.5-3.7 MB a face for the fused dlib_age graph: one 64-face pass took
# a session from 185 to 416 MB; 200 faces in one pass left a process 500 MB larger for good, in passes of 64
# 360 MB; 1,152 faces took the server from 1 to 5 GB). The service's batcher cuts its passes at
# this number too (faceage.serving.DEFAULT_MAX_PASS_FACES).
MAX_PASS_FACES = 64


def cpu_session(model: str | bytes, threads: int, *, spin: bool = True,
                shared_arena: bool = False) -> ort.InferenceSession:
    """An ONNX Runtime CPU session for a model file or its bytes: ``threads`` intra-op threads,
    inter-op 1 (the graph runs sequentially).

    ``spin=False`` lets idle pool threads sleep instead of busy-waiting for the next operator.
    That costs a little when the threads have the cores to themselves, and it stops them from
    taking CPU time from other processes (the service's detection workers) when they do not.

    ``shared_arena=True``: the session allocates from one arena the process's other such sessions share
    (ONNX Runtime's environment allocator), not from its own. Each arena keeps the memory of the
    largest pass it ran, so two sessions over one graph that run in turn (:class:`OnnxAgeModel`'s
    sleeping and spinning ones) kept it twice: 32 faces of the fused graph through each left a
    process at 621 MB, against 377 MB with one session; with the shared arena, 445 MB.

    Raises:
        ValueError: ``threads`` is not a whole number >= 1 (ONNX Runtime's 0, one thread per physical core,
            would ignore the process's affinity and CPU quota).
    """
    options = ort.SessionOptions()
    options.intra_op_num_threads = _thread_count(threads)
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.add_session_config_entry("session.intra_op.allow_spinning", "1" if spin else "0")
    if shared_arena:
        _register_shared_arena()
        options.add_session_config_entry("session.use_env_allocators", "1")
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def _thread_count(threads: Any) -> int:
    """``threads`` checked: ONNX Runtime takes 0 (and less) for "one per physical core", which ignores this
    process's affinity and CPU quota and oversubscribes the cores the count is there to share.

    Raises:
        ValueError: ``threads`` is not a whole number >= 1.
    """
    if isinstance(threads, bool) or not isinstance(threads, (int, np.integer)) or threads < 1:
        raise ValueError(f"threads must be a whole number >= 1, got {threads!r}")
    return int(threads)


class OnnxGraphError(FaceAgeError, ValueError):
    """The ``.onnx`` file is not a FaceAge graph ONNX Runtime can load (a truncated copy, a ``.pt`` or another
    model given by mistake). A :class:`FaceAgeError`, so a stage or the CLI prints it as one line, not a
    traceback; a ``ValueError`` as before, for callers that catch that."""


@cache
def _register_shared_arena() -> None:
    """Registers, once per process, the CPU arena that sessions built with ``shared_arena=True`` share."""
    info = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(info, None)


class OnnxAgeModel:
    """An exported age graph ready for inference (same interface as :class:`~faceage.inference.AgeModel`).

    Args:
        onnx_path: The exported graph.
        detector_dir: The detector folder (face-encoder files for ``dlib_face``).
        threads: ONNX Runtime intra-op threads (inter-op: 1; the graph runs sequentially). They
            do not spin (:func:`cpu_session`), so using every core costs little when the cores
            are busy with detection. With more than one thread a second session over the same
            graph has spinning threads, for callers that know the cores are free (``idle=True``;
            built on first use, ~65 MB for the fused graph): on 2 idle cores, waking sleeping
            threads between operators cost one face of the fused ``dlib_age`` graph ~5 ms (22.1
            against 16.8 ms, round 12). Both sessions allocate from one shared arena
            (:func:`cpu_session`'s ``shared_arena``), so a pass's memory is kept once, not once per session.

    Raises:
        ValueError: ``threads`` is not a whole number >= 1.
        OnnxGraphError: The file is not an ONNX graph (a truncated copy, a ``.pt`` given by mistake), or
            carries no FaceAge settings, or damaged ones (not exported by :mod:`faceage.export`, or cut short).
    """

    device = "cpu (ONNX Runtime)"

    def __init__(self, onnx_path: str | Path, detector_dir: str | Path | None = None, *, threads: int = 1):
        # Checked before the file: inside the try below, a bad count was reported as a file ONNX Runtime cannot load
        threads = _thread_count(threads)
        try:
            self.session = cpu_session(str(onnx_path), threads, spin=False, shared_arena=True)
        except Exception as e:  # ONNX Runtime's own types (InvalidProtobuf, NoSuchFile, ...), none a ValueError
            raise OnnxGraphError(f"{onnx_path} is not an ONNX graph ONNX Runtime can load: "
                                 f"{' '.join(str(e).split())[:200]}") from e
        self._path, self._threads = str(onnx_path), int(threads)
        stored = self.session.get_modelmeta().custom_metadata_map.get(META_KEY)
        if stored is None:
            # The settings are the file's last field, so a FaceAge export cut short right before them parses too
            raise OnnxGraphError(f"{onnx_path} has no {META_KEY!r} metadata: export it with faceage.export (it is "
                                 f"another graph, or a copy of a FaceAge export cut short before its settings)")
        try:
            self.meta: dict[str, Any] = json.loads(stored)
        except ValueError as e:  # json.loads' bare traceback named neither the file nor the entry
            raise OnnxGraphError(f"{onnx_path}: its {META_KEY!r} settings are not JSON ({e}): the file is damaged; "
                                 f"export it again with faceage.export") from e
        if not isinstance(self.meta, dict):
            raise OnnxGraphError(f"{onnx_path}: its {META_KEY!r} settings are not a JSON object but "
                                 f"{type(self.meta).__name__}: export it again with faceage.export")
        self.kind = input_kind(self.meta)
        self.temperature = float(self.meta.get("temperature", 1.0))
        self.detector_dir = detector_dir
        self._input = self.session.get_inputs()[0].name
        self._prepare = None

    @cached_property
    def spinning(self) -> ort.InferenceSession:
        """The session with spinning threads (``idle=True``), built on first use; with one thread
        there is nothing to spin, and it is :attr:`session` itself."""
        return (cpu_session(self._path, self._threads, spin=True, shared_arena=True) if self._threads > 1
                else self.session)

    def prepare(self, crops: list[np.ndarray]) -> np.ndarray:
        """Crops -> the stored input form (:mod:`faceage.inputs`)."""
        if self._prepare is None:  # dlib_face loads the face encoder here, on first use
            self._prepare = input_preparer(self.meta, self.detector_dir)
        return self._prepare(list(crops))

    def run(self, inputs: np.ndarray, *, idle: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Age, age_std and the age distribution for stored inputs (``idle``: the cores are free, the
        threads may spin)."""
        session = self.spinning if idle else self.session
        age, std, probs = session.run(None, {self._input: np.ascontiguousarray(inputs, dtype=self.kind.dtype)})
        return age, std, probs

    def predict_crops(self, crops: list[np.ndarray], *, idle: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """Ages and stds (years, float64) for uint8 crops, in batched passes of at most
        :data:`MAX_PASS_FACES` (``idle``: see :meth:`run`)."""
        if len(crops) == 0:
            return np.zeros(0), np.zeros(0)
        inputs = self.prepare(crops)
        out = [self.run(inputs[i:i + MAX_PASS_FACES], idle=idle)[:2] for i in range(0, len(inputs), MAX_PASS_FACES)]
        return (np.concatenate([age for age, _ in out]).astype(np.float64),
                np.concatenate([std for _, std in out]).astype(np.float64))


def load_age_model(onnx_path: str | Path, detector_dir: str | Path | None, *, device: str | None = "cpu",
                   threads: int = 1) -> OnnxAgeModel:
    """The ONNX runtime of :class:`faceage.predict.AgePredictor` (CPU; ``device`` is ignored)."""
    return OnnxAgeModel(onnx_path, detector_dir, threads=threads)
