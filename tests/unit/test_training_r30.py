"""Review round 30 of training: what a resume keeps (the fp16 skip count, the saved epochs' MLflow metrics) and
what a rerun says when it cannot resume (the params that changed since the kill).

Real tiny runs: MobileNetV3-small at 32 px on a synthetic ``preprocess``-like folder (random images), a real sqlite
MLflow store in the test's tmp_path, one torch thread.
"""

from __future__ import annotations

import csv
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from faceage.config import Params
from faceage.tracking import EXPERIMENT, mlflow_env

TINY = {"backbone": "mobilenet_v3_small", "pretrained": "none", "epochs": 2, "image_size": 32, "batch_size": 4,
        "num_workers": 0, "device": "cpu"}


def synthetic_rows(n_train: int, n_valid: int) -> list[dict]:
    """Manifest rows of a synthetic ``preprocess`` output: ages 10, 17, ... in each split."""
    rows = []
    for split, n in (("train", n_train), ("valid", n_valid)):
        for i in range(n):
            name = f"{split}_{i}.png"
            age = 10 + 7 * i
            rows.append({"split": split, "file_name": name, "crop": f"{split}/{name}", "apparent_age": age,
                         "apparent_age_std": 2.0, "real_age": age})
    return rows


def write_faces_output(dest: Path, rows: list[dict]) -> None:
    """The manifest and crop settings of a synthetic ``preprocess`` output in ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    (dest / "preprocess.json").write_text(json.dumps({"margin": 0.4, "size": 40, "detector": "hog",
                                                      "data_source": "synthetic", "data_sha256": "d" * 64}))


def _faces(dest: Path, n_train: int = 8, n_valid: int = 4) -> Path:
    """A ``preprocess`` output folder of random 40 px crops with ages."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = synthetic_rows(n_train, n_valid)
    for r in rows:
        (dest / r["split"]).mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)).save(dest / r["crop"])
    write_faces_output(dest, rows)
    return dest


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A fresh sqlite store, current for the test; yields its client. Training pins one torch thread."""
    import mlflow

    from faceage import training
    from faceage.tracking import setup_mlflow

    monkeypatch.setattr(training, "_cores_per_rank", lambda: 1)
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        setup_mlflow()
        yield mlflow.MlflowClient()


def _train(p, tmp_path):
    from faceage import training

    return training.train_model(p, tmp_path / "faces", tmp_path / "model.pt", tmp_path / "reports",
                                tmp_path / "run.json", tmp_path / "state.pt")


def _saved(tmp_path):
    from faceage.training import TrainState

    return TrainState(**torch.load(tmp_path / "state.pt", weights_only=True))


class _Killed(Exception):
    """Stands for a kill -9 right after an epoch's state was saved."""


def _kill_after_first_save(monkeypatch):
    from faceage import training

    write = training._write_history

    def history_then_kill(path, history):
        write(path, history)
        raise _Killed

    monkeypatch.setattr(training, "_write_history", history_then_kill)
    return lambda: monkeypatch.setattr(training, "_write_history", write)


def test_the_fp16_skip_count_survives_a_resume(tmp_path, store, monkeypatch):
    """check_amp_step's count of skipped steps in a row runs across epochs, but was not in the training state: a
    run killed after 49 skipped steps in a row restarted at 0, and a network that no longer fits in fp16 could skip
    on for another 49 steps per kill (and the resumed run stopped at another step than the uninterrupted one)."""
    from faceage import training

    _faces(tmp_path / "faces")
    p = replace(Params().train, **TINY)

    def every_step_skipped(loss, skipped, consecutive, *, scaling, limit=training.MAX_CONSECUTIVE_SKIPPED_STEPS):
        return True, consecutive + 1  # as the fp16 scaler skipping each step, below the limit

    monkeypatch.setattr(training, "check_amp_step", every_step_skipped)
    seen_at_start = []
    epoch = training.train_one_epoch

    def recording(net, loader, opt, sched, loss_fn, prepare, device, amp, d):
        seen_at_start.append(amp.consecutive_skips)
        return epoch(net, loader, opt, sched, loss_fn, prepare, device, amp, d)

    monkeypatch.setattr(training, "train_one_epoch", recording)
    restore = _kill_after_first_save(monkeypatch)
    with pytest.raises(_Killed):
        _train(p, tmp_path)
    steps = 8 // 4
    assert _saved(tmp_path).epoch == 1
    assert _saved(tmp_path).amp_consecutive_skips == steps
    restore()
    _train(p, tmp_path)
    assert seen_at_start == [0, steps]  # the resumed epoch 2 starts from epoch 1's count, as uninterrupted


