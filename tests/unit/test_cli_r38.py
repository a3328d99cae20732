"""Round-38 review of `faceage predict` as a user runs it on a large folder: the results are printed as the photos
are done (table, CSV, and `--json`'s one list), not all at the end.

Each test blocks the run on a photo it pipes in on standard input (the PATH `-`, given after the folder): what was
printed before that photo is what a run prints while it is still working."""

from __future__ import annotations

import csv
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from PIL import Image

from faceage.cli import CHUNK_IMAGES, detection_threads
from tests.unit.test_predict import model_files

# A declared test dependency (pyproject's test extra).
from skimage import data as skimage_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    made = model_files(tmp_path_factory.mktemp("cli_r38"))
    return ["--model", str(made["checkpoint"]), "--detector", str(made["detector"])]


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """Two batches of photos (hard links of one face photo: distinct files), so that a run's first batch is done
    and printed before it reaches a photo given after the folder."""
    folder = tmp_path_factory.mktemp("cli_r38_photos")
    first = folder / "p000.png"
    Image.fromarray(skimage_data.astronaut()).save(first)
    for i in range(1, 2 * max(CHUNK_IMAGES, detection_threads())):
        os.link(first, folder / f"p{i:03d}.png")
    return folder


def _start(model, photos: Path, *options: str) -> subprocess.Popen:
    """`faceage predict [options] FOLDER -`, its stdin a pipe the test writes the last photo into."""
    return subprocess.Popen([sys.executable, "-m", "faceage.cli", "predict", *options, *model, str(photos), "-"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=REPO)


class _Lines:
    """The lines a process printed so far, read on a thread."""

    def __init__(self, stream):
        self.lines: list[str] = []
        self._thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        self._thread.start()

    def _read(self, stream) -> None:
        for line in stream:
            self.lines.append(line.decode())

    def wait_for(self, count: int, proc: subprocess.Popen, timeout: float = 90) -> list[str]:
        deadline = time.monotonic() + timeout
        while len(self.lines) < count and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.05)
        return list(self.lines)

    def rest(self) -> str:
        self._thread.join(timeout=60)
        return "".join(self.lines)


def _astronaut_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(skimage_data.astronaut()).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("fmt, first_lines", [("--csv", 2), ("--json", 3), (None, 2)])
def test_rows_are_printed_as_photos_are_done_not_all_at_the_end(model, photos, fmt, first_lines):
    """A folder of thousands of photos printed nothing until every one was done: a user (or `| tee`, a script
    reading rows) saw nothing for hours, and a killed run left nothing. The folder's photos are printed while the
    run waits for the last one, and the whole output is still what it was: one CSV, one JSON list, one table."""
    n = len(list(photos.iterdir()))
    proc = _start(model, photos, *filter(None, [fmt]))
    lines = _Lines(proc.stdout)
    try:
        seen = lines.wait_for(first_lines, proc)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert len(seen) >= first_lines, "nothing printed while the run waits for its last photo"
        proc.stdin.write(_astronaut_png())
        proc.stdin.close()
        assert proc.wait(timeout=180) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            proc.kill()
    out = lines.rest()
    if fmt == "--csv":
        rows = list(csv.DictReader(io.StringIO(out)))
        files = list(dict.fromkeys(Path(r["file"]).name for r in rows))  # a row per face: a photo's rows together
        assert files == sorted(p.name for p in photos.iterdir()) + ["-"]
        assert all(r["age"] and not r["error"] for r in rows)
    elif fmt == "--json":
        entries = json.loads(out)  # one document, as --help promises (not JSON Lines) ...
        assert out == json.dumps(entries, indent=2) + "\n"  # ... laid out as json.dump(indent=2) wrote it
        files = [Path(e["file"]).name for e in entries]
        assert files == sorted(p.name for p in photos.iterdir()) + ["-"]
        assert all(e["faces"] for e in entries)
    else:
        table = out.splitlines()
        assert table[0].split() == ["file", "face", "age", "age_std", "box", "score", "note"]
        files = list(dict.fromkeys(line.split()[0] for line in table[1:]))
        assert files == [str(p) for p in sorted(photos.iterdir())] + ["-"]
        # one column layout for the whole table: each column starts where the header's does
        starts = [table[0].index(name) for name in ("face", "age ", "age_std", "box", "score")]
        for line in table[1:]:
            assert all(line[s - 2:s] == "  " and line[s] != " " for s in starts), line
    assert len(files) == n + 1


