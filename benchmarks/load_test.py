"""Load test: many concurrent POST /predict requests, some malformed, against a running service.

Input: the packaged bento (``face_age:latest`` in ``$BENTOML_HOME``; this script starts
``bentoml serve`` on a free 127.0.0.1 port) or ``--url`` of one already running on 127.0.0.1, and
photos (default: the bundled ``faceage/examples``; ``--photos DIR`` for others, e.g. the shared
``wild`` folder). Output: printed counts and a JSON summary (``--json``): requests by status
class, dropped connections, malformed requests answered with a 4xx, latency p50/p95 of the photos (the
malformed requests, refused in milliseconds, apart: ``malformed_p50_ms``), ``/readyz``
afterwards, and the server's resident memory before and after (the whole ``bentoml serve`` process tree;
with ``--url``, the ``bentoml serve`` above the process listening on its port, and the report says which).
A ``--url`` where nothing answers ``/readyz`` is refused in one message.

By default 2,000 requests at 16 concurrent clients, 10% of them malformed (garbage bytes,
truncated JPEG, empty file, wrong field, JSON body, a text part), in a shuffled but seeded
order. The run is bounded (``--requests``, per-request ``--timeout``, ``--max-seconds``) and
stops by itself; nothing but 127.0.0.1 is contacted. The server it starts is stopped on exit,
SIGTERM included, and a failed start shows its stderr's last lines. A run where no request got an
answer reports its latencies as n/a (and fails: a run of nothing is no pass). The acceptance: at
least one request answered, 0 5xx, 0 dropped connections, every malformed one a 4xx, ``/readyz`` 200
afterwards, RSS growth < 10%; the script reports whether each held (and exits 1 when one did not)
but is not a test.

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
from _server import exit_on_sigterm, map_threads, wait_ui  # noqa: E402
from bench_service import load_photos, percentile, require_service, start_server  # noqa: E402

from faceage.atomic import write_text  # noqa: E402

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


def is_bentoml_serve(cmdline: list[str]) -> bool:
    """Whether a process's argv is ``bentoml serve ...`` (the ``bentoml`` script, or ``python -m bentoml``)."""
    return "serve" in cmdline and any(Path(arg).name == "bentoml" for arg in cmdline[:3])


