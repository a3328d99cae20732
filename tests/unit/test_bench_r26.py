"""Round 26's review of the benchmarks' servers and containers (``benchmarks/_server.py``, ``bench_service``,
``bench_container``), against stand-ins (no bento, no Docker daemon): a server whose workers run in their own
process groups (as ``bentoml serve``'s do) is stopped whole; SIGTERM right after a server is ready does not
leave it running; a container ``docker run`` was creating when SIGTERM came, or that failed to start, is
removed; a missing image is one message with Docker's reason."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from tests.unit.test_bench_server import FAKE_SERVICE, fake_bentoml, running, stop_left_behind

REPO = Path(__file__).resolve().parents[2]


# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")


def wait_for(predicate, timeout_s: float = 20) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return predicate()


# A stand-in ``bentoml serve``: its worker runs in a session (process group) of its own, as bentoml's
# service worker does; the "arbiter" itself ignores SIGTERM (a hung shutdown), so only Server.stop's
# SIGKILL ends it.
FAKE_ARBITER = textwrap.dedent('''
    import os, signal, subprocess, sys, time
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    worker = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"], start_new_session=True)
    open(sys.argv[1], "w").write(str(worker.pid))
    time.sleep(120)
''')


def test_stopping_a_server_also_stops_workers_outside_its_process_group(tmp_path):
    """bentoml's worker (and its detection pool) is in its own process group: SIGKILL to the server's group
    after the SIGTERM timeout left it running, holding the port and its memory."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    from _server import Server

    (tmp_path / "arbiter.py").write_text(FAKE_ARBITER)
    pid_file = tmp_path / "worker.pid"
    server = Server([sys.executable, str(tmp_path / "arbiter.py"), str(pid_file)])
    worker = None
    try:
        assert wait_for(lambda: pid_file.is_file() and pid_file.read_text())
        worker = int(pid_file.read_text())
        assert os.getpgid(worker) != os.getpgid(server.pid)
        server.stop(timeout_s=1)
        assert not running(server.pid)
        assert wait_for(lambda: not running(worker), 10), "the worker outlived Server.stop()"
    finally:
        if server.alive():
            os.kill(server.pid, signal.SIGKILL)
        if worker is not None and running(worker):
            os.kill(worker, signal.SIGKILL)
        server.close()


def test_sigterm_as_the_server_becomes_ready_does_not_leave_it_running(tmp_path):
    """SIGTERM between /readyz's 200 and the measurement (start_server's print, then the bento's size) used
    to leave the server it had just started running for good (its own session: nothing else stops it)."""
    (tmp_path / "fake_service.py").write_text(FAKE_SERVICE)
    python = fake_bentoml(tmp_path, f'exec "{sys.executable}" "{tmp_path / "fake_service.py"}" "$6"\n')
    pid_file, go = tmp_path / "server.pid", tmp_path / "signalled"
    photos = tmp_path / "photos"
    photos.mkdir()
    from PIL import Image

    Image.new("RGB", (32, 32)).save(photos / "a.jpg")
    # The bento's size is read once the server is ready: the stand-in signals the benchmark there, then
    # waits for the signal to arrive (what a Ctrl-C or SIGTERM at that moment does).
    code = textwrap.dedent(f'''
        import os, signal, sys, time
        sys.executable = {str(python)!r}; sys.path.insert(0, {str(REPO)!r})
        import benchmarks.bench_service as bs
        def size_bytes(self):
            open({str(go)!r}, "w").close()
            time.sleep(30)
        bs.HostTarget.size_bytes = size_bytes
        class Predictor:
            class locator:
                max_pixels = 10**8
            def predict(self, image):
                return []
        import faceage.predict
        faceage.predict.AgePredictor.from_model_dir = staticmethod(lambda *a, **k: Predictor())
        import bentoml
        class Info:
            all_models = [type("M", (), {{"tag": "m:1"}})]
        bentoml.get = lambda tag: type("B", (), {{"tag": "fake:1", "info": Info}})
        bentoml.models.get = lambda tag: type("Model", (), {{"path": ".", "tag": "m:1",
                                                             "info": type("I", (), {{"metadata": {{}}}})}})
        bs.main(["--tag", "fake:1", "--photos", {str(photos)!r}, "--rounds", "1", "--clients", "2"])
    ''')
    env = {**os.environ, "FAKE_PID_FILE": str(pid_file)}
    bench = subprocess.Popen([sys.executable, "-c", code], env=env, cwd=tmp_path,
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    server_pid = None
    try:
        assert wait_for(go.is_file, 60), bench.stdout.read() if bench.poll() is not None else "not ready"
        server_pid = int(pid_file.read_text())
        bench.send_signal(signal.SIGTERM)
        rc = bench.wait(timeout=60)
        assert rc == 128 + signal.SIGTERM, bench.stdout.read()
        assert wait_for(lambda: not running(server_pid), 10), "the server outlived the benchmark"
    finally:
        stop_left_behind(bench, server_pid)


# A stand-in ``docker``: ``run`` records the container it creates (under --name, else an id of its own) in
# $FAKE_DOCKER_STATE, then either takes its time (FAKE_DOCKER_RUN=slow: SIGTERM lands while it runs) or fails
# after creating it (FAKE_DOCKER_RUN=fail, as a port already taken does); ``rm -f`` deletes the record;
# ``image inspect`` of a missing image fails as Docker's does.
FAKE_DOCKER = textwrap.dedent('''\
    #!/bin/sh
    state="$FAKE_DOCKER_STATE"
    cmd="$1"; shift
    case "$cmd" in
    run)
        name="anon$$"; prev=""
        for a in "$@"; do [ "$prev" = "--name" ] && name="$a"; prev="$a"; done
        touch "$state/$name"
        if [ "$FAKE_DOCKER_RUN" = fail ]; then
            echo "docker: Error response from daemon: driver failed programming external connectivity" >&2
            exit 125
        fi
        exec sleep 60 ;;
    rm)
        [ "$1" = "-f" ] && shift
        for c in "$@"; do
            if [ -e "$state/$c" ]; then rm -f "$state/$c"; else echo "Error: No such container: $c" >&2; exit 1; fi
        done ;;
    inspect) echo false ;;
    image)
        echo "Error: No such image: $4" >&2; exit 1 ;;
    esac
''')


@pytest.fixture
def fake_docker(tmp_path, monkeypatch):
    bin_dir, state = tmp_path / "docker-bin", tmp_path / "containers"
    bin_dir.mkdir()
    state.mkdir()
    (bin_dir / "docker").write_text(FAKE_DOCKER)
    (bin_dir / "docker").chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "FAKE_DOCKER_STATE": str(state)}
    for key in ("PATH", "FAKE_DOCKER_STATE"):
        monkeypatch.setenv(key, env[key])
    return env, state


