"""Round 30: users' own data in the release layout (spreadsheet CSVs, full disks, implausible ages)."""

import errno
import os
import zipfile

import numpy as np
import pytest
from PIL import Image

import faceage.appa_real as appa_real
from faceage.appa_real import LayoutError, fetch_appa_real, read_demographics, read_split, validate_layout
from faceage.errors import FaceAgeError
from faceage.sources import resolve_external

SPLITS = ("train", "valid", "test")


def write_csv(path, text, *, bom=False, crlf=False):
    data = text.replace("\n", "\r\n") if crlf else text
    path.write_bytes((b"\xef\xbb\xbf" if bom else b"") + data.encode())


def make_release(root, sep=",", ages=("20.5", "3", "21"), *, bom=False, crlf=False, splits=SPLITS):
    """A tiny release: one real 16x16 JPEG per split, its ages written as given (``sep``-separated)."""
    rng = np.random.default_rng(0)
    for split in splits:
        (root / split).mkdir(parents=True)
        name = f"{split}000.jpg"
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(root / split / name)
        header = sep.join(appa_real.COLUMNS)
        write_csv(root / f"gt_avg_{split}.csv", f"{header}\n{sep.join([name, '10', *ages])}\n", bom=bom, crlf=crlf)
    return root


def hidden_beside(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}-"))


# 1. Spreadsheet CSVs ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sep", [";", "\t"])
def test_a_semicolon_or_tab_csv_from_excel_with_bom_crlf_and_decimal_commas_is_read(tmp_path, sep):
    """Excel in a European locale saves "CSV" with ';' and decimal commas: it was refused (one column found)."""
    src = make_release(tmp_path / "src", sep, ages=("28,5", "3,25", "29"), bom=True, crlf=True)
    info = fetch_appa_real(str(src), tmp_path / "out")
    assert info["counts"] == {"train": 1, "valid": 1, "test": 1}
    sample = validate_layout(tmp_path / "out")["test"][0]
    assert (sample.file_name, sample.apparent_age, sample.apparent_age_std, sample.real_age) == \
        ("test000.jpg", 28.5, 3.25, 29.0)


def test_an_external_set_saved_with_semicolons_is_resolved(tmp_path):
    ext = make_release(tmp_path / "my-faces", ";", ages=("41,0", "0", "40"), splits=("test",))
    [resolved] = resolve_external([str(ext)])
    assert read_split(resolved.path, "test")[0].apparent_age == 41.0


def test_a_quoted_decimal_comma_in_a_comma_separated_file_is_read(tmp_path):
    write_csv(tmp_path / "gt_avg_train.csv", ",".join(appa_real.COLUMNS) + '\na.jpg,10,"28,5",0,29\n')
    assert read_split(tmp_path, "train")[0].apparent_age == 28.5


def test_a_sep_line_that_excel_reads_is_honoured(tmp_path):
    write_csv(tmp_path / "gt_avg_train.csv", "sep=;\n" + ";".join(appa_real.COLUMNS) + "\na.jpg;10;28,5;0;29\n")
    assert read_split(tmp_path, "train")[0].apparent_age == 28.5
    write_csv(tmp_path / "gt_avg_valid.csv", "sep=;\n" + ";".join(appa_real.COLUMNS) + "\na.jpg;10;28;0;29\nb.jpg;1;x;0;1\n")
    with pytest.raises(LayoutError, match="line 4: non-numeric age"):  # lines counted from the file's first
        read_split(tmp_path, "valid")


def test_empty_rows_excel_writes_after_the_data_are_skipped(tmp_path):
    """Excel exports formatted but empty rows as ';;;;': they failed as a "non-numeric age"."""
    write_csv(tmp_path / "gt_avg_train.csv",
              ";".join(appa_real.COLUMNS) + "\na.jpg;10;28,5;0;29\n;;;;\n;;;;\n", crlf=True)
    assert [s.file_name for s in read_split(tmp_path, "train")] == ["a.jpg"]


@pytest.mark.parametrize(("value", "message"), [
    ("1.234,5", r"line 2: non-numeric age in column apparent_age_avg: '1\.234,5'"),
    ("abc", r"line 2: non-numeric age in column apparent_age_avg: 'abc' \(write a number of years"),
])
def test_a_value_that_is_not_a_number_names_its_column_and_value(tmp_path, value, message):
    write_csv(tmp_path / "gt_avg_train.csv", ";".join(appa_real.COLUMNS) + f"\na.jpg;10;{value};0;29\n")
    with pytest.raises(LayoutError, match=message):
        read_split(tmp_path, "train")


def test_another_separator_is_refused_saying_which_are_read(tmp_path):
    write_csv(tmp_path / "gt_avg_train.csv", "|".join(appa_real.COLUMNS) + "\na.jpg|10|28|0|29\n")
    with pytest.raises(LayoutError, match=r"separated by ',', ';' or a tab"):
        read_split(tmp_path, "train")


def test_an_empty_csv_says_it_is_empty(tmp_path):
    (tmp_path / "gt_avg_train.csv").write_bytes(b"\xef\xbb\xbf")
    with pytest.raises(LayoutError, match=r"gt_avg_train\.csv is empty: expected the header file_name,num_ratings"):
        read_split(tmp_path, "train")


