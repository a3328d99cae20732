"""Round 25 review of downloads, the release layout and atomic outputs: each test failed before its fix."""

import gzip
import hashlib
import http.server
import io
import os
import random
import signal
import struct
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from faceage.appa_real import LayoutError, fetch_appa_real, read_demographics, read_split
from faceage.download import DownloadError, download
from tests.conftest import http_server

HEADER = "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
BODY = random.Random(25).randbytes(200_000)  # incompressible, as a zip of JPEGs is
MD5 = hashlib.md5(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves BODY misbehaving as ``server.mode`` says; ``server.requests`` records each Range asked for."""

    protocol_version = "HTTP/1.0"

    def log_message(self, *args):
        pass

    def _send(self, status, body, headers=()):
        self.send_response(status)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        srv, rng = self.server, self.headers.get("Range")
        srv.requests.append(rng)
        mode = srv.mode
        if mode == "gzip":  # encodes whatever the client accepts (identity too); a Range counts encoded bytes
            encoded = gzip.compress(BODY, mtime=0)
            start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
            headers = [("Content-Encoding", "gzip"), ("Content-Length", str(len(encoded) - start))]
            if rng:
                headers.append(("Content-Range", f"bytes {start}-{len(encoded) - 1}/{len(encoded)}"))
            self._send(206 if rng else 200, encoded[start:], headers)
        elif mode == "duplicate-length":  # one value twice, which RFC 9110 lets a recipient accept
            self._send(200, BODY, [("Content-Length", str(len(BODY)))] * 2)
        elif mode == "503-once":
            if len(srv.requests) == 1:
                self._send(503, b"busy", [("Content-Length", "4")])
            else:
                self._send(200, BODY, [("Content-Length", str(len(BODY)))])
        elif mode == "206-whole":  # answers a Range with 206 and the whole body
            status = 206 if rng else 200
            headers = [("Content-Length", str(len(BODY)))]
            if rng:
                headers.append(("Content-Range", f"bytes 0-{len(BODY) - 1}/{len(BODY)}"))
            self._send(status, BODY, headers)
        elif mode == "html":  # a maintenance page with 200 OK
            self._send(200, b"<html>down for maintenance</html>", [("Content-Type", "text/html")])
        else:
            self._send(200, srv.body, [("Content-Length", str(len(srv.body)))])


@pytest.fixture
def server():
    with http_server(_Handler, requests=[], mode="", body=b"") as srv:
        yield srv


def _url(srv, path="/f.zip"):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


# --- downloads -------------------------------------------------------------------------------------


def test_a_body_gzip_encoded_against_accept_encoding_identity_is_taken_whole(server, tmp_path):
    """The decoded bytes were counted against the encoded Content-Length: "connection closed at byte
    200000 of 200083", six attempts over 31 s, then a DownloadError, for a body that had arrived whole."""
    server.mode = "gzip"
    dest = download(_url(server), tmp_path / "f.zip", md5=MD5, retries=1, backoff_s=0.01, progress=False)
    assert dest.read_bytes() == BODY and server.requests == [None]


def test_a_gzip_encoded_body_cut_short_is_not_resumed_from_its_decoded_bytes(server, tmp_path):
    """A part file of decoded bytes cannot be resumed with a Range that counts encoded bytes."""
    server.mode = "gzip"
    (tmp_path / "f.zip.part").write_bytes(BODY[:50_000])  # what an earlier, identity-encoded try left
    dest = download(_url(server), tmp_path / "f.zip", md5=MD5, retries=0, progress=False)
    assert dest.read_bytes() == BODY and server.requests == ["bytes=50000-", None]


def test_a_content_length_sent_twice_is_read_not_a_traceback(server, tmp_path):
    """int("200000, 200000") raised ValueError out of the stage, a traceback instead of a download."""
    server.mode = "duplicate-length"
    assert download(_url(server), tmp_path / "f.zip", md5=MD5, progress=False).read_bytes() == BODY


def test_a_503_is_retried_like_a_dropped_connection(server, tmp_path):
    """A busy server's one 503 ended the download at once (with the release's mirror dead: the stage)."""
    server.mode = "503-once"
    dest = download(_url(server), tmp_path / "f.zip", md5=MD5, retries=2, backoff_s=0.01, progress=False)
    assert dest.read_bytes() == BODY and server.requests == [None, None]


class _NotFound(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.server.hits += 1
        self.send_error(404)


def test_a_404_is_still_not_retried(tmp_path):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _NotFound)
    srv.hits = 0
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        with pytest.raises(DownloadError, match="HTTP 404"):
            download(_url(srv), tmp_path / "f.zip", retries=3, backoff_s=5, progress=False)
    finally:
        srv.shutdown()
        srv.server_close()
    assert srv.hits == 1


def test_a_206_that_starts_at_byte_0_is_not_appended_to_the_part_file(server, tmp_path):
    """The whole body was appended after the part's bytes: a file 50,000 bytes too long (no md5)."""
    server.mode = "206-whole"
    (tmp_path / "f.zip.part").write_bytes(BODY[:50_000])
    assert download(_url(server), tmp_path / "f.zip", progress=False).read_bytes() == BODY
    (tmp_path / "g.zip.part").write_bytes(BODY[:50_000])
    assert download(_url(server), tmp_path / "g.zip", md5=MD5, progress=False).read_bytes() == BODY


# --- the release layout ----------------------------------------------------------------------------


def _release_files(names=("a.jpg", "b.jpg")) -> dict[str, bytes]:
    files = {}
    for split in ("train", "valid", "test"):
        files[f"rel/gt_avg_{split}.csv"] = (HEADER + "".join(f"{n},1,20,1,20\n" for n in names)).encode()
        for n in names:
            files[f"rel/{split}/{n}"] = os.urandom(300)
    return files


def _zip(files: dict[str, bytes], *, flag_utf8: bool = True) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    data = buf.getvalue()
    if not flag_utf8:  # as Info-ZIP's zip writes UTF-8 names on Linux: the bytes, no language-encoding flag
        data = _patch_headers(data, _no_utf8_flag)
    return data


def _no_utf8_flag(b, i, flags):
    b[i + flags + 1] &= ~0x08  # bit 11 of the little-endian flags


def _patch_headers(data: bytes, patch) -> bytes:
    """Applies ``patch(buffer, offset, field_offset)`` to each local header's and central-directory entry's
    general-purpose flags (field_offset 6 and 8); compression methods follow them (8 and 10)."""
    b = bytearray(data)
    for signature, flags in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        i = b.find(signature)
        while i >= 0:
            patch(b, i, flags)
            i = b.find(signature, i + 4)
    return bytes(b)


def _set_method(method: int):
    return lambda b, i, flags: b.__setitem__(slice(i + flags + 2, i + flags + 4), struct.pack("<H", method))


def _encrypted(b, i, flags):
    b[i + flags] |= 1


@pytest.mark.parametrize("patch, message", [
    (_encrypted, "encrypted"),
    (_set_method(9), "compression method 9"),   # Deflate64: Windows Explorer's for large files
    (_set_method(98), "compression method 98"),  # PPMd: 7-Zip's
])
def test_a_zip_python_cannot_extract_is_a_layout_error_not_a_traceback(tmp_path, patch, message):
    """An encrypted zip raised RuntimeError, an unsupported compression method NotImplementedError."""
    (tmp_path / "s.zip").write_bytes(_patch_headers(_zip(_release_files()), patch))
    with pytest.raises(LayoutError, match=message):
        fetch_appa_real(str(tmp_path / "s.zip"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_utf8_names_without_the_zip_flag_are_read_as_utf8(tmp_path):
    """Info-ZIP's zip (Linux) stores UTF-8 names without the flag: they were read as cp437 ("Jos├⌐.jpg"),
    and every listed image was reported missing."""
    data = _zip(_release_files(("José.jpg", "b.jpg")), flag_utf8=False)
    assert "rel/train/Jos├⌐.jpg" in zipfile.ZipFile(io.BytesIO(data)).namelist()  # the test zip is as zip writes it
    (tmp_path / "s.zip").write_bytes(data)
    fetch_appa_real(str(tmp_path / "s.zip"), tmp_path / "out")
    assert (tmp_path / "out" / "train" / "José.jpg").is_file()


def test_a_csv_with_an_unclosed_quote_is_a_layout_error_naming_the_file(tmp_path):
    """csv's "field larger than field limit (131072)" escaped as a traceback."""
    rows = "".join(f"{i:06d}.jpg,1,20,1,20\n" for i in range(8000))
    (tmp_path / "gt_avg_train.csv").write_text(HEADER + '"000000x.jpg,1,20,1,20\n' + rows)
    with pytest.raises(LayoutError, match=r"gt_avg_train.csv line 2"):
        read_split(tmp_path, "train")
    (tmp_path / "labels.csv").write_text("file_name,gender\n" + '"a.jpg,female\n' + "x.jpg,male\n" * 20000)
    assert read_demographics(tmp_path) == {}  # skipped with a warning, as an undecodable labels file is


def test_without_an_md5_a_page_that_is_not_a_zip_tries_the_mirror(server, tmp_path):
    """The mirror was never asked: the maintenance page was deleted and the next run fetched it again."""
    good = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    good.requests, good.mode, good.body = [], "", _zip(_release_files())
    threading.Thread(target=good.serve_forever, daemon=True).start()
    try:
        server.mode = "html"
        info = fetch_appa_real(_url(server), tmp_path / "out", mirrors=[_url(good)], cache_dir=tmp_path / "cache")
    finally:
        good.shutdown()
        good.server_close()
    assert info["counts"] == {"train": 2, "valid": 2, "test": 2} and good.requests == [None]


# --- atomic outputs --------------------------------------------------------------------------------

_SWAP = r'''
import sys
from faceage.atomic import staged_dir
with staged_dir(sys.argv[1]) as tmp:
    (tmp / "new.txt").write_text("new")
    print("built", flush=True)
'''


def test_a_build_killed_while_it_swaps_leaves_the_old_output_or_the_new_never_half_of_one(tmp_path):
    """The previous output was deleted in place: killed during that, 17,000 of its 20,000 files remained
    under the output's name (neither the old output nor the new)."""
    out = tmp_path / "out"
    for s in range(20):
        (out / f"d{s}").mkdir(parents=True)
        for i in range(1000):
            (out / f"d{s}" / f"{i}.png").write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", _SWAP, str(out)], stdout=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parents[2])
    assert proc.stdout.readline() == "built\n"
    time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    files = sorted(p.name for _, _, names in os.walk(out) for p in map(Path, names))
    assert files in (["new.txt"], []) or len(files) == 20_000  # [] only if killed between the two renames
    # What the killed build left beside the output goes with the next build.
    from faceage.atomic import staged_dir

    with staged_dir(out) as tmp:
        (tmp / "again.txt").write_text("again")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
