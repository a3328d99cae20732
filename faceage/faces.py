"""Face detection (dlib HOG or CNN) and the margin crop: the one crop path.

Input: an RGB uint8 array (from :func:`faceage.images.load_image`). Output: face boxes, the
square margin region around each at the photo's own resolution, and the crop of ``size`` x
``size`` pixels resized from it.

``preprocess`` and the service (:class:`faceage.predict.FaceLocator`) both cut
:func:`margin_region` and resize it with :func:`resize_region` (:func:`crop_face`); ``dlib_age``
chips are cut from the same region (:mod:`faceage.chips`), around boxes found by the same
:meth:`FaceDetector.detect` (a photo over :data:`MAX_DETECT_PIXELS` is detected downscaled by both).
There is no second copy of the crop geometry, so a model is served exactly the pixels it was trained on.
"""

from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import dlib
import numpy as np
from PIL import Image

from faceage.detector import CNN_FILE, HOG_FILE, load_dlib_file
from faceage.errors import FaceAgeError

log = logging.getLogger(__name__)

RETRY_SIDE = 400  # longer side (px) of the bordered image of the detector's second look
RELEASE_MARGIN = 0.4  # APPA-REAL's NAME_face.jpg: the face with 40% of its side added on each side
# dlib's CNN finds no face under ~70 px (0 of 20 utk-external faces scaled to 60 px or less, 18 of
# 20 at 80 px) and on an image under ~10 px a side it raises, after which its heap is corrupt (a
# later call or the process exit crashes): it never looks at an image with a side under this.
CNN_MIN_SIDE = 40
# dlib's CNN holds about 1 KB per pixel it looks at (the image after upsampling): a 1920 x 1080 photo at
# upsample 1 took 8.1 GB and 59 s, at half the side 2.1 GB (measured). `detector: cnn` looks at a photo
# scaled down to at most this many pixels after upsampling (~2 GB), as the HOG detector is capped by
# the service's max_detect_pixels; a face there still spans ~200 px of a 1080p photo at upsample 1.
CNN_MAX_PIXELS = 2_000_000
# Photos with more pixels are looked at downscaled (BOX) to this many, boxes mapped back: a 20 MP photo at
# upsample 1 took ~1 GB and 8 s per look at full size, and a face in it is still >100 px at 3840 x 2160.
# The service's and the CLI's default (FACEAGE_MAX_DETECT_PIXELS, --max-detect-pixels), and preprocess's:
# one detection for both, so a large photo in a training or external set is cut as the service cuts it.
MAX_DETECT_PIXELS = 3840 * 2160
# dlib's CNN computes on dlib's own thread pool, started at its first run in a process with DLIB_NUM_THREADS threads
# (dlib's default: one per core the hardware has). A fork copies the pool without its threads, and the child's first
# CNN run waited for them for ever. (pid, pool threads) of the process whose CNN run here started it.
_cnn_pool: tuple[int, int] | None = None


class CnnAfterForkError(FaceAgeError, RuntimeError):
    """dlib's CNN was asked to run in a process forked after it ran in the parent: it would wait for ever."""


def _dlib_pool_threads() -> int:
    """The threads dlib's pool starts with (dlib's ``default_num_threads``): ``DLIB_NUM_THREADS``, else the
    hardware's core count."""
    try:
        return int(os.environ["DLIB_NUM_THREADS"])
    except (KeyError, ValueError):
        return os.cpu_count() or 1


def _cnn_may_run() -> None:
    """Records the process that starts dlib's pool with its first CNN run; in a child forked after it, raises
    :class:`CnnAfterForkError` (where the pool has threads) instead of letting the CNN wait for ever."""
    global _cnn_pool
    if _cnn_pool is None:
        _cnn_pool = (os.getpid(), _dlib_pool_threads())
    elif _cnn_pool[0] != os.getpid() and _cnn_pool[1] > 0:
        raise CnnAfterForkError(
            f"dlib's CNN face detector cannot run in this process (pid {os.getpid()}): it was forked after the CNN "
            f"ran in process {_cnn_pool[0]}, and the fork copied dlib's thread pool without its {_cnn_pool[1]} "
            "threads, so the CNN would wait for them for ever. Start worker processes with the spawn start method "
            "(multiprocessing.get_context('spawn'), as preprocess and the service do), or set DLIB_NUM_THREADS=0 in "
            "the environment before the first CNN run (the CNN then computes on the calling thread)")


