"""Round 31: a user bringing their own data (folders, zips from macOS and Windows, their own HTTP server)."""

import http.server
import logging
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import faceage.appa_real as appa_real
from faceage.appa_real import LayoutError, fetch_appa_real, read_split
from faceage.download import DownloadError
from faceage.sources import resolve_external
from tests.conftest import http_server

SPLITS = ("train", "valid", "test")


def make_release(root, splits=SPLITS, n=2, face=True):
    """A tiny release: ``n`` real 16x16 JPEGs per split (and their ``_face.jpg`` copies)."""
    rng = np.random.default_rng(0)
    for split in splits:
        (root / split).mkdir(parents=True)
        rows = []
        for i in range(n):
            name = f"{split}{i:03d}.jpg"
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / name)
            if face:
                (root / split / (name + "_face.jpg")).write_bytes((root / split / name).read_bytes())
            rows.append(f"{name},10,{20 + i}.5,3.0,{21 + i}")
        (root / f"gt_avg_{split}.csv").write_text(",".join(appa_real.COLUMNS) + "\n" + "\n".join(rows) + "\n")
    return root


# 1. Photos in a split's folder that its CSV does not list ---------------------------------------------------------

def test_photos_the_csv_does_not_list_are_counted_in_a_warning_not_dropped_silently(tmp_path, caplog):
    src = make_release(tmp_path / "src")
    for name in ("new_a.jpg", "new_b.PNG"):  # added to train/, their rows forgotten
        (src / "train" / name).write_bytes((src / "train" / "train000.jpg").read_bytes())
    (src / "train" / "new_a.jpg_face.jpg").write_bytes(b"crop of an unlisted photo: not counted twice")
    for junk in (".DS_Store", "._train000.jpg", "Thumbs.db", "notes.txt"):  # not photos
        (src / "train" / junk).write_bytes(b"x")
    with caplog.at_level(logging.WARNING, logger="faceage.appa_real"):
        info = fetch_appa_real(str(src), tmp_path / "out")
    assert info["counts"] == {"train": 2, "valid": 2, "test": 2}
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warned) == 1, warned
    assert "2 photos in" in warned[0] and "train" in warned[0] and "gt_avg_train.csv" in warned[0]
    assert "new_a.jpg" in warned[0] and "new_b.PNG" in warned[0]
    assert not (tmp_path / "out" / "train" / "new_a.jpg").exists()


def test_a_release_whose_folders_hold_only_listed_photos_warns_nothing(tmp_path, caplog):
    src = make_release(tmp_path / "src")
    with caplog.at_level(logging.WARNING, logger="faceage.appa_real"):
        fetch_appa_real(str(src), tmp_path / "out")
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


def test_an_external_set_with_unlisted_photos_warns_with_their_count(tmp_path, caplog):
    ext = make_release(tmp_path / "my-set", splits=("test",), face=False)
    (ext / "test" / "extra.jpg").write_bytes((ext / "test" / "test000.jpg").read_bytes())
    with caplog.at_level(logging.WARNING):
        (found,) = resolve_external([str(ext)])
    assert found.name == "my_set"
    assert "1 photo in" in caplog.text and "extra.jpg" in caplog.text and "gt_avg_test.csv" in caplog.text


# 2. A zip made on Windows whose names are in the PC's code page --------------------------------------------------

def _windows_zip(src, path, raw_name: bytes, placeholder: str):
    """Zips ``src`` under a top folder as Windows tools do: backslashes, no UTF-8 flag, and the one file whose
    name holds ``placeholder`` stored with the bytes ``raw_name`` (the PC's code page) instead."""
    with zipfile.ZipFile(path, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                info = zipfile.ZipInfo("release\\" + str(p.relative_to(src)).replace("/", "\\"))
                info.create_system = 0
                zf.writestr(info, p.read_bytes())
    path.write_bytes(path.read_bytes().replace(placeholder.encode(), raw_name))


def _jose_zip(tmp_path: Path, encoding: str) -> Path:
    """A release zipped as Windows tools do, whose CSV lists José.jpg, stored under its name in ``encoding``."""
    src = make_release(tmp_path / "src")
    (src / "train" / "train000.jpg").rename(src / "train" / "JosQ.jpg")
    (src / "train" / "train000.jpg_face.jpg").unlink()
    csv = src / "gt_avg_train.csv"
    csv.write_text(csv.read_text().replace("train000.jpg", "José.jpg"))
    archive = tmp_path / "release.zip"
    _windows_zip(src, archive, "José".encode(encoding), "JosQ")
    return archive


def test_a_windows_zip_with_code_page_names_says_why_an_accented_photo_is_missing(tmp_path):
    archive = _jose_zip(tmp_path, "cp1252")  # ANSI code page: read as cp437 "JosΘ"
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(archive), tmp_path / "out")
    message = str(e.value)
    assert "José.jpg" in message and "missing" in message
    assert "not UTF-8" in message and "JosΘ.jpg" in message  # the name the zip holds, and why
    assert "unzip" in message and "fetch_data.source" in message