def test_resume_restores_the_skip_count_and_an_older_state_starts_it_at_zero():
    from torch import nn

    from faceage.training import Amp, TrainState, _resume

    net = nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters())
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    amp = Amp(False, torch.float16, torch.amp.GradScaler("cpu", enabled=False))
    state = TrainState("f", "r", epoch=1, model=net.state_dict(), optimizer=opt.state_dict(),
                       scheduler=sched.state_dict(), amp_consecutive_skips=7)
    assert _resume(state, net, opt, sched, amp, Path("state.pt")) is state and amp.consecutive_skips == 7
    old = {k: v for k, v in vars(state).items() if k != "amp_consecutive_skips"}  # a state saved before the field
    assert TrainState(**old).amp_consecutive_skips == 0


def test_a_continued_run_gets_its_saved_unlogged_epochs_at_once(tmp_path, store):
    """Killed between an epoch's state save and its MLflow metrics: the rerun continued the run but logged that
    epoch only with the next one, so a rerun that failed again (a divergence, Ctrl-C, out of memory) left the run
    without an epoch that history.csv and the state had."""
    from faceage.training import Distributed, TrainState, _Tracker, save_state

    history = [{"epoch": e, "train_loss": 3.0 - e / 10, "train_mae": 9.0 - e, "val_mae": 10.0 - e, "lr": 1e-3,
                "images_per_s": 50.0, "elapsed_s": 10.0 * e} for e in (1, 2)]
    run = store.create_run(store.get_experiment_by_name(EXPERIMENT).experiment_id).info.run_id
    store.log_metric(run, "val_mae", 9.0, step=1)
    store.set_terminated(run, "KILLED")
    save_state(tmp_path / "state.pt", TrainState("params", run_id=run, epoch=2, history=history, best_val_mae=8.0,
                                                 best_epoch=2))
    tracker = _Tracker(replace(Params().train, **TINY), Distributed(), {"data_sha256": "d" * 64, "data_source": "s"},
                       torch.device("cpu"), 0, 1, "params", _saved(tmp_path), tmp_path / "state.pt")
    with pytest.raises(RuntimeError), tracker.run():
        raise RuntimeError("the next epoch failed")
    assert [(m.step, m.value) for m in store.get_metric_history(run, "val_mae")] == [(1, 9.0), (2, 8.0)]
    assert [m.step for m in store.get_metric_history(run, "train_loss")] == [2]  # epoch 1's were not logged twice


def test_a_state_for_other_params_says_which_changed_and_what_is_lost(tmp_path, store, caplog, monkeypatch):
    """train.epochs raised after a kill: the state was ignored with an INFO line, "written for other params or
    data", and training silently started over; it now warns, naming the keys and the epochs not resumed."""
    caplog.set_level("INFO", logger="faceage")
    _faces(tmp_path / "faces")
    p = replace(Params().train, **{**TINY, "epochs": 1})
    restore = _kill_after_first_save(monkeypatch)
    with pytest.raises(_Killed):
        _train(p, tmp_path)
    restore()
    caplog.clear()
    _train(replace(p, epochs=2, lr=2e-3), tmp_path)
    warned = [r for r in caplog.records if r.levelname == "WARNING" and "state.pt" in r.getMessage()]
    assert len(warned) == 1, caplog.text
    text = warned[0].getMessage()
    assert "written for other params or data (train.epochs=1 (now 2), train.lr=0.001 (now 0.002))" in text, text
    assert "1 finished epoch" in text and "starts over" in text, text
    assert "resuming from epoch" not in caplog.text


def test_a_state_for_the_same_params_says_the_data_or_weights_changed_and_an_older_one_says_what_it_did(
        tmp_path, caplog):
    from dataclasses import asdict

    from faceage.training import TrainState, load_state, save_state

    params = asdict(replace(Params().train, **TINY))
    path = tmp_path / "state.pt"
    save_state(path, TrainState("old data", run_id="r1", epoch=3, params=params))
    assert load_state(path, "new data", params) is None
    assert "(3 finished epoch(s) of MLflow run r1): it was written for other params or data (the same params: the " \
           "preprocess output, the embeddings or a pretrained weights file changed); training starts over" in caplog.text
    caplog.clear()
    save_state(path, TrainState("old data", run_id="r1", epoch=3))  # saved before the state kept its params
    assert load_state(path, "new data", params) is None
    assert "it was written for other params or data; training starts over" in caplog.text
    assert load_state(path, "old data", params).epoch == 3
