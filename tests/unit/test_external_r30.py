"""Round 30 review of the external sets (faceage/sources.py, faceage/external.py): a corrupt ``evaluate.external``
MLflow tag, two entries with one name, and a full disk while a set's face descriptors are written."""

import csv
import errno
import logging
import os
import shutil

import numpy as np
import pytest

from faceage.appa_real import WriteError
from faceage.external import external_embeddings, external_faces, external_maes
from faceage.sources import ExternalSetError, resolve_external
from tests.unit.test_external import COLUMNS, checkpoint_crop, make_set, noise

METRICS = {"external_a_mae": 5.0, "external_a_n_faces": 3.0, "external_b_mae": 6.0, "external_b_n_faces": 2.0,
           "external_utk_external_mae": 7.0, "external_utk_external_n_faces": 9.0}
ALL = {"a": 5.0, "b": 6.0, "utk_external": 7.0}


# 1. A corrupt evaluate.external tag -------------------------------------------------------------------------------

@pytest.mark.parametrize("tag", ["not json", "[../x/a", "3", "null", '{"a": 1}', '"abc"'])
def test_a_tag_that_is_not_a_list_of_paths_counts_every_set_with_a_warning(tag, caplog):
    """external_maes raised a traceback (JSONDecodeError, TypeError) on a tag that is not JSON or not a list, and read
    the string '"abc"' as the sets a, b and c: the packaging champion guard and the sweep table died on one run. Such a
    tag says nothing of the latest sets: every set counts, as for a run evaluated before the tag existed."""
    with caplog.at_level(logging.WARNING, logger="faceage.external"):
        assert external_maes(METRICS, {"evaluate.external": tag}) == ALL
    assert "evaluate.external" in caplog.text and repr(tag)[:20] in caplog.text


def test_entries_of_the_tag_that_name_no_set_are_left_out():
    """An entry that is no path (3), or one no set can be named after ('/'), raised AttributeError or ExternalSetError;
    the other entries still say which sets the latest evaluation scored."""
    assert external_maes(METRICS, {"evaluate.external": '["../x/a", 3, "/", "/d/utk-external/"]'}) == {
        "a": 5.0, "utk_external": 7.0}
    assert external_maes(METRICS, {"evaluate.external": "[]"}) == {}
    assert external_maes(METRICS, {}) == ALL == external_maes(METRICS)


# 2. Two entries with one name -------------------------------------------------------------------------------------

def test_two_folders_with_one_name_are_named_by_the_entries(tmp_path):
    """The message listed only the names (['faces', 'faces']), not which entries: with a long list the user had to
    find them."""
    make_set(tmp_path / "one" / "faces", {"a.jpg": noise()})
    make_set(tmp_path / "two" / "Faces", {"a.jpg": noise(1)})
    with pytest.raises(ExternalSetError) as e:
        resolve_external(["one/faces", "two/Faces"], tmp_path)
    message = str(e.value)
    assert message.startswith("evaluate.external: ") and "'one/faces'" in message and "'two/Faces'" in message
    assert "'faces'" in message and "rename" in message


def test_one_folder_listed_twice_is_said_so(tmp_path, monkeypatch):
    """The same folder as a relative and an absolute path was told to "give the folders distinct names": it is one
    folder, listed twice."""
    folder = make_set(tmp_path / "sets" / "faces", {"a.jpg": noise()})
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "faces").symlink_to(folder)  # a link of the same name is the same folder too
    for entries in (["sets/faces", str(folder)], ["sets/faces", "sets/faces/"], ["~/sets/faces", "other/faces"]):
        with pytest.raises(ExternalSetError, match=r"lists the folder .*faces twice .*: remove one") as e:
            resolve_external(entries, tmp_path)
        assert all(repr(entry) in str(e.value) for entry in entries)


# 3. A full disk while a dlib_face model's descriptors of a set are written ---------------------------------------

def real_faces_set(external_dir, dest, n=2):
    """The first ``n`` faces of utk-external, in the release layout."""
    with open(external_dir / "gt_avg_test.csv", newline="") as f:
        rows = [r for _, r in zip(range(n), csv.DictReader(f))]
    (dest / "test").mkdir(parents=True)
    with open(dest / "gt_avg_test.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    for r in rows:
        shutil.copyfile(external_dir / "test" / r["file_name"], dest / "test" / r["file_name"])
    return dest


def test_a_full_disk_while_the_descriptors_are_written_is_one_line_and_leaves_no_partial_file(
        external_dir, detector_dir, tmp_path, monkeypatch):
    """np.savez's ENOSPC came out of evaluate as a raw OSError traceback, and left the partial
    ``embeddings.npz.tmp.npz`` in the shared cache entry. It is one line naming the set, the entry and the space free;
    nothing partial stays, and a rerun with space writes the descriptors."""
    import faceage.face_encoder as face_encoder

    folder = real_faces_set(external_dir, tmp_path / "faces-set")
    [ext] = resolve_external([str(folder)], tmp_path)
    faces = external_faces(ext, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    savez = np.savez

    def full_disk(file, **arrays):
        with open(file, "wb") as f:
            f.write(b"PK\x03\x04 partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))

    monkeypatch.setattr(face_encoder.np, "savez", full_disk)
    with pytest.raises(WriteError) as e:
        external_embeddings(faces, detector_dir, workers=1)
    message = str(e.value)
    assert "\n" not in message and "faces_set" in message and str(faces) in message
    assert "No space left on device" in message and "MB is free" in message
    assert sorted(p.name for p in faces.iterdir() if "embeddings" in p.name) == []
    monkeypatch.setattr(face_encoder.np, "savez", savez)
    path = external_embeddings(faces, detector_dir, workers=1)
    assert path.parent == faces
    assert sorted(p.name for p in faces.iterdir() if "embeddings" in p.name) == [path.name]
