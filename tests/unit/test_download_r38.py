"""Downloads against odd servers on 127.0.0.1 (round 38): a resume answered with a whole body (a captive portal's
page, a proxy ignoring Range) no longer destroys the good part before that body has proven itself; a 416 that
says nothing about the length is not taken as "complete"; progress log lines count the bytes."""

import hashlib
import http.server
import logging
import random

import pytest

from faceage.download import ChecksumError, ContentError, DownloadError, download
from tests.conftest import http_server

BODY = random.Random(381).randbytes(1 << 20)  # 1 MiB
SHA = hashlib.sha256(BODY).hexdigest()
PAGE = b"<html><body>Accept the terms of use to continue</body></html>"  # a captive portal's answer
HELD = 600_000  # bytes of BODY a part holds from an earlier run
UNSIZED = "unsized"  # in an answer's headers: send no Content-Length


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers each GET with ``server.answer(start)`` -> (status, payload, headers), ``start`` being the first
    byte the Range asks for (None without one); ``server.drop_after`` cuts every payload after that many bytes."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if len(srv.requests) > 50:  # a client that loops for ever still ends
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else None
        status, payload, headers = srv.answer(start)
        self.send_response(status)
        unsized = headers.pop(UNSIZED, False)  # a body sent without a length (HTTP/1.0: it ends with the connection)
        for key, value in headers.items():
            self.send_header(key, value)
        if not unsized:
            self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            if srv.drop_after is not None:
                self.wfile.write(payload[:srv.drop_after])
                self.wfile.flush()
                self.connection.shutdown(2)  # the connection dies mid-body
                return
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):
            pass


@pytest.fixture
def server():
    with http_server(_Handler, requests=[], drop_after=None, answer=_honest) as srv:
        yield srv


def _honest(start):
    """A server with Range support."""
    if start is None:
        return 200, BODY, {}
    if start >= len(BODY):
        return 416, b"", {"Content-Range": f"bytes */{len(BODY)}"}
    return 206, BODY[start:], {"Content-Range": f"bytes {start}-{len(BODY) - 1}/{len(BODY)}"}


def _url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/f.bin"


def _left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def _not_a_page(path):
    return "an HTML page, not the file" if path.read_bytes().startswith(b"<html") else None


# --- 1. a whole body answering a resume -----------------------------------------------------------------------------

def test_a_portal_page_answering_the_resume_keeps_the_good_part_and_the_next_run_resumes_it(server, tmp_path):
    """A captive portal answers the resume (Range) with 200 and its HTML page: the part was wiped for the page,
    the checksum failed, and the page was deleted with it: 600 KB (of a 1 GB zip: hundreds of MB) fetched again."""
    part = tmp_path / "f.bin.part"
    part.write_bytes(BODY[:HELD])
    server.answer = lambda start: (200, PAGE, {"Content-Type": "text/html"})
    with pytest.raises(ChecksumError) as caught:
        download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert part.read_bytes() == BODY[:HELD]
    message = str(caught.value)
    assert f"{part} keeps the {HELD} bytes fetched before" in message, message
    assert "was deleted" not in message, message
    assert server.requests == [f"bytes={HELD}-"]  # the page is not fetched whole a second time
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]

    server.answer, server.requests = _honest, []  # back on the real network: the part is resumed
    assert download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False).read_bytes() == BODY
    assert server.requests == [f"bytes={HELD}-"]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_page_that_check_rejects_keeps_the_good_part_too(server, tmp_path):
    """Without a checksum (and a page sent without a length), ``check`` is what rejects the page: the part's bytes
    were lost the same way."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    server.answer = lambda start: (200, PAGE, {UNSIZED: True})
    with pytest.raises(ContentError, match="keeps the 600000 bytes fetched before"):
        download(_url(server), tmp_path / "f.bin", check=_not_a_page, progress=False)
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]


def test_a_restart_cut_short_before_the_old_parts_end_puts_the_old_part_back(server, tmp_path):
    """A proxy ignoring Range (200, the whole file) on a line that drops after 100 KB: each try wiped the 600 KB
    part for 100 KB of the restart, and the run ended keeping 100 KB."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    server.answer, server.drop_after = (lambda start: (200, BODY, {})), 100_000
    with pytest.raises(DownloadError, match=f"keeps the {HELD} bytes") as caught:
        download(_url(server), tmp_path / "f.bin", sha256=SHA, retries=1, backoff_s=0.01, progress=False)
    assert "failed after 2 attempts" in str(caught.value)
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
    assert server.requests == [f"bytes={HELD}-"] * 2  # each try resumed the kept part, not the restart's bytes
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]


def test_a_restart_that_completes_replaces_the_part_and_leaves_nothing_behind(server, tmp_path):
    """The other side: a server that really ignores Range sends the whole file, which is taken."""
    (tmp_path / "f.bin.part").write_bytes(b"not these bytes" * 1000)
    server.answer = lambda start: (200, BODY, {})
    assert download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False).read_bytes() == BODY
    assert server.requests == ["bytes=15000-"]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_part_kept_aside_by_a_killed_run_is_put_back(server, tmp_path):
    """A run killed while a restart streamed left the old part aside (``.part.kept``) and the restart's first
    bytes as the part: the next run resumes the longer, kept one."""
    (tmp_path / "f.bin.part.kept").write_bytes(BODY[:HELD])
    (tmp_path / "f.bin.part").write_bytes(PAGE)
    assert download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False).read_bytes() == BODY
    assert server.requests == [f"bytes={HELD}-"]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


