"""The side-by-side ratios of ``benchmarks/bench_service.py`` (issue 7's one-face latency ratio), and the
summaries of ``bench_detect`` and ``bench_cnn_retry``."""

import json
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from benchmarks.bench_service import interleaved_one_face, interleaved_ratios, ratios


def run(target: str, one_face: float | None, p50: float, img_s: float) -> dict:
    return {"target": target, "one_face_p50_ms": one_face, "service_1": {"p50_ms": p50},
            "service_8": {"images_per_s": img_s}}


def test_each_later_run_is_divided_by_the_first():
    runs = [run("host a", 400.0, 480.0, 2.0), run("host b", 250.0, 260.0, 3.5), run("host c", 200.0, 240.0, 4.0)]
    out = ratios(runs, 8)
    assert [q["target"] for q in out] == ["host b", "host c"]
    assert all(q["versus"] == "host a" for q in out)
    assert out[0]["one_face_p50"] == pytest.approx(0.625)
    assert out[0]["service_1_p50"] == pytest.approx(260 / 480)
    assert out[0]["service_8_images_per_s"] == pytest.approx(1.75)
    assert out[1]["one_face_p50"] == pytest.approx(0.5)


def test_a_missing_one_face_figure_gives_no_ratio():
    out = ratios([run("host a", None, 480.0, 2.0), run("host b", 250.0, 260.0, 3.5)], 8)
    assert out[0]["one_face_p50"] is None
    assert out[0]["service_1_p50"] == pytest.approx(260 / 480)


def test_one_face_p50s_over_different_photos_give_no_ratio():
    """A model that found one face on other photos (another detector setting) had its p50 divided by one over
    another subset of the photos."""
    a, b, c = run("host a", 400.0, 480.0, 2.0), run("host b", 250.0, 260.0, 3.5), run("host c", 200.0, 240.0, 4.0)
    a["one_face_photos"], b["one_face_photos"], c["one_face_photos"] = ["x.jpg", "y.jpg"], ["x.jpg"], ["x.jpg", "y.jpg"]
    out = ratios([a, b, c], 8)
    assert out[0]["one_face_p50"] is None and out[0]["service_1_p50"] == pytest.approx(260 / 480)
    assert out[1]["one_face_p50"] == pytest.approx(0.5)


def test_one_run_has_nothing_to_compare():
    assert ratios([run("host a", 400.0, 480.0, 2.0)], 8) == []


def test_interleaved_ratios_divide_p50s_and_pair_requests():
    out = interleaved_ratios({"host a": [0.40, 0.42, 0.44], "host b": [0.20, 0.30, 0.22]})
    assert out["p50_ms"] == pytest.approx({"host a": 420.0, "host b": 220.0})
    (q,) = out["ratios"]
    assert q["target"] == "host b" and q["versus"] == "host a"
    assert q["p50"] == pytest.approx(220 / 420)
    assert q["median_paired"] == pytest.approx(0.5)  # ratios 0.5, 0.714, 0.5


