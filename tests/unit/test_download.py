"""Downloads against a real HTTP server on 127.0.0.1: progress-streamed, resumable, checksummed, atomic."""

import hashlib
import http.server
import logging
import multiprocessing
import threading
import time

import pytest

from faceage.download import ChecksumError, DownloadError, download

BODY = bytes(range(256)) * 4096  # 1 MiB


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves BODY with Range support; ``server.drop_after`` cuts the first response short."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append(self.headers.get("Range"))
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = 0
        rng = self.headers.get("Range")
        if rng and srv.ranges:
            start = int(rng.removeprefix("bytes=").split("-")[0])
            if start >= len(BODY):
                self.send_response(416)
                self.end_headers()
                return
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(BODY) - 1}/{len(BODY)}")
        else:
            self.send_response(200)
        payload = BODY[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if srv.drop_after is not None:
            cut, srv.drop_after = srv.drop_after, None
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)  # the connection dies mid-body
            return
        for i in range(0, len(payload), srv.chunk_bytes):  # a slow server: chunk_delay_s between chunks
            self.wfile.write(payload[i : i + srv.chunk_bytes])
            time.sleep(srv.chunk_delay_s)


def serve():
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.requests, srv.drop_after, srv.ranges = [], None, True
    srv.chunk_bytes, srv.chunk_delay_s = len(BODY), 0.0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


def stop(srv):
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def server():
    srv = serve()
    yield srv
    stop(srv)


@pytest.fixture
def mirror():
    """A second server with the same file: another host of the same release."""
    srv = serve()
    yield srv
    stop(srv)


def url(srv, path="/file.bin"):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()


def test_download_verifies_and_lands_atomically(server, tmp_path):
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, md5=MD5, progress=False)
    assert dest.read_bytes() == BODY
    assert not (tmp_path / "f.bin.part").exists()


def test_dropped_connection_resumes_with_range(server, tmp_path):
    server.drop_after = 300_000
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, backoff_s=0.01, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests[0] is None
    # The resume starts from what reached the disk: whole 64 KiB reads before the cut.
    resumed_at = int(server.requests[1].removeprefix("bytes=").rstrip("-"))
    assert 4 * 65536 <= resumed_at <= 300_000, server.requests


def test_existing_part_file_is_resumed(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY[:123_456])
    download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert server.requests == ["bytes=123456-"]
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_server_without_range_support_restarts_cleanly(server, tmp_path):
    server.ranges = False
    (tmp_path / "f.bin.part").write_bytes(b"garbage" * 10)
    download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_complete_part_file_gets_416_and_is_accepted(server, tmp_path):
    (tmp_path / "f.bin.part").write_bytes(BODY)
    download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert server.requests == [f"bytes={len(BODY)}-"]  # one ranged request (416), no fresh download
    assert (tmp_path / "f.bin").read_bytes() == BODY


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    with pytest.raises(ChecksumError, match=f"sha256 of .* is {SHA}, expected 0000"):
        download(url(server), tmp_path / "f.bin", sha256="0" * 64, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == [".f.bin.lock"]  # only the (empty) lock file


def test_http_error_is_reported_and_leaves_no_output(server, tmp_path):
    with pytest.raises(DownloadError, match="HTTP 404"):
        download(url(server, "/missing.bin"), tmp_path / "f.bin", progress=False)
    assert not (tmp_path / "f.bin").exists()


def test_interrupted_download_keeps_only_the_part_file(server, tmp_path):
    server.drop_after = 200_000
    with pytest.raises(DownloadError, match="failed after 1 attempts.*resumes"):
        download(url(server), tmp_path / "f.bin", sha256=SHA, retries=0, progress=False)
    assert not (tmp_path / "f.bin").exists()
    assert 65536 <= (tmp_path / "f.bin.part").stat().st_size <= 200_000


def test_verified_existing_file_is_not_fetched_again(server, tmp_path):
    (tmp_path / "f.bin").write_bytes(BODY)
    download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert server.requests == []


def test_unreachable_host_fails_fast(tmp_path):
    with pytest.raises(DownloadError, match="failed after 1 attempts") as failed:
        download("http://127.0.0.1:9/x.zip", tmp_path / "x.zip", retries=0, progress=False)
    assert "keeps the" not in str(failed.value)  # nothing was fetched: no "keeps the 0 bytes" to resume from


def test_a_failing_url_falls_back_to_the_mirror(server, mirror, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="faceage.download"):
        dest = download(url(server, "/gone.bin"), tmp_path / "f.bin", md5=MD5, mirrors=[url(mirror)], progress=False)
    assert dest.read_bytes() == BODY
    assert "HTTP 404" in caplog.text and f"trying the mirror {url(mirror)}" in caplog.text
    assert mirror.requests == [None]


def test_the_mirror_resumes_what_the_first_url_fetched(server, mirror, tmp_path):
    server.drop_after = 300_000  # the first host dies mid-body and stays down (no retries)
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, mirrors=[url(mirror)], retries=0, progress=False)
    assert dest.read_bytes() == BODY
    [asked] = mirror.requests
    assert asked.startswith("bytes=") and 65536 <= int(asked[6:].rstrip("-")) <= 300_000


