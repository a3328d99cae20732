"""Round 34: what stands at preprocess's partial path (``.NAME.partial`` beside the output) when it is not the
folder preprocess keeps there: a file, a dangling link, a folder this user cannot write. Each gave a raw
``FileExistsError`` / ``PermissionError`` traceback; now one line names the path and what to do, and the thing
there is left as it was (preprocess never makes a file or a link there, so whatever is there is not its own).
"""

from __future__ import annotations

import os
import shutil

import pytest

import faceage.preprocess as preprocess
from faceage.errors import FaceAgeError, error_line
from tests.unit.test_crops_r30 import make_release
from tests.unit.test_preprocess_r33 import NOISE, partial
from tests.unit.test_small_r30 import _run_unprivileged, shared_tmp


FIXTURES = (shared_tmp,)


def _one_line(e: BaseException) -> str:
    line = error_line(e)
    assert "\n" not in line and "Traceback" not in line
    return line


def test_a_file_at_the_partial_path_is_named_and_left_alone(tmp_path, detector_dir):
    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    out.parent.mkdir()
    partial(out).write_text("my notes")
    with pytest.raises(FaceAgeError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    line = _one_line(e.value)
    assert str(partial(out)) in line and "is a file" in line and "move it away" in line, line
    assert partial(out).read_text() == "my notes"  # the user's file: never removed
    assert not out.exists()
    assert sorted(p.name for p in out.parent.iterdir()) == [".faces.partial"]  # no staging folder left either


def test_a_link_at_the_partial_path_is_named_and_left_alone(tmp_path, detector_dir):
    data = make_release(tmp_path)
    out = tmp_path / "out" / "faces"
    out.parent.mkdir()
    partial(out).symlink_to(tmp_path / "gone")  # dangling
    with pytest.raises(FaceAgeError) as e:
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    line = _one_line(e.value)
    assert str(partial(out)) in line and "symbolic link" in line and str(tmp_path / "gone") in line, line
    assert partial(out).is_symlink() and not (tmp_path / "gone").exists()

    # A link to a folder: its files are not preprocess's to remove when the job differs, nor can the crops be
    # renamed out of it across file systems; refused the same way, the folder untouched.
    (tmp_path / "gone").mkdir()
    (tmp_path / "gone" / "mine.txt").write_text("x")
    with pytest.raises(FaceAgeError, match="symbolic link"):
        preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert [p.name for p in (tmp_path / "gone").iterdir()] == ["mine.txt"]


def _preprocess_unprivileged(data, detector_dir, out) -> str:
    """The one line a user without root's override rights gets from preprocessing ``data`` into ``out``."""
    proc = _run_unprivileged(f"""
        from faceage.errors import FaceAgeError, error_line
        from faceage.preprocess import preprocess_dataset
        from tests.unit.test_preprocess_r33 import NOISE
        try:
            preprocess_dataset({str(data)!r}, {str(detector_dir)!r}, {str(out)!r}, NOISE)
        except FaceAgeError as e:
            print(error_line(e))
        """)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return proc.stdout.strip()


def test_a_partial_folder_this_user_cannot_write_is_one_line(shared_tmp, detector_dir):
    data = make_release(shared_tmp)
    out = shared_tmp / "out" / "faces"
    out.parent.mkdir()
    partial(out).mkdir()
    partial(out).chmod(0o555)
    line = _preprocess_unprivileged(data, detector_dir, out)
    assert str(partial(out)) in line and "cannot write" in line, line
    assert partial(out).is_dir() and not out.exists()


def test_an_output_parent_this_user_cannot_write_is_one_line(shared_tmp, detector_dir):
    data = make_release(shared_tmp)
    out = shared_tmp / "out" / "faces"
    out.parent.mkdir()
    out.parent.chmod(0o555)
    line = _preprocess_unprivileged(data, detector_dir, out)
    assert str(partial(out)) in line and "Permission denied" in line, line
    assert os.listdir(out.parent) == []


def test_stray_things_inside_the_partial_folder_are_its_own_and_handled(tmp_path, detector_dir, monkeypatch):
    """Inside the partial folder everything is preprocess's: a file where its records folder goes is replaced, and
    a link where a split's folder goes is removed (not followed: the files it points at are not preprocess's)."""
    from tests.unit.test_preprocess_r33 import _interrupted, assert_same_output

    data, out = _interrupted(tmp_path, detector_dir, monkeypatch)
    records = partial(out) / "records"
    for f in records.iterdir():
        f.unlink()
    records.rmdir()
    records.write_text("x")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.png").write_bytes(b"mine")
    shutil.rmtree(partial(out) / "valid")
    (partial(out) / "valid").symlink_to(elsewhere)
    preprocess.preprocess_dataset(data, detector_dir, out, NOISE)
    assert (elsewhere / "keep.png").read_bytes() == b"mine"
    straight = tmp_path / "straight" / "faces"
    preprocess.preprocess_dataset(data, detector_dir, straight, NOISE)
    assert_same_output(straight, out)