# --- 2. a 416 without Content-Range ---------------------------------------------------------------------------------

def _unsatisfiable_without_length(start):
    """A server answering every Range with a bare 416 (no ``Content-Range: bytes */LENGTH``)."""
    return (416, b"", {}) if start is not None else (200, BODY, {})


def test_a_416_without_a_length_does_not_make_a_short_part_the_file(server, tmp_path):
    """Without a checksum (the dlib detector's bz2, a model's weights) a bare 416 was read as "the part is
    complete": a 1000-byte part became the file, with no error."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:1000])
    server.answer = _unsatisfiable_without_length
    assert download(_url(server), tmp_path / "f.bin", progress=False).read_bytes() == BODY
    assert server.requests == ["bytes=1000-", None]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_416_without_a_length_for_a_part_with_a_checksum_is_checked_by_it(server, tmp_path):
    """With a checksum, the part is checked as it is (a complete one is taken, as before, without a download);
    a short one fails it and is fetched whole."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:1000])
    server.answer = _unsatisfiable_without_length
    assert download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False).read_bytes() == BODY
    assert server.requests == ["bytes=1000-", None]


# --- 3. a range from byte 0 that gets no further --------------------------------------------------------------------

def test_a_server_restarting_every_range_from_byte_0_keeps_the_good_part_and_says_so(server, tmp_path):
    """A server that answers every Range with its first 1000 bytes (206): the 600 KB part was wiped for them,
    and the error said the part kept 1000 bytes (from an "earlier byte", of a range that started at byte 0)."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    server.answer = lambda start: (206, BODY[:1000], {"Content-Range": f"bytes 0-999/{len(BODY)}"})
    with pytest.raises(DownloadError) as caught:
        download(_url(server), tmp_path / "f.bin", sha256=SHA, retries=2, backoff_s=0.01, progress=False)
    message = str(caught.value)
    assert "failed after 3 attempts" in message, message
    assert f"from byte {HELD} got no further" in message and "from byte 0" in message, message
    assert f"keeps the {HELD} bytes" in message, message
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]


# --- 4. progress log lines ------------------------------------------------------------------------------------------

def test_progress_log_lines_count_the_bytes_fetched(server, tmp_path, caplog, monkeypatch):
    """Without a terminal the progress is a log line every PROGRESS_LOG_S; each said the byte count the transfer
    started with (tqdm's count stays put while it is disabled): "f.bin: 0 B" every 30 s of a 1 GB download."""
    import faceage.download as download_module

    monkeypatch.setattr(download_module, "PROGRESS_LOG_S", 0.0)  # a line for every read
    monkeypatch.setattr(download_module, "_stderr_is_tty", lambda: False)
    with caplog.at_level(logging.INFO, logger="faceage.download"):
        download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=True)
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("f.bin: ")]
    assert lines, caplog.text
    assert lines[-1] == "f.bin: 1.0 MB of 1.0 MB", lines[-3:]


def test_a_full_disk_during_a_restart_names_the_part_put_back_not_the_restarts_bytes(server, tmp_path):
    """A full disk while a restart from byte 0 streams (its files may not grow past 100 KB here): the error said
    the part kept the restart's 100 KB "written so far", and the next run resumed those instead of the 600 KB."""
    from tests.unit.test_download_r30 import _download_with_file_size_limit

    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    server.answer = lambda start: (200, BODY, {})
    proc = _download_with_file_size_limit(_url(server), tmp_path / "f.bin", 100_000, SHA)
    assert proc.stdout.startswith("DownloadWriteError: "), proc.stdout + proc.stderr[-2000:]
    assert "File too large" in proc.stdout, proc.stdout
    assert f"keeps the {HELD} bytes" in proc.stdout and "100000 bytes" not in proc.stdout, proc.stdout
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]


def test_a_portal_page_with_its_own_etag_does_not_wipe_the_part_either(server, tmp_path):
    """The portal's page has its own ETag, so it reads as a new version of the file (If-Range did not match):
    the part was wiped for it all the same. A "new version" shorter than the bytes already held waits aside."""
    import json

    part = tmp_path / "f.bin.part"
    part.write_bytes(BODY[:HELD])
    (tmp_path / "f.bin.part.meta").write_text(json.dumps({"url": _url(server), "etag": '"release"'}))
    server.answer = lambda start: (200, PAGE, {"ETag": '"portal"'})
    with pytest.raises(ChecksumError, match=f"keeps the {HELD} bytes fetched before"):
        download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert part.read_bytes() == BODY[:HELD]
    assert json.loads((tmp_path / "f.bin.part.meta").read_text())["etag"] == '"release"'  # still sent as If-Range


def test_without_a_checksum_a_body_shorter_than_the_part_is_not_taken_as_the_file(server, tmp_path):
    """The dlib detector's bz2 comes over plain http with no checksum: a portal's page answering the resume
    became the file (and the 600 KB part was lost). A whole body shorter than the bytes already held of the same
    version cannot be the file."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:HELD])
    server.answer = lambda start: (200, PAGE, {}) if start else (200, BODY, {})
    with pytest.raises(ContentError) as caught:
        download(_url(server), tmp_path / "f.bin", progress=False)
    message = str(caught.value)
    assert f"{len(PAGE)} bytes" in message and f"keeps the {HELD} bytes" in message, message
    assert (tmp_path / "f.bin.part").read_bytes() == BODY[:HELD]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin.part"]
