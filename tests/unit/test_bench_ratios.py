"""The side-by-side ratios of ``benchmarks/bench_service.py`` (issue 7's one-face latency ratio)."""

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
