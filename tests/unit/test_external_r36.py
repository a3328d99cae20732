"""Round 36 review of a user's own external set (``evaluate.external``; faceage/appa_real.py, faceage/external.py).

1. A photo in the set's folder whose file name is not UTF-8 (a zip made on Windows, a camera's card copied from an
   old system: ``b\\xe9.jpg`` in Latin-1), listed or not, stopped the evaluation with a ``UnicodeEncodeError``
   traceback from the set's fingerprint (the cache key), after resolve_external had only warned the photo is unlisted.
2. A row with more fields than the header (``a.jpg,0,28,5,0,28``: a decimal comma left unquoted in a comma-separated
   file) was read silently, shifted: apparent age 28, std 5, real age 0, the last field dropped. A row with fewer
   fields than the header was "non-numeric age in column real_age: None".
3. Photos sorted into subfolders of ``test/`` (``test/women/a.jpg``), their rows naming them alone (``a.jpg``), were
   "missing from test/" with no word of where they are.
"""

from __future__ import annotations

import os

import pytest

from faceage.appa_real import COLUMNS, LayoutError, dataset_fingerprint, read_split
from faceage.external import cache_key
from faceage.sources import ExternalSetError, resolve_external
from tests.unit.test_external import CROP, make_set, noise


# 1. A file name that is not UTF-8 -----------------------------------------------------------------------------

def _latin1_name(folder, data: bytes) -> None:
    """Writes ``data`` under the Latin-1 name ``b\\xe9.jpg`` (bytes: no str spells it as UTF-8) in ``folder``."""
    try:
        with open(os.path.join(os.fsencode(folder), b"b\xe9.jpg"), "wb") as f:
            f.write(data)
    except OSError as e:  # a file system that only takes UTF-8 names (macOS APFS)
        pytest.skip(f"this file system refuses a non-UTF-8 file name: {e}")


def test_a_photo_named_in_another_encoding_does_not_crash_the_cache_key(tmp_path):
    folder = make_set(tmp_path / "mine", {"a.jpg": noise()})
    key = cache_key(folder, CROP)
    _latin1_name(folder / "test", (folder / "test" / "a.jpg").read_bytes())
    [ext] = resolve_external([str(folder)], tmp_path)  # warns that it is unlisted, as before
    assert ext.name == "mine"
    # The set's fingerprint keys its crops: every file counts, this one too, the same way each time.
    fingerprint = dataset_fingerprint(folder)
    assert fingerprint == dataset_fingerprint(folder)
    with_it = cache_key(folder, CROP)
    assert with_it != key and with_it == cache_key(folder, CROP)
    # A name that is valid UTF-8 is hashed as before (no existing entry or dataset.json changes its fingerprint).
    os.unlink(os.path.join(os.fsencode(folder / "test"), b"b\xe9.jpg"))
    assert cache_key(folder, CROP) == key


# 2. Rows with more or fewer fields than the header ------------------------------------------------------------

def _csv(tmp_path, *rows: str):
    folder = tmp_path / "set"
    folder.mkdir(exist_ok=True)
    (folder / "gt_avg_test.csv").write_text(",".join(COLUMNS) + "\n" + "".join(r + "\n" for r in rows))
    return folder


def test_a_row_with_more_fields_than_the_header_is_not_read_shifted(tmp_path):
    folder = _csv(tmp_path, "a.jpg,0,30,0,30", "b.jpg,0,28,5,0,28")
    with pytest.raises(LayoutError, match=r"gt_avg_test\.csv line 3 has 6 fields, but the header has 5 columns "
                                          r"\(.*a decimal comma.*must be quoted"):
        read_split(folder, "test")
    # Through evaluate.external the same line, naming the set.
    (folder / "test").mkdir()
    with pytest.raises(ExternalSetError, match=r"evaluate\.external: .*line 3 has 6 fields"):
        resolve_external([str(folder)], tmp_path)


def test_empty_fields_past_the_header_are_still_read(tmp_path):
    """Excel writes a row's empty cells past the last column it formatted (``a.jpg,0,30,0,30,,``): nothing lost."""
    folder = _csv(tmp_path, "a.jpg,0,30.5,1,31,,", "b.jpg,0,20,0,20")
    assert [(s.file_name, s.apparent_age, s.apparent_age_std, s.real_age) for s in read_split(folder, "test")] == [
        ("a.jpg", 30.5, 1.0, 31.0), ("b.jpg", 20.0, 0.0, 20.0)]


def test_a_row_with_fewer_fields_than_the_header_says_so(tmp_path):
    folder = _csv(tmp_path, "a.jpg,0,30,0,30", "b.jpg,0,28")
    with pytest.raises(LayoutError, match=r"gt_avg_test\.csv line 3 has 3 fields, but the header has 5 columns: "
                                          r"no apparent_age_std, real_age"):
        read_split(folder, "test")


# 3. Listed photos that sit in a subfolder ---------------------------------------------------------------------

def test_listed_photos_in_a_subfolder_are_found_and_named(tmp_path):
    folder = make_set(tmp_path / "sorted", {"a.jpg": noise(), "b.jpg": noise(1), "c.jpg": noise(2)})
    (folder / "test" / "women").mkdir()
    (folder / "test" / "b.jpg").rename(folder / "test" / "women" / "b.jpg")
    (folder / "test" / "c.jpg").rename(folder / "test" / "women" / "c.jpg")
    with pytest.raises(ExternalSetError, match=r"2 of 3 images listed in gt_avg_test\.csv are missing from .*/test, "
                                               r"e\.g\. \['b\.jpg', 'c\.jpg'\]; 2 of them are in a subfolder of test/ "
                                               r"\(e\.g\. 'women/b\.jpg'\): the photos must be directly in test/"):
        resolve_external([str(folder)], tmp_path)
