"""Review round 31 of training: its files written through ``faceage.atomic`` (fsynced, a staging name per call,
nothing left behind by a failed write, the same bytes as before); a resume that survives another
``train.num_workers`` or ``train.device``; a divergence under DDP that stops every rank with one clear line.

Real tiny runs: MobileNetV3-small at 32 px on a synthetic ``preprocess``-like folder (random images), a real sqlite
MLflow store in the test's tmp_path, one torch thread (the helpers of test_training_r30).
"""

from __future__ import annotations

import os
import socket
import threading
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from faceage.config import Params
from tests.unit.test_training_r30 import (  # noqa: F401 - store: the fixture
    TINY, _faces, _kill_after_first_save, _Killed, _saved, _train, store,
)

FIXTURES = (store,)  # pytest finds the fixture by its name in this module

HISTORY = [{"epoch": e, "train_loss": 3.0 - e / 10, "train_mae": 9.0 - e, "val_mae": 10.25 - e, "lr": 1e-3,
            "images_per_s": 50.0, "elapsed_s": 10.0 * e} for e in (1, 2)]


def test_history_csv_keeps_its_bytes_and_is_synced_to_disk(tmp_path, monkeypatch):
    """history.csv was renamed into place unsynced: after a power loss ext4/xfs could show it empty."""
    from faceage import training

    synced = []
    real = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real(fd))[1])
    training._write_history(tmp_path / "reports" / "history.csv", HISTORY)
    assert (tmp_path / "reports" / "history.csv").read_bytes() == (
        b"epoch,train_loss,train_mae,val_mae,lr\r\n1,2.9,8.0,9.25,0.001\r\n2,2.8,7.0,8.25,0.001\r\n")
    assert synced, "history.csv was not fsynced before its rename"
    assert [p.name for p in (tmp_path / "reports").iterdir()] == ["history.csv"]


def test_a_failed_state_or_history_write_leaves_the_old_file_and_no_staging_file(tmp_path, monkeypatch):
    """A write that failed half-way (a full disk) left ``state.pt.tmp`` (a copy of the weights, twice with the best
    epoch's) or ``history.csv.tmp`` beside the output, for ever."""
    from faceage import training
    from faceage.training import TrainState, save_state

    save_state(tmp_path / "state.pt", TrainState("f", "r1", epoch=1))
    training._write_history(tmp_path / "history.csv", HISTORY[:1])
    before = (tmp_path / "history.csv").read_bytes()

    def full_disk(obj, f, *a, **k):
        f.write(b"x" * 1000)
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError):
        save_state(tmp_path / "state.pt", TrainState("f", "r1", epoch=2))

    def half_written(self, rows):
        self.writer.writerow(["1", "2"])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(training.csv.DictWriter, "writerows", half_written)
    with pytest.raises(OSError):
        training._write_history(tmp_path / "history.csv", HISTORY)
    monkeypatch.undo()
    assert _saved(tmp_path).epoch == 1 and (tmp_path / "history.csv").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["history.csv", "state.pt"]


