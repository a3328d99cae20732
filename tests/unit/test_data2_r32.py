"""Round 32, second read of round 31's download changes (faceage/download.py, faceage/appa_real.py): a wrong file
at the destination hashed once per URL, a "without a connection" hint where a server did answer, and a subfolder
that cannot be read silently left out of a dataset's fingerprint."""

import http.server
import logging
import os
from pathlib import Path

import pytest

from faceage import appa_real, download as download_module
from faceage.appa_real import LayoutError, dataset_fingerprint, fetch_appa_real, tree_files
from faceage.download import DownloadError, HTTPStatusError, download
from tests.conftest import http_server
from tests.unit.test_data_r31 import make_release


class _Missing(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_error(404)


class _Serve(http.server.BaseHTTPRequestHandler):
    """``/good.bin`` is the server's ``body``; anything else is a 404."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/good.bin":
            self.send_error(404)
            return
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)


def _count_digests_of(monkeypatch, path: Path) -> list[str]:
    """The algorithms ``faceage.download.file_digest`` is asked for on ``path`` (the real digest is still computed)."""
    calls, real = [], download_module.file_digest

    def counting(p, algorithm="sha256"):
        if Path(p) == path:
            calls.append(algorithm)
        return real(p, algorithm)

    monkeypatch.setattr(download_module, "file_digest", counting)
    return calls


# 1. A wrong file at the destination, hashed and reported once per URL -----------------------------------------------

def test_a_wrong_file_at_the_destination_is_hashed_and_reported_once_for_all_urls(tmp_path, monkeypatch, caplog):
    """With the release's source and one mirror, the >1 GB zip left at the destination was md5'd (and warned about,
    and appended to the error) once per URL before anything was fetched."""
    dest = tmp_path / "cache" / "release.zip"
    dest.parent.mkdir()
    dest.write_bytes(b"another version of the release")
    digests = _count_digests_of(monkeypatch, dest)
    with http_server(_Missing) as srv:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        with caplog.at_level(logging.WARNING, logger="faceage.download"), pytest.raises(HTTPStatusError) as e:
            download(f"{base}/a.zip", dest, md5="0" * 32, mirrors=[f"{base}/b.zip"], retries=0, progress=False)
    assert digests == ["md5"]
    stale = [r for r in caplog.records if "is there but its md5 does not match" in r.getMessage()]
    assert len(stale) == 1
    message = str(e.value)
    assert message.count("is there but its md5 does not match") == 1 and "a.zip" in message and "b.zip" in message
    assert dest.read_bytes() == b"another version of the release"  # nothing fetched: the copy is left as it was


def test_a_wrong_file_at_the_destination_is_replaced_by_the_mirrors_right_one(tmp_path, monkeypatch):
    import hashlib

    body = b"the right bytes" * 100
    dest = tmp_path / "release.bin"
    dest.write_bytes(b"stale")
    digests = _count_digests_of(monkeypatch, dest)
    with http_server(_Serve, body=body) as srv:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        got = download(f"{base}/gone.bin", dest, md5=hashlib.md5(body).hexdigest(), mirrors=[f"{base}/good.bin"],
                       retries=0, progress=False)
    assert got == dest and dest.read_bytes() == body
    assert digests == ["md5"]  # the stale copy, once (the fetched bytes are checked as the part, before the move)


def test_a_verified_file_at_the_destination_is_used_without_asking_any_url(tmp_path):
    import hashlib

    dest = tmp_path / "release.bin"
    dest.write_bytes(b"kept")
    with http_server(_Missing) as srv:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        assert download(f"{base}/a.bin", dest, md5=hashlib.md5(b"kept").hexdigest(), mirrors=[f"{base}/b.bin"],
                        progress=False) == dest
    assert dest.read_bytes() == b"kept"


def test_a_wrong_file_at_the_destination_is_named_once_where_a_single_url_fails(tmp_path):
    dest = tmp_path / "release.zip"
    dest.write_bytes(b"old")
    with http_server(_Missing) as srv:
        with pytest.raises(HTTPStatusError) as e:
            download(f"http://127.0.0.1:{srv.server_address[1]}/a.zip", dest, md5="0" * 32, progress=False)
    assert str(e.value).count("is there but its md5 does not match") == 1 and "404" in str(e.value)


# 2. "Without a connection" where one host answered -------------------------------------------------------------------

NO_HOST = "http://faceage-no-such-host.invalid/appa-real-release.zip"


def test_a_404_and_an_unreachable_host_do_not_say_without_a_connection(tmp_path):
    """download() raises a plain DownloadError where one URL answered 404 and another was not reached: fetch_appa_real
    added "Without a connection to the release's hosts", of a host that did answer."""
    with http_server(_Missing) as srv:
        mirror = f"http://127.0.0.1:{srv.server_address[1]}/appa-real-release.zip"
        with pytest.raises(DownloadError) as e:
            fetch_appa_real(NO_HOST, tmp_path / "out", md5="", mirrors=[mirror], cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert NO_HOST in message and mirror in message and "404" in message and "cannot resolve" in message
    assert "without a connection" not in message.lower() and "The server was reached" not in message
    hint = message.splitlines()[-1]  # one paragraph: the hint is the last line, after each URL's failure
    assert "fetch_data.source" in hint and "fetch_data.mirrors" in hint and "answered" in hint
    assert "local copy" in hint and not (tmp_path / "out").exists()


def test_the_same_mix_the_other_way_round_gets_the_same_hint(tmp_path):
    with http_server(_Missing) as srv:
        source = f"http://127.0.0.1:{srv.server_address[1]}/appa-real-release.zip"
        with pytest.raises(DownloadError) as e:
            fetch_appa_real(source, tmp_path / "out", md5="", mirrors=[NO_HOST], cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert type(e.value) is DownloadError
    assert "without a connection" not in message.lower() and "answered" in message.splitlines()[-1]


def test_no_url_reached_still_says_without_a_connection(tmp_path):
    from faceage.download import UnreachableError

    other = "http://faceage-no-such-mirror.invalid/appa-real-release.zip"
    with pytest.raises(UnreachableError) as e:
        fetch_appa_real(NO_HOST, tmp_path / "out", md5="", mirrors=[other], cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert NO_HOST in message and other in message
    assert message.splitlines()[-1].startswith("Without a connection to the release's hosts")
    assert "fetch_data.source=/abs/path/appa-real-release.zip" in message


def test_a_single_unreachable_url_says_without_a_connection(tmp_path):
    from faceage.download import UnreachableError

    with pytest.raises(UnreachableError) as e:
        fetch_appa_real(NO_HOST, tmp_path / "out", md5="", cache_dir=tmp_path / "cache")
    assert "Without a connection" in str(e.value) and NO_HOST in str(e.value)


# 3. A subfolder that cannot be read, left out of the fingerprint -----------------------------------------------------

def _unlistable(monkeypatch, folder: Path) -> None:
    """Listing ``folder`` fails as for a folder of another account with mode 700 (the tests run as root)."""
    real = os.scandir

    def scandir(path="."):
        if os.fspath(path) == str(folder):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)


def test_a_subfolder_that_cannot_be_read_is_an_error_naming_it_not_left_out_of_the_fingerprint(tmp_path, monkeypatch):
    """os.walk skips a folder it cannot list unless told: the fingerprint then left out a split's photos, and
    changes there never re-ran the pipeline."""
    src = make_release(tmp_path / "src")
    _unlistable(monkeypatch, src / "valid")
    with pytest.raises(LayoutError) as e:
        dataset_fingerprint(src)
    message = str(e.value)
    assert len(message.splitlines()) == 1
    assert f"cannot read {src / 'valid'}" in message and "Permission denied" in message and "chmod -R a+rX" in message


def test_an_unreadable_top_folder_is_an_error_too(tmp_path, monkeypatch):
    src = make_release(tmp_path / "src")
    _unlistable(monkeypatch, src)
    with pytest.raises(LayoutError, match="cannot read"):
        tree_files(src)


def test_a_readable_tree_and_a_missing_folder_are_listed_as_before(tmp_path):
    src = make_release(tmp_path / "src", n=1)
    assert [p.relative_to(src).as_posix() for p in tree_files(src)] == [
        "gt_avg_test.csv", "gt_avg_train.csv", "gt_avg_valid.csv", "test/test000.jpg", "test/test000.jpg_face.jpg",
        "train/train000.jpg", "train/train000.jpg_face.jpg", "valid/valid000.jpg", "valid/valid000.jpg_face.jpg"]
    assert tree_files(tmp_path / "absent") == []


def test_a_full_disk_while_copying_a_folder_with_an_unreadable_subfolder_is_still_the_write_error(tmp_path,
                                                                                                   monkeypatch):
    """The space estimate walks the source: a LayoutError there replaced the full disk's WriteError."""
    import errno

    from faceage.atomic import WriteError

    src = make_release(tmp_path / "src")
    _unlistable(monkeypatch, src / "valid")
    error = appa_real._write_error(OSError(errno.ENOSPC, "No space left on device"), "copying", [], src,
                                   tmp_path / "out")
    assert isinstance(error, WriteError) and "No space left on device" in str(error)
