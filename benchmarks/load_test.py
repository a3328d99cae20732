"""Load test: many concurrent POST /predict requests, some malformed, against a running service.

Input: the packaged bento (``face_age:latest`` in ``$BENTOML_HOME``; this script starts
``bentoml serve`` on a free 127.0.0.1 port) or ``--url`` of one already running on 127.0.0.1, and
photos (default: the bundled ``faceage/examples``; ``--photos DIR`` for others, e.g. the shared
``wild`` folder). Output: printed counts and a JSON summary (``--json``): requests by status
class, dropped connections, malformed requests answered with a 4xx, latency p50/p95, ``/readyz``
afterwards, and the server's resident memory (the whole process tree) before and after.

By default 2,000 requests at 16 concurrent clients, 10% of them malformed (garbage bytes,
truncated JPEG, empty file, wrong field, JSON body, a text part), in a shuffled but seeded
order. The run is bounded (``--requests``, per-request ``--timeout``, ``--max-seconds``) and
stops by itself; nothing but 127.0.0.1 is contacted. The server it starts is stopped on exit,
SIGTERM included, and a failed start shows its stderr's last lines. A run where no request got an
answer reports its latencies as n/a. The acceptance: 0 5xx, 0 dropped
connections, every malformed one a 4xx, ``/readyz`` 200 afterwards, RSS growth < 10%; the
script reports whether each held (and exits 1 when one did not) but is not a test.

    python benchmarks/load_test.py [--requests 2000] [--clients 16] [--malformed 0.1] [--url URL]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import threading
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO  # noqa: E402
from _server import exit_on_sigterm, map_threads  # noqa: E402
from bench_service import load_photos, percentile, start_server  # noqa: E402

DEFAULT_PHOTOS = REPO / "faceage" / "examples"


def process_tree_rss(pid: int) -> int:
    """Resident bytes of ``pid`` and all its descendants (the server, its worker, its detection pool)."""
    import psutil

    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def server_pid(url: str) -> int | None:
    """The pid listening on the URL's port (for ``--url``), via psutil; ``None`` when not visible."""
    import psutil

    parsed = urlparse(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)  # (a URL without one crashed here)
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            return conn.pid
    return None


