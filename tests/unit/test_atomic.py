"""``locked``: one process at a time builds a shared output; a killed holder leaves no stale lock."""

import multiprocessing
import os
import signal
import time

from faceage.atomic import locked


def _hold_until_killed(target, held):
    with locked(target):
        held.set()
        time.sleep(600)


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    target = tmp_path / "cache" / "entry"
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_until_killed, args=(target, held))
    holder.start()
    assert held.wait(60)
    os.kill(holder.pid, signal.SIGKILL)  # like a stage killed mid-build
    holder.join(60)
    start = time.monotonic()
    with locked(target):
        assert time.monotonic() - start < 5
    assert (tmp_path / "cache" / ".entry.lock").is_file() and not target.exists()


def test_a_staged_folder_gets_the_mode_any_new_folder_gets(tmp_path):
    """mkdtemp makes a 0700 folder and the swap kept it: data/raw/appa-real was private to its owner."""
    from faceage.atomic import staged_dir

    old = os.umask(0o022)
    try:
        with staged_dir(tmp_path / "out") as staged:
            (staged / "sub").mkdir()
        (tmp_path / "plain").mkdir()
    finally:
        os.umask(old)
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o755
    assert (tmp_path / "out").stat().st_mode == (tmp_path / "plain").stat().st_mode
