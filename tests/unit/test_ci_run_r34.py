"""Round 34: ``.ci/run``'s base-image log. Each run left ``/tmp/faceage-base-image.XXXXXX`` behind, success or not
(three more per test run of ``tests/unit/test_review_stages_r29.py``), and ignored ``TMPDIR``. Now the log is made
in ``TMPDIR`` (``/tmp`` without it), removed once the base image is built, and kept only where the build failed
(its last lines printed, the file left to read)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from tests.unit.test_review_stages_r29 import ci_machine

PATTERN = "faceage-base-image.*"


def _run(tmp_path: Path, **machine) -> tuple[subprocess.CompletedProcess, Path, set[Path]]:
    """``.ci/run`` on a stub CI machine with ``TMPDIR`` of its own; the base-image logs it left in ``/tmp``."""
    repo, env, _ = ci_machine(tmp_path, have={"chromium", "dockerd", "debootstrap"}, **machine)
    tmpdir = tmp_path / "tmpdir"
    tmpdir.mkdir()
    env["TMPDIR"] = str(tmpdir)
    before = set(Path("/tmp").glob(PATTERN))
    done = subprocess.run([shutil.which("bash"), ".ci/run"], cwd=repo, env=env, capture_output=True, text=True,
                          timeout=120)
    return done, tmpdir, set(Path("/tmp").glob(PATTERN)) - before


def test_the_base_image_log_goes_once_the_image_is_built(tmp_path):
    done, tmpdir, left_in_tmp = _run(tmp_path)
    assert done.returncode == 0, done.stderr
    assert not left_in_tmp and not list(tmpdir.glob(PATTERN))


def test_a_failed_base_image_keeps_its_log_in_tmpdir(tmp_path):
    done, tmpdir, left_in_tmp = _run(tmp_path, base_image='echo "debootstrap: no route to the mirror"; exit 3\n')
    assert done.returncode == 1, done.stderr
    assert "no route to the mirror" in done.stdout + done.stderr
    [kept] = tmpdir.glob(PATTERN)
    assert "no route to the mirror" in kept.read_text()
    assert not left_in_tmp
