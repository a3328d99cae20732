"""Benchmark: cold start, POST /predict latency and throughput, against the same predictor in-process.

Input: one or more bentos (``--tag``, default ``face_age:latest`` in ``$BENTOML_HOME``) and a folder
of photos (default: ``$FACEAGE_SHARED_DATASETS/wild`` or ``../shared/datasets/wild``, the files
that decode). For each bento, in one run: the cold start (``bentoml serve`` process start to the
first 200 on ``/readyz``, on a free 127.0.0.1 port) and what it ships (the bento's size); p50/p95/mean
latency and images/s for 1 client and for N concurrent clients (default 8); the in-process
:class:`faceage.predict.AgePredictor` built from the same model folder with the same runtime (the
ONNX graph) and the same ``FACEAGE_THREADS``, ``FACEAGE_MAX_PIXELS`` and ``FACEAGE_MAX_DETECT_PIXELS`` as the
server it starts (:func:`served_limits`), called sequentially (a predictor is not thread-safe); the ratios (1-client p50
service/in-process, N-client throughput vs one client); the p50 of photos with exactly one face.
Two ``--tag``s compare two bentos side by side (e.g. two champions): each later bento's one-face p50,
1-client p50 and N-client throughput as ratios of the first one's (:func:`ratios`), measured in the
same run. Each bento is measured in its own time window, so a machine whose speed drifts between
windows moves those ratios. Then, the one-face photos are measured **interleaved**: every bento
is served at once, and each photo goes to each of them back to back, in an order that rotates from
photo to photo and from round to round (``--interleaved-rounds`` passes). That gives each bento's one-face p50 from the same minutes and
the ratio of the p50s (:func:`interleaved_ratios`). ``--json`` writes it all.

Deployments are targets with ``start() -> (url, cold start)``, ``stop()`` and ``size_bytes()``:
:class:`HostTarget` (``bentoml serve``), :class:`UrlTarget` (``--url``, already running: it must serve the model of
``--tag``'s bento, as it names it in ``X-FaceAge-Model``, or the run stops in one line, :func:`require_model`); a
container target adds ``docker run`` and the image size the same way.

The 1-client figures are paired: each photo goes in-process and to the service back to back
(alternating which goes first), so a load change on the machine hits both sides alike; the
median of the paired differences is the time the service adds per request. Loops are bounded
(``--rounds`` passes over the photos); nothing but 127.0.0.1 is contacted. Every server it starts
is stopped on exit, SIGTERM included; a server that fails to start shows its stderr's last lines
(:mod:`_server`). Not a test: it reports numbers and asserts nothing.

    python benchmarks/bench_service.py [--rounds 2] [--clients 8] [--tag face_age:v1 --tag face_age:v2]
        [--interleaved-rounds 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import requests

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import shared_datasets  # noqa: E402
from _server import Server, bentoml_serve, exit_on_sigterm, map_threads, wait_ui  # noqa: E402

from faceage.atomic import write_text  # noqa: E402

DEFAULT_PHOTOS = shared_datasets() / "wild"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(ordered) - 1)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


def ratios(runs: list[dict], clients: int) -> list[dict]:
    """Each run after the first against the first (same run, same photos): one-face p50, 1-client p50
    and ``clients``-client throughput as ``run / first``; ``None`` where either side has no figure.

    The one-face p50s are compared only where both found exactly one face on the same photos
    (``one_face_photos``): two models that detect differently (one with the CNN's last look) took
    each p50 over other photos, a ratio of two subsets. The interleaved figure
    (:func:`interleaved_one_face`) measures the photos they share."""
    def ratio(a: float | None, b: float | None) -> float | None:
        return None if a is None or b is None or b == 0 else a / b

    def same_photos(r: dict) -> bool:
        return r.get("one_face_photos") == first.get("one_face_photos")

    first = runs[0]
    return [{"target": r["target"], "versus": first["target"],
             "one_face_p50": ratio(r["one_face_p50_ms"], first["one_face_p50_ms"]) if same_photos(r) else None,
             "service_1_p50": ratio(r["service_1"]["p50_ms"], first["service_1"]["p50_ms"]),
             f"service_{clients}_images_per_s": ratio(r[f"service_{clients}"]["images_per_s"],
                                                      first[f"service_{clients}"]["images_per_s"])}
            for r in runs[1:]]


def summary(latencies_s: list[float], wall_s: float) -> dict:
    return {"n": len(latencies_s), "p50_ms": 1000 * percentile(latencies_s, 0.5),
            "p95_ms": 1000 * percentile(latencies_s, 0.95), "mean_ms": 1000 * statistics.fmean(latencies_s),
            "images_per_s": len(latencies_s) / wall_s}


def load_photos(folder: Path) -> list[tuple[str, bytes]]:
    """The photos of ``folder`` that decode (broken files measure error paths, not prediction).

    Raises:
        SystemExit: ``folder`` is not a folder (e.g. the default ``wild`` on a clone without ``../shared``).
    """
    from faceage.images import ImageDecodeError, load_image

    if not folder.is_dir():
        raise SystemExit(f"--photos {folder} is not a folder of photos")
    photos = []
    for path in sorted(p for p in folder.iterdir() if p.is_file()):
        data = path.read_bytes()
        try:
            load_image(data)
        except ImageDecodeError:
            continue
        photos.append((path.name, data))
    return photos


def served_limits() -> dict:
    """The predictor settings the service reads from the environment (:class:`faceage.http.Limits`: ``FACEAGE_THREADS``,
    ``FACEAGE_MAX_PIXELS``, ``FACEAGE_MAX_DETECT_PIXELS``), as ``AgePredictor`` keywords.

    The in-process side is built with them: ``bentoml serve`` inherits this environment, and a
    ``FACEAGE_THREADS=1`` run gave the served side one ONNX Runtime thread against every core in-process (a ratio
    of two configurations, not of serving). With ``--url``, the service was started elsewhere: these are this
    shell's settings.

    Raises:
        SystemExit: A value the service would refuse at its start; the message names the variable.
    """
    from faceage.http import Limits

    try:
        limits = Limits.from_env()
    except ValueError as e:
        raise SystemExit(f"{e} (the service reads it from the environment as it starts)") from None
    return {"threads": limits.threads, "max_pixels": limits.max_pixels, "max_detect_pixels": limits.max_detect_pixels}


def tree_cpu_s(pid: int) -> float:
    """CPU seconds (user + system) used so far by ``pid`` and its descendants."""
    import psutil

    total = 0.0
    try:
        root = psutil.Process(pid)
        for p in (root, *root.children(recursive=True)):
            try:
                t = p.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    except psutil.NoSuchProcess:
        pass
    return total


def start_server(tag: str, timeout_s: float = 180) -> tuple[Server, str, float]:
    """``bentoml serve tag`` on a free 127.0.0.1 port: (server, base URL, cold start in s); stop it
    with ``server.stop()`` (:func:`_server.bentoml_serve`: a failed start exits with its stderr's tail).

    The cold start runs from process start to the first 200 on ``/readyz``. Also printed: the CPU
    seconds the server's processes used until then (on a busy machine the wall time mostly
    measures the wait for a core; the CPU time does not).
    """
    server, url, ready_s = bentoml_serve(tag, timeout_s)
    try:
        print(f"server {tag} ready in {ready_s:.1f} s at {url} ({tree_cpu_s(server.pid):.1f} CPU s so far)")
    except BaseException:  # SIGTERM or Ctrl-C before the caller holds the server: nothing else would stop it
        server.stop()
        server.close()
        raise
    return server, url, ready_s


@dataclass
class HostTarget:
    """``bentoml serve`` of a bento on this host. Another deployment (e.g. the container) is a
    class with the same three methods: ``start() -> (base URL, cold start s)``, ``stop()`` and
    ``size_bytes()`` (what it ships: here the bento folder; for an image, its size)."""

    tag: str
    server: Server | None = None

    @property
    def name(self) -> str:
        return f"host {self.tag}"

    def start(self) -> tuple[str, float]:
        self.server, url, ready_s = start_server(self.tag)
        return url, ready_s

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()
            self.server.close()
            self.server = None

    def size_bytes(self) -> int | None:
        """The bento folder plus the models it serves (what ``bentoml export``/containerize ship)."""
        import bentoml

        bento = bentoml.get(self.tag)
        paths = [Path(bento.path), *(Path(bentoml.models.get(m.tag).path) for m in bento.info.all_models)]
        return sum(p.stat().st_size for path in paths for p in path.rglob("*") if p.is_file())


@dataclass
class UrlTarget:
    """A service that is already running on 127.0.0.1 (``--url``): no cold start, no size."""

    url: str

    @property
    def name(self) -> str:
        return self.url

    def start(self) -> tuple[str, float | None]:
        """The URL, once its ``/readyz`` answers 200 (:func:`require_service`)."""
        url = self.url.rstrip("/")
        require_service(url)
        return url, None

    def stop(self) -> None:
        pass

    def size_bytes(self) -> int | None:
        return None


def require_service(url: str, timeout_s: float = 10) -> None:
    """Checks that a service already running at ``url`` (``--url``) is ready: ``GET url/readyz`` answers 200.

    Raises:
        SystemExit: Nothing answers there (a dead port: the first POST ended in a ConnectionError traceback),
            or ``/readyz`` answers something else; one message naming the URL.
    """
    try:
        code = requests.get(url + "/readyz", timeout=timeout_s).status_code
    except requests.RequestException as e:
        raise SystemExit(f"--url {url}: nothing answers GET /readyz there ({type(e).__name__}); is the service "
                         "running? (make serve starts one)") from None
    if code != 200:
        raise SystemExit(f"--url {url}: GET /readyz answered {code}, not 200 (not ready, or not the FaceAge "
                         "service)")


MODEL_HEADER = "X-FaceAge-Model"  # service.MODEL_HEADER: the tag of the model that answered, on every route's 200


def served_model(url: str, photo: tuple[str, bytes], timeout_s: float = 300) -> tuple[str | None, str]:
    """The tag of the model the service at ``url`` serves, as it names it (:data:`MODEL_HEADER`), and where it
    looked: ``GET /model_card``, or, where that answers no name (a model packaged without a card: a 404), ``POST
    /predict`` of ``photo``. ``None`` where neither names one (not the FaceAge service, or one from before the header).

    Raises:
        SystemExit: The service stopped answering; one message naming the URL.
    """
    try:
        r = requests.get(url + "/model_card", timeout=10)
        if r.status_code == 200 and r.headers.get(MODEL_HEADER):
            return r.headers[MODEL_HEADER], "GET /model_card"
        name, data = photo
        r = requests.post(url + "/predict", files={"image": (name, data, "application/octet-stream")},
                          timeout=timeout_s)
    except requests.RequestException as e:
        raise SystemExit(f"--url {url}: no answer while asking which model it serves ({type(e).__name__})") from None
    if r.status_code == 200 and r.headers.get(MODEL_HEADER):
        return r.headers[MODEL_HEADER], "POST /predict"
    return None, f"GET /model_card or POST /predict (which answered {r.status_code})"


def require_model(url: str, model_tag: str, bento_tag: str, photo: tuple[str, bytes]) -> None:
    """Checks that the service already running at ``url`` (``--url``) serves ``model_tag``, the model of the bento
    ``bento_tag`` (``--tag``): its figures are reported as that model's, and the in-process side loads that model.
    Without this check, a side-by-side comparison run once per service could time one model twice, under two
    names.

    Raises:
        SystemExit: It serves another model, or names none; one line naming both sides.
    """
    served, where = served_model(url, photo)
    if served is None:
        raise SystemExit(f"--url {url}: cannot tell which model it serves (no {MODEL_HEADER} header on {where}), so "
                         f"not whether it is {model_tag} of --tag {bento_tag}; not measured")
    if served != model_tag:
        raise SystemExit(f"--url {url} serves the model {served} (its {MODEL_HEADER} on {where}), not {model_tag} "
                         f"of --tag {bento_tag}: give the --tag of the bento it serves, or serve that bento")


def post(session: requests.Session, url: str, name: str, data: bytes) -> float:
    return post_faces(session, url, name, data)[0]


def post_faces(session: requests.Session, url: str, name: str, data: bytes) -> tuple[float, int]:
    """Seconds for one POST /predict, and the number of faces it found."""
    t0 = time.perf_counter()
    r = session.post(url + "/predict", files={"image": (name, data, "application/octet-stream")}, timeout=300)
    elapsed = time.perf_counter() - t0
    if r.status_code != 200:
        raise RuntimeError(f"{name}: {r.status_code} {r.text[:200]}")
    return elapsed, len(r.json()["faces"])


def in_process(predictor, data: bytes) -> float:
    from faceage.images import load_image

    t0 = time.perf_counter()
    predictor.predict(load_image(data, max_pixels=predictor.locator.max_pixels))
    return time.perf_counter() - t0


def concurrent_run(fn, jobs: list, clients: int) -> tuple[list[float], float]:
    """``clients`` workers share ``jobs``; returns the latencies and the wall time."""
    t0 = time.perf_counter()
    latencies = map_threads(fn, jobs, clients)
    return latencies, time.perf_counter() - t0


def measure(target, predictor, photos: list[tuple[str, bytes]], rounds: int, clients: int) -> dict:
    """Cold start, then paired 1-client latency against ``predictor``, then ``clients`` (2 or more) concurrent."""
    if clients < 2:
        raise ValueError(f"clients must be >= 2 (the 1-client figures are the paired run), got {clients}")
    results: dict = {"target": target.name}
    try:  # from the start: SIGTERM or Ctrl-C once the server is up (the bento's size is read then) stops it too
        url, results["cold_start_s"] = target.start()
        results["size_bytes"] = target.size_bytes()
        wait_ui(url)  # the UI's background import done first: it is no part of a request's time
        session = requests.Session()
        for name, data in photos[:3]:  # warm both sides up (first calls allocate)
            in_process(predictor, data)
            post(session, url, name, data)
        local, served, one_face, one_face_names = [], [], [], set()
        for i, (name, data) in enumerate(photos * rounds):
            # Paired: the same photo on both sides, back to back; photo j of round r goes to the service
            # first when j + r is odd, so the order alternates from photo to photo and, per photo, by round.
            if (i % len(photos) + i // len(photos)) % 2:
                elapsed, faces = post_faces(session, url, name, data)
                local.append(in_process(predictor, data))
            else:
                local.append(in_process(predictor, data))
                elapsed, faces = post_faces(session, url, name, data)
            served.append(elapsed)
            if faces == 1:
                one_face.append(elapsed)
                one_face_names.add(name)
        results["in_process_1"] = summary(local, sum(local))
        results["service_1"] = summary(served, sum(served))
        results["one_face_p50_ms"] = 1000 * percentile(one_face, 0.5) if one_face else None
        results["one_face_photos"] = sorted(one_face_names)
        results["overhead_ms_median"] = 1000 * statistics.median(b - a for a, b in zip(local, served))

        jobs = [(name, data) for _ in range(rounds) for name, data in photos]
        per_thread = threading.local()  # one connection per client thread

        def client_post(job: tuple[str, bytes]) -> float:
            if not hasattr(per_thread, "session"):
                per_thread.session = requests.Session()
            return post(per_thread.session, url, *job)

        lat, wall = concurrent_run(client_post, jobs, clients)
        results[f"service_{clients}"] = summary(lat, wall)
    finally:
        target.stop()
    one, many, base = results["service_1"], results[f"service_{clients}"], results["in_process_1"]
    results["ratio_p50_1"] = one["p50_ms"] / base["p50_ms"]
    results["ratio_p95_1"] = one["p95_ms"] / base["p95_ms"]
    results[f"ratio_throughput_{clients}"] = many["images_per_s"] / base["images_per_s"]
    results[f"ratio_throughput_{clients}_vs_1_client"] = many["images_per_s"] / one["images_per_s"]
    return results


def distinct_names(names: list[str]) -> list[str]:
    """``names`` with each repeated one numbered (``host x #1``, ``host x #2``): the same bento given twice
    (an A/A run, the noise floor) is two servers, measured apart."""
    seen: dict[str, int] = {}
    out = []
    for name in names:
        seen[name] = seen.get(name, 0) + 1
        out.append(f"{name} #{seen[name]}" if names.count(name) > 1 else name)
    return out


def interleaved_one_face(targets: list, photos: list[tuple[str, bytes]], rounds: int,
                         settle_s: float = 5.0) -> dict[str, list[float]]:
    """Serves every target at once; each photo goes to each target back to back. The order rotates by
    one target per photo and per round (photo ``j`` of round ``r`` starts at target ``(j + r) % k``),
    so every photo is sent first to each target in turn, whatever the number of photos. Returns
    the seconds of every request, per target name (a name given twice numbered: :func:`distinct_names`)."""
    names = distinct_names([target.name for target in targets])
    started = []
    try:  # every target is stopped below, started or not (stop() of one never started does nothing)
        for name, target in zip(names, targets):
            url, _ = target.start()
            started.append((name, target, url, requests.Session()))
            wait_ui(url)  # (its Gradio import, in the background, slowed the bentos started before it)
        for _, target, url, session in started:  # warm up, then let start-up work (the UI's import) finish
            for photo, data in photos[:3]:
                post(session, url, photo, data)
        time.sleep(settle_s)
        latencies: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for j, (photo, data) in enumerate(photos):
                shift = (j + r) % len(started)
                for name, target, url, session in started[shift:] + started[:shift]:
                    latencies[name].append(post(session, url, photo, data))
        return latencies
    finally:
        for target in targets:
            target.stop()


def interleaved_ratios(latencies: dict[str, list[float]]) -> dict:
    """Per target its p50 (ms); each later target's p50 as a ratio of the first one's, and the median
    of the request-by-request ratios (request i of one target against request i of the first)."""
    first, *later = latencies
    p50_ms = {n: 1000 * percentile(v, 0.5) for n, v in latencies.items()}
    return {"p50_ms": p50_ms,
            "ratios": [{"target": n, "versus": first, "p50": p50_ms[n] / p50_ms[first],
                        "median_paired": statistics.median(b / a for a, b in zip(latencies[first], latencies[n]))}
                       for n in later]}


def report(results: dict, clients: int) -> None:
    print(f"\n{results['target']} (model {results['model']}):")
    cold = results["cold_start_s"]
    size = results["size_bytes"]
    print(f"  cold start (process start -> /readyz 200): {'n/a' if cold is None else f'{cold:.1f} s'}; "
          f"size: {'n/a' if size is None else f'{size / 2**20:.1f} MiB'}")
    print(f"  {'':28s}{'p50 ms':>10s}{'p95 ms':>10s}{'mean ms':>10s}{'img/s':>9s}")
    for key, label in (("in_process_1", "in-process, sequential"), ("service_1", "service, 1 client"),
                       (f"service_{clients}", f"service, {clients} clients")):
        r = results[key]
        print(f"  {label:28s}{r['p50_ms']:10.1f}{r['p95_ms']:10.1f}{r['mean_ms']:10.1f}{r['images_per_s']:9.2f}")
    one_face = results["one_face_p50_ms"]
    print(f"  1 client: p50 {results['ratio_p50_1']:.2f}x in-process, p95 {results['ratio_p95_1']:.2f}x (median added "
          f"per request: {results['overhead_ms_median']:.1f} ms); one-face photos p50 "
          f"{'n/a' if one_face is None else f'{one_face:.1f} ms'}")
    print(f"  {clients} clients: throughput {results[f'ratio_throughput_{clients}_vs_1_client']:.2f}x one client, "
          f"{results[f'ratio_throughput_{clients}']:.2f}x in-process sequential")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--photos", type=Path, default=DEFAULT_PHOTOS, help="folder of photos (default: %(default)s)")
    parser.add_argument("--tag", action="append", help="bento (and its model) to serve; repeat to compare bentos "
                        "side by side in one run (default: face_age:latest)")
    parser.add_argument("--url", help="an already running service on 127.0.0.1, serving the model of --tag's bento "
                        "(checked; default: start one per --tag)")
    parser.add_argument("--rounds", type=int, default=2, help="passes over the photos per measurement")
    parser.add_argument("--clients", type=int, default=8,
                        help="concurrent clients for the second measurement (2 or more)")
    parser.add_argument("--interleaved-rounds", type=int, default=5,
                        help="passes over the one-face photos with every bento served at once (two or more "
                             "--tag; 0 = skip)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)
    exit_on_sigterm()  # so the servers started below are stopped on SIGTERM too
    tags = args.tag or ["face_age:latest"]
    if args.url and (urlparse(args.url).hostname not in ("127.0.0.1", "localhost") or len(tags) > 1):
        raise SystemExit(f"--url must be on 127.0.0.1 and goes with one --tag, got {args.url}")
    # One client is the paired measurement: --clients 1 wrote its concurrent run over it (same key, service_1).
    if args.rounds < 1 or args.clients < 2 or args.interleaved_rounds < 0:
        raise SystemExit(f"--rounds must be >= 1, --clients >= 2 (one client is measured anyway, paired with "
                         f"in-process), --interleaved-rounds >= 0; got {args.rounds}, {args.clients}, "
                         f"{args.interleaved_rounds}")

    if args.url:
        require_service(args.url.rstrip("/"))  # a dead port: one message, before the model is loaded

    import bentoml

    from faceage.predict import AgePredictor, available_cores

    limits = served_limits()  # a bad FACEAGE_* value: one message before anything loads or starts
    photos = load_photos(args.photos)
    if not photos:
        raise SystemExit(f"no decodable photos in {args.photos}")
    # Every bento and its model before the first is measured: a later --tag that is not there stopped the run
    # only after the earlier ones' minutes.
    bentos = []
    for tag in tags:
        try:
            bento = bentoml.get(tag)
            bentos.append((bento, bentoml.models.get(bento.info.all_models[0].tag)))  # the model it serves
        except bentoml.exceptions.NotFound as e:  # a clone that never ran make bento
            raise SystemExit(f"{e} (make bento packages one; --tag names another)") from None
    if args.url:  # the running service's figures are reported as --tag's model's, beside that model in-process
        (bento, model), = bentos
        require_model(args.url.rstrip("/"), str(model.tag), str(bento.tag), photos[0])
    runs, bento_tags = [], []
    for bento, model in bentos:
        bento_tags.append(str(bento.tag))
        # The service's own predictor (same folder, same ONNX graph, same limits), called in-process.
        predictor = AgePredictor.from_model_dir(model.path, runtime="onnx", **limits)
        target = UrlTarget(args.url) if args.url else HostTarget(str(bento.tag))
        results = measure(target, predictor, photos, args.rounds, args.clients)
        results["model"] = str(model.tag)
        results["backbone"] = model.info.metadata.get("backbone")
        runs.append(results)
        del predictor
    for results, name in zip(runs, distinct_names([r["target"] for r in runs])):
        results["target"] = name  # the same bento twice: "#1", "#2", as in the interleaved lines
    print(f"\nFaceAge /predict: {len(photos)} photos from {args.photos} x {args.rounds} rounds, "
          f"{available_cores()} CPU cores")
    for results in runs:
        report(results, args.clients)
    side = ratios(runs, args.clients)
    if side:
        print("\nside by side (same run):")
        for r in runs:
            one_face = r["one_face_p50_ms"]
            print(f"  {r['target']:40s} {r['backbone'] or '?':16s} cold start {r['cold_start_s'] or float('nan'):5.1f} s, "
                  f"1-client p50 {r['service_1']['p50_ms']:7.1f} ms, one-face p50 "
                  f"{'n/a' if one_face is None else f'{one_face:7.1f} ms'}, "
                  f"{args.clients} clients {r[f'service_{args.clients}']['images_per_s']:.2f} img/s")
        print(f"\nratios to {runs[0]['target']} (same run):")
        for q in side:
            text = [f"{name} {'n/a' if q[key] is None else f'{q[key]:.2f}x'}" for name, key in (
                ("one-face p50", "one_face_p50"), ("1-client p50", "service_1_p50"),
                (f"{args.clients}-client throughput", f"service_{args.clients}_images_per_s"))]
            print(f"  {q['target']:40s} " + ", ".join(text))
    interleaved = None
    if side and not args.url and args.interleaved_rounds:
        # Photos where every bento found exactly one face.
        common = set.intersection(*(set(r["one_face_photos"]) for r in runs))
        one_face = [(name, data) for name, data in photos if name in common]
        if one_face:
            latencies = interleaved_one_face([HostTarget(t) for t in bento_tags], one_face, args.interleaved_rounds)
            interleaved = {"photos": len(one_face), "rounds": args.interleaved_rounds,
                           **interleaved_ratios(latencies)}
            print(f"\none-face photos interleaved ({len(one_face)} photos x {args.interleaved_rounds} rounds, every "
                  "bento served at once, each photo to each bento back to back in rotating order):")
            for name, p50 in interleaved["p50_ms"].items():
                print(f"  {name:40s} one-face p50 {p50:7.1f} ms")
            for q in interleaved["ratios"]:
                print(f"  {q['target']:40s} {q['p50']:.2f}x the p50 of {q['versus']} "
                      f"(median of request-by-request ratios {q['median_paired']:.2f}x)")
    if args.json:
        write_text(args.json, json.dumps({"photos": len(photos), "rounds": args.rounds, "cores": available_cores(),
                                          "runs": runs, "ratios": side, "interleaved": interleaved},
                                         indent=2) + "\n")  # never half a file


if __name__ == "__main__":
    main()
