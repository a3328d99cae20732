"""dlib's HOG face detector with its image pyramid split over two threads: the same boxes and scores, sooner.

Input: the detector file (``fetch_detector``'s ``frontal_face_detector.svm``) and RGB or grey
uint8 images. Output: what ``dlib.fhog_object_detector.run(image, upsample, 0.0)`` returns, as
``(dlib.rectangle, score)`` pairs in its order, computed in about half the time on two free cores.

How dlib detects (``object_detector<scan_fhog_pyramid<pyramid_down<6>>>``): ``upsample`` times
``pyramid_up``, then a pyramid of levels each 5/6 the side of the one before, HOG features of
every level, the five filters over each, every window scoring >= 0 mapped back to the top level,
then greedy non-maximum suppression over all of them, best first. Levels 0 and 1 hold about as
many pixels as all the others together (1 + 0.69 against 0.48 + 0.33 + ...), so:

- one thread runs the detector limited to levels 0 and 1 on the top level;
- the other builds levels 2, 3, ... with dlib's own ``pyramid_down`` (the very images dlib
  builds) and runs the detector limited to one level on each, mapping each window back with
  dlib's ``rect_up`` from its own level, as dlib does;
- both run with suppression off, and the union goes through dlib's suppression, rewritten here
  (:func:`overlaps`), with the file's own thresholds.

The limited detectors are the same file with two serialized fields changed
(:class:`DetectorFile`): ``max_pyramid_levels`` (1000 in dlib's file) and the suppression
thresholds (set to 1: nothing overlaps more). dlib's Python API exposes neither. A file whose
layout is not the one read here (another dlib serialization version) raises
:class:`UnsupportedDetectorFile`; :class:`faceage.faces.FaceDetector` then detects on one thread.

Measured (``benchmarks/bench_detect.py``): the boxes and scores equal dlib's on every photo tried
(``tests/unit/test_hog_pyramid.py``; ``tests/integration/test_hog_pyramid.py`` on the shared
photos); about 0.55x the time on a one-face photo of 565x800 px, with both cores free.
"""

from __future__ import annotations

import math
import os
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import dlib
import numpy as np

SPLIT_LEVEL = 2  # levels [0, 2) on one thread, [2, ...) on the other
# dlib's field order (object_detector version 2 around scan_fhog_pyramid version 1), each an integer
# in dlib's variable-length encoding; a double is two of them, mantissa and base-2 exponent.
FIELDS = ("version", "scanner_version", "feats_max_size", "feats_size", "cell_size", "padding",
          "window_width", "window_height", "max_pyramid_levels", "min_layer_width", "min_layer_height",
          "nuclear_norm_mantissa", "nuclear_norm_exponent", "dimensions", "match_mantissa",
          "match_exponent", "overlap_mantissa", "overlap_exponent", "filters")


class UnsupportedDetectorFile(ValueError):
    """The detector file is not a dlib HOG detector serialized the way :class:`DetectorFile` reads."""


def decode_int(data: bytes, pos: int) -> tuple[int, int]:
    """dlib's serialized integer at ``pos``: a byte with the length (and 0x80 for negative), then
    little-endian bytes. Returns the value and the position after it."""
    head = data[pos] if pos < len(data) else 0
    size = head & 0x7F
    if pos + 1 + size > len(data):
        raise UnsupportedDetectorFile("the detector file ends inside its header")
    if size > 8:
        raise UnsupportedDetectorFile(f"bad integer at byte {pos} of the detector file")
    value = int.from_bytes(data[pos + 1:pos + 1 + size], "little")
    return (-value if head & 0x80 else value), pos + 1 + size