@dataclass(frozen=True)
class FaceBox:
    """A detected face: pixel box ``[left, top, right, bottom)`` and detector score."""

    left: int
    top: int
    right: int
    bottom: int
    score: float

    @property
    def width(self) -> int:
        return self.right - self.left

    @property
    def height(self) -> int:
        return self.bottom - self.top

    @property
    def area(self) -> int:
        return max(self.width, 0) * max(self.height, 0)

    def as_list(self) -> list[int]:
        return [self.left, self.top, self.right, self.bottom]


class FaceDetector:
    """dlib face detector loaded from a ``fetch_detector`` folder.

    Args:
        model_dir: Folder written by :func:`faceage.detector.fetch_detector_files`.
        kind: ``"hog"`` (fast, frontal faces) or ``"cnn"`` (mmod; finds more, ~25x slower on CPU).
        upsample: How many times to upsample the image before detecting (finds smaller faces).
        retry_pad: When nothing is found, look once more for a face that fills the frame (a tight
            crop, a headshot): such a face touches the borders, where HOG's window cannot see it.
            The second look extends the image on every side by this fraction of its longer side
            (edge pixels repeated), scales it to :data:`RETRY_SIDE` px (a frame-filling face is
            large there, so no upsampling) and maps the boxes back. 0 disables. Measured with HOG,
            0.35 (``reports/recipe_dlib_age.md``, round 6): of the images where the first look
            found nothing, 81 of 89 on the shared sample and 48 of 65 on utk-external are
            recovered; none of the 12 ``wild`` photos without one gains a face; the second look
            costs ~29 ms on them against ~170 ms for the first (with upsample 1 instead: 393 ms).
        cnn_retry_side: When a HOG detector's looks find nothing, a last look with dlib's CNN
            (mmod) detector, which finds faces HOG misses (turned, tilted, old, tightly cropped),
            on the image scaled down to at most this longer side in px (never up; no
            upsampling), so it costs a fraction of a second. 0 disables. Measured at 400
            (round 20): it finds 16 of the 17 utk-external faces and 7 of the 8 sample faces both
            HOG looks miss, and no face in any of the 11 ``wild`` photos without one.
        max_detect_pixels: Larger images are detected on a copy downscaled to this many pixels (box
            filter), the boxes mapped back to the image; 0 never downscales. See :data:`MAX_DETECT_PIXELS`.

    Raises:
        ValueError: Unknown ``kind``, negative ``upsample``, ``cnn_retry_side`` or ``max_detect_pixels``, or
            ``retry_pad`` outside [0, 1].
        FileNotFoundError: A model file it needs is missing from ``model_dir``.
        faceage.detector.DetectorFilesError: dlib cannot read one (the message names it).

    dlib's detectors release the GIL but are not thread-safe (threads sharing one crashed with
    "double free or corruption"), so :meth:`detect` holds a lock; for parallelism use one
    detector per process, as ``preprocess`` and the service's detection pool do. One photo can
    also use two cores: ``detect(image, parallel=True)`` splits HOG's image pyramid over two
    threads (:mod:`faceage.hog_pyramid`) for the same boxes and scores in about half the time.
    """

    def __init__(self, model_dir: str | Path, kind: str = "hog", upsample: int = 1, retry_pad: float = 0.0,
                 cnn_retry_side: int = 0, max_detect_pixels: int = MAX_DETECT_PIXELS):
        if kind not in ("hog", "cnn"):
            raise ValueError(f"detector must be 'hog' or 'cnn', got {kind!r}")
        if upsample < 0:
            raise ValueError(f"upsample must be >= 0, got {upsample}")
        if not 0.0 <= retry_pad <= 1.0:
            raise ValueError(f"retry_pad must be in [0, 1], got {retry_pad}")
        if cnn_retry_side < 0:
            raise ValueError(f"cnn_retry_side must be >= 0, got {cnn_retry_side}")
        if max_detect_pixels < 0:
            raise ValueError(f"max_detect_pixels must be >= 0, got {max_detect_pixels}")
        self.max_detect_pixels = int(max_detect_pixels)
        path = Path(model_dir) / (HOG_FILE if kind == "hog" else CNN_FILE)
        self.cnn_retry_side = cnn_look_side(kind, cnn_retry_side)
        for needed in (path, Path(model_dir) / CNN_FILE) if self.cnn_retry_side else (path,):
            if not needed.exists():
                raise FileNotFoundError(f"{needed} not found: run the fetch_detector stage first")
        self.kind = kind
        self.upsample = upsample
        self.retry_pad = float(retry_pad)
        self.path = path
        self._lock, self._pid = threading.Lock(), os.getpid()
        if kind == "hog":
            self._hog = load_dlib_file(dlib.fhog_object_detector, path)
        if kind == "cnn" or self.cnn_retry_side:
            self._cnn = load_dlib_file(dlib.cnn_face_detection_model_v1, Path(model_dir) / CNN_FILE)

    def detect(self, image: np.ndarray, *, parallel: bool = False) -> list[FaceBox]:
        """Finds every face in an RGB uint8 image in :func:`subject_order`: largest first, ties to the most
        central (then the higher score), so the first is the face ``preprocess`` crops and the service lists first.

        Boxes are clipped to the image; the margin crop may still extend past its edges. When
        nothing is found and ``retry_pad`` > 0, the second look (see the class) runs.
        ``parallel=True`` (HOG): both looks run on two threads, with the same result; worth it
        only when a second core is free. An image over ``max_detect_pixels`` is looked at downscaled.

        Raises:
            ValueError: ``image`` is not an RGB uint8 array (a 2-D greyscale one, RGBA, 16-bit, float).
            CnnAfterForkError: The CNN was to look in a process forked after dlib's CNN ran in its parent (see
                :func:`_cnn_may_run`); a forked child's HOG looks are not affected.
        """
        require_rgb(image, "FaceDetector.detect")
        h, w = image.shape[:2]
        if not self.max_detect_pixels or h * w <= self.max_detect_pixels:
            return subject_order(self._looks(image, parallel), w, h)
        scale = math.sqrt(self.max_detect_pixels / (h * w))
        sw, sh = max(int(w * scale), 1), max(int(h * scale), 1)
        # A side under 1 px is kept at 1, so the other is cut to keep the cap (a 1 x 20000000 strip was looked
        # at as 1 x 12880000, over half as many pixels again as any photo's look).
        sw, sh = min(sw, max(self.max_detect_pixels // sh, 1)), min(sh, max(self.max_detect_pixels // sw, 1))
        small = np.asarray(Image.fromarray(np.ascontiguousarray(image)).resize((sw, sh), Image.Resampling.BOX))
        fx, fy = w / sw, h / sh
        log.debug("detecting on %dx%d instead of %dx%d (max_detect_pixels=%d)", sw, sh, w, h, self.max_detect_pixels)
        boxes = [FaceBox(max(round(b.left * fx), 0), max(round(b.top * fy), 0),
                         min(round(b.right * fx), w), min(round(b.bottom * fy), h), b.score)
                 for b in self._looks(small, parallel)]
        return subject_order(boxes, w, h)

    def _looks(self, image: np.ndarray, parallel: bool) -> list[FaceBox]:
        """:meth:`detect` on an image within the pixel cap: the first look, then the retries."""
        image = np.ascontiguousarray(image)
        h, w = image.shape[:2]
        looked_at = h * w * 4 ** self.upsample
        if self.kind == "cnn" and looked_at > CNN_MAX_PIXELS:
            scale = math.sqrt(CNN_MAX_PIXELS / looked_at)
            boxes = self._detect(_scaled(image, scale), self.upsample, w, h, scale=scale)
        else:
            boxes = self._detect(image, self.upsample, w, h, parallel=parallel)
        pad = int(round(self.retry_pad * max(h, w)))
        if not boxes and pad >= 1:
            # Scaled down first, then bordered: bordering the full image first made its longer side's
            # square of memory (a 20000 x 400 image: 3.6 GB), whatever the pixel cap allowed.
            scale = RETRY_SIDE / (max(h, w) + 2 * pad)
            border = int(round(pad * scale))
            bordered = np.pad(_scaled(image, scale), ((border, border), (border, border), (0, 0)), mode="edge")
            boxes = self._detect(bordered, 0, w, h, scale=scale, shift=border / scale, parallel=parallel)
        if not boxes and self.cnn_retry_side and h * w:  # an empty image has no face (its scale divided by 0)
            scale = min(1.0, self.cnn_retry_side / max(h, w))
            boxes = self._detect(_scaled(image, scale), 0, w, h, scale=scale, kind="cnn")
        return boxes

    def warm_up(self) -> None:
        """Runs the CNN's last look once at its full size, on a blank image: its first run allocates
        its buffers (~60 MB), which a long-running process then holds from the start instead of
        growing by them at the first photo without a face. Nothing to do without the look."""
        if self.cnn_retry_side:
            side = self.cnn_retry_side
            self._detect(np.zeros((side, side, 3), np.uint8), 0, side, side, kind="cnn")

    @cached_property
    def _split_hog(self):
        """The two-thread HOG detector over this detector's file (:mod:`faceage.hog_pyramid`), built on
        the first parallel detect; ``None`` when the file's layout is not one it can rewrite (then one
        thread detects)."""
        from faceage.hog_pyramid import SplitHogDetector, UnsupportedDetectorFile

        try:
            return SplitHogDetector(self.path)
        except UnsupportedDetectorFile as e:
            log.warning("%s: detecting on one thread", e)
            return None

    def _own_lock(self) -> threading.Lock:
        """The lock that keeps one dlib call at a time, this process's own.

        A forked child inherits the parent's lock as it was at the fork: held, when another of the
        parent's threads was detecting then, and no thread in the child would ever release it (its
        first detect waited for ever). The child makes its own, as
        :class:`faceage.hog_pyramid.SplitHogDetector` makes its thread.
        """
        if self._pid != os.getpid():
            self._lock, self._pid = threading.Lock(), os.getpid()
        return self._lock

    def _detect(self, image: np.ndarray, upsample: int, w: int, h: int, scale: float = 1.0,
                shift: float = 0.0, parallel: bool = False, kind: str | None = None) -> list[FaceBox]:
        """Boxes found in ``image`` by ``kind`` (default: this detector's) mapped to the original
        ``w`` x ``h`` image (``/ scale - shift``), clipped to it."""
        if (kind or self.kind) == "cnn" and min(image.shape[:2]) * 2 ** upsample < CNN_MIN_SIDE:
            return []
        with self._own_lock():
            if (kind or self.kind) == "hog":
                split = self._split_hog if parallel else None
                found = split.run(image, upsample) if split is not None else None
                if found is None:
                    rects, scores, _ = self._hog.run(image, upsample, 0.0)
                    found = list(zip(rects, scores))
            else:
                _cnn_may_run()
                found = [(d.rect, d.confidence) for d in self._cnn(image, upsample)]
        boxes = []
        for r, score in found:
            box = FaceBox(
                max(int(round(r.left() / scale - shift)), 0),
                max(int(round(r.top() / scale - shift)), 0),
                min(int(round((r.right() + 1) / scale - shift)), w),
                min(int(round((r.bottom() + 1) / scale - shift)), h),
                float(score),
            )
            if box.width > 1 and box.height > 1:
                boxes.append(box)
        return sorted(boxes, key=lambda b: (-b.area, -b.score))


def require_rgb(image: np.ndarray, what: str) -> None:
    """Raises ValueError unless ``image`` is an (H, W, 3) uint8 array. A 2-D greyscale array was detected on
    when the first look found a face, then its crop failed, and failed at the second look when none was
    found, both in numpy's words; RGBA, 16-bit and float arrays failed in dlib's."""
    if isinstance(image, np.ndarray) and image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3:
        return
    got = f"shape {image.shape} of {image.dtype}" if isinstance(image, np.ndarray) else type(image).__name__
    raise ValueError(f"{what} takes an RGB uint8 array (H, W, 3), as faceage.images.load_image returns "
                     f"(greyscale, RGBA and 16-bit photos converted); got {got}")


def _scaled(image: np.ndarray, scale: float) -> np.ndarray:
    """``image`` resized by ``scale`` (bilinear; each side at least 1 px); itself at scale 1."""
    if scale == 1.0:
        return image
    h, w = image.shape[:2]
    size = (max(int(round(w * scale)), 1), max(int(round(h * scale)), 1))
    return np.asarray(Image.fromarray(image).resize(size, Image.Resampling.BILINEAR))


def crop_retry_pad(crop: dict) -> float:
    """A checkpoint's ``crop.retry_pad`` (``meta["crop"]``, preprocess's settings): 0 for checkpoints
    made before the setting existed, whose faces were found without the retry."""
    return float(crop.get("retry_pad", 0.0))


def cnn_look_side(kind: str, cnn_retry_side: int) -> int:
    """The side of the CNN's last look for a ``kind`` detector: it only follows HOG (a CNN detector has
    already looked with the CNN), so 0 for ``"cnn"``."""
    return int(cnn_retry_side) if kind == "hog" else 0


def crop_cnn_retry_side(crop: dict) -> int:
    """A checkpoint's ``crop.cnn_retry_side``: 0 (no CNN look) for checkpoints made before the setting."""
    return int(crop.get("cnn_retry_side", 0))


def crop_detector_files(crop: dict) -> dict[str, str]:
    """The dlib detector files a checkpoint's crops were found with, each with its sha256 (``meta["crop"]``):
    the detector and, where its last look ran, the CNN detector. Whatever detects for that checkpoint
    (the service, ``evaluate``'s external sets) must use these exact files."""
    files = {crop["detector_file"]: crop["detector_sha256"]}
    if crop_cnn_retry_side(crop):
        files[CNN_FILE] = crop["cnn_retry_sha256"]
    return files


def subject_order(boxes: Sequence[FaceBox], width: int, height: int) -> list[FaceBox]:
    """``boxes`` largest first, ties to the most central, then the higher score: the first is :func:`choose_subject`'s pick, the face
    ``preprocess`` crops for training and ``evaluate`` scores (on external sets too). HOG's boxes come in a
    few sizes per pyramid level, so faces of one group photo often tie on area; :meth:`FaceDetector.detect`'s
    former order (largest, then highest score) put another face first there than the one the pipeline scores,
    and a caller reading a photo's first face (the CLI's JSON, the service's answer) got another person's age.
    The score decides only between boxes of one size equally far from the centre, whatever order they came in."""
    cx, cy = width / 2.0, height / 2.0

    def key(b: FaceBox) -> tuple[float, float, float]:
        bx, by = (b.left + b.right) / 2.0, (b.top + b.bottom) / 2.0
        return (-b.area, (bx - cx) ** 2 + (by - cy) ** 2, -b.score)

    return sorted(boxes, key=key)


def choose_subject(boxes: list[FaceBox], width: int, height: int) -> FaceBox | None:
    """Picks the photo's subject among several faces: the largest, ties to the most central (the first of
    :func:`subject_order`).

    APPA-REAL photos are framed on the person whose age was rated; bystanders are
    smaller and off-centre, so size first, then closeness to the centre, decide.
    """
    return subject_order(boxes, width, height)[0] if boxes else None


def crop_box(box: FaceBox, margin: float) -> tuple[int, int, int, int]:
    """The square crop region around ``box``: side = max(w, h) * (1 + 2 * margin), same centre."""
    if not 0.0 <= margin < 2.0:
        raise ValueError(f"margin must be in [0, 2), got {margin}")
    side = max(box.width, box.height) * (1.0 + 2.0 * margin)
    cx, cy = (box.left + box.right) / 2.0, (box.top + box.bottom) / 2.0
    left = int(round(cx - side / 2.0))
    top = int(round(cy - side / 2.0))
    s = max(int(round(side)), 1)
    return left, top, left + s, top + s


def margin_region(image: np.ndarray, box: FaceBox, margin: float) -> np.ndarray:
    """The square margin region around ``box`` at the image's own resolution (no resampling).

    Parts of the region outside the image are black, so a face near the border keeps its scale
    instead of being stretched to fill the region. (Detected boxes are clipped to the image first, so
    a face the border cuts is centred on its visible part; training and serving crop it alike.) :func:`crop_face` resizes this region;
    :mod:`faceage.chips` cuts dlib's aligned chips from it directly, because a chip cut from a
    resampled crop is not the chip dlib's age network was trained on (measured zero-shot on
    utk-external: 8.52 years from the region against 8.77 from the 224 px crop).

    Args:
        image: RGB uint8 array (H, W, 3).
        box: The face.
        margin: Context added on each side, as a fraction of the box's longer side.

    Returns:
        RGB uint8 array (S, S, 3), ``S`` the side of :func:`crop_box`.

    Raises:
        ValueError: ``image`` is not an RGB uint8 array.
    """
    require_rgb(image, "margin_region")
    h, w = image.shape[:2]
    x0, y0, x1, y1 = crop_box(box, margin)
    out = np.zeros((y1 - y0, x1 - x0, 3), dtype=np.uint8)
    sx0, sy0, sx1, sy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
    if sx1 > sx0 and sy1 > sy0:
        out[sy0 - y0 : sy1 - y0, sx0 - x0 : sx1 - x0] = image[sy0:sy1, sx0:sx1]
    return out


def resize_region(region: np.ndarray, size: int) -> np.ndarray:
    """A :func:`margin_region` resized to the crop side ``size`` (bicubic): the stored crop."""
    if size < 1:
        raise ValueError(f"size must be >= 1, got {size}")
    return np.asarray(Image.fromarray(region).resize((size, size), Image.Resampling.BICUBIC))


def crop_face(image: np.ndarray, box: FaceBox, margin: float, size: int) -> np.ndarray:
    """Cuts the square margin crop around ``box`` and resizes it to ``size`` x ``size``.

    The crop is :func:`margin_region` (black where it extends past the image) resized with
    :func:`resize_region`.

    Args:
        image: RGB uint8 array (H, W, 3).
        box: The face.
        margin: Context added on each side, as a fraction of the box's longer side.
        size: Output side in pixels.

    Returns:
        RGB uint8 array (size, size, 3).
    """
    return resize_region(margin_region(image, box, margin), size)


def whole_image_box(image: np.ndarray) -> FaceBox:
    """A box covering the whole image (for the ``whole_image`` / release-crop fallbacks)."""
    h, w = image.shape[:2]
    return FaceBox(0, 0, w, h, 0.0)


WHOLE_IMAGE_SIDE = 2048  # the whole-image fallback's longest region side (px)


def whole_image_region(image: np.ndarray) -> np.ndarray:
    """The ``whole_image`` fallback's region: the photo padded square, first scaled down so its longer
    side is at most :data:`WHOLE_IMAGE_SIDE` (the 224 px crop and the 64/150 px chips need no more).
    Padding first made the square of the longer side: a 300 x 12000 photo took 412 MB for one crop."""
    h, w = image.shape[:2]
    scaled = _scaled(image, min(1.0, WHOLE_IMAGE_SIDE / max(h, w)))
    return margin_region(scaled, whole_image_box(scaled), 0.0)


def release_crop_region(crop: np.ndarray, margin: float) -> np.ndarray:
    """The margin region of an APPA-REAL release crop (``NAME_face.jpg``), framed as ``margin`` frames
    a detected face.

    The release crop holds the face with :data:`RELEASE_MARGIN` on each side: padded square, it is the
    region at that margin. At another ``preprocess.margin`` it is re-framed around its central face
    box, so that the crop shows the face at the scale the detected faces are shown at, and the chips'
    landmark fit (:func:`faceage.chips.face_rect`, which places the face by ``margin``) finds it.
    """
    region = margin_region(crop, whole_image_box(crop), 0.0)
    if margin == RELEASE_MARGIN:
        return region
    side = region.shape[0]
    face = side / (1.0 + 2.0 * RELEASE_MARGIN)
    lo, hi = int(round((side - face) / 2.0)), int(round((side + face) / 2.0))
    return margin_region(region, FaceBox(lo, lo, hi, hi, 0.0), margin)


def crop_faces(image: np.ndarray, boxes: list[FaceBox], margin: float, size: int) -> list[np.ndarray]:
    """:func:`crop_face` for each box, in order."""
    return [crop_face(image, b, margin, size) for b in boxes]
