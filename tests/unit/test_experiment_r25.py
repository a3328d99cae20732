"""The profile runner started without an activated venv, or from inside the faceage package."""

import os
import subprocess
import sys
from pathlib import Path

from faceage.experiment import tool_env

REPO = Path(__file__).resolve().parents[2]


def test_dvc_is_this_environments_without_an_activated_venv():
    """`.venv/bin/python -m faceage.experiment` with the venv not on PATH: FileNotFoundError 'dvc'."""
    here = str(Path(sys.executable).parent)
    assert tool_env({"PATH": "/usr/bin:/bin"})["PATH"].split(os.pathsep) == [here, "/usr/bin", "/bin"]
    assert tool_env({})["PATH"] == here
    chosen = f"/opt/other/bin{os.pathsep}{here}{os.pathsep}/usr/bin"  # on PATH already: the user's order stands
    assert tool_env({"PATH": chosen})["PATH"] == chosen
    env = tool_env({"PATH": "/usr/bin:/bin"})
    found = subprocess.run(["sh", "-c", "command -v dvc"], env=env, capture_output=True, text=True)
    assert found.stdout.strip() == str(Path(here) / "dvc")


def test_the_runner_starts_from_inside_the_faceage_folder(tmp_path):
    """`cd faceage && python -m faceage.experiment -S ...` put faceage/ first on sys.path, where faceage/packaging.py
    hid the `packaging` library: ModuleNotFoundError "'packaging' is not a package" from hydra's import."""
    bin_dir, record = tmp_path / "bin", tmp_path / "dvc-call.txt"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_DVC_RECORD"\n')  # reads and runs nothing
    (bin_dir / "dvc").chmod(0o755)
    env = {**os.environ, "FAKE_DVC_RECORD": str(record),
           "PATH": os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]])}
    done = subprocess.run([sys.executable, "-m", "faceage.experiment", "-S", "train.epochs=1"], cwd=REPO / "faceage",
                          env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert record.read_text().splitlines()[:4] == ["exp", "run", "-S", "train.epochs=1"]
