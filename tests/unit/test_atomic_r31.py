"""Review round 31 of ``faceage.atomic``: a file written through a staging file of its own, opened the way the
caller needs (bytes for ``torch.save``, ``newline=""`` for the csv module), fsynced before its rename, and removed
when the write fails."""

from __future__ import annotations

import csv
import os
import threading
from pathlib import Path

import pytest

from faceage import atomic


def test_replacing_writes_bytes_and_csv_rows_exactly_and_syncs_before_the_rename(tmp_path, monkeypatch):
    synced, order = [], []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(atomic.os, "fsync", lambda fd: (synced.append(fd), order.append("fsync"), real_fsync(fd)))
    monkeypatch.setattr(atomic.os, "replace", lambda a, b: (order.append("replace"), real_replace(a, b)))
    with atomic.replacing(tmp_path / "blob.bin") as f:
        f.write(b"\x00\r\n\xff")
    assert (tmp_path / "blob.bin").read_bytes() == b"\x00\r\n\xff"
    assert order[:2] == ["fsync", "replace"], order  # the data is on disk before its name is
    with atomic.replacing(tmp_path / "rows.csv", "w", newline="") as f:
        csv.writer(f).writerows([["a", "b"], [1, 2.5]])
    assert (tmp_path / "rows.csv").read_bytes() == b"a,b\r\n1,2.5\r\n"  # as csv writes it, no newline translation
    assert sorted(p.name for p in tmp_path.iterdir()) == ["blob.bin", "rows.csv"]


def test_replacing_keeps_the_old_file_and_removes_its_staging_file_when_the_write_fails(tmp_path):
    (tmp_path / "state.pt").write_bytes(b"old")
    with pytest.raises(RuntimeError), atomic.replacing(tmp_path / "state.pt") as f:
        f.write(b"half of the new")
        raise RuntimeError("the disk filled up")
    assert (tmp_path / "state.pt").read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def test_write_bytes_from_two_threads_at_once_leaves_one_whole_file(tmp_path):
    """Each call stages under a name of its own: with one fixed staging name, one writer moved in the other's
    half-written file, and the other's rename failed (FileNotFoundError)."""
    path, errors = tmp_path / "out.bin", []
    payloads = [bytes([i]) * 200_000 for i in (1, 2)]

    def write(data):
        try:
            for _ in range(30):
                atomic.write_bytes(path, data)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(d,)) for d in payloads]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert path.read_bytes() in payloads
    assert [p.name for p in tmp_path.iterdir()] == ["out.bin"]


def test_write_text_is_unchanged(tmp_path):
    atomic.write_text(tmp_path / "a.txt", "é\nline\n")
    assert (tmp_path / "a.txt").read_bytes() == "é\nline\n".encode()


def test_a_staging_file_left_by_a_killed_writer_is_removed_by_the_next_write(tmp_path):
    """Unique staging names are never reused: a writer killed mid-write (kill -9 during a 100 MB state save)
    left its file for ever, one more per kill. The next write removes those whose process has ended."""
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    with pytest.raises(RuntimeError), atomic.replacing(tmp_path / "state.pt") as f:
        staging = Path(f.name)  # this call's own staging file (removed, as the block fails)
        raise RuntimeError
    assert staging.name.endswith(".tmp") and staging.name.startswith(".state.pt-")
    left = staging.with_name(staging.name.replace(f"-{os.getpid()}@", f"-{pid}@"))  # a killed writer's
    left.write_bytes(b"half")
    staging.write_bytes(b"in progress")  # this process's (another thread's write): kept
    atomic.write_bytes(tmp_path / "state.pt", b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([staging.name, "state.pt"])
