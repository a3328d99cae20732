"""Round 24 review of downloads and data fetching: each test failed before its fix."""

import hashlib
import http.server
import io
import os
import shutil
import signal
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from faceage.appa_real import LayoutError, cached_download, fetch_appa_real, read_demographics, read_split
from faceage.atomic import staged_dir
from faceage.download import ChecksumError, download
from faceage.sources import ExternalSetError, resolve_external
from tests.conftest import http_server

HEADER = "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"


class _Handler(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` at any path, with Range support and RFC 7233's 416 (Content-Range: bytes */LENGTH)."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        body, rng = self.server.body, self.headers.get("Range")
        self.server.requests.append(rng)
        start = int(rng.removeprefix("bytes=").split("-")[0]) if rng else 0
        if start >= len(body) and rng:
            self.send_response(416)
            self.send_header("Content-Range", f"bytes */{len(body)}")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        self.send_response(206 if rng else 200)
        if rng:
            self.send_header("Content-Range", f"bytes {start}-{len(body) - 1}/{len(body)}")
        self.send_header("Content-Length", str(len(body) - start))
        self.end_headers()
        self.wfile.write(body[start:])


@pytest.fixture
def server():
    with http_server(_Handler, body=b"", requests=[]) as srv:
        yield srv


def _url(srv, path="/f.bin"):
    return f"http://127.0.0.1:{srv.server_address[1]}{path}"


def test_a_part_file_longer_than_the_remote_file_is_refetched_not_taken_as_the_file(server, tmp_path):
    """A 416 was taken as "the part is complete": a part left by a longer, older version of the file
    became the file (no checksum given), or failed its checksum and was deleted (one given)."""
    server.body = b"N" * 1000
    (tmp_path / "f.bin.part").write_bytes(b"O" * 1500)
    assert download(_url(server), tmp_path / "f.bin", progress=False).read_bytes() == server.body
    (tmp_path / "g.bin.part").write_bytes(b"O" * 1500)
    dest = download(_url(server), tmp_path / "g.bin", md5=hashlib.md5(server.body).hexdigest(), progress=False)
    assert dest.read_bytes() == server.body and not (tmp_path / "g.bin.part").exists()
    # A complete part still costs one ranged request, no second download.
    server.requests.clear()
    (tmp_path / "h.bin.part").write_bytes(server.body)
    download(_url(server), tmp_path / "h.bin", progress=False)
    assert server.requests == ["bytes=1000-"]


def _release(folder: Path, n: int = 2, shift: int = 0) -> Path:
    for i, split in enumerate(("train", "valid", "test")):
        (folder / split).mkdir(parents=True)
        rows = []
        for j in range(n):
            name = f"{i}{j:05d}.jpg"
            (folder / split / name).write_bytes(os.urandom(3000))  # incompressible, as JPEGs are
            rows.append(f"{name},1,{20 + j + shift},1,{20 + j}\n")
        (folder / f"gt_avg_{split}.csv").write_text(HEADER + "".join(rows))
    return folder


def _zip(folder: Path) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for p in sorted(folder.rglob("*")):
            zf.write(p, f"appa-real-release/{p.relative_to(folder).as_posix()}")
    return buf.getvalue()


def _damaged(data: bytes) -> bytes:
    """The zip with its first member's deflate stream starting 0xff: block type 3, which zlib refuses."""
    first = zipfile.ZipFile(io.BytesIO(data)).infolist()[0].header_offset
    name_len = int.from_bytes(data[first + 26 : first + 28], "little")
    extra_len = int.from_bytes(data[first + 28 : first + 30], "little")
    start = first + 30 + name_len + extra_len
    return data[:start] + b"\xff" + data[start + 1:]


def test_a_damaged_zip_is_a_layout_error_not_a_zlib_traceback(tmp_path):
    zipped = _damaged(_zip(_release(tmp_path / "rel")))
    (tmp_path / "bad.zip").write_bytes(zipped)
    with pytest.raises(LayoutError, match="bad.zip is not a valid zip file"):
        fetch_appa_real(str(tmp_path / "bad.zip"), tmp_path / "out")
    assert not (tmp_path / "out").exists() and (tmp_path / "bad.zip").read_bytes() == zipped  # the user's file stays


def test_without_an_md5_a_damaged_download_is_deleted_so_the_next_run_fetches_it_again(server, tmp_path):
    """A cached zip that cannot be extracted (no md5 to say so) was used again on every run: the same
    error forever (a zlib traceback), with nothing saying where the copy was kept."""
    good = _zip(_release(tmp_path / "rel"))
    server.body = _damaged(good)
    url, cache = _url(server, "/appa-real-release.zip"), tmp_path / "cache"
    with pytest.raises(LayoutError, match="was deleted, and the next run fetches it again"):
        fetch_appa_real(url, tmp_path / "out", cache_dir=cache)
    assert not cached_download(url, "", cache).exists()
    server.body = good
    assert fetch_appa_real(url, tmp_path / "out", cache_dir=cache)["counts"] == {"train": 2, "valid": 2, "test": 2}


def test_a_staged_folder_left_by_a_killed_build_is_removed_by_the_next(tmp_path):
    """The docstring said so; the folder (a whole copy of the data) stayed beside the output for good."""
    code = ("import sys, time\nfrom faceage.atomic import staged_dir\n"
            f"with staged_dir({str(tmp_path / 'out')!r}) as tmp:\n"
            "    (tmp / 'x').write_text('half')\n    print('in', flush=True)\n    time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline() == b"in\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(os.listdir(tmp_path)) == 1  # the staged folder
    with staged_dir(tmp_path / "out") as tmp:
        (tmp / "y").write_text("whole")
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_a_staged_folder_of_a_running_build_is_left_alone(tmp_path):
    with staged_dir(tmp_path / "out") as outer:
        with staged_dir(tmp_path / "other"):
            pass
        with staged_dir(tmp_path / "out2"):
            pass
        assert outer.is_dir()


def test_a_killed_unzip_is_removed_by_the_next_fetch(tmp_path):
    rel = tmp_path / "rel"
    _release(rel)
    shutil.make_archive(str(tmp_path / "rel"), "zip", rel)
    code = ("import time\nimport faceage.appa_real as a\n"
            "def stop(root):\n    print('in', flush=True)\n    time.sleep(60)\n"
            "a.validate_layout = stop\n"
            f"a.fetch_appa_real({str(tmp_path / 'rel.zip')!r}, {str(tmp_path / 'data' / 'out')!r})\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2])
    assert proc.stdout.readline() == b"in\n"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stdout.close()
    assert len(os.listdir(tmp_path / "data")) == 2  # the unzipped release and the staged folder
    fetch_appa_real(str(tmp_path / "rel.zip"), tmp_path / "data" / "out")
    assert sorted(os.listdir(tmp_path / "data")) == ["out"]


def test_a_short_row_in_a_labels_file_is_an_unknown_label_not_a_crash(tmp_path):
    """evaluate (after training) died on AttributeError: 'NoneType' object has no attribute 'strip'."""
    (tmp_path / "labels.csv").write_text("file_name,gender,race\na.jpg,male,white\nb.jpg,female\nc.jpg,,asian\n")
    assert read_demographics(tmp_path) == {
        "a.jpg": {"gender": "male", "race": "white"}, "b.jpg": {"gender": "female"}, "c.jpg": {"race": "asian"}}


def test_an_undecodable_labels_file_is_skipped_with_a_warning(tmp_path, caplog):
    (tmp_path / "labels.csv").write_text("file_name,gender\na.jpg,male\n")
    (tmp_path / "._labels.csv").write_bytes(b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        \xff\xfe")
    assert read_demographics(tmp_path) == {"a.jpg": {"gender": "male"}}
    assert "._labels.csv line 1 is not UTF-8" in caplog.text


def test_a_row_is_named_by_its_line_in_the_file_past_blank_lines_and_quoted_line_breaks(tmp_path):
    (tmp_path / "gt_avg_train.csv").write_text(HEADER + "\na.jpg,1,20,1,20\n\n\nb.jpg,1,abc,1,20\n")
    with pytest.raises(LayoutError, match="line 6: non-numeric age"):
        read_split(tmp_path, "train")
    (tmp_path / "gt_avg_valid.csv").write_text(HEADER.replace("\n", ",note\n")
                                               + 'a.jpg,1,20,1,20,"two\nlines"\nb.jpg,1,-3,1,20,x\n')
    with pytest.raises(LayoutError, match="line 4: an age must be"):
        read_split(tmp_path, "valid")


def test_a_csv_that_is_not_utf8_says_how_to_save_it(tmp_path):
    """A cp1252 CSV (a spreadsheet's plain "CSV" on Windows) stopped check_sources with a traceback
    (UnicodeDecodeError)."""
    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "José.jpg").write_bytes(b"x")
    (tmp_path / "gt_avg_test.csv").write_bytes((HEADER + "José.jpg,0,30,0,30\n").encode("cp1252"))
    with pytest.raises(ExternalSetError, match='line 2 is not UTF-8 text.*save it as "CSV UTF-8"'):
        resolve_external([str(tmp_path)])
    (tmp_path / "gt_avg_test.csv").write_bytes(b"\xef\xbb\xbf" + (HEADER + "José.jpg,0,30,0,30\r\n").encode())
    assert [s.file_name for s in read_split(tmp_path, "test")] == ["José.jpg"]


def test_a_folder_holding_two_releases_says_so(tmp_path):
    """It said "no gt_avg_train.csv found in ... or its immediate subfolders", having found two."""
    _release(tmp_path / "src" / "appa-real-release")
    _release(tmp_path / "src" / "appa-real-backup")
    with pytest.raises(LayoutError, match=r"holds 2 releases \(appa-real-backup, appa-real-release\)"):
        fetch_appa_real(str(tmp_path / "src"), tmp_path / "out")


def test_a_local_zip_whose_md5_differs_says_how_to_skip_the_check(tmp_path):
    (tmp_path / "mine.zip").write_bytes(_zip(_release(tmp_path / "rel")))
    with pytest.raises(ChecksumError, match="skip the check: -S fetch_data.md5=$"):
        fetch_appa_real(str(tmp_path / "mine.zip"), tmp_path / "out", md5="0" * 32)


def test_a_staged_folder_of_another_pid_namespace_on_the_same_host_name_is_left_alone(tmp_path, monkeypatch):
    """A container sharing the host's name (--uts=host) numbers its processes apart: its build's PID 11 looked dead
    from the host, whose next build removed the folder the container was still writing."""
    import faceage.atomic as atomic

    real_stat = os.stat

    def other_namespace(path, *a, **kw):
        if str(path) == "/proc/self/ns/pid":
            return os.stat_result((0, 4026531836 + 7, 0, 0, 0, 0, 0, 0, 0, 0))  # another namespace's inode
        return real_stat(path, *a, **kw)

    out = tmp_path / "out"
    monkeypatch.setattr(atomic.os, "stat", other_namespace)
    theirs = atomic.scratch_name(out)  # named by a build in the other namespace, under a PID not alive here
    monkeypatch.undo()
    theirs = theirs.with_name(theirs.name.replace(f"-{os.getpid()}@", "-999999@"))
    theirs.mkdir()
    atomic.clear_stale(out)
    assert theirs.is_dir()
    ours = out.parent / theirs.name.replace(theirs.name.split("@")[1].split("-")[0], atomic._host())
    ours.mkdir()
    atomic.clear_stale(out)
    assert theirs.is_dir() and not ours.exists()  # a dead build of this namespace is still removed