def test_a_windows_zip_in_the_oem_code_page_is_read(tmp_path):
    archive = _jose_zip(tmp_path, "cp437")  # Explorer's own: cp437 as the zip format says
    info = fetch_appa_real(str(archive), tmp_path / "out")
    assert info["counts"]["train"] == 2 and (tmp_path / "out" / "train" / "José.jpg").is_file()


# 3. A URL on the user's own server -------------------------------------------------------------------------------

class _Missing(http.server.BaseHTTPRequestHandler):
    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_error(404)


def test_a_404_from_the_users_server_names_the_url_and_does_not_blame_the_connection(tmp_path):
    with http_server(_Missing) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}/my-release.zip"
        with pytest.raises(DownloadError) as e:
            fetch_appa_real(url, tmp_path / "out", md5="", cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert "404" in message and url in message
    assert "Without a connection" not in message  # the server was reached: it has no such file
    assert "fetch_data.source" in message
    assert not (tmp_path / "out").exists()


# 4. Rows and splits ----------------------------------------------------------------------------------------------

def test_a_row_repeated_word_for_word_says_it_is_listed_twice(tmp_path):
    src = make_release(tmp_path / "src")
    csv = src / "gt_avg_train.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join([*lines, lines[1]]) + "\n")
    with pytest.raises(LayoutError) as e:
        read_split(src, "train")
    assert "train000.jpg" in str(e.value) and "line 4" in str(e.value) and "on line 2" in str(e.value)
    assert "listed twice: remove one row" in str(e.value)


def test_a_release_with_only_some_splits_names_each_missing_one_and_what_is_needed(tmp_path):
    src = make_release(tmp_path / "src", splits=("train", "test"))
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(src), tmp_path / "out")
    message = str(e.value)
    assert "missing gt_avg_valid.csv in" in message and "gt_avg_test.csv" not in message
    assert "train, valid and test" in message and "<split>/ folder" in message
    assert not (tmp_path / "out").exists()


def test_a_csv_whose_split_folder_is_absent_says_the_folder_is_absent(tmp_path):
    src = make_release(tmp_path / "src")
    for p in (src / "valid").iterdir():
        p.unlink()
    (src / "valid").rmdir()
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(src), tmp_path / "out")
    assert "no folder" in str(e.value) and str(src / "valid") in str(e.value)


class _Zip(http.server.BaseHTTPRequestHandler):
    """Serves ``server.body`` at any path, with no Range support."""

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(200)
        self.send_header("Content-Length", str(len(self.server.body)))
        self.end_headers()
        self.wfile.write(self.server.body)


def test_a_users_zip_checked_against_the_releases_md5_says_which_param_to_change(tmp_path):
    src = make_release(tmp_path / "src")
    archive = tmp_path / "mine.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    release_md5 = "2701c6ec291b242e6b4f8a0a56087a43"  # params.yaml's, left there when the source changed
    with http_server(_Zip, body=archive.read_bytes()) as srv:
        url = f"http://127.0.0.1:{srv.server_address[1]}/mine.zip"
        with pytest.raises(DownloadError) as e:
            fetch_appa_real(url, tmp_path / "out", md5=release_md5, cache_dir=tmp_path / "cache")
        assert "fetch_data.md5" in str(e.value) and "-S fetch_data.md5=" in str(e.value)
        assert not (tmp_path / "cache" / "mine.zip").exists() and not (tmp_path / "cache" / "mine.zip.part").exists()
        info = fetch_appa_real(url, tmp_path / "out", md5="", cache_dir=tmp_path / "cache")  # as the message says
    assert info["counts"] == {"train": 2, "valid": 2, "test": 2}



# 5. What the fingerprint of a local source counts -----------------------------------------------------------------

def test_finder_and_explorer_files_do_not_change_a_sources_fingerprint_but_a_photo_does(tmp_path):
    from faceage.sources import external_fingerprint, source_fingerprint

    src = make_release(tmp_path / "src")
    before, sets_before = source_fingerprint(str(src)), external_fingerprint([str(src)])
    # Opening the folder in Finder rewrites .DS_Store; a copy to a USB disk adds ._ files; Explorer adds Thumbs.db
    for junk in (".DS_Store", "train/.DS_Store", "test/._test000.jpg", "._gt_avg_train.csv", "valid/Thumbs.db",
                 "desktop.ini"):
        (src / junk).write_bytes(b"\x00\x05\x16\x07 view settings")
    assert source_fingerprint(str(src)) == before  # else fetch_data copied the whole release again
    assert external_fingerprint([str(src)]) == sets_before  # else evaluate reran, external crops were cut again
    (src / "test" / "test001.jpg").write_bytes((src / "test" / "test000.jpg").read_bytes())  # an edited photo
    assert source_fingerprint(str(src))["sha256"] != before["sha256"]
    assert external_fingerprint([str(src)]) != sets_before


