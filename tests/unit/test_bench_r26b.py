"""Round 26's second review of the benchmarks' command lines: counts of zero or less, missing files and a dead
``--url`` are one message each, before any work (they ended in tracebacks: ``statistics.StatisticsError`` 'no
median for empty data', ``requests.ConnectionError``, ``ValueError``, ``FileNotFoundError``); ``load_test``
reports a server that dies under the load instead of a traceback, and with ``--url`` measures the ``bentoml
serve`` process tree, not only its worker's. Stand-ins only: no bento, no model, no shared data."""

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from tests.conftest import http_server
from tests.unit.test_bench_server import Answering

REPO = Path(__file__).resolve().parents[2]


# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")


def went_on(*args, **kwargs):
    raise AssertionError("the benchmark went on past a value it should have refused")


def dead_url() -> str:
    """A 127.0.0.1 URL on a port nothing listens on."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


@pytest.fixture
def photos(tmp_path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(folder / "grey.jpg")
    return folder


class NoFaces:
    """A stand-in FaceLocator that finds no face (what HOG does on a photo without one)."""

    max_pixels = 10**8

    def detect(self, image, parallel=False):
        return []


# -- bench_detect and bench_cnn_retry ------------------------------------------------------------------------------

@pytest.mark.parametrize("module", ["benchmarks.bench_detect", "benchmarks.bench_cnn_retry"])
@pytest.mark.parametrize("rounds", ["0", "-1"])
def test_detection_benchmarks_refuse_rounds_below_one_in_one_message(module, rounds, photos, monkeypatch, capsys):
    import importlib

    bench = importlib.import_module(module)
    monkeypatch.setattr(bench, "measure", went_on)
    monkeypatch.setattr(bench, "FaceLocator", went_on)
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos), "--detector", str(photos), "--rounds", rounds])
    assert e.value.code == 2 and "--rounds" in capsys.readouterr().err


def test_detection_benchmarks_measure_refuses_zero_rounds_not_a_statistics_error(photos):
    """``measure(..., rounds=0)`` timed nothing, then took the median of nothing (a photo where HOG finds
    no face is timed ``rounds`` times in bench_cnn_retry)."""
    import benchmarks.bench_cnn_retry as cnn
    import benchmarks.bench_detect as detect

    files = sorted(photos.iterdir())
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        detect.measure(NoFaces(), files, 0)
    with pytest.raises(ValueError, match="rounds must be >= 1"):
        cnn.measure(NoFaces(), NoFaces(), files, 0)
    assert cnn.measure(NoFaces(), NoFaces(), files, 1)[0]["faces"] == 0  # one round: measured


@pytest.mark.parametrize("side", ["0", "-5"])
def test_cnn_look_benchmark_refuses_a_side_below_one(side, photos, monkeypatch, capsys):
    import benchmarks.bench_cnn_retry as bench

    monkeypatch.setattr(bench, "measure", went_on)
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos), "--detector", str(photos), "--side", side])
    assert e.value.code == 2 and "--side" in capsys.readouterr().err


@pytest.mark.parametrize("module", ["benchmarks.bench_detect", "benchmarks.bench_cnn_retry"])
def test_detection_benchmarks_name_a_detector_folder_without_dlibs_files(module, photos, tmp_path, capsys):
    import importlib

    bench = importlib.import_module(module)
    missing = tmp_path / "no-detector"
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos), "--detector", str(missing)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"--detector {missing}" in err and "frontal_face_detector.svm" in err


def test_detection_benchmark_names_a_missing_params_file(photos, tmp_path, monkeypatch, capsys):
    import benchmarks.bench_detect as bench

    monkeypatch.setattr(bench, "FaceLocator", went_on)
    with pytest.raises(SystemExit) as e:
        bench.main(["--photos", str(photos), "--detector", str(photos), "--params", str(tmp_path / "none.yaml")])
    assert e.value.code == 2 and "none.yaml is not a file" in capsys.readouterr().err


# -- a dead --url --------------------------------------------------------------------------------------------------

def test_load_test_with_a_dead_url_is_one_message_naming_it(monkeypatch):
    import benchmarks.load_test as load_test

    url = dead_url()
    monkeypatch.setattr(load_test, "server_pid", lambda url: None)
    with pytest.raises(SystemExit) as e:
        load_test.main(["--url", url, "--requests", "2", "--clients", "1"])
    assert isinstance(e.value.code, str) and url in e.value.code and "/readyz" in e.value.code


def test_service_benchmark_with_a_dead_url_is_one_message_before_the_model_loads(monkeypatch):
    import bentoml

    import benchmarks.bench_service as bs

    url = dead_url()
    monkeypatch.setattr(bentoml, "get", went_on)
    with pytest.raises(SystemExit) as e:
        bs.main(["--url", url, "--photos", str(REPO / "faceage" / "examples"), "--rounds", "1", "--clients", "2"])
    assert isinstance(e.value.code, str) and url in e.value.code
    with pytest.raises(SystemExit, match="nothing answers"):
        bs.UrlTarget(url).start()  # the target itself, for measure()


@pytest.mark.parametrize("bad", [["--clients", "0"], ["--timeout", "0"], ["--malformed", "2"], ["--malformed", "-0.1"],
                                 ["--requests", "-1"]], ids=lambda a: " ".join(a))
def test_load_test_refuses_counts_it_cannot_run_with_in_one_message(bad, monkeypatch, capsys):
    """--clients 0 ended in ThreadPoolExecutor's ValueError, --timeout 0 in urllib3's; --malformed 2 sent twice
    --requests, all malformed."""
    import benchmarks.load_test as load_test

    monkeypatch.setattr(load_test, "require_service", went_on)
    monkeypatch.setattr(load_test, "start_server", went_on)
    with pytest.raises(SystemExit) as e:
        load_test.main(["--url", dead_url(), *bad])
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


# -- a server that dies under the load -----------------------------------------------------------------------------

class DiesAfterSixPosts(Answering):
    """/readyz 200 and POST /predict -> one face, until six POSTs came: then every request has its connection
    closed unanswered (what a crashed server's clients see)."""

    def _gone(self) -> bool:
        with self.server.lock:
            return self.server.posts >= 6

    def do_GET(self):  # noqa: N802 - http.server's naming
        if self._gone():
            self.close_connection = True
            return
        self._answer(b"ok")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.posts += 1
        if self._gone():
            self.close_connection = True
            return
        self._answer(json.dumps({"faces": [{"age": 30.0}]}).encode())


def test_a_server_that_dies_under_the_load_is_reported_not_a_traceback(tmp_path, monkeypatch, capsys):
    """The /readyz after the run raised ConnectionError: the report (what the load test is for) was lost."""
    import benchmarks.load_test as load_test

    monkeypatch.setattr(load_test, "server_pid", lambda url: None)
    out = tmp_path / "summary.json"
    with http_server(DiesAfterSixPosts, posts=0, lock=threading.Lock()) as srv:
        rc = load_test.main(["--url", f"http://127.0.0.1:{srv.server_address[1]}", "--requests", "8",
                             "--clients", "2", "--json", str(out)])
    assert rc == 1
    printed = capsys.readouterr().out
    assert "[FAILED] /readyz 200 afterwards" in printed and "[FAILED] 0 dropped connections" in printed
    summary = json.loads(out.read_text())
    assert summary["readyz_after"] is None and summary["failures"][0].startswith("/readyz afterwards")
    assert summary["rss_before_mb"] is None and summary["rss_growth"] is None  # not measured: not "0 MB"


# -- --url: the bentoml serve process tree -------------------------------------------------------------------------

# A stand-in ``bentoml serve`` (its argv: ``python .../bentoml serve ...``): its child listens on the port, as
# bentoml's service worker does, and writes the port.
FAKE_SERVE = textwrap.dedent('''
    import subprocess, sys
    child = """
    import socket, sys, time
    s = socket.socket(); s.bind(("127.0.0.1", 0)); s.listen()
    open(sys.argv[1], "w").write(str(s.getsockname()[1]))
    time.sleep(120)
    """
    subprocess.run([sys.executable, "-c", child, sys.argv[2]])
''')


def test_load_test_url_measures_the_bentoml_serve_tree_not_only_its_listening_worker(tmp_path):
    """server_pid() returned the worker listening on the port: 'server RSS (process tree)' left out the
    ``bentoml serve`` process above it (426 MB reported of 530 MB)."""
    import psutil

    import benchmarks.load_test as load_test

    (tmp_path / "bentoml").write_text(FAKE_SERVE)
    port_file = tmp_path / "port"
    serve = subprocess.Popen([sys.executable, str(tmp_path / "bentoml"), "serve", str(port_file)])
    try:
        deadline = time.monotonic() + 30
        while not (port_file.is_file() and port_file.read_text()) and time.monotonic() < deadline:
            time.sleep(0.05)
        url = f"http://127.0.0.1:{port_file.read_text()}"
        worker = psutil.Process(serve.pid).children()[0].pid
        deadline = time.monotonic() + 10
        while load_test.server_pid(url) is None and time.monotonic() < deadline:  # listen() shows up
            time.sleep(0.05)
        pid = load_test.server_pid(url)
        assert pid == serve.pid, f"got {pid}: the listening worker is {worker}, bentoml serve {serve.pid}"
        assert load_test.rss_scope(pid).startswith(f"bentoml serve, pid {serve.pid}")
        assert load_test.process_tree_rss(pid) > load_test.process_tree_rss(worker)
    finally:
        for proc in psutil.Process(serve.pid).children(recursive=True):
            proc.kill()
        serve.kill()
        serve.wait()


def test_a_listener_without_bentoml_serve_above_it_is_labelled_as_such():
    import os

    import benchmarks.load_test as load_test

    with http_server(DiesAfterSixPosts, posts=0, lock=threading.Lock()) as srv:
        pid = load_test.server_pid(f"http://127.0.0.1:{srv.server_address[1]}")
    assert pid == os.getpid()
    assert "no bentoml serve above it" in load_test.rss_scope(pid)
    assert load_test.rss_scope(None).startswith("not measured")


# -- the other benchmarks ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag", ["--rounds", "--faces", "--threads", "--batch"])
def test_frozen_runtime_refuses_counts_below_one_before_loading_the_model(flag, tmp_path, monkeypatch, capsys):
    import benchmarks.frozen_runtime as bench

    (tmp_path / "model.pt").write_bytes(b"x")
    (tmp_path / "manifest.csv").write_text("x\n")
    monkeypatch.setattr(bench, "AgeModel", went_on)
    monkeypatch.setattr(sys, "argv", ["frozen_runtime.py", "--model", str(tmp_path / "model.pt"),
                                      "--faces-dir", str(tmp_path), flag, "0"])
    with pytest.raises(SystemExit) as e:
        bench.main()
    assert e.value.code == 2 and f"{flag} must be >= 1" in capsys.readouterr().err


def test_frozen_runtime_names_a_missing_model(tmp_path, capsys):
    import benchmarks.frozen_runtime as bench

    with pytest.raises(SystemExit) as e:
        bench.main(["--model", str(tmp_path / "none.pt")])
    assert e.value.code == 2 and "none.pt" in capsys.readouterr().err


@pytest.mark.parametrize("bad", [["--sample", "MISSING"], ["--train", "0"], ["--epochs", "0"], ["--kills", "-1"]],
                         ids=lambda a: " ".join(a))
def test_kill_resume_refuses_what_it_cannot_run_before_building_anything(bad, tmp_path, monkeypatch, capsys):
    import benchmarks.kill_resume as kill_resume

    sample = tmp_path / "sample"
    sample.mkdir()
    (sample / "gt_avg_train.csv").write_text("file_name\n")
    monkeypatch.setattr(kill_resume, "run", went_on)
    args = ["--sample", str(sample), *[str(tmp_path / a) if a == "MISSING" else a for a in bad]]
    with pytest.raises(SystemExit) as e:
        kill_resume.main(args)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err


def test_exploration_benchmarks_refuse_values_that_crash_after_their_inputs_load(tmp_path, monkeypatch, capsys):
    """Each crashed only after minutes of loading: band_regret --folds 1 (a fold with nothing to train on),
    shift_groups --guard -1 (KMeans), dlib_age_heads --checkpoints of a missing file, dlib_age_sweep K 7 (every
    stage frozen: AdamW's empty parameter list) or a CONFIG with epochs 0 (load_state_dict(None))."""
    import benchmarks.band_regret as band_regret
    import benchmarks.dlib_age_heads as heads
    import benchmarks.dlib_age_sweep as sweep
    import benchmarks.shift_groups as shift_groups

    monkeypatch.setattr(band_regret, "fused_inputs", went_on)
    monkeypatch.setattr(shift_groups, "load_inputs", went_on)
    monkeypatch.setattr(heads, "load_inputs", went_on)
    monkeypatch.setattr(sweep, "load_cached", went_on)
    cases = [(band_regret.main, ["--folds", "1"], "--folds"), (shift_groups.main, ["--guard", "-1"], "--guard"),
             (heads.main, ["--variants", "--checkpoints", str(tmp_path / "a.pt")], "a.pt"),
             (sweep.main, ["7"], "K must be in 0..6"),
             (sweep.main, ["4", '{"lr": 0.001, "epochs": 0}'], "epochs must be"),
             (sweep.main, ["4", '{"lr": 0.001, "epochs": 2, "bs": 0}'], "bs must be")]
    for main, argv, said in cases:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2 and said in capsys.readouterr().err, argv


@pytest.mark.parametrize("bad", [["--workers", "-1"], ["--params", "MISSING"], ["--detector", "MISSING"]],
                         ids=lambda a: a[0])
def test_external_crops_benchmark_refuses_what_it_cannot_run(bad, tmp_path, monkeypatch, capsys):
    import benchmarks.bench_external_crops as bench

    detector = tmp_path / "detector"
    detector.mkdir()
    (detector / "manifest.json").write_text(json.dumps({"files": {}}))
    monkeypatch.setattr(bench, "external_faces", went_on)
    monkeypatch.setattr(bench, "fetch_detector_files", went_on)
    monkeypatch.setattr(bench, "resolve_external", lambda paths, root: [SimpleNamespace(name="x")])
    args = ["--params", str(REPO / "params.yaml"), "--detector", str(detector),
            *[str(tmp_path / "none") if a == "MISSING" else a for a in bad]]
    with pytest.raises(SystemExit) as e:
        bench.main(args)
    assert e.value.code == 2 and bad[0] in capsys.readouterr().err