def server_pid(url: str) -> int | None:
    """For ``--url``: the pid whose process tree is the server, via psutil; ``None`` when nothing is visibly
    listening on the URL's port.

    The process listening there is ``bentoml serve``'s service worker: its tree left out the ``bentoml serve``
    process above it (426 MB reported of a 530 MB server). So from the listener up, the nearest ``bentoml
    serve`` (the listener itself when there is none: another kind of server; :func:`rss_scope` says which).
    """
    import psutil

    parsed = urlparse(url)
    port = parsed.port or {"http": 80, "https": 443}.get(parsed.scheme)  # (a URL without one crashed here)
    for conn in psutil.net_connections("tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port and conn.pid:
            try:
                listener = psutil.Process(conn.pid)
                for proc in (listener, *listener.parents()):
                    if is_bentoml_serve(proc.cmdline()):
                        return proc.pid
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
            return conn.pid
    return None


def rss_scope(pid: int | None) -> str:
    """What the server RSS figures cover: ``pid``'s process tree, named (``bentoml serve`` or not)."""
    import psutil

    if pid is None:
        return "not measured: no process visible listening on the port"
    try:
        serve = is_bentoml_serve(psutil.Process(pid).cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        serve = False
    return (f"bentoml serve, pid {pid}, and its descendants" if serve else
            f"pid {pid}, listening on the port (no bentoml serve above it), and its descendants")


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
          f"({'n/a' if rate is None else f'{rate:.2f}'} req/s), photos: p50 {ms(summary['p50_ms'])}, "
          f"p95 {ms(summary['p95_ms'])}; malformed: p50 {ms(summary['malformed_p50_ms'])}")
    print("statuses:", ", ".join(f"{k}: {v}" for k, v in summary["statuses"].items()) or "none")
    before, after = summary["rss_before_mb"], summary["rss_after_mb"]
    print(f"server RSS ({summary['rss_of']}): "
          + ("n/a" if before is None else f"{before:.0f} MB -> {after:.0f} MB"))
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
    # One message, not a traceback (--clients 0: ThreadPoolExecutor's ValueError; --timeout 0: urllib3's) or a
    # run of nonsense (--malformed 2: twice as many malformed requests as --requests).
    if args.requests < 0 or args.clients < 1 or not 0 <= args.malformed <= 1 or args.timeout <= 0 \
            or args.max_seconds < 0:
        parser.error(f"--requests must be >= 0, --clients >= 1, --malformed in [0, 1], --timeout > 0, "
                     f"--max-seconds >= 0; got {args.requests}, {args.clients}, {args.malformed}, {args.timeout}, "
                     f"{args.max_seconds}")
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
        if args.url:
            server, url = None, args.url.rstrip("/")
            require_service(url)  # a dead port: one message naming the URL, not a ConnectionError traceback
            pid = server_pid(url)
        else:
            server, url = start_server(args.tag)[:2]
            pid = server.pid
        summary: dict = {"url": url, "requests": len(jobs), "clients": args.clients, "malformed": n_bad,
                         "rss_of": rss_scope(pid)}
        statuses: Counter = Counter()
        failures: list[str] = []
        latencies: dict[str, list[float]] = {"valid": [], "malformed": []}  # seconds of each answered request
        lock = threading.Lock()

        # Warm up at full concurrency first (first calls and the first large batches allocate):
        # the RSS check is about growth under sustained load, from a warm server. A failure here (a server
        # that drops the connection or dies) is reported with the rest, not a traceback.
        def warm(i: int) -> None:
            name, data = photos[i % len(photos)]
            try:
                r = requests.post(url + "/predict", files={"image": (name, data)}, timeout=args.timeout)
            except requests.RequestException as e:
                with lock:
                    statuses["warm-up failed"] += 1
                    failures.append(f"warm-up {name}: {type(e).__name__}: {e}")
                return
            if r.status_code != 200:
                with lock:
                    statuses["warm-up failed"] += 1
                    failures.append(f"warm-up {name}: {r.status_code} {r.text[:200]}")

        wait_ui(url)  # the UI's background import (its memory) is done before the RSS before the load is read
        map_threads(warm, list(range(2 * args.clients)), args.clients)
        rss_before = process_tree_rss(pid) if pid else None
        per_thread = threading.local()
        deadline = time.monotonic() + args.max_seconds

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
                latencies[kind].append(time.perf_counter() - t0)
                statuses[f"{kind} {code // 100}xx"] += 1
                if code >= 500 or (kind == "malformed" and not 400 <= code < 500) or (kind == "valid" and code != 200):
                    failures.append(f"{kind} {name}: {code} {r.text[:200]}")

        t0 = time.perf_counter()
        map_threads(send, jobs, args.clients)
        wall = time.perf_counter() - t0
        try:  # a server that died under the load: the check fails, and the report still comes
            readyz = requests.get(url + "/readyz", timeout=30).status_code
        except requests.RequestException as e:
            readyz = None
            failures.insert(0, f"/readyz afterwards: {type(e).__name__}: {e}")  # first: the list is cut short
        rss_after = process_tree_rss(pid) if pid else None
    finally:
        if server is not None:
            server.stop()
            server.close()

    five = sum(v for k, v in statuses.items() if k.endswith("5xx"))
    answered = len(latencies["valid"]) + len(latencies["malformed"])
    # The percentiles are the photos' alone: the malformed requests' few ms pulled them down (a p50 read as a
    # photo's time under queueing was the 44th percentile of the photos' at the default 10% malformed).
    photos_s, malformed_s = latencies["valid"], latencies["malformed"]
    summary.update({
        "statuses": dict(sorted(statuses.items())), "wall_s": round(wall, 1),
        "requests_per_s": answered / wall if wall > 0 else None,
        "p50_ms": 1000 * percentile(photos_s, 0.5) if photos_s else None,
        "p95_ms": 1000 * percentile(photos_s, 0.95) if photos_s else None,
        "malformed_p50_ms": 1000 * percentile(malformed_s, 0.5) if malformed_s else None,
        "readyz_after": readyz,
        "rss_before_mb": None if rss_before is None else rss_before / 2**20,
        "rss_after_mb": None if rss_after is None else rss_after / 2**20,
        # None without both figures (a server gone by the end has 0 bytes: not a growth of -100%)
        "rss_growth": (rss_after / rss_before - 1) if rss_before and rss_after else None, "failures": failures[:20],
    })
    checks = {
        # (--requests 0, or a --max-seconds spent in the warm-up, passed every check below having measured nothing)
        "at least one request answered": answered > 0,
        "0 5xx": five == 0,
        "0 dropped connections": statuses["dropped"] == 0 and statuses["not sent (time limit)"] == 0,
        "every malformed one a 4xx": statuses["malformed 4xx"] == n_bad,
        "every valid one a 200": statuses["valid 2xx"] == len(jobs) - n_bad,
        # Its failures were listed and checked by nothing: a server dropping its first requests passed every check
        "every warm-up request answered 200": statuses["warm-up failed"] == 0,
        "/readyz 200 afterwards": readyz == 200,
        "RSS growth < 10%": summary["rss_growth"] is not None and summary["rss_growth"] < 0.10,
    }
    summary["checks"] = checks
    report(summary)
    if args.json:
        write_text(args.json, json.dumps(summary, indent=2) + "\n")  # never half a file
    return 0 if all(checks.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
