"""The servers the benchmarks start (``benchmarks/_server.py``, used by ``bench_service``, ``load_test`` and
``bench_container``), and ``load_test``'s report, against stand-ins on 127.0.0.1: a failed start shows the
server's stderr, SIGTERM stops the server, and a run where no request got an answer reports n/a."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

FAKE_SERVICE = textwrap.dedent('''
    """A stand-in ``bentoml serve``: /readyz 200, POST /predict -> one face after a delay; writes its pid."""
    import json, os, sys, time
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
    class H(BaseHTTPRequestHandler):
        def do_GET(self):
            self.send_response(200); self.send_header("Content-Length", "2"); self.end_headers(); self.wfile.write(b"ok")
        def do_POST(self):
            self.rfile.read(int(self.headers.get("Content-Length", 0)))
            time.sleep(float(os.environ.get("FAKE_DELAY", "0")))
            body = json.dumps({"faces": [{"age": 30.0}]}).encode()
            self.send_response(200); self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
        def log_message(self, *a): pass
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[1])), H)
    open(os.environ["FAKE_PID_FILE"], "w").write(str(os.getpid()))
    server.serve_forever()
''')


def fake_bentoml(folder: Path, script: str) -> Path:
    """``folder/bin/bentoml`` (a shell script) beside a ``python`` the benchmarks take as ``sys.executable``."""
    bin_dir = folder / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / "bentoml").write_text("#!/bin/sh\n" + script)
    (bin_dir / "bentoml").chmod(0o755)
    return bin_dir / "python"  # only its folder is used


def running(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting to be reaped is not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


FAILING = 'echo "cannot load model face_age:latest: no such bento" >&2\nexit 3\n'


def test_a_server_that_fails_to_start_shows_its_stderr_not_a_process_lookup_error(tmp_path, monkeypatch):
    from benchmarks.bench_service import start_server

    monkeypatch.setattr(sys, "executable", str(fake_bentoml(tmp_path, FAILING)))
    with pytest.raises(SystemExit) as e:
        start_server("face_age:latest", timeout_s=30)
    assert "cannot load model face_age:latest: no such bento" in str(e.value.code)


def test_the_containers_host_cold_start_shows_the_stderr_of_a_failed_start(tmp_path, monkeypatch):
    from benchmarks.bench_container import host_cold_start

    monkeypatch.setattr(sys, "executable", str(fake_bentoml(tmp_path, FAILING)))
    with pytest.raises(SystemExit) as e:
        host_cold_start("face_age:latest", 30)
    assert "cannot load model face_age:latest: no such bento" in str(e.value.code)


def test_sigterm_to_the_load_test_stops_the_server_it_started(tmp_path):
    (tmp_path / "fake_service.py").write_text(FAKE_SERVICE)
    python = fake_bentoml(tmp_path, f'exec "{sys.executable}" "{tmp_path / "fake_service.py"}" "$6"\n')
    pid_file = tmp_path / "server.pid"
    code = (f"import sys; sys.executable = {str(python)!r}; sys.path.insert(0, {str(REPO)!r})\n"
            "from benchmarks.load_test import main\n"
            "sys.exit(main(['--tag', 'fake:1', '--requests', '400', '--clients', '2', '--timeout', '30']))\n")
    env = {**os.environ, "FAKE_DELAY": "0.2", "FAKE_PID_FILE": str(pid_file)}
    bench = subprocess.Popen([sys.executable, "-u", "-c", code], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True, cwd=tmp_path)
    server_pid = None
    try:
        lines = []
        for line in bench.stdout:  # "server fake:1 ready in ... s at ..." once /readyz answered
            lines.append(line)
            if "ready in" in line:
                break
        assert pid_file.is_file(), "".join(lines)
        server_pid = int(pid_file.read_text())
        time.sleep(1.0)  # into the warm-up and the load
        assert running(server_pid)
        bench.send_signal(signal.SIGTERM)
        rc = bench.wait(timeout=60)
        deadline = time.monotonic() + 10
        while running(server_pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not running(server_pid), f"the server outlived the load test (rc {rc})"
        assert rc == 128 + signal.SIGTERM
    finally:
        stop_left_behind(bench, server_pid)


def stop_left_behind(bench: subprocess.Popen, server_pid: int | None) -> None:
    """A test's clean-up: the benchmark process it started, then the stand-in server (by its pid), each
    only if still running."""
    if bench.poll() is None:
        bench.kill()
        bench.wait()
    if server_pid is not None and running(server_pid):
        os.kill(server_pid, signal.SIGKILL)


class Answering(BaseHTTPRequestHandler):
    """A stand-in service on 127.0.0.1: /readyz 200, POST /predict -> one face."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._answer(b"ok")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        self._answer(json.dumps({"faces": [{"age": 30.0}]}).encode())

    def _answer(self, body: bytes) -> None:
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def service_url():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Answering)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def keep_sigterm():
    """main() installs its SIGTERM handler in this process: put pytest's back afterwards."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


@pytest.mark.parametrize("limits", [["--requests", "0"], ["--requests", "4", "--max-seconds", "0"]],
                         ids=["no requests", "no time"])
def test_a_load_test_where_no_request_got_an_answer_reports_n_a_and_writes_its_json(
        limits, service_url, tmp_path, monkeypatch, capsys, keep_sigterm):
    import benchmarks.load_test as load_test

    monkeypatch.setattr(load_test, "server_pid", lambda url: None)  # the stand-in's RSS is not the point
    out = tmp_path / "summary.json"
    rc = load_test.main(["--url", service_url, "--clients", "2", "--json", str(out), *limits])
    printed = capsys.readouterr().out
    assert "p50 n/a, p95 n/a" in printed
    summary = json.loads(out.read_text())
    assert summary["p50_ms"] is None and summary["p95_ms"] is None
    assert rc == 1  # (no RSS figure for the stand-in: that check fails)
