"""Round 33: with mirrors, the error type of a failed download says what went wrong, not which URL came last.

A mirror that served the whole file with the wrong checksum is a data-integrity problem (a tampered or corrupted
copy, a proxy rewriting bytes): where an unreachable or 404 mirror was tried after it, ``download`` raised the plain
``DownloadError`` of the mix, so ``fetch_appa_real`` (which catches ``ChecksumError`` to name ``fetch_data.md5``) and
any caller catching ``ChecksumError`` never heard of it. Likewise a server that sent something that is not the file
(``ContentError``: an error page with 200 OK). Real HTTP servers on 127.0.0.1.
"""

from __future__ import annotations

import hashlib
import http.server
import logging
import socket

import pytest

from faceage.download import ChecksumError, ContentError, DownloadError, HTTPStatusError, UnreachableError, download
from tests.conftest import http_server

BODY = bytes(range(256)) * 512  # 128 KiB
SHA = hashlib.sha256(BODY).hexdigest()
MD5 = hashlib.md5(BODY).hexdigest()
WRONG = bytes(reversed(BODY))  # the same size, other bytes: a corrupted or substituted copy
PAGE = b"<html><body>Sign in to download</body></html>"


class _Mirrors(http.server.BaseHTTPRequestHandler):
    """``/good.bin`` is the file, ``/wrong.bin`` a copy of its size with other bytes, ``/page.bin`` an HTML page
    sent with 200 OK; anything else is a 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body = {"/good.bin": BODY, "/wrong.bin": WRONG, "/page.bin": PAGE}.get(self.path)
        if body is None:
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def base():
    with http_server(_Mirrors) as srv:
        yield f"http://127.0.0.1:{srv.server_address[1]}"


@pytest.fixture
def unreachable() -> str:
    """A URL on a port of 127.0.0.1 nothing listens on (bound, then closed): the connection is refused at once."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/release.bin"


def _fetch(urls: list[str], dest, **kwargs):
    return download(urls[0], dest, mirrors=urls[1:], retries=0, backoff_s=0.0, progress=False, **kwargs)


@pytest.mark.parametrize("after", ["unreachable", "404", "unreachable and 404"])
def test_a_wrong_checksum_is_not_hidden_by_a_mirror_that_failed_after_it(tmp_path, base, unreachable, after):
    """The source served the whole file with the wrong sha256; the mirror tried after it was not reached (or
    answered 404): the error was the mix's plain DownloadError (or the 404's type), not a ChecksumError."""
    later = {"unreachable": [unreachable], "404": [f"{base}/gone.bin"],
             "unreachable and 404": [unreachable, f"{base}/gone.bin"]}[after]
    urls = [f"{base}/wrong.bin", *later]
    dest = tmp_path / "release.bin"
    with pytest.raises(ChecksumError) as e:
        _fetch(urls, dest, sha256=SHA)
    message = str(e.value)
    assert message.startswith("every URL of release.bin failed:")
    assert all(u in message for u in urls)  # each URL's own failure is still listed
    assert f"sha256 of {base}/wrong.bin is {hashlib.sha256(WRONG).hexdigest()}, expected {SHA}" in message
    assert isinstance(e.value.__cause__, ChecksumError)  # the traceback's cause is the integrity failure
    assert list(tmp_path.iterdir()) == [tmp_path / ".release.bin.lock"]  # no file, no part kept


def test_a_wrong_checksum_after_failing_mirrors_is_still_a_checksum_error(tmp_path, base, unreachable):
    """The order does not matter: a 404 and an unreachable host first, the wrong bytes last."""
    with pytest.raises(ChecksumError):
        _fetch([f"{base}/gone.bin", unreachable, f"{base}/wrong.bin"], tmp_path / "release.bin", md5=MD5)


def test_a_mirror_with_the_right_bytes_after_a_wrong_one_still_succeeds(tmp_path, base, caplog):
    with caplog.at_level(logging.WARNING, logger="faceage.download"):
        dest = _fetch([f"{base}/wrong.bin", f"{base}/good.bin"], tmp_path / "release.bin", sha256=SHA)
    assert dest.read_bytes() == BODY
    assert "sha256 of" in caplog.text and f"trying the mirror {base}/good.bin" in caplog.text


def _not_the_file(path) -> str | None:
    return "an HTML page, not the file" if path.read_bytes().lstrip().startswith(b"<html") else None


@pytest.mark.parametrize("after", ["unreachable", "404"])
def test_a_page_sent_for_the_file_is_not_hidden_by_a_mirror_that_failed_after_it(tmp_path, base, unreachable, after):
    """Without a checksum, ``check`` rejecting what a server sent (an error page with 200 OK) is a ContentError;
    a mirror that failed after it turned it into the mix's plain DownloadError."""
    later = unreachable if after == "unreachable" else f"{base}/gone.bin"
    with pytest.raises(ContentError) as e:
        _fetch([f"{base}/page.bin", later], tmp_path / "release.bin", check=_not_the_file)
    assert "an HTML page, not the file" in str(e.value) and later in str(e.value)


def test_a_wrong_checksum_outranks_a_page_from_another_mirror(tmp_path, base):
    """Both are wrong bytes; the checksum mismatch is the one the pinned digest proves."""
    with pytest.raises(ChecksumError):
        _fetch([f"{base}/page.bin", f"{base}/wrong.bin"], tmp_path / "release.bin", md5=MD5, check=_not_the_file)


def test_failures_without_wrong_bytes_keep_their_types(tmp_path, base, unreachable):
    """Unchanged: every URL answered an HTTP error -> HTTPStatusError, none was reached -> UnreachableError, a mix ->
    DownloadError (neither "the server answered" nor "no connection" is so of every URL)."""
    dest = tmp_path / "release.bin"
    with pytest.raises(HTTPStatusError):
        _fetch([f"{base}/a.bin", f"{base}/b.bin"], dest, sha256=SHA)
    with pytest.raises(UnreachableError):
        _fetch([unreachable, unreachable.replace("release", "other")], dest, sha256=SHA)
    with pytest.raises(DownloadError) as e:
        _fetch([f"{base}/a.bin", unreachable], dest, sha256=SHA)
    assert type(e.value) is DownloadError


def test_fetch_appa_real_names_fetch_data_md5_when_a_mirror_after_the_wrong_bytes_is_unreachable(tmp_path, base,
                                                                                                 unreachable,
                                                                                                 monkeypatch):
    """The user-visible effect: fetch_appa_real adds the fetch_data.md5 hint to a ChecksumError only; with the
    source's wrong bytes and an unreachable mirror it said "check ... against what each URL answered" instead."""
    import time

    from faceage.appa_real import fetch_appa_real

    monkeypatch.setattr(time, "sleep", lambda s: None)  # fetch_appa_real's 5 retries of the refused mirror: 31 s

    with pytest.raises(ChecksumError) as e:
        fetch_appa_real(f"{base}/wrong.bin", tmp_path / "out", md5=MD5, mirrors=[unreachable],
                        cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert f"fetch_data.md5={MD5}" in message and unreachable in message
    assert not (tmp_path / "out").exists()
