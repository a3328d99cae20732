"""Resumes with If-Range against a real HTTP server on 127.0.0.1: a file changed on the server between the
first try and the resume (a new release at the same URL) is fetched whole, not its tail appended to the old head."""

import hashlib
import http.server
import json
import logging
import random

import pytest

from faceage.download import ChecksumError, DownloadError, download
from tests.conftest import http_server

OLD = random.Random(1).randbytes(1 << 20)  # 1 MiB, the first release
NEW = random.Random(2).randbytes(1 << 20)  # as long, other bytes: the release that replaced it at the same URL
OLD_SHA = hashlib.sha256(OLD).hexdigest()
NEW_SHA = hashlib.sha256(NEW).hexdigest()
OLD_DATE, NEW_DATE = "Tue, 01 Dec 2026 10:00:00 GMT", "Sat, 05 Dec 2026 10:00:00 GMT"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` with its ``etag`` / ``last_modified`` (when set) and Range support, evaluating
    If-Range as RFC 9110 says (unless ``checks_if_range`` is False): a strong ETag must match exactly, a
    date must equal Last-Modified, else the whole body (200). ``drop_after`` cuts the next response short;
    ``after_drop`` then changes the file, before the client can see the cut."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        record = {"range": rng, "if_range": if_range, "status": None, "sent": None}
        srv.requests.append(record)
        body = srv.body
        honour = bool(rng) and (if_range is None or not srv.checks_if_range or self._matches(if_range))
        start = int(rng.removeprefix("bytes=").split("-")[0]) if honour else 0
        if honour and start >= len(body):
            record.update(status=416, sent=0)
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        record["status"] = 206 if honour else 200
        self.send_response(record["status"])
        if honour:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        if srv.etag:
            self.send_header("ETag", srv.etag)
        if srv.last_modified:
            self.send_header("Last-Modified", srv.last_modified)
        payload = body[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            if srv.drop_after is not None:
                cut, srv.drop_after = srv.drop_after, None
                record["sent"] = cut
                self.wfile.write(payload[:cut])
                self.wfile.flush()
                if srv.after_drop:
                    srv.after_drop()
                self.connection.shutdown(2)  # the connection dies mid-body
                return
            record["sent"] = len(payload)  # before writing: the client may be done before this thread goes on
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (it restarts from byte 0)
            record["sent"] = "cut by the client"

    def _matches(self, if_range):
        srv = self.server
        if if_range.startswith(('"', "W/")):  # an entity tag: strong comparison, a weak one never matches
            return bool(srv.etag) and not srv.etag.startswith("W/") and if_range == srv.etag
        return if_range == srv.last_modified


@pytest.fixture
def server():
    with http_server(_Handler, requests=[], body=OLD, etag=None, last_modified=None, drop_after=None,
                     after_drop=None, checks_if_range=True) as srv:
        yield srv


def url(srv):
    return f"http://127.0.0.1:{srv.server_address[1]}/f.bin"


def _first_try_cut_off(server, tmp_path, cut=300_000):
    """A first run whose connection dies after ``cut`` bytes (no retries): returns the part's size."""
    server.drop_after = cut
    with pytest.raises(DownloadError, match="failed after 1 attempts"):
        download(url(server), tmp_path / "f.bin", retries=0, progress=False)
    have = (tmp_path / "f.bin.part").stat().st_size
    assert 65536 <= have <= cut
    return have


def _left(tmp_path):
    return sorted(p.name for p in tmp_path.iterdir())


def test_a_file_changed_on_the_server_during_retries_is_fetched_whole_via_if_range(server, tmp_path, caplog):
    """The resume appended the new release's tail to the old one's head: a sha256 error after the whole
    download. With If-Range the server answers 200 with the whole new file, which replaces the part."""
    server.etag, server.drop_after = '"v1"', 300_000

    def new_release():
        server.body, server.etag = NEW, '"v2"'

    server.after_drop = new_release
    with caplog.at_level(logging.INFO, logger="faceage.download"):
        dest = download(url(server), tmp_path / "f.bin", sha256=NEW_SHA, backoff_s=0.01, progress=False)
    assert dest.read_bytes() == NEW
    first, resume = server.requests
    assert first == {"range": None, "if_range": None, "status": 200, "sent": 300_000}
    resumed_at = int(resume["range"].removeprefix("bytes=").removesuffix("-"))
    assert 65536 <= resumed_at <= 300_000
    assert resume == {"range": f"bytes={resumed_at}-", "if_range": '"v1"', "status": 200, "sent": len(NEW)}
    assert 'changed on the server (ETag "v2", was "v1")' in caplog.text
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]  # no part, no part.meta, no temporary file


def test_a_file_changed_on_the_server_between_runs_is_detected_by_last_modified(server, tmp_path, caplog):
    server.last_modified = OLD_DATE  # no ETag: the date is the validator
    have = _first_try_cut_off(server, tmp_path)
    assert json.loads((tmp_path / "f.bin.part.meta").read_text()) == {"url": url(server), "last_modified": OLD_DATE}
    server.body, server.last_modified = NEW, NEW_DATE
    with caplog.at_level(logging.WARNING, logger="faceage.download"):
        dest = download(url(server), tmp_path / "f.bin", sha256=NEW_SHA, progress=False)
    assert dest.read_bytes() == NEW
    assert server.requests[1:] == [{"range": f"bytes={have}-", "if_range": OLD_DATE, "status": 200, "sent": len(NEW)}]
    assert f"changed on the server (Last-Modified {NEW_DATE}, was {OLD_DATE})" in caplog.text
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_an_unchanged_file_resumes_with_206_from_the_parts_end(server, tmp_path):
    server.etag, server.last_modified = '"v1"', OLD_DATE  # both: the strong ETag is the one kept and sent
    have = _first_try_cut_off(server, tmp_path)
    assert json.loads((tmp_path / "f.bin.part.meta").read_text()) == {"url": url(server), "etag": '"v1"'}
    dest = download(url(server), tmp_path / "f.bin", sha256=OLD_SHA, progress=False)
    assert dest.read_bytes() == OLD
    assert server.requests[1:] == [
        {"range": f"bytes={have}-", "if_range": '"v1"', "status": 206, "sent": len(OLD) - have}  # only the rest
    ]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


@pytest.mark.parametrize("last_modified", [None, OLD_DATE])
def test_a_weak_etag_is_not_sent_as_if_range(server, tmp_path, last_modified):
    """RFC 9110 (13.1.5) forbids a weak entity tag in If-Range (a server compares it strongly: it would never
    match), and a date where the client holds an entity tag: with a weak ETag, no If-Range at all."""
    server.etag, server.last_modified = 'W/"v1"', last_modified
    have = _first_try_cut_off(server, tmp_path)
    assert not (tmp_path / "f.bin.part.meta").exists()
    dest = download(url(server), tmp_path / "f.bin", sha256=OLD_SHA, progress=False)
    assert dest.read_bytes() == OLD
    assert server.requests[1:] == [
        {"range": f"bytes={have}-", "if_range": None, "status": 206, "sent": len(OLD) - have}
    ]


def test_a_part_resumed_from_a_mirror_sends_no_if_range(server, tmp_path):
    """A mirror's ETag names its own copy, not the file: the part of another URL is resumed as before
    (a plain Range), and the checksum decides."""
    server.etag = '"v1"'
    have = _first_try_cut_off(server, tmp_path)
    mirror = url(server) + "?mirror=1"
    server.etag = '"m1"'  # the mirror's own tag for the same bytes
    dest = download(mirror, tmp_path / "f.bin", sha256=OLD_SHA, progress=False)
    assert dest.read_bytes() == OLD
    assert server.requests[1:] == [{"range": f"bytes={have}-", "if_range": None, "status": 206, "sent": len(OLD) - have}]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_206_with_another_etag_restarts_from_byte_0(server, tmp_path, caplog):
    """A server (or proxy) that ignores If-Range sends the new file's tail, with the new ETag: not appended."""
    server.etag, server.checks_if_range = '"v1"', False
    have = _first_try_cut_off(server, tmp_path)
    server.body, server.etag = NEW, '"v2"'
    with caplog.at_level(logging.WARNING, logger="faceage.download"):
        dest = download(url(server), tmp_path / "f.bin", sha256=NEW_SHA, progress=False)
    assert dest.read_bytes() == NEW
    resume, restart = server.requests[1:]
    assert (resume["range"], resume["if_range"], resume["status"]) == (f"bytes={have}-", '"v1"', 206)
    assert restart == {"range": None, "if_range": None, "status": 200, "sent": len(NEW)}
    assert 'changed on the server (ETag "v2", was "v1")' in caplog.text
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_part_without_a_stored_validator_resumes_as_before(server, tmp_path):
    """A part left by an older version of this code (no .part.meta): a plain Range, no If-Range."""
    server.etag = '"v1"'
    (tmp_path / "f.bin.part").write_bytes(OLD[:123_456])
    download(url(server), tmp_path / "f.bin", sha256=OLD_SHA, progress=False)
    assert server.requests == [{"range": "bytes=123456-", "if_range": None, "status": 206, "sent": len(OLD) - 123_456}]
    assert (tmp_path / "f.bin").read_bytes() == OLD


def test_a_complete_part_of_a_replaced_file_is_not_taken_by_the_416(server, tmp_path):
    """A complete part of the old release: If-Range makes the server send the new one (200), not a 416."""
    server.etag = '"v1"'
    (tmp_path / "f.bin.part").write_bytes(OLD)
    (tmp_path / "f.bin.part.meta").write_text(json.dumps({"url": url(server), "etag": '"v1"'}))
    download(url(server), tmp_path / "f.bin", sha256=OLD_SHA, progress=False)
    assert server.requests == [{"range": f"bytes={len(OLD)}-", "if_range": '"v1"', "status": 416, "sent": 0}]
    (tmp_path / "f.bin").unlink()
    (tmp_path / "f.bin.part").write_bytes(OLD)
    (tmp_path / "f.bin.part.meta").write_text(json.dumps({"url": url(server), "etag": '"v1"'}))
    server.body, server.etag, server.requests = NEW, '"v2"', []
    dest = download(url(server), tmp_path / "f.bin", progress=False)  # no checksum: only If-Range can tell
    assert dest.read_bytes() == NEW
    assert server.requests == [{"range": f"bytes={len(OLD)}-", "if_range": '"v1"', "status": 200, "sent": len(NEW)}]
    assert _left(tmp_path) == [".f.bin.lock", "f.bin"]


def test_a_checksum_mismatch_deletes_the_stored_validator_too(server, tmp_path):
    server.etag = '"v1"'
    with pytest.raises(ChecksumError):
        download(url(server), tmp_path / "f.bin", sha256="0" * 64, progress=False)
    assert _left(tmp_path) == [".f.bin.lock"]