def malformed_requests(photo: bytes) -> list[tuple[str, dict]]:
    """``(name, requests.post kwargs)`` of each kind of malformed request."""
    return [
        ("garbage bytes", {"files": {"image": ("x.jpg", os.urandom(2048), "image/jpeg")}}),
        ("truncated image", {"files": {"image": ("t.jpg", photo[: len(photo) // 3], "image/jpeg")}}),
        ("empty file", {"files": {"image": ("e.jpg", b"", "image/jpeg")}}),
        ("wrong field", {"files": {"photo": ("a.jpg", photo, "image/jpeg")}}),
        ("JSON body", {"json": {"image": "not a file"}}),
        ("text part", {"files": {"image": ("a.txt", b"hello", "text/plain")}}),
    ]


def ms(value: float | None) -> str:
    """``value`` in whole ms, or ``n/a`` (no request got an answer)."""
    return "n/a" if value is None else f"{value:.0f} ms"


def report(summary: dict) -> None:
    """Prints the summary: counts, latencies (n/a when none), RSS, the checks and the first failures."""
    rate = summary["requests_per_s"]
    print(f"\nFaceAge load test: {summary['requests']} POST /predict ({summary['malformed']} malformed) at "
          f"{summary['clients']} concurrent, {summary['wall_s']:.1f} s "
          f"({'n/a' if rate is None else f'{rate:.2f}'} req/s), p50 {ms(summary['p50_ms'])}, "
          f"p95 {ms(summary['p95_ms'])}")
    print("statuses:", ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items()) or "none")
    print(f"server RSS (process tree): {summary['rss_before_mb']:.0f} MB -> {summary['rss_after_mb']:.0f} MB")
    for name, ok in summary["checks"].items():
        print(f"  [{'ok' if ok else 'FAILED'}] {name}")
    for line in summary["failures"][:10]:
        print("  ", line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default: %(default)s)")
    parser.add_argument("--tag", default="face_age:latest", help="bento to serve (without --url)")
    parser.add_argument("--url", help="an already running service on 127.0.0.1 (default: start one)")
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--malformed", type=float, default=0.1, help="share of malformed requests")
    parser.add_argument("--timeout", type=float, default=300, help="per-request timeout (s)")
    parser.add_argument("--max-seconds", type=float, default=3600, help="stop sending after this long")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # so the server started below is stopped on SIGTERM too
    # The host itself, as bench_service checks it: a prefix let http://localhost.example.com:3000 through.
    if args.url and urlparse(args.url).hostname not in ("127.0.0.1", "localhost"):
        raise SystemExit(f"--url must be on 127.0.0.1, got {args.url}")
    photos = load_photos(args.photos)
    if not photos:
        raise SystemExit(f"no decodable photos in {args.photos}")
    rng = random.Random(args.seed)
    bad = malformed_requests(photos[0][1])
    n_bad = round(args.requests * args.malformed)
    jobs = [("malformed", *bad[i % len(bad)]) for i in range(n_bad)]
    jobs += [("valid", name, {"files": {"image": (name, data, "application/octet-stream")}})
             for name, data in (photos[i % len(photos)] for i in range(args.requests - n_bad))]
    rng.shuffle(jobs)

    server = None
    try:
        server, url = (None, args.url.rstrip("/")) if args.url else start_server(args.tag)[:2]
        pid = server.pid if server is not None else server_pid(url)
        summary: dict = {"url": url, "requests": len(jobs), "clients": args.clients, "malformed": n_bad}
        # Warm up at full concurrency first (first calls and the first large batches allocate):
        # the RSS check is about growth under sustained load, from a warm server.
        def warm(i: int) -> None:
            name, data = photos[i % len(photos)]
            requests.post(url + "/predict", files={"image": (name, data)}, timeout=args.timeout)

        map_threads(warm, list(range(2 * args.clients)), args.clients)
        rss_before = process_tree_rss(pid) if pid else 0
        per_thread = threading.local()
        deadline = time.monotonic() + args.max_seconds
        statuses: Counter = Counter()
        failures: list[str] = []
        latencies: list[float] = []
        lock = threading.Lock()

        def send(job) -> None:
            kind, name, kwargs = job
            if time.monotonic() > deadline:
                with lock:
                    statuses["not sent (time limit)"] += 1
                return
            if not hasattr(per_thread, "session"):
                per_thread.session = requests.Session()
            t0 = time.perf_counter()
            try:
                r = per_thread.session.post(url + "/predict", timeout=args.timeout, **kwargs)
                code = r.status_code
            except requests.RequestException as e:  # a dropped or refused connection, or a timeout
                with lock:
                    statuses["dropped"] += 1
                    failures.append(f"{kind} {name}: {type(e).__name__}: {e}")
                return
            with lock:
                latencies.append(time.perf_counter() - t0)
                statuses[f"{kind} {code // 100}xx"] += 1
                if code >= 500 or (kind == "malformed" and not 400 <= code < 500) or (kind == "valid" and code != 200):
                    failures.append(f"{kind} {name}: {code} {r.text[:200]}")

        t0 = time.perf_counter()
        map_threads(send, jobs, args.clients)
        wall = time.perf_counter() - t0
        readyz = requests.get(url + "/readyz", timeout=30).status_code
        rss_after = process_tree_rss(pid) if pid else 0
    finally:
        if server is not None:
            server.stop()
            server.close()

    five = sum(v for k, v in statuses.items() if k.endswith("5xx"))
    summary.update({
        "statuses": dict(sorted(statuses.items())), "wall_s": round(wall, 1),
        "requests_per_s": len(latencies) / wall if wall > 0 else None,
        "p50_ms": 1000 * percentile(latencies, 0.5) if latencies else None,
        "p95_ms": 1000 * percentile(latencies, 0.95) if latencies else None,
        "readyz_after": readyz, "rss_before_mb": rss_before / 2**20, "rss_after_mb": rss_after / 2**20,
        "rss_growth": (rss_after / rss_before - 1) if rss_before else None, "failures": failures[:20],
    })
    checks = {
        "0 5xx": five == 0,
        "0 dropped connections": statuses["dropped"] == 0 and statuses["not sent (time limit)"] == 0,
        "every malformed one a 4xx": statuses["malformed 4xx"] == n_bad,
        "every valid one a 200": statuses["valid 2xx"] == len(jobs) - n_bad,
        "/readyz 200 afterwards": readyz == 200,
        "RSS growth < 10%": summary["rss_growth"] is not None and summary["rss_growth"] < 0.10,
    }
    summary["checks"] = checks
    report(summary)
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2) + "\n")
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
