"""Round 31, second look at the user's data (faceage/appa_real.py, faceage/sources.py, faceage/external.py): names
that are one file on macOS and Windows, the detector manifest read once for an external set's crops, and source
files the user cannot read."""

import builtins
import io
import os
import unicodedata

import pytest

import faceage.appa_real as appa_real
from faceage.appa_real import LayoutError, fetch_appa_real, read_split
from faceage.sources import external_fingerprint, pretrained_fingerprint, resolve_external
from tests.unit.test_data_r31 import make_release
from tests.unit.test_external import checkpoint_crop, make_set, noise


def _rows(root, split, names):
    """Rewrites ``gt_avg_<split>.csv`` to list ``names`` (each a copy of the split's first photo)."""
    first = sorted((root / split).glob("*.jpg"))[0].read_bytes()
    for name in names:
        (root / split / name).write_bytes(first)
    rows = [f"{name},10,{20 + i},3.0,{21 + i}" for i, name in enumerate(names)]
    (root / f"gt_avg_{split}.csv").write_text(",".join(appa_real.COLUMNS) + "\n" + "\n".join(rows) + "\n")


def _unreadable(monkeypatch, locked):
    """Reading ``locked`` fails as for a file of another account with mode 600 (the tests run as root, who reads it)."""
    real = builtins.open

    def fake(file, *args, **kwargs):
        if isinstance(file, (str, bytes, os.PathLike)) and os.fsdecode(file) == str(locked):
            raise PermissionError(13, "Permission denied", str(locked))
        return real(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake)
    monkeypatch.setattr(io, "open", fake)


# 1. Two rows whose crops are one file on macOS and Windows --------------------------------------------------------

def test_two_names_that_differ_only_in_letter_case_are_refused_naming_both_lines(tmp_path):
    """IMG.jpg and img.jpg are two photos on Linux, but their crops IMG.png and img.png are one file on a Mac or a PC
    (a faces folder pulled there, or preprocess run there): one crop then carried two labels."""
    src = make_release(tmp_path / "src")
    _rows(src, "train", ["IMG.jpg", "other.jpg", "img.jpg"])
    with pytest.raises(LayoutError) as e:
        read_split(src, "train")
    message = str(e.value)
    assert "line 4" in message and "line 2" in message and "'img.jpg'" in message and "'IMG.jpg'" in message
    assert "letter case" in message and "macOS" in message
    with pytest.raises(LayoutError, match="letter case"):
        fetch_appa_real(str(src), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_one_name_in_two_unicode_spellings_is_one_photo_listed_twice(tmp_path):
    """'José.jpg' typed on Linux (NFC) and pasted from a Mac (NFD) is one file wherever the CSV is read: both rows
    were read as the same photo (listed_file matches names NFC) and scored twice."""
    src = make_release(tmp_path / "src")
    nfc, nfd = unicodedata.normalize("NFC", "José.jpg"), unicodedata.normalize("NFD", "José.jpg")
    _rows(src, "valid", [nfc])
    (src / "gt_avg_valid.csv").write_text((src / "gt_avg_valid.csv").read_text() + f"{nfd},10,30,3.0,31\n")
    with pytest.raises(LayoutError) as e:
        read_split(src, "valid")
    assert "line 3" in str(e.value) and "line 2" in str(e.value) and "listed twice" in str(e.value)


def test_names_of_other_splits_may_share_a_stem(tmp_path):
    """Each split's crops have their own folder (<split>/<stem>.png): only names within a split must differ."""
    src = make_release(tmp_path / "src")
    _rows(src, "train", ["Face.jpg"])
    _rows(src, "valid", ["face.jpg"])
    assert [s.file_name for s in read_split(src, "train")] == ["Face.jpg"]
    assert fetch_appa_real(str(src), tmp_path / "out")["counts"] == {"train": 1, "valid": 1, "test": 2}


# 2. The detector manifest read once for an external set -----------------------------------------------------------

def test_an_external_sets_chips_record_the_verified_manifest_read(detector_dir, tmp_path, monkeypatch):
    """external_faces verified its read of the detector manifest, then crop_samples read it again, unverified: a
    manifest rewritten in between was the one chips.npz recorded."""
    import faceage.preprocess as preprocess
    from faceage.chips import load_chips
    from faceage.detector import SHAPE5_FILE, read_manifest
    from faceage.external import external_faces

    verified = read_manifest(detector_dir, verify=True)["files"][SHAPE5_FILE]
    real = preprocess.read_manifest

    def rewritten(folder, *args, **kwargs):  # what a second read finds after fetch_detector rewrote it
        manifest = real(folder, *args, **kwargs)
        return {**manifest, "files": {**manifest["files"], SHAPE5_FILE: "0" * 64}}

    monkeypatch.setattr(preprocess, "read_manifest", rewritten)
    [ext] = resolve_external([str(make_set(tmp_path / "set", {"a.jpg": noise()}))], tmp_path)
    faces = external_faces(ext, checkpoint_crop(detector_dir, no_face="whole_image"), detector_dir,
                           tmp_path / "cache", workers=1)
    _, info = load_chips(faces / "chips.npz")
    assert info["shape_predictor_sha256"] == verified


# 3. A label file the user cannot read -----------------------------------------------------------------------------

def test_an_unreadable_label_file_of_an_external_set_is_one_line_naming_it(tmp_path, monkeypatch):
    ext = make_release(tmp_path / "my-set", splits=("test",), face=False)
    _unreadable(monkeypatch, ext / "gt_avg_test.csv")
    with pytest.raises(LayoutError) as e:  # check_sources: was a PermissionError's traceback
        external_fingerprint([str(ext)])
    message = str(e.value)
    assert "\n" not in message and str(ext / "gt_avg_test.csv") in message and "Permission denied" in message
    assert message.startswith("evaluate.external: ")


def test_an_unreadable_label_file_of_the_source_is_one_line_naming_it_not_a_failed_copy(tmp_path, monkeypatch):
    src = make_release(tmp_path / "src")
    _unreadable(monkeypatch, src / "gt_avg_valid.csv")
    with pytest.raises(LayoutError) as e:  # fetch_data: was "copying ... failed: [Errno 13] Permission denied"
        fetch_appa_real(str(src), tmp_path / "out")
    message = str(e.value)
    assert "\n" not in message and str(src / "gt_avg_valid.csv") in message and "Permission denied" in message
    assert "copying" not in message and not (tmp_path / "out").exists()


# 4. A train.pretrained file the user cannot read ------------------------------------------------------------------

def test_an_unreadable_pretrained_weights_file_is_one_line_naming_the_param_and_file(tmp_path, monkeypatch):
    weights = tmp_path / "weights.pth"
    weights.write_bytes(b"\x80\x02weights")
    _unreadable(monkeypatch, weights)
    with pytest.raises(LayoutError) as e:  # check_sources: was a PermissionError's traceback
        pretrained_fingerprint(str(weights), "resnet18")
    message = str(e.value)
    assert "\n" not in message and "train.pretrained" in message and str(weights) in message
    assert "Permission denied" in message
