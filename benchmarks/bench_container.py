"""Benchmark: cold start of the container vs the host service, and the image size.

Input: the bento ``face_age:latest`` (``$BENTOML_HOME``) and its Docker image (default
``face-age:latest``, from ``make container``; ``--build`` runs ``bentoml containerize`` first).
Output: printed median/min/max cold start, from process start to the first 200 on ``/readyz``,
for ``bentoml serve face_age:latest`` on the host and for ``docker run`` of the image (the two
alternate, ``--rounds`` times each, so a load change on the machine hits both alike, and which one
goes first alternates from round to round), their ratio, and the image size. ``--json`` also writes
them to a file. Only 127.0.0.1 is contacted; every server and container is stopped (containers
removed by id) before the next starts, and on exit, SIGTERM included; a host server that fails to
start shows its stderr's last lines. Not a test: it reports numbers and asserts nothing.
:class:`ContainerTarget` is the container as a deployment target of ``benchmarks/bench_service.py``
(request latency, side by side with the host).

    python benchmarks/bench_container.py [--image face-age:latest] [--rounds 3] [--build] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _order import alternating  # noqa: E402
from _paths import REPO  # noqa: E402
from _server import ServerError, bentoml_serve, exit_on_sigterm, free_port, wait_ready  # noqa: E402

from faceage.atomic import write_text  # noqa: E402

BIN = Path(sys.executable).parent


def host_cold_start(tag: str, timeout_s: float) -> float:
    """Seconds from ``bentoml serve tag``'s process start to the first 200 on ``/readyz``; then stopped."""
    server, _, ready_s = bentoml_serve(tag, timeout_s)
    try:
        return ready_s
    finally:
        server.stop(timeout_s=60)
        server.close()


@dataclass
class ContainerTarget:
    """``docker run`` of the bento's image on a free 127.0.0.1 port: the container counterpart of
    ``bench_service.HostTarget`` (same ``name``, ``start() -> (base URL, cold start s)``, ``stop()``,
    ``size_bytes()``), so the service benchmark can measure it beside the host service."""

    image: str
    timeout_s: float = 300
    cid: str | None = None  # the container's name (unique, given before docker run) while it may exist

    @property
    def name(self) -> str:
        return f"container {self.image}"

    def start(self) -> tuple[str, float]:
        port = free_port()
        # Named before docker run: the id is known only once it answers, and SIGTERM or Ctrl-C while it ran
        # (or a start that failed after the create) left the container behind. stop() removes it by this name.
        self.cid = f"faceage-bench-{uuid.uuid4().hex[:12]}"
        url = f"http://127.0.0.1:{port}"
        start = time.monotonic()
        try:
            run = subprocess.run(["docker", "run", "-d", "--name", self.cid, "-p", f"127.0.0.1:{port}:3000",
                                  "--shm-size=256m", self.image], capture_output=True, text=True)
            if run.returncode != 0:
                raise SystemExit(f"docker run {self.image} failed (exit code {run.returncode}): "
                                 f"{run.stderr.strip() or run.stdout.strip()}")
            wait_ready(url, self.running, self.timeout_s)
        except ServerError as e:
            logs = subprocess.run(["docker", "logs", "--tail", "20", self.cid], capture_output=True, text=True)
            self.stop()
            raise SystemExit(f"container {self.image} {e}; its log ended with:\n{logs.stdout}{logs.stderr}") from None
        except BaseException:
            self.stop()
            raise
        return url, time.monotonic() - start

    def running(self) -> bool:
        state = subprocess.run(["docker", "inspect", "-f", "{{.State.Running}}", self.cid or ""],
                               capture_output=True, text=True)
        return state.stdout.strip() == "true"

    def stop(self) -> None:
        if self.cid:  # removed by its own name: nothing else on the daemon is touched
            subprocess.run(["docker", "rm", "-f", self.cid], capture_output=True)
            self.cid = None

    def size_bytes(self) -> int:
        """The image's size in bytes.

        Raises:
            SystemExit: No such image (``make container`` builds it; ``--build`` here), or no Docker daemon:
                Docker's own words.
        """
        inspect = subprocess.run(["docker", "image", "inspect", "-f", "{{.Size}}", self.image],
                                 capture_output=True, text=True)
        if inspect.returncode != 0:
            raise SystemExit(f"cannot read image {self.image}: {inspect.stderr.strip() or inspect.stdout.strip()} "
                             "(make container builds it; --build runs bentoml containerize first)")
        return int(inspect.stdout)