def test_a_semicolon_labels_file_gives_its_gender_and_race(tmp_path):
    """A ';' labels file beside the CSVs was read as one column: its labels silently vanished."""
    write_csv(tmp_path / "labels.csv", "file_name;utk_gender(0=male,1=female);race\na.jpg;1;Asian\n", bom=True, crlf=True)
    assert read_demographics(tmp_path) == {"a.jpg": {"gender": "female", "race": "Asian"}}


# 3. Ages the model cannot mean ----------------------------------------------------------------------------------

@pytest.mark.parametrize(("column", "value"), [("real_age", "1985"), ("apparent_age_avg", "340")])
def test_an_age_no_person_reaches_is_refused(tmp_path, column, value):
    """A birth year (or months) in an age column passed and was trained on as a centenarian."""
    ages = {"apparent_age_avg": "20", "apparent_age_std": "1", "real_age": "21", column: value}
    write_csv(tmp_path / "gt_avg_train.csv", ",".join(appa_real.COLUMNS)
              + f"\na.jpg,1,{ages['apparent_age_avg']},{ages['apparent_age_std']},{ages['real_age']}\n")
    with pytest.raises(LayoutError, match=rf"line 2: an age must be a finite number >= 0 and <= 130 years, "
                                          rf"got {column}='{value}'"):
        read_split(tmp_path, "train")


def test_utkface_ages_above_the_head_are_kept(tmp_path):
    """The head stops at 100 but UTKFace labels go to 116 (utk-external): those rows are valid."""
    write_csv(tmp_path / "gt_avg_test.csv", ",".join(appa_real.COLUMNS) + "\na.jpg,0,116.0,0.0,116\n")
    assert read_split(tmp_path, "test")[0].real_age == 116.0


# 2. A full disk while extracting or copying -----------------------------------------------------------------

def zip_release(src, archive):
    with zipfile.ZipFile(archive, "w") as zf:
        for p in sorted(src.rglob("*")):
            zf.write(p, p.relative_to(src.parent))
    return archive


def test_a_full_disk_while_extracting_is_one_line_naming_zip_destination_and_space(tmp_path, monkeypatch):
    """ENOSPC surfaced as a raw OSError traceback; nothing half-extracted may stay behind for a rerun."""
    archive = zip_release(make_release(tmp_path / "appa-real-release"), tmp_path / "appa-real-release.zip")
    out = tmp_path / "data" / "raw"
    extract, calls = zipfile.ZipFile.extract, []

    def fills_the_disk(self, member, path=None, pwd=None):
        calls.append(member)
        if len(calls) == 4:  # some files are written already
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return extract(self, member, path, pwd)

    monkeypatch.setattr(zipfile.ZipFile, "extract", fills_the_disk)
    with pytest.raises(FaceAgeError) as e:
        fetch_appa_real(str(archive), out)
    message = str(e.value)
    assert isinstance(e.value, OSError) and not isinstance(e.value, LayoutError)
    assert "\n" not in message
    assert f"extracting {archive} for {out} failed" in message and "No space left on device" in message
    assert "needs about" in message and "free" in message
    assert not out.exists() and hidden_beside(out) == []
    monkeypatch.undo()
    assert fetch_appa_real(str(archive), out)["counts"]["test"] == 1


def test_a_full_disk_while_copying_a_folder_keeps_the_previous_output(tmp_path, monkeypatch):
    src = make_release(tmp_path / "src")
    out = tmp_path / "out"
    before = fetch_appa_real(str(src), out)
    copy = appa_real.shutil.copyfile

    def fills_the_disk(a, b, *args, **kwargs):
        if str(b).endswith(".jpg"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(b))
        return copy(a, b, *args, **kwargs)

    monkeypatch.setattr(appa_real.shutil, "copyfile", fills_the_disk)
    with pytest.raises(FaceAgeError, match=rf"copying {src} into {out} failed: \[Errno 28\] No space left on device"):
        fetch_appa_real(str(src), out)
    monkeypatch.undo()
    assert appa_real.read_dataset_info(out) == before and hidden_beside(out) == []


def test_a_full_disk_while_cropping_an_external_set_is_one_line_and_leaves_no_cache_entry(detector_dir, tmp_path,
                                                                                          monkeypatch):
    """ENOSPC writing an external set's crops into the cache surfaced as a raw OSError traceback in evaluate."""
    import faceage.preprocess as preprocess
    from faceage.external import external_faces
    from tests.unit.test_external import checkpoint_crop, make_set, noise

    def fills_the_disk(fn, items, workers, initializer, initargs, *, desc, unit, workers_key):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(tmp_path / "cache" / "x.png"))

    monkeypatch.setattr(preprocess, "map_in_processes", fills_the_disk)
    [ext] = resolve_external([str(make_set(tmp_path / "set", {"a.jpg": noise()}))], tmp_path)
    with pytest.raises(FaceAgeError) as e:
        external_faces(ext, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=2)
    message = str(e.value)
    assert isinstance(e.value, OSError) and "\n" not in message
    assert message.startswith(f"cropping external set set into {tmp_path / 'cache'}") and "No space left" in message
    assert "MB is free" in message
    assert [p.name for p in (tmp_path / "cache").iterdir() if not p.name.endswith(".lock")] == []