class Recorder(BaseHTTPRequestHandler):
    """A stand-in service on 127.0.0.1: answers POST /predict with one face and logs who was asked."""

    log: list = []

    def do_POST(self):  # noqa: N802 - http.server's naming
        self.rfile.read(int(self.headers["Content-Length"]))
        Recorder.log.append(self.server.server_address[1])
        body = json.dumps({"faces": [{"age": 30.0}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@dataclass
class FakeTarget:
    name: str
    server: ThreadingHTTPServer | None = None
    stopped: bool = False

    def start(self):
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.server.server_address[1]}", 0.1

    def stop(self):
        self.server.shutdown()
        self.server.server_close()
        self.stopped = True


def test_interleaving_serves_every_target_at_once_and_rotates_who_goes_first():
    Recorder.log = []
    targets = [FakeTarget("host a"), FakeTarget("host b")]
    photos = [(f"p{i}.jpg", b"x" * 10) for i in range(4)]
    latencies = interleaved_one_face(targets, photos, rounds=2, settle_s=0)
    assert {n: len(v) for n, v in latencies.items()} == {"host a": 8, "host b": 8}
    assert all(v > 0 for values in latencies.values() for v in values)
    assert all(t.stopped for t in targets)
    a, b = (t.server.server_address[1] for t in targets)
    measured = Recorder.log[2 * 3:]  # after 3 warm-up photos for each target
    assert measured[:4] == [a, b, b, a]  # photo 1: a then b; photo 2: b then a
    assert measured.count(a) == measured.count(b) == 8


def test_interleaving_alternates_each_photos_first_target_from_round_to_round():
    # Two targets and an even photo count: a rotation by request index alone gave every photo the
    # same first target in every round.
    Recorder.log = []
    targets = [FakeTarget("host a"), FakeTarget("host b")]
    photos = [(f"p{i}.jpg", b"x" * 10) for i in range(2)]
    interleaved_one_face(targets, photos, rounds=3, settle_s=0)
    a, b = (t.server.server_address[1] for t in targets)
    measured = Recorder.log[2 * 2:]  # after the warm-up (every photo, up to 3) for each target
    firsts = [measured[2 * i] for i in range(len(measured) // 2)]  # request pairs: (photo, round) in order
    by_photo = {photo: firsts[photo::len(photos)] for photo in range(len(photos))}
    assert by_photo == {0: [a, b, a], 1: [b, a, b]}


def test_paired_one_client_order_alternates_for_each_photo_from_round_to_round():
    # Each photo goes in-process and to the service back to back; with an even photo count, alternating
    # by request index alone sent every photo first to the same side in every round.
    from pathlib import Path
    from types import SimpleNamespace

    from benchmarks.bench_service import load_photos, measure

    Recorder.log = []
    photos = load_photos(Path(__file__).resolve().parents[2] / "faceage" / "examples")[:2]
    predictor = SimpleNamespace(predict=lambda image: Recorder.log.append("local"),
                                locator=SimpleNamespace(max_pixels=10**9))

    class Target(FakeTarget):
        def size_bytes(self):
            return None

    measure(Target("host a"), predictor, photos, rounds=3, clients=2)
    paired = Recorder.log[2 * len(photos):2 * len(photos) + 2 * len(photos) * 3]  # after the warm-up
    local_first = [paired[2 * i] == "local" for i in range(len(paired) // 2)]  # (round, photo) in order
    assert {j: local_first[j::len(photos)] for j in range(len(photos))} == {0: [True, False, True],
                                                                            1: [False, True, False]}


def test_detection_benchmark_ratios_are_two_threads_over_one():
    from benchmarks.bench_detect import summary

    rows = [{"photo": "a", "faces": 1, "one_thread_ms": 100.0, "two_threads_ms": 60.0},
            {"photo": "b", "faces": 1, "one_thread_ms": 200.0, "two_threads_ms": 100.0},
            {"photo": "c", "faces": 1, "one_thread_ms": 300.0, "two_threads_ms": 150.0},
            {"photo": "d", "faces": 3, "one_thread_ms": 400.0, "two_threads_ms": 300.0}]
    out = summary(rows)
    assert out["one_face_photos"] == 3 and out["photos"] == 4
    assert out["one_face_p50_ms"] == {"one_thread_ms": 200.0, "two_threads_ms": 100.0}
    assert out["one_face_p50_ratio"] == pytest.approx(0.5)
    assert out["total_ratio"] == pytest.approx(610 / 1000)
    assert out["median_photo_ratio"] == pytest.approx((0.5 + 0.6) / 2)  # ratios 0.6, 0.5, 0.5, 0.75


def test_detection_benchmark_without_a_one_face_photo_has_no_one_face_figures():
    from benchmarks.bench_detect import summary

    rows = [{"photo": "group", "faces": 3, "one_thread_ms": 400.0, "two_threads_ms": 300.0},
            {"photo": "cat", "faces": 0, "one_thread_ms": 100.0, "two_threads_ms": 100.0}]
    out = summary(rows)
    assert out["one_face_photos"] == 0
    assert out["one_face_p50_ms"] is None and out["one_face_p50_ratio"] is None
    assert out["total_ratio"] == pytest.approx(400 / 500)
    empty = summary([])  # no decodable photo at all
    assert empty["photos"] == 0 and empty["total_ratio"] is None and empty["median_photo_ratio"] is None


def test_detection_benchmark_detects_with_the_pipelines_settings_and_reports_n_a(tmp_path, monkeypatch, capsys):
    """The locator gets params.yaml's preprocess settings (the CNN's last look included); a run without a
    one-face photo prints n/a instead of failing after all the timing."""
    import benchmarks.bench_detect as bench
    from faceage.config import load_params

    made = {}

    class Locator:
        def __init__(self, detector_dir, **kwargs):
            made.update(kwargs)

    rows = [{"photo": "group.jpg", "width": 10, "height": 10, "faces": 2, "one_thread_ms": 4.0, "two_threads_ms": 3.0}]
    monkeypatch.setattr(bench, "FaceLocator", Locator)
    monkeypatch.setattr(bench, "measure", lambda locator, photos, rounds: rows)
    out = tmp_path / "out.json"
    assert bench.main(["--photos", str(tmp_path), "--detector", str(tmp_path), "--json", str(out)]) == 0
    pre = load_params(bench.REPO / "params.yaml").preprocess
    assert made == {"kind": pre.detector, "upsample": pre.upsample, "retry_pad": pre.retry_pad,
                    "cnn_retry_side": pre.cnn_retry_side, "margin": pre.margin, "crop_size": pre.size}
    assert "one-face p50 (0 photos): n/a" in capsys.readouterr().out
    assert json.loads(out.read_text())["summary"]["one_face_p50_ratio"] is None


def test_cnn_look_benchmark_ratios_and_gains():
    from benchmarks.bench_cnn_retry import summary

    rows = [{"photo": "crop.jpg", "faces": 0, "faces_with_look": 1, "ms": 100.0, "ms_with_look": 300.0},
            {"photo": "cat.png", "faces": 0, "faces_with_look": 0, "ms": 100.0, "ms_with_look": 200.0},
            {"photo": "group.jpg", "faces": 3, "faces_with_look": 3, "ms": 200.0, "ms_with_look": 200.0}]
    out = summary(rows, {"cat.png": 0, "crop.jpg": 1, "group.jpg": 3})
    assert out["with_a_face"] == 1 and out["with_a_face_with_look"] == 2 and out["gained"] == ["crop.jpg"]
    assert out["count_changed_against_labels"] == ["crop.jpg: 0 -> 1 (labels: 1)"]
    assert out["time_ratio_where_hog_found_none"] == pytest.approx(500 / 200)
    assert out["time_ratio_all_photos"] == pytest.approx(700 / 400)