def build_image(tag: str, image: str) -> float:
    has_buildx = subprocess.run(["docker", "buildx", "version"], capture_output=True).returncode == 0
    env = {**os.environ, "BENTOML_DO_NOT_TRACK": "True",
           "DOCKER_BUILDKIT": os.environ.get("DOCKER_BUILDKIT", "1" if has_buildx else "0")}
    subprocess.run(["bash", str(REPO / "scripts" / "base-image.sh")], check=True, cwd=REPO)
    start = time.monotonic()
    subprocess.run([str(BIN / "bentoml"), "containerize", tag, "-t", image], check=True, env=env)
    return time.monotonic() - start


def stats(values: list[float]) -> dict:
    return {"median_s": statistics.median(values), "min_s": min(values), "max_s": max(values), "runs": values}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tag", default="face_age:latest", help="bento served on the host")
    parser.add_argument("--image", default="face-age:latest", help="its Docker image (make container)")
    parser.add_argument("--rounds", type=int, default=3, help="cold starts of each (alternating)")
    parser.add_argument("--build", action="store_true", help="bentoml containerize first (and time it)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds to wait for one start")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)
    # One message, before the image is read or built (--rounds 0 ended in statistics' 'no median for empty
    # data' traceback, --timeout 0 in a 'not ready after 0 s' of a server that had no time to start).
    if args.rounds < 1 or args.timeout <= 0:
        parser.error(f"--rounds must be >= 1 and --timeout > 0, got {args.rounds}, {args.timeout}")
    if shutil.which("docker") is None:  # (every docker call below ended in a FileNotFoundError traceback)
        raise SystemExit("docker not found on PATH: this benchmark runs the image with the docker CLI "
                         "(install Docker, or measure the host service alone with bench_service.py)")
    exit_on_sigterm()  # so the server or container running at that moment is stopped on SIGTERM too

    result: dict = {"tag": args.tag, "image": args.image}
    if args.build:
        result["containerize_s"] = build_image(args.tag, args.image)
    target = ContainerTarget(args.image, args.timeout)
    result["image_bytes"] = target.size_bytes()

    def container_cold_start() -> float:
        try:
            return target.start()[1]
        finally:
            target.stop()

    # Which starts first alternates (_order.alternating): neither is always the one that starts right after the
    # other stopped (or, in round 1, on an idle machine).
    host, container = alternating(lambda: host_cold_start(args.tag, args.timeout), container_cold_start, args.rounds)
    result["host"], result["container"] = stats(host), stats(container)
    result["container_vs_host"] = result["container"]["median_s"] / result["host"]["median_s"]

    print(f"image {args.image}: {result['image_bytes'] / 1e6:.0f} MB"
          + (f" (containerize {result['containerize_s']:.0f} s)" if args.build else ""))
    print("| cold start to /readyz 200 | median s | min s | max s |\n|---|---:|---:|---:|")
    for name, key in (("host, `bentoml serve`", "host"), ("container, `docker run`", "container")):
        s = result[key]
        print(f"| {name} | {s['median_s']:.1f} | {s['min_s']:.1f} | {s['max_s']:.1f} |")
    print(f"container / host: {result['container_vs_host']:.2f}x ({args.rounds} alternating rounds)")
    if args.json:
        write_text(args.json, json.dumps(result, indent=2))  # never half a file


if __name__ == "__main__":
    main()
