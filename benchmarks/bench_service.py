"""Benchmark: POST /predict latency and throughput, against the same predictor called in-process.

Input: the packaged model (``face_age:latest`` in ``$BENTOML_HOME``) and a folder of photos
(default: ``$FACEAGE_SHARED_DATASETS/wild`` or ``../shared/datasets/wild``, the files that decode). Output: printed p50/p95/mean
latency and images/s for 1 client and for N concurrent clients (default 8), for the service
(a `bentoml serve` this script starts on a free 127.0.0.1 port, or ``--url``), and for the
in-process :class:`faceage.predict.AgePredictor` built from the same model folder, called
sequentially (a predictor is not thread-safe); then the service/in-process ratios: latency
for 1 client, throughput for N clients. ``--json`` also writes them to a file. Loops are bounded
(``--rounds`` passes over the photos); nothing but 127.0.0.1 is contacted. Not a test: it
reports numbers and asserts nothing.

The 1-client figures are paired: each photo goes in-process and to the service back to back
(alternating which goes first), so a load change on the machine hits both sides alike; the
median of the paired differences is the time the service adds per request.

    python benchmarks/bench_service.py [--rounds 2] [--clients 8] [--url http://127.0.0.1:3000]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlparse

import requests

REPO = Path(__file__).resolve().parents[1]
DEFAULT_PHOTOS = Path(os.environ.get("FACEAGE_SHARED_DATASETS", REPO.parent / "shared" / "datasets")) / "wild"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def summary(latencies_s: list[float], wall_s: float) -> dict:
    return {"n": len(latencies_s), "p50_ms": 1000 * percentile(latencies_s, 0.5),
            "p95_ms": 1000 * percentile(latencies_s, 0.95), "mean_ms": 1000 * statistics.fmean(latencies_s),
            "images_per_s": len(latencies_s) / wall_s}


def load_photos(folder: Path) -> list[tuple[str, bytes]]:
    """The photos of ``folder`` that decode (broken files measure error paths, not prediction)."""
    from faceage.images import ImageDecodeError, load_image

    photos = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            load_image(data)
        except ImageDecodeError:
            continue
        photos.append((path.name, data))
    return photos


def start_server(tag: str, timeout_s: float = 180) -> tuple[subprocess.Popen, str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True"}
    bentoml = Path(sys.executable).parent / "bentoml"
    proc = subprocess.Popen([str(bentoml), "serve", tag, "--host", "127.0.0.1", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    url, start = f"http://127.0.0.1:{port}", time.monotonic()
    while time.monotonic() - start < timeout_s:
        if proc.poll() is not None:
            raise SystemExit(f"bentoml serve {tag} exited with {proc.returncode}")
        try:
            if requests.get(url + "/readyz", timeout=2).status_code == 200:
                print(f"server {tag} ready in {time.monotonic() - start:.1f} s at {url}")
                return proc, url
        except requests.RequestException:
            pass
        time.sleep(0.25)
    os.killpg(proc.pid, signal.SIGTERM)
    raise SystemExit(f"bentoml serve {tag} not ready after {timeout_s} s")


def post(session: requests.Session, url: str, name: str, data: bytes) -> float:
    t0 = time.perf_counter()
    r = session.post(url + "/predict", files={"image": (name, data, "application/octet-stream")}, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
    return elapsed


def in_process(predictor, data: bytes) -> float:
    from faceage.images import load_image

    t0 = time.perf_counter()
    predictor.predict(load_image(data, max_pixels=predictor.locator.max_pixels))
    return time.perf_counter() - t0


def concurrent_run(fn, jobs: list, clients: int) -> tuple[list[float], float]:
    """``clients`` workers share ``jobs``; returns the latencies and the wall time."""
    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        latencies = list(pool.map(fn, jobs))
    return latencies, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default: %(default)s)")
    parser.add_argument("--tag", default="face_age:latest", help="BentoML model and bento tag")
    parser.add_argument("--url", help="an already running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the photos per measurement")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients for the second measurement")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"--url must be on 127.0.0.1, got {args.url}")
    if args.rounds < 1 or args.clients < 1:
        raise SystemExit("--rounds and --clients must be >= 1")

    import bentoml

    from faceage.predict import AgePredictor, available_cores

    photos = load_photos(args.photos)
    if not photos:
        raise SystemExit(f"no decodable photos in {args.photos}")
    model = bentoml.models.get(args.tag)
    predictor = AgePredictor.from_model_dir(model.path)  # same folder, same settings as the service
    proc, url = (None, args.url.rstrip("/")) if args.url else start_server(args.tag)
    results: dict = {"model": str(model.tag), "photos": len(photos), "rounds": args.rounds, "cores": available_cores()}
    try:
        session = requests.Session()
        for name, data in photos[:3]:  # warm both sides up (first calls allocate)
            in_process(predictor, data)
            post(session, url, name, data)

        local, served = [], []
        for i, (name, data) in enumerate(photos * args.rounds):
            # Paired: the same photo on both sides, back to back, in alternating order.
            if i % 2:
                served.append(post(session, url, name, data))
                local.append(in_process(predictor, data))
            else:
                local.append(in_process(predictor, data))
                served.append(post(session, url, name, data))
        results["in_process_1"] = summary(local, sum(local))
        results["service_1"] = summary(served, sum(served))
        results["overhead_ms_median"] = 1000 * statistics.median(b - a for a, b in zip(local, served))

        jobs = [(name, data) for _ in range(args.rounds) for name, data in photos]
        per_thread = threading.local()  # one connection per client thread

        def client_post(job: tuple[str, bytes]) -> float:
            if not hasattr(per_thread, "session"):
                per_thread.session = requests.Session()
            return post(per_thread.session, url, *job)

        lat, wall = concurrent_run(client_post, jobs, args.clients)
        results[f"service_{args.clients}"] = summary(lat, wall)
    finally:
        if proc is not None:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)

    print(f"\nFaceAge /predict: {len(photos)} photos from {args.photos} x {args.rounds} rounds, model {model.tag}, "
          f"{results['cores']} CPU cores")
    print(f"{'':28s}{'p50 ms':>10s}{'p95 ms':>10s}{'mean ms':>10s}{'img/s':>9s}")
    for key, label in (("in_process_1", "in-process, sequential"), ("service_1", "service, 1 client"),
                       (f"service_{args.clients}", f"service, {args.clients} clients")):
        r = results[key]
        print(f"{label:28s}{r['p50_ms']:10.1f}{r['p95_ms']:10.1f}{r['mean_ms']:10.1f}{r['images_per_s']:9.2f}")
    one, many, base = results["service_1"], results[f"service_{args.clients}"], results["in_process_1"]
    results["ratio_p50_1"] = one["p50_ms"] / base["p50_ms"]
    results["ratio_p95_1"] = one["p95_ms"] / base["p95_ms"]
    results[f"ratio_throughput_{args.clients}"] = many["images_per_s"] / base["images_per_s"]
    print(f"ratio service/in-process, 1 client: p50 {results['ratio_p50_1']:.2f}x, p95 {results['ratio_p95_1']:.2f}x "
          f"(median added per request: {results['overhead_ms_median']:.1f} ms)")
    print(f"ratio service ({args.clients} clients)/in-process (sequential): throughput "
          f"{results[f'ratio_throughput_{args.clients}']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
