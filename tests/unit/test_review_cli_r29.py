"""Review round 29 of `faceage predict`: what a user sees on real photos (the shared ``wild`` folder) with a
tiny real checkpoint."""

import errno
import json
import os
import shutil

import pytest

from faceage.cli import main
from tests.unit.test_predict import make_checkpoint, make_detector_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_r29")
    detector = make_detector_dir(root / "detector")
    return ["--model", str(make_checkpoint(root / "model.pt", detector)), "--detector", str(detector)]


@pytest.fixture
def locked_folder(monkeypatch):
    """Makes folders named ``locked`` unreadable. Root, which runs these tests here, reads a ``chmod 000`` folder
    anyway, so the denial a user's locked folder gets from the file system is raised where the scan lists it."""
    scandir = os.scandir

    def denying(path="."):
        if not isinstance(path, int) and os.path.basename(os.fspath(path)) == "locked":  # not a folder's fd
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
        return scandir(path)

    monkeypatch.setattr(os, "scandir", denying)


@pytest.mark.parametrize("recursive", [False, True])
def test_a_folder_that_cannot_be_read_is_an_error_row_and_exit_1(wild_dir, model, tmp_path, capsys, locked_folder,
                                                                  recursive):
    # `faceage predict good locked`, or `good --recursive` with good/locked inside: the folder's photos were
    # left out with a log line alone, the exit status 0, as if every photo had been read.
    good = tmp_path / "good"
    good.mkdir()
    shutil.copyfile(wild_dir / "fr_obama_small.jpg", good / "obama.jpg")
    locked = good / "locked" if recursive else tmp_path / "locked"
    locked.mkdir()
    shutil.copyfile(wild_dir / "fr_obama_small.jpg", locked / "unseen.jpg")
    paths = [str(good), "--recursive"] if recursive else [str(good), str(locked)]
    code = main(["predict", *paths, "--json", *model])
    rows = json.loads(capsys.readouterr().out)
    assert code == 1
    by_file = {r["file"]: r for r in rows}
    assert sorted(by_file) == sorted([str(good / "obama.jpg"), str(locked)]) and len(rows) == 2  # in scan order
    assert len(by_file[str(good / "obama.jpg")]["faces"]) == 1
    assert by_file[str(locked)] == {"file": str(locked), "error": f"cannot read the folder {locked}: Permission denied"}


@pytest.mark.skipif(not os.path.exists("/dev/stdin"), reason="reads - as /dev/stdin")
def test_a_dash_reads_the_photo_from_standard_input(model, tmp_path):
    """`curl ... | faceage predict -`: '-' was taken as a file name ('no such file or folder: -', exit 1)."""
    import io
    import subprocess
    import sys

    from PIL import Image
    from skimage.data import astronaut

    buf = io.BytesIO()
    Image.fromarray(astronaut()).save(buf, format="PNG")
    done = subprocess.run([sys.executable, "-m", "faceage.cli", "predict", "-", "--json", *model],
                          input=buf.getvalue(), capture_output=True, timeout=300)
    assert done.returncode == 0, done.stderr.decode()[-2000:]
    (row,) = json.loads(done.stdout)
    assert row["file"] == "-" and row["width"] == 512 and len(row["faces"]) >= 1
    path = tmp_path / "astronaut.png"
    path.write_bytes(buf.getvalue())
    again = subprocess.run([sys.executable, "-m", "faceage.cli", "predict", str(path), "--json", *model],
                           capture_output=True, timeout=300)
    assert [f["age"] for f in json.loads(again.stdout)[0]["faces"]] == [f["age"] for f in row["faces"]]
