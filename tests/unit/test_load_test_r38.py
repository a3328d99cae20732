"""benchmarks/load_test.py: the warm-up's failures (a dropped connection, a 5xx) went into the failures list but
into no check, so a run whose server dropped its first requests passed every check."""

from __future__ import annotations

import json
import threading

from tests.conftest import http_server
from tests.unit.test_bench_server import Answering


class DropsTheFirstPosts(Answering):
    """/readyz 200; the first ``drop`` POSTs have their connection closed unanswered, the rest get one face."""

    def do_GET(self):  # noqa: N802 - http.server's naming
        self._answer(b"ok")

    def do_POST(self):  # noqa: N802
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        with self.server.lock:
            self.server.posts += 1
            dropped = self.server.posts <= self.server.drop
        if dropped:
            self.close_connection = True
            return
        self._answer(json.dumps({"faces": [{"age": 30.0}]}).encode())


def _run(monkeypatch, capsys, drop: int):
    import benchmarks.load_test as load_test

    monkeypatch.setattr(load_test, "server_pid", lambda url: None)
    with http_server(DropsTheFirstPosts, posts=0, drop=drop, lock=threading.Lock()) as srv:
        rc = load_test.main(["--url", f"http://127.0.0.1:{srv.server_address[1]}", "--requests", "6",
                             "--clients", "1", "--malformed", "0"])
    return rc, capsys.readouterr().out


def test_a_warm_up_request_dropped_fails_a_check(monkeypatch, capsys):
    rc, out = _run(monkeypatch, capsys, drop=1)  # the warm-up sends 2 per client first
    assert rc == 1, out
    assert "[FAILED] every warm-up request answered 200" in out, out


def test_a_clean_warm_up_passes_that_check(monkeypatch, capsys):
    rc, out = _run(monkeypatch, capsys, drop=0)
    assert "[ok] every warm-up request answered 200" in out, out