def test_every_url_failing_names_each_and_leaves_no_file(server, mirror, tmp_path):
    urls = [url(server, "/gone.bin"), "http://127.0.0.1:9/f.bin", url(mirror, "/also-gone.bin")]
    with pytest.raises(DownloadError, match="every URL of f.bin failed") as failed:
        download(urls[0], tmp_path / "f.bin", mirrors=urls[1:], retries=0, progress=False)
    assert all(u in str(failed.value) for u in urls)
    assert not (tmp_path / "f.bin").exists()
    with pytest.raises(ChecksumError, match="every URL"):  # wrong bytes everywhere: still a checksum error
        download(url(server), tmp_path / "f.bin", sha256="0" * 64, mirrors=[url(mirror)], progress=False)


def _download_in_process(address, dest, barrier, results):
    barrier.wait()
    try:
        download(address, dest, sha256=SHA, progress=False)
        results.put("ok")
    except Exception as e:  # reported to the test, which names it
        results.put(repr(e))


def test_processes_fetching_one_file_at_once_download_it_once(server, tmp_path):
    """Two DVC runs side by side share the download cache: one fetches, the other waits and reuses
    the verified file (before, both wrote one part file, and one failed: the other had moved it)."""
    server.chunk_bytes, server.chunk_delay_s = 1 << 16, 0.03  # ~0.5 s for the 1 MiB body
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=_download_in_process, args=(url(server), tmp_path / "f.bin", barrier, results))
             for _ in range(2)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert got == ["ok", "ok"]
    assert server.requests == [None]  # one GET, from the start
    assert (tmp_path / "f.bin").read_bytes() == BODY and not (tmp_path / "f.bin.part").exists()