def test_sigterm_while_docker_run_creates_the_container_removes_it(fake_docker, tmp_path):
    """The container id was only known once ``docker run -d`` answered: SIGTERM (or Ctrl-C) while it ran left
    the container the daemon had created (with the real image: a running server on a published port)."""
    env, state = fake_docker
    code = textwrap.dedent(f'''
        import sys; sys.path.insert(0, {str(REPO / "benchmarks")!r})
        from _server import exit_on_sigterm
        from bench_container import ContainerTarget
        exit_on_sigterm()
        ContainerTarget("face-age:latest", timeout_s=5).start()
    ''')
    bench = subprocess.Popen([sys.executable, "-c", code], env={**env, "FAKE_DOCKER_RUN": "slow"},
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert wait_for(lambda: any(state.iterdir()), 30), "docker run never started"
        bench.send_signal(signal.SIGTERM)
        rc = bench.wait(timeout=30)
        assert rc == 128 + signal.SIGTERM, bench.stdout.read()
        assert not list(state.iterdir()), f"containers left behind: {[p.name for p in state.iterdir()]}"
    finally:
        if bench.poll() is None:
            bench.kill()
            bench.wait()


def test_a_container_that_fails_to_start_is_removed_and_docker_says_why(fake_docker):
    sys.path.insert(0, str(REPO / "benchmarks"))
    from bench_container import ContainerTarget

    env, state = fake_docker
    os.environ["FAKE_DOCKER_RUN"] = "fail"
    try:
        with pytest.raises(SystemExit) as e:
            ContainerTarget("face-age:latest", timeout_s=5).start()
    finally:
        del os.environ["FAKE_DOCKER_RUN"]
    assert "driver failed programming external connectivity" in str(e.value.code)
    assert not list(state.iterdir()), f"containers left behind: {[p.name for p in state.iterdir()]}"


def test_a_missing_image_is_one_message_with_dockers_reason(fake_docker, capsys):
    """Without ``make container`` (no face-age:latest), bench_container ended in a CalledProcessError
    traceback, Docker's own reason swallowed (its stderr was captured and dropped)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_container

    with pytest.raises(SystemExit) as e:
        bench_container.main(["--rounds", "1"])
    message = str(e.value.code)
    assert "No such image: face-age:latest" in message and "make container" in message


def test_one_concurrent_client_is_refused_not_written_over_the_paired_figures(tmp_path, monkeypatch):
    """``--clients 1`` stored the concurrent run under ``service_1``, the paired run's key: the 1-client p50, its
    ratio to in-process and the one-face p50 then came from different runs, and throughput was 1.00x itself."""
    from types import SimpleNamespace

    import bentoml

    import benchmarks.bench_service as bs

    def measured(tag):
        raise AssertionError("--clients 1 went on to serve and measure")

    monkeypatch.setattr(bentoml, "get", measured)
    with pytest.raises(SystemExit, match="--clients >= 2"):
        bs.main(["--photos", str(REPO / "faceage" / "examples"), "--clients", "1"])
    started = []
    target = SimpleNamespace(name="t", start=lambda: started.append(1) or ("http://127.0.0.1:9", 0.0),
                             stop=lambda: None, size_bytes=lambda: None)
    with pytest.raises(ValueError, match="clients must be >= 2"):
        bs.measure(target, None, [], rounds=1, clients=1)
    assert not started  # refused before any server starts
