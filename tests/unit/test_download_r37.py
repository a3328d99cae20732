"""Downloads against odd servers on 127.0.0.1 (round 37): ranges that do not start where they were asked, a
server that keeps sending the same first slice, and a restart from byte 0 that is not a resume."""

import hashlib
import http.server
import random

import pytest

from faceage.download import ChecksumError, DownloadError, HTTPStatusError, download
from tests.conftest import http_server
from tests.unit.test_download_if_range import url

BODY = random.Random(37).randbytes(1 << 20)  # 1 MiB
OTHER = random.Random(38).randbytes(1 << 20)  # what a server sends in its place (another version)
SHA = hashlib.sha256(BODY).hexdigest()
GIVE_UP_AFTER = 200  # requests: then 404, so that a client that loops for ever still ends (the old code did loop)


class _Handler(http.server.BaseHTTPRequestHandler):
    """Answers each GET with ``server.answer(start)`` -> (status, first byte, body, headers), where ``start`` is
    the first byte the Range asks for (None without one)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        if len(srv.requests) > GIVE_UP_AFTER:
            self.send_error(404)
            return
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else None
        status, payload, headers = srv.answer(start)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        try:
            self.wfile.write(payload)
        except (BrokenPipeError, ConnectionResetError):  # the client hung up (it restarts from byte 0)
            pass


@pytest.fixture
def server():
    with http_server(_Handler, requests=[]) as srv:
        yield srv


def _slice(body, first, last=None):
    """A 206 answer with ``body[first:last + 1]`` (to its end without ``last``)."""
    last = len(body) - 1 if last is None else last
    return 206, body[first:last + 1], {"Content-Range": f"bytes {first}-{last}/{len(body)}"}


def test_a_server_that_keeps_sending_the_first_slice_fails_instead_of_looping_for_ever(server, tmp_path):
    """A server that answers every request, Range or not, with its first 1000 bytes as a 206: each answer
    restarted the part from byte 0 and asked for the next range at once, with no back-off and no count, so the
    download never ended (here: until the server gave up with a 404, after 200 requests)."""
    server.answer = lambda start: _slice(BODY, 0, 999)
    with pytest.raises(DownloadError) as caught:
        download(url(server), tmp_path / "f.bin", sha256=SHA, retries=2, backoff_s=0.01, progress=False)
    assert not isinstance(caught.value, HTTPStatusError), caught.value
    assert len(server.requests) <= 10, len(server.requests)
    assert "failed after 3 attempts" in str(caught.value)
    assert not (tmp_path / "f.bin").exists()


def test_a_206_from_before_the_asked_byte_is_trimmed_and_resumed(server, tmp_path):
    """A server that starts a range at a block boundary before the byte asked for (4096 for 5000): the answer
    was a DownloadError, and every later run failed the same way on the same part file."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:5000])
    server.answer = lambda start: _slice(BODY, start - start % 4096) if start else (200, BODY, {})
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests == ["bytes=5000-"]
    assert not (tmp_path / "f.bin.part").exists()


def test_a_206_from_after_the_asked_byte_restarts_from_byte_0(server, tmp_path):
    """A range that leaves a gap after the part's bytes cannot be appended: the file is fetched from byte 0."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:5000])
    server.answer = lambda start: _slice(BODY, start + 100) if start else (200, BODY, {})
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests == ["bytes=5000-", None]


def test_a_restart_from_byte_0_that_fails_the_checksum_is_not_fetched_whole_again(server, tmp_path):
    """A server that ignores Range (200) sent the whole file in one piece, but the part had been there before:
    the checksum mismatch was blamed on the old bytes and the whole file fetched once more (a second full
    download of a release zip before the same error)."""
    (tmp_path / "f.bin.part").write_bytes(BODY[:5000])
    server.answer = lambda start: (200, OTHER, {})
    with pytest.raises(ChecksumError):
        download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert server.requests == ["bytes=5000-"]
    assert not (tmp_path / "f.bin.part").exists() and not (tmp_path / "f.bin").exists()


def test_a_resumed_part_that_fails_the_checksum_is_still_fetched_whole_once_more(server, tmp_path):
    """The other side of the last test: bytes appended to an older part (a 206) may be another version's tail, so
    the whole file is fetched once more, from byte 0."""
    (tmp_path / "f.bin.part").write_bytes(OTHER[:5000])  # another version's head, left by an older run
    server.answer = lambda start: _slice(BODY, start) if start else (200, BODY, {})
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests == ["bytes=5000-", None]
