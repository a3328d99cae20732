"""Round 29 review of atomic.py, logs.py, cores.py and dlib_age.py: defects found, each a test first."""

from __future__ import annotations

import threading

from faceage.atomic import write_text


def test_write_text_from_two_threads_at_once_leaves_one_whole_text(tmp_path):
    """The temporary file was named after the PID alone: two threads writing the same file shared it, so one
    thread's rename moved in the other's half-written text and the other's rename failed (FileNotFoundError)."""
    path = tmp_path / "record.json"
    texts = ["a" * 200_000, "b" * 300_000]
    errors: list[BaseException] = []
    start = threading.Barrier(2)

    def writer(text: str) -> None:
        start.wait()
        try:
            for _ in range(40):
                write_text(path, text)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=writer, args=(t,)) for t in texts]
    for t in threads:
        t.start()
    seen = set()
    while any(t.is_alive() for t in threads):
        if path.exists():
            seen.add(len(path.read_text()))
    for t in threads:
        t.join()
    assert errors == []
    assert seen <= {len(t) for t in texts}  # a reader never met half a text
    assert path.read_text() in texts
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]  # no temporary file left behind