def encode_int(value: int) -> bytes:
    """The inverse of :func:`decode_int` (zero is one zero byte after its length, as dlib writes it)."""
    body = abs(value).to_bytes(max(1, (abs(value).bit_length() + 7) // 8), "little")
    return bytes([len(body) | (0x80 if value < 0 else 0)]) + body


@dataclass(frozen=True)
class DetectorFile:
    """A serialized ``fhog_object_detector``: its header fields and the bytes to rewrite them.

    Raises:
        UnsupportedDetectorFile: Another serialization version or layout.
    """

    data: bytes
    values: dict[str, int]
    spans: dict[str, tuple[int, int]]

    @classmethod
    def read(cls, path: str | Path) -> DetectorFile:
        data = Path(path).read_bytes()
        values, spans, pos = {}, {}, 0
        for name in FIELDS:
            start = pos
            values[name], pos = decode_int(data, pos)
            spans[name] = (start, pos)
        if (values["version"], values["scanner_version"], values["feats_size"]) != (2, 1, 0):
            raise UnsupportedDetectorFile(f"{path}: object_detector version {values['version']}, scanner "
                                          f"version {values['scanner_version']}; expected 2 and 1")
        if values["min_layer_width"] < 1 or values["min_layer_height"] < 1 or values["max_pyramid_levels"] < 1:
            raise UnsupportedDetectorFile(f"{path}: implausible pyramid settings {values}")
        return cls(data, values, spans)

    def threshold(self, name: str) -> float:
        """A suppression threshold: ``"match"`` (overlap / bounding box of both) or ``"overlap"``
        (overlap / either box)."""
        return math.ldexp(self.values[f"{name}_mantissa"], self.values[f"{name}_exponent"])

    def rewritten(self, *, max_levels: int, suppress: bool) -> bytes:
        """The file with ``max_pyramid_levels`` set and, unless ``suppress``, suppression off."""
        new = {"max_pyramid_levels": max_levels}
        if not suppress:  # thresholds 1.0: no ratio exceeds them, nothing is suppressed
            new.update(match_mantissa=1, match_exponent=0, overlap_mantissa=1, overlap_exponent=0)
        out, pos = bytearray(), 0
        for name in FIELDS:
            start, end = self.spans[name]
            out += self.data[pos:start]
            out += encode_int(new[name]) if name in new else self.data[start:end]
            pos = end
        out += self.data[pos:]
        return bytes(out)

    def load(self, **kwargs) -> dlib.fhog_object_detector:
        """:meth:`rewritten` loaded by dlib (which reads detectors only from files).

        Raises:
            UnsupportedDetectorFile: dlib cannot read it (a file cut short after its header), or there is no
                temporary folder to write it to (a read-only root file system): the caller detects with dlib's
                own detector on one thread instead of failing.
        """
        try:
            with tempfile.TemporaryDirectory(prefix="faceage-hog-") as tmp:
                path = Path(tmp) / "detector.svm"
                path.write_bytes(self.rewritten(**kwargs))
                return dlib.fhog_object_detector(str(path))
        except (RuntimeError, OSError) as e:
            raise UnsupportedDetectorFile(f"the split HOG detector cannot be built ({type(e).__name__}: "
                                          f"{' '.join(str(e).split())})") from e


def overlaps(a: dlib.rectangle, b: dlib.rectangle, match: float, overlap: float) -> bool:
    """dlib's ``test_box_overlap``: the intersection over the bounding box of both (not the union)
    above ``match``, or over either box above ``overlap``."""
    inner = a.intersect(b).area()
    if inner == 0:
        return False
    return inner / (a + b).area() > match or inner / a.area() > overlap or inner / b.area() > overlap


class SplitHogDetector:
    """``fhog_object_detector.run(image, upsample, 0.0)`` computed on two threads (module docstring).

    Not thread-safe (each half keeps dlib scratch state): one caller at a time, as
    :class:`faceage.faces.FaceDetector` ensures with its lock. A forked child starts its own thread (the
    parent's is not in it: the child's first :meth:`run` waited for ever on the executor it inherited).

    Raises:
        UnsupportedDetectorFile: The file's layout is not the one this class rewrites.
    """

    def __init__(self, path: str | Path):
        spec = DetectorFile.read(path)
        self.top = spec.load(max_levels=SPLIT_LEVEL, suppress=False)  # levels 0 and 1
        self.one_level = spec.load(max_levels=1, suppress=False)  # one level: the image it is given
        self.match, self.overlap = spec.threshold("match"), spec.threshold("overlap")
        self.max_levels = spec.values["max_pyramid_levels"]
        self.min_layer = (spec.values["min_layer_width"], spec.values["min_layer_height"])
        self._down = dlib.pyramid_down(6)
        self._half = dlib.pyramid_down(2)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faceage-hog")
        self._pid = os.getpid()

    def _executor(self) -> ThreadPoolExecutor:
        """The second thread, this process's own: a forked child has the parent's executor, not its thread."""
        if self._pid != os.getpid():
            self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="faceage-hog")
            self._pid = os.getpid()
        return self._thread

    def levels(self, height: int, width: int) -> int:
        """How many pyramid levels dlib scans on an image of this size (``scan_fhog_pyramid::load``)."""
        rect, levels = dlib.rectangle(0, 0, width - 1, height - 1), 0
        while True:
            rect = self._down.rect_down(rect)
            levels += 1
            if not (rect.width() >= self.min_layer[0] and rect.height() >= self.min_layer[1]
                    and levels < self.max_levels):
                return levels

    def upsampled(self, image: np.ndarray, upsample: int) -> np.ndarray:
        """dlib's ``pyramid_up`` ``upsample`` times: bilinear to the size ``pyramid_down<2>::rect_up`` gives."""
        for _ in range(upsample):
            up = self._half.rect_up(dlib.rectangle(0, 0, image.shape[1] - 1, image.shape[0] - 1))
            image = dlib.resize_image(image, up.bottom() + 1, up.right() + 1)
        return image

    def run(self, image: np.ndarray, upsample: int) -> list[tuple[dlib.rectangle, float]] | None:
        """Boxes and scores of ``fhog_object_detector.run(image, upsample, 0.0)``, in its order;
        ``None`` for an image too small to split (at most :data:`SPLIT_LEVEL` levels): run dlib's."""
        top = self.upsampled(np.ascontiguousarray(image), upsample)
        levels = self.levels(*top.shape[:2])
        if levels <= SPLIT_LEVEL:
            return None
        fine = self._executor().submit(self.top.run, top, 0, 0.0)
        windows = []
        try:
            level = top
            for k in range(1, levels):
                level = self._down(level)  # level k, built from level k - 1 as dlib builds it
                if k >= SPLIT_LEVEL:
                    rects, scores, _ = self.one_level.run(level, 0, 0.0)
                    windows += [(s, self._down.rect_up(r, k)) for r, s in zip(rects, scores)]
        finally:
            rects, scores, _ = fine.result()
        windows += list(zip(scores, rects))
        windows.sort(key=lambda w: -w[0])  # dlib: best first, then greedy suppression
        kept: list[tuple[float, dlib.rectangle]] = []
        for score, rect in windows:
            if not any(overlaps(k, rect, self.match, self.overlap) for _, k in kept):
                kept.append((score, rect))
        return [(self._half.rect_down(r, upsample) if upsample else r, s) for s, r in kept]