def test_two_writers_of_one_state_file_do_not_collide(tmp_path):
    """One fixed staging name (``state.pt.tmp``): two writers at once (a second run beside a first one on the same
    --state, threads in one process) renamed each other's half-written file in, or failed with FileNotFoundError."""
    from faceage.training import TrainState, save_state

    big = {"w": torch.zeros(100_000)}
    errors = []

    def write(run_id):
        try:
            for _ in range(20):
                save_state(tmp_path / "state.pt", TrainState("f", run_id, model=big))
        except Exception as e:  # noqa: BLE001 - asserted below
            errors.append(e)

    threads = [threading.Thread(target=write, args=(r,)) for r in ("a", "b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert _saved(tmp_path).run_id in ("a", "b")
    assert [p.name for p in tmp_path.iterdir()] == ["state.pt"]


def _final_weights(tmp_path):
    return torch.load(tmp_path / "model.pt", map_location="cpu", weights_only=False)


def test_a_run_restarted_with_other_loader_workers_or_device_setting_resumes_to_the_same_result(
        tmp_path, store, caplog, monkeypatch):
    """train.num_workers and train.device were fingerprinted: a run killed at epoch 1 of 30 and rerun with
    num_workers=2 (or device=cuda for auto on the same GPU) threw its epochs away and started over. Neither
    changes what is trained (every face's draws are seeded per face and epoch, whatever process draws them):
    the resumed run ends with the uninterrupted one's weights and history."""
    caplog.set_level("INFO", logger="faceage")
    _faces(tmp_path / "faces")
    p = replace(Params().train, **TINY)  # num_workers 0, device cpu
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "faces").symlink_to(tmp_path / "faces")
    _train(p, tmp_path / "plain")

    restore = _kill_after_first_save(monkeypatch)
    with pytest.raises(_Killed):
        _train(p, tmp_path)
    restore()
    caplog.clear()
    _train(replace(p, num_workers=1, device="auto"), tmp_path)  # auto: the CPU here, as device=cpu was
    assert "resuming from epoch 1 of 2" in caplog.text, caplog.text
    assert "starts over" not in caplog.text
    assert (tmp_path / "reports" / "history.csv").read_bytes() == \
        (tmp_path / "plain" / "reports" / "history.csv").read_bytes()
    resumed, plain = _final_weights(tmp_path)["state_dict"], _final_weights(tmp_path / "plain")["state_dict"]
    assert resumed.keys() == plain.keys()
    assert all(torch.equal(resumed[k], plain[k]) for k in plain)


def test_a_state_ignored_for_other_params_does_not_blame_the_loader_workers_or_device(tmp_path, caplog):
    from faceage.training import TrainState, load_state, save_state

    params = asdict(replace(Params().train, **TINY))
    save_state(tmp_path / "state.pt", TrainState("old data", run_id="r1", epoch=3, params=params))
    assert load_state(tmp_path / "state.pt", "new data", {**params, "num_workers": 4, "device": "auto"}) is None
    assert "(the same params: the preprocess output" in caplog.text, caplog.text
    assert "num_workers" not in caplog.text and "device" not in caplog.text


def test_the_fingerprint_ignores_loader_workers_and_device_and_keeps_the_default_runs_states(tmp_path):
    """Only the execution keys leave it, normalised to their defaults: a state saved by the earlier code for
    num_workers=-1 and device=auto (the defaults) still resumes."""
    import hashlib
    import json

    from faceage import training
    from faceage.download import file_digest
    from faceage.preprocess import MANIFEST, read_crop_settings

    faces = _faces(tmp_path / "faces")
    p = replace(Params().train, **{**TINY, "num_workers": -1, "device": "auto"})
    h = hashlib.sha256(json.dumps(asdict(p), sort_keys=True).encode())  # the earlier code's formula
    h.update(file_digest(faces / MANIFEST).encode())
    h.update(json.dumps(read_crop_settings(faces), sort_keys=True).encode())
    assert training._fingerprint(p, faces, None) == h.hexdigest()
    for other in ({"num_workers": 3}, {"device": "cpu"}):
        assert training._fingerprint(replace(p, **other), faces, None) == h.hexdigest()
    for other in ({"seed": 1}, {"amp": False}, {"nproc_per_node": 2}):
        assert training._fingerprint(replace(p, **other), faces, None) != h.hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _diverging_rank(rank: int, world: int, tmp: str, port: int, results) -> None:
    """One torchrun-like rank of a real 2-process gloo run whose rank 0 measures a NaN validation MAE."""
    import math

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
    from faceage import training

    training._cores_per_rank = lambda: 1
    if rank == 0:
        training.evaluate = lambda *a, **k: math.nan  # (only rank 0 evaluates)
    p = replace(Params().train, **{**TINY, "epochs": 1})
    try:
        training.train_model(p, Path(tmp) / "faces", Path(tmp) / "model.pt", Path(tmp) / "reports",
                             Path(tmp) / "run.json", Path(tmp) / "state.pt")
        results.put((rank, "returned", ""))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, type(e).__name__, str(e)))


def test_a_divergence_under_ddp_stops_every_rank_with_its_one_line(tmp_path):
    """Only rank 0 checks an epoch: it raised TrainingDivergedError while rank 1 waited in the epoch's barrier,
    which then failed with gloo's "Connection closed by peer" traceback (a bug's, not the divergence's line)."""
    import multiprocessing

    _faces(tmp_path / "faces")
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_diverging_rank, args=(r, 2, str(tmp_path), port, results)) for r in (0, 1)]
    try:
        for proc in procs:
            proc.start()
        got = {r: (kind, text) for r, kind, text in (results.get(timeout=200) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():  # (a hang: the test fails, its processes do not outlive it)
                proc.kill()
    assert got[0][0] == "TrainingDivergedError", got
    assert got[1][0] == "TrainingDivergedError", got  # the same error, not gloo's RuntimeError
    assert got[1][1] == got[0][1] and "validation MAE nan" in got[1][1], got
    assert (tmp_path / "state.pt").exists()  # the run stays resumable (nothing of the epoch kept)