class _OddHandler(http.server.BaseHTTPRequestHandler):
    """/loop.bin redirects to itself; /gz.bin is a pre-gzipped file served with Content-Encoding: gzip
    to clients that accept it, a Range counting the encoded bytes (a misconfigured server or CDN)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        srv.requests.append((self.path, self.headers.get("Range"), self.headers.get("Accept-Encoding")))
        if self.path == "/loop.bin":
            self.send_response(302)
            self.send_header("Location", "/loop.bin")
            self.end_headers()
            return
        gzipped = "gzip" in (self.headers.get("Accept-Encoding") or "")
        body = srv.encoded if gzipped else srv.raw
        start = int(self.headers["Range"].removeprefix("bytes=").split("-")[0]) if self.headers.get("Range") else 0
        self.send_response(206 if start else 200)
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        payload = body[start:]
        if srv.drop_after is not None:
            cut, srv.drop_after = srv.drop_after, None
            self.wfile.write(payload[:cut])
            self.wfile.flush()
            self.connection.shutdown(2)
            return
        self.wfile.write(payload)


@pytest.fixture
def odd_server():
    import gzip
    import random

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _OddHandler)
    srv.requests, srv.drop_after = [], None
    srv.raw = random.Random(0).randbytes(1 << 20)  # incompressible: the encoded stream is as long
    srv.encoded = gzip.compress(srv.raw)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield srv
    stop(srv)


def test_a_redirect_loop_is_a_download_error_and_the_mirror_is_tried(odd_server, mirror, tmp_path):
    """requests' TooManyRedirects escaped as a traceback, and the mirror was never asked."""
    dest = download(url(odd_server, "/loop.bin"), tmp_path / "f.bin", md5=MD5, mirrors=[url(mirror)], progress=False)
    assert dest.read_bytes() == BODY and mirror.requests == [None]
    with pytest.raises(DownloadError, match=r"GET .*/loop.bin failed: TooManyRedirects"):
        download(url(odd_server, "/loop.bin"), tmp_path / "g.bin", progress=False)


def test_a_resume_counts_the_servers_bytes_not_decoded_ones(odd_server, tmp_path):
    """The bytes went to disk gzip-decoded while a resume's Range counts the encoded stream: the
    resumed body failed to decode (ContentDecodingError), on every later run too."""
    odd_server.drop_after = 300_000
    dest = download(url(odd_server, "/gz.bin"), tmp_path / "f.bin", md5=hashlib.md5(odd_server.raw).hexdigest(),
                    backoff_s=0.01, progress=False)
    assert dest.read_bytes() == odd_server.raw
    assert [enc for _, _, enc in odd_server.requests] == ["identity", "identity"]
    assert odd_server.requests[1][1].startswith("bytes=")


def test_a_host_name_that_does_not_resolve_goes_to_the_mirror_at_once(mirror, tmp_path):
    """A name that does not resolve was retried with back-off (1+2+4+8+16 s) before the mirror was asked."""
    started = time.monotonic()
    dest = download("http://faceage-no-such-host.invalid/f.bin", tmp_path / "f.bin", md5=MD5,
                    mirrors=[url(mirror)], progress=False)
    assert dest.read_bytes() == BODY and mirror.requests == [None]
    assert time.monotonic() - started < 5


def test_a_host_name_that_does_not_resolve_is_named_in_the_error(tmp_path):
    with pytest.raises(DownloadError, match="cannot resolve the host name"):
        download("http://faceage-no-such-host.invalid/f.bin", tmp_path / "f.bin", backoff_s=30, progress=False)
    assert not (tmp_path / "f.bin").exists() and not (tmp_path / "f.bin.part").exists()


def test_a_refused_connection_is_still_retried(tmp_path, caplog):
    with caplog.at_level(logging.WARNING), pytest.raises(DownloadError, match="after 2 attempts"):
        download("http://127.0.0.1:9/f.bin", tmp_path / "f.bin", retries=1, backoff_s=0.01, progress=False)
    assert "resuming in" in caplog.text


def test_a_temporary_resolver_failure_is_retried_and_an_unknown_name_is_not():
    """EAI_AGAIN ("Temporary failure in name resolution", a busy resolver) was given up on at once too."""
    import socket

    import requests
    from urllib3.exceptions import NameResolutionError

    from faceage.download import _unresolvable

    def wrapped(errno):
        gai = socket.gaierror(errno, "resolver says no")
        try:
            try:
                raise gai
            except socket.gaierror as e:
                raise NameResolutionError("example.invalid", None, e) from e
        except NameResolutionError as e:
            return requests.ConnectionError(e)

    assert _unresolvable(wrapped(socket.EAI_NONAME))
    assert not _unresolvable(wrapped(socket.EAI_AGAIN))
    assert not _unresolvable(requests.ConnectionError("connection refused"))
