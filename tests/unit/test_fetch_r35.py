"""Round 35 review of fetch_data: what a user hits fetching APPA-REAL from a zip (each test failed before its fix).

A zip source was unzipped into a hidden folder beside the output, and every photo was then copied from there into
the output: the release (about a gigabyte of JPEGs, which do not compress) was written to disk twice, the copy took
as long again as the extraction, and the disk had to hold the zip, the unzipped copy and the output at once.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
import zipfile
from pathlib import Path

import pytest

from faceage import appa_real
from faceage.appa_real import fetch_appa_real
from tests.conftest import shared_datasets
from tests.unit.test_appa_real import make_release, zip_release


def _tree(folder: Path) -> dict[str, str]:
    """Every file under ``folder`` (relative path -> sha256), ``dataset.json`` left out."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != appa_real.DATASET_JSON}


@pytest.fixture
def copies(monkeypatch) -> list[tuple[str, str]]:
    """Records each file the fetch copies byte by byte (and still copies it)."""
    made: list[tuple[str, str]] = []
    real = shutil.copyfile

    def copyfile(src, dst, *args, **kwargs):
        made.append((os.fspath(src), os.fspath(dst)))
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(appa_real.shutil, "copyfile", copyfile)
    return made


def test_a_zip_is_written_to_disk_once_not_unzipped_then_copied(tmp_path, copies):
    """Each photo was extracted, then copied into the output: twice the writing and twice the disk."""
    src = make_release(tmp_path / "appa-real-release", n=4)
    (src / "gt_train.csv").write_text("file_name,apparent_age\ntrain000.jpg,20\n")  # the release's per-rating CSV
    archive = zip_release(src, tmp_path / "appa-real-release.zip")
    out = tmp_path / "data" / "raw" / "appa-real"
    info = fetch_appa_real(str(archive), out)
    assert copies == []  # the output took the unzipped files themselves
    assert info["counts"] == {"train": 4, "valid": 4, "test": 4} and info["release_face_crops"] == 12
    assert _tree(out) == _tree(src)
    # Nothing shares its bytes with a leftover: the unzipped copy is gone, each output file is its only name.
    assert [p.name for p in out.parent.iterdir()] == ["appa-real"]
    assert all(p.stat().st_nlink == 1 for p in out.rglob("*") if p.is_file())
    # The same bytes from the folder and from its zip: one fingerprint (the check_sources/fetch_data contract).
    assert fetch_appa_real(str(src), tmp_path / "from-folder")["sha256"] == info["sha256"]


@pytest.mark.parametrize("code", [errno.EXDEV, errno.EPERM, errno.EMLINK, errno.EOPNOTSUPP])
def test_a_file_system_without_hard_links_still_gets_the_whole_release(tmp_path, monkeypatch, code):
    """Where the unzipped files cannot be linked into the output (a file system without hard links, a link limit),
    they are copied, as before: the output is complete and the same."""
    src = make_release(tmp_path / "appa-real-release")
    archive = zip_release(src, tmp_path / "appa-real-release.zip")

    def no_links(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(appa_real.os, "link", no_links)
    out = tmp_path / "out"
    info = fetch_appa_real(str(archive), out)
    assert info["counts"] == {"train": 3, "valid": 3, "test": 3}
    assert _tree(out) == _tree(src)


def test_a_folder_source_is_copied_never_linked(tmp_path, copies):
    """The user's own folder is theirs: the output must not share its files (an edit to one would edit the
    other, behind DVC's back)."""
    src = make_release(tmp_path / "appa-real-release")
    out = tmp_path / "out"
    fetch_appa_real(str(src), out)
    assert all(p.stat().st_nlink == 1 for p in out.rglob("*") if p.is_file())
    assert all(p.stat().st_nlink == 1 for p in src.rglob("*") if p.is_file())
    assert len(copies) == 3 + 3 * 3 * 2  # the CSVs, each photo and its _face.jpg


def test_a_photo_listed_also_as_anothers_face_crop_is_written_once(tmp_path):
    """A CSV may list ``a.jpg_face.jpg`` as a photo of its own beside ``a.jpg``: both rows take the one file."""
    src = make_release(tmp_path / "appa-real-release", n=2)
    with open(src / "gt_avg_test.csv", "a") as f:
        f.write("test000.jpg_face.jpg,10,30.0,2.0,31\n")
    archive = zip_release(src, tmp_path / "appa-real-release.zip")
    out = tmp_path / "out"
    info = fetch_appa_real(str(archive), out)
    assert info["counts"]["test"] == 3
    assert _tree(out) == _tree(src)


def test_the_shared_sample_zipped_under_its_own_folder_gives_the_folders_data(tmp_path, copies):
    """The shared sample (CRLF CSVs, a labels CSV beside them), zipped as macOS's Archive Utility zips a folder
    (under its name, with __MACOSX/ resource forks and a .DS_Store): the same data and fingerprint as the folder."""
    sample = shared_datasets() / "appa-real-sample"
    if not sample.is_dir():
        pytest.skip(f"needs the shared sample at {sample} (../shared/datasets)")
    archive = tmp_path / "appa-real-sample.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(sample.rglob("*")):
            rel = p.relative_to(sample.parent).as_posix()
            zf.write(p, rel)
            if p.is_file() and p.parent == sample:
                zf.writestr(f"__MACOSX/{Path(rel).parent}/._{p.name}", b"\x00\x05\x16\x07 resource fork")
        zf.writestr("appa-real-sample/.DS_Store", b"Bud1")
    from_zip = fetch_appa_real(str(archive), tmp_path / "from-zip")
    assert copies == []
    from_folder = fetch_appa_real(str(sample), tmp_path / "from-folder")
    assert from_zip["counts"] == from_folder["counts"] == {"train": 1500, "valid": 300, "test": 300}
    assert from_zip["sha256"] == from_folder["sha256"]
    assert _tree(tmp_path / "from-zip") == _tree(tmp_path / "from-folder")