# 6. Sources spelled as URLs that are not http(s) -----------------------------------------------------------------

def test_a_file_url_is_read_as_the_local_path_it_names(tmp_path):
    src = make_release(tmp_path / "my release")
    info = fetch_appa_real(src.as_uri(), tmp_path / "out")  # file:///.../my%20release
    assert info["counts"] == {"train": 2, "valid": 2, "test": 2}
    from faceage.sources import source_fingerprint
    assert source_fingerprint(src.as_uri())["kind"] == "folder"


def test_a_url_of_a_scheme_that_is_not_fetched_says_which_are(tmp_path):
    with pytest.raises(LayoutError) as e:
        fetch_appa_real("ftp://example.org/appa-real-release.zip", tmp_path / "out")
    assert "'ftp'" in str(e.value) and "http" in str(e.value) and "resolved to" not in str(e.value)


# 7. Names a case-insensitive disk or an extra folder level hid ----------------------------------------------------

def test_photos_listed_in_another_letter_case_are_named_with_the_spelling_found(tmp_path):
    src = make_release(tmp_path / "src")  # made on a Mac or Windows, where TRAIN000.JPG opens train000.jpg
    csv = src / "gt_avg_train.csv"
    csv.write_text(csv.read_text().replace("train000.jpg", "TRAIN000.JPG"))
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(src), tmp_path / "out")
    message = str(e.value)
    assert "1 of 2 images" in message and "TRAIN000.JPG" in message
    assert "'train000.jpg'" in message and "case" in message


def test_an_external_set_one_folder_down_names_the_folder_to_give(tmp_path):
    make_release(tmp_path / "unzipped" / "my-set", splits=("test",), face=False)  # my-set.zip's own top folder
    with pytest.raises(LayoutError) as e:
        resolve_external([str(tmp_path / "unzipped")])
    assert "missing gt_avg_test.csv" in str(e.value) and str(tmp_path / "unzipped" / "my-set") in str(e.value)


# 8. A source file that cannot be read ----------------------------------------------------------------------------

def test_a_photo_the_user_cannot_read_is_one_line_naming_it_not_a_traceback(tmp_path, monkeypatch):
    from faceage.sources import external_fingerprint, source_fingerprint

    src = make_release(tmp_path / "src")
    locked = src / "test" / "test001.jpg"  # e.g. copied from another account with mode 600 (root reads it anyway)
    real = appa_real.file_digest

    def digest(path, algorithm="sha256"):
        if str(path) == str(locked):
            raise PermissionError(13, "Permission denied", str(path))
        return real(path, algorithm)

    monkeypatch.setattr(appa_real, "file_digest", digest)
    for fingerprint in (lambda: source_fingerprint(str(src)), lambda: external_fingerprint([str(src)])):
        with pytest.raises(LayoutError) as e:
            fingerprint()
        assert str(locked) in str(e.value) and "Permission denied" in str(e.value)


# 9. A CSV typed by hand -----------------------------------------------------------------------------------------

def test_a_csv_typed_with_a_space_after_each_comma_is_read(tmp_path):
    src = make_release(tmp_path / "src")
    csv = src / "gt_avg_valid.csv"
    csv.write_text(csv.read_text().replace(",", ", "))  # file_name, num_ratings, ... / valid000.jpg, 10, 20.5, ...
    samples = read_split(src, "valid")
    assert [s.file_name for s in samples] == ["valid000.jpg", "valid001.jpg"]
    assert [s.apparent_age for s in samples] == [20.5, 21.5]
    assert fetch_appa_real(str(src), tmp_path / "out")["counts"]["valid"] == 2


# 10. A zip made from an absolute path -----------------------------------------------------------------------------

def test_a_zip_made_with_zip_r_of_an_absolute_path_names_where_the_release_is(tmp_path):
    src = make_release(tmp_path / "src")
    archive = tmp_path / "release.zip"
    with zipfile.ZipFile(archive, "w") as zf:  # `zip -r release.zip /home/ana/data/appa` stores home/ana/data/appa/...
        for p in sorted(src.rglob("*")):
            zf.write(p, "home/ana/data/appa/" + p.relative_to(src).as_posix())
            zf.writestr("__MACOSX/home/ana/data/appa/._" + p.name, b"\x00\x05\x16\x07")
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(archive), tmp_path / "out")
    message = str(e.value)
    assert "no gt_avg_train.csv found in" in message and str(archive) in message  # the zip, not its unzipped copy
    assert "home/ana/data/appa/" in message and "unzip it" in message  # where it is, and what to do
