"""Review round 35 of training: the checkpoint, the run's one shipped output, is written as durably as the
training state and history.csv it outlives.

``save_checkpoint`` renamed ``model.pt.tmp`` into place unsynced, under one fixed staging name. Training deletes its
state file right after (so a rerun no longer resumes): after a power loss ext4/xfs could show ``model.pt`` empty,
with the run's every epoch gone, and two writers of one path (a second run beside a first on the same ``--model``,
threads in one process) renamed each other's half-written file in, or failed with FileNotFoundError. Real files in
the test's tmp_path; only ``os.fsync`` / ``os.replace`` are watched.
"""

from __future__ import annotations

import os
import threading

import torch
from torch import nn

from faceage.model import load_checkpoint, save_checkpoint

META = {"backbone": "dlib_face", "min_age": 0, "max_age": 100}


def _head() -> nn.Module:
    from faceage.model import build_model

    return build_model("dlib_face")


def test_a_checkpoint_is_on_disk_before_its_name_is(tmp_path, monkeypatch):
    """fsync of the staged file, then the rename, then the folder: what history.csv and the state already do."""
    events = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd):
        events.append(("fsync", fd))
        return real_fsync(fd)

    def replace(src, dst):
        events.append(("replace", os.path.basename(dst)))
        return real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    save_checkpoint(tmp_path / "model.pt", _head(), META)
    monkeypatch.undo()
    kinds = [e[0] for e in events]
    assert "replace" in kinds and "fsync" in kinds[:kinds.index("replace")], (
        f"model.pt was renamed into place before its bytes were synced: {events}")
    model, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["backbone"] == "dlib_face" and isinstance(model, nn.Module)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_two_writers_of_one_checkpoint_do_not_collide(tmp_path):
    """One fixed staging name (``model.pt.tmp``): each writer's rename took the other's file, or found none."""
    errors = []

    def write(val_mae: float):
        model = _head()
        try:
            for _ in range(15):
                save_checkpoint(tmp_path / "model.pt", model, {**META, "val_mae": val_mae})
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(v,)) for v in (1.0, 2.0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    _, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["val_mae"] in (1.0, 2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]


def test_a_failed_checkpoint_write_keeps_the_previous_one_and_leaves_no_staging_file(tmp_path, monkeypatch):
    """A full disk while torch writes: the last checkpoint stands whole, nothing half-written beside it."""
    import faceage.model as model_module

    path = tmp_path / "model.pt"
    save_checkpoint(path, _head(), {**META, "val_mae": 9.5})

    def full_disk(obj, f, *a, **k):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.torch, "save", full_disk)
    try:
        save_checkpoint(path, _head(), {**META, "val_mae": 8.0})
    except OSError as e:
        assert e.errno == 28
    else:
        raise AssertionError("the failed write was not reported")
    monkeypatch.undo()
    assert load_checkpoint(path)[1]["val_mae"] == 9.5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]
    assert torch.load(path, weights_only=True)["format"] == "faceage-checkpoint/1"
