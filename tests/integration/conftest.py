"""A real packaged and served FaceAge bento, shared by the service and UI tests.

From the session's ``tiny_run`` (a real small pipeline run with its own MLflow store), the
fixture runs the real commands with ``BENTOML_HOME`` in a temp folder: ``stages/package.py``
(registry + BentoML model), ``bentoml build``, then ``bentoml serve face_age:latest`` on a free
127.0.0.1 port, and stops it at the end of the session.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
READY_TIMEOUT_S = 180  # generous: CI machines are shared; the acceptance figure is measured separately


@dataclass(frozen=True)
class BentoServer:
    url: str
    home: Path
    env: dict
    ready_s: float  # from `bentoml serve` to the first 200 on /readyz
    package: dict  # what stages/package.py recorded (lineage)
    log: Path

    def post(self, route: str, path: Path | None = None, *, data: bytes | None = None, name: str | None = None,
             content_type: str = "application/octet-stream", params: dict | None = None, timeout: float = 120):
        """POSTs one file (or raw bytes) in the form field ``image``."""
        body = path.read_bytes() if path is not None else data
        files = {"image": (name or (path.name if path else "upload"), body, content_type)}
        return requests.post(self.url + route, files=files, params=params, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(cmd: list[str], env: dict, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="session")
def bento_server(tiny_run, tmp_path_factory):
    home = tmp_path_factory.mktemp("bentoml_home")
    env = {
        **os.environ,
        "BENTOML_HOME": str(home),
        "BENTOML_DO_NOT_TRACK": "True",
        "MLFLOW_TRACKING_URI": tiny_run["tracking_uri"],
        "GRADIO_TEMP_DIR": str(home / "gradio"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    _run([sys.executable, "stages/package.py", "--model", str(tiny_run["model"]), "--detector",
          str(tiny_run["detector"]), "--faces", str(tiny_run["faces"]), "--out", str(home / "package.json")], env, REPO)
    _run([str(BIN / "bentoml"), "build"], env, REPO)
    port = free_port()
    log = home / "serve.log"
    with open(log, "wb") as out:
        start = time.monotonic()
        proc = subprocess.Popen([str(BIN / "bentoml"), "serve", "face_age:latest", "--host", "127.0.0.1", "--port",
                                 str(port)], cwd=home, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        while True:
            if proc.poll() is not None:
                raise AssertionError(f"bentoml serve exited with {proc.returncode}:\n{log.read_text()[-5000:]}")
            try:
                if requests.get(url + "/readyz", timeout=2).status_code == 200:
                    break
            except requests.RequestException:  # not listening yet, or busy starting
                pass
            if time.monotonic() - start > READY_TIMEOUT_S:
                raise AssertionError(f"not ready after {READY_TIMEOUT_S} s:\n{log.read_text()[-5000:]}")
            time.sleep(0.25)
        ready_s = time.monotonic() - start
        package = json.loads((home / "package.json").read_text())
        yield BentoServer(url=url, home=home, env=env, ready_s=ready_s, package=package, log=log)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=30)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)