def test_sigterm_while_waiting_leaves_the_rows_printed_and_json_valid(model, photos):
    """Stopped while it waits for a photo (SIGTERM, as `timeout` sends), the run's JSON is the one list of the
    photos done, closed, and the process ends by the signal."""
    proc = _start(model, photos, "--json")
    lines = _Lines(proc.stdout)
    try:
        lines.wait_for(3, proc)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    err = proc.stderr.read().decode()
    assert rc == -signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    done = json.loads(lines.rest())  # valid JSON: the photos done, each complete, the list closed
    n = len(list(photos.iterdir()))
    assert 1 <= len(done) <= n and all(e["faces"] for e in done)  # not the photo never sent
    assert f"after {len(done)} of {n + 1} photos" in err.strip().splitlines()[-1]


def test_a_printed_table_keeps_its_layout_and_widens_only_for_a_later_wider_cell():
    """The table is printed a batch at a time: up to a batch of photos it is the table printing every row at once
    gave (the header's columns fitted to the widest cell); a later batch's wider box widens its column from there
    on, the rows already printed staying as they were, the file column sized once by every path."""
    from faceage.cli import PhotoResult, ResultWriter
    from faceage.predict import FaceAge

    def result(name: str, box: tuple[int, int, int, int]) -> PhotoResult:
        return PhotoResult(Path(name), 100, 100, [FaceAge(box=box, age=30.0, age_std=2.0, score=0.5)])

    small = [result(f"a{i}.jpg", (1, 2, 3, 4)) for i in range(CHUNK_IMAGES)]
    wide = result("a-long-name.jpg", (1000, 2000, 3000, 4000))
    out = io.StringIO()
    writer = ResultWriter("table", out, paths=[r.path for r in small] + [wide.path])
    for r in small:
        writer.add(r)
    first = out.getvalue().splitlines()
    assert len(first) == 1 + CHUNK_IMAGES  # printed before the run's end
    assert first[0] == "file             face  age   age_std  box      score  note"
    assert first[1] == "a0.jpg           1     30.0  2.0      1 2 3 4  0.500"
    writer.add(wide)
    writer.finish()
    lines = out.getvalue().splitlines()
    assert lines[:len(first)] == first
    assert lines[-1] == "a-long-name.jpg  1     30.0  2.0      1000 2000 3000 4000  0.500"

    alone = io.StringIO()
    ResultWriter("table", alone).finish()  # no photo: no header either
    assert alone.getvalue() == ""
    empty = io.StringIO()
    ResultWriter("json", empty).finish()
    assert json.loads(empty.getvalue()) == []


def _screen(raw: str) -> list[str]:
    """The lines a terminal shows for ``raw``: a carriage return goes back to the line's start, and what follows
    overwrites it (escape sequences dropped)."""
    import re

    shown = []
    for line in re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", raw).split("\n"):
        cells: list[str] = []
        col = 0
        for c in line:
            if c == "\r":
                col = 0
                continue
            cells[col:col + 1] = [c]
            col += 1
        shown.append("".join(cells).rstrip())
    return shown


@pytest.mark.skipif(not hasattr(os, "openpty"), reason="needs a pseudo-terminal")
def test_rows_printed_on_a_terminal_do_not_run_into_the_progress_bar(model, photos):
    """On a terminal, the progress bar (stderr) shares the screen with the rows (stdout): printed as photos are
    done, a row began on the bar's line, after it (`predict:  50%|...| 8/16 [...]file  face  age ...`). The bar is
    cleared for the rows and drawn again below them."""
    import fcntl
    import pty
    import struct
    import termios

    leader, follower = pty.openpty()
    try:
        # A terminal of 40 rows of 160 columns (a new one is 0 x 0: the bar would be empty).
        fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 160, 0, 0))
        proc = subprocess.Popen([sys.executable, "-m", "faceage.cli", "predict", *model, str(photos)],
                                stdin=subprocess.DEVNULL, stdout=follower, stderr=follower, cwd=REPO)
        os.close(follower)
        follower = None
        raw = b""
        while True:
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            raw += chunk
        assert proc.wait(timeout=180) == 0, raw.decode(errors="replace")[-2000:]
    finally:
        os.close(leader)
        if follower is not None:
            os.close(follower)
    shown = _screen(raw.decode(errors="replace"))
    assert any(line.startswith("predict:") for line in shown)  # the bar was drawn
    rows = [line for line in shown if str(photos) in line]
    assert rows and all(line.startswith(str(photos)) for line in rows), "\n".join(rows[:3])
    assert sum(line.startswith("file  ") for line in shown) == 1
    assert len({line.split()[0] for line in rows}) == len(list(photos.iterdir()))
    assert [line for line in shown if line][-1].startswith("predict: 100%")  # below the rows, not between them
