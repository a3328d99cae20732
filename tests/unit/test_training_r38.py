"""Round 38 of training: a loss that stops being a number ends the epoch at that step, not after the whole epoch.

Real tiny runs: MobileNetV3-small at 32 px on a synthetic ``preprocess``-like folder (random images), a real sqlite
MLflow store in the test's tmp_path, one torch thread (the helpers of test_training_r30); a real 2-process gloo run
for DDP. The NaN is put into the real loss at a chosen step (the way too high a ``train.lr`` ends in one).
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faceage.config import Params
from faceage.training import Amp, Distributed, TrainingDivergedError, check_epoch, train_one_epoch
from tests.unit.test_training_r30 import TINY, _faces, _saved, _train, store
from tests.unit.test_training_r31 import _free_port

FIXTURES = (store,)  # pytest finds the fixture by its name in this module
CPU = torch.device("cpu")


class _Batches:
    """A loader's batches (input value per batch), counting those the epoch drew."""

    def __init__(self, values: list[float]):
        self.values, self.drawn = values, 0

    def __len__(self) -> int:
        return len(self.values)

    def __iter__(self):
        for v in self.values:
            self.drawn += 1
            yield torch.full((4, 3), v), torch.full((4,), 30), torch.full((4,), 30.0)


def test_an_epoch_stops_at_its_first_loss_that_is_not_a_number():
    """A loss that turned NaN or inf mid-epoch (too high a train.lr) trained on to the epoch's end: minutes of
    batches on CPU, each poisoning the weights further, before check_epoch said so. Now the epoch stops at that step
    (no extra sync: the loss is read once per step as before), and check_epoch says it, naming train.lr."""
    torch.manual_seed(0)
    net = nn.Linear(3, 101)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    batches = _Batches([0.5, float("inf"), 0.5, -0.5, 0.25, 0.5])
    fp32 = Amp(False, torch.float16, torch.amp.GradScaler("cuda", enabled=False))  # as Amp.for_device on CPU
    train = train_one_epoch(net, batches, opt, sched, lambda logits, t, _x: F.cross_entropy(logits.float(), t),
                            lambda x: x, CPU, fp32, Distributed())
    assert batches.drawn == 2, "trained on after the step whose loss was not a number"
    assert train["seen"] == 8 and math.isnan(train["train_loss"])
    with pytest.raises(TrainingDivergedError, match=r"epoch 4: training loss nan.*lower train\.lr.*step 2 of 6"):
        check_epoch(4, train, val_mae=float("nan"))


def _nan_loss_at(monkeypatch, call: int, calls: list[int]) -> None:
    """The real training loss, NaN from its ``call``-th call on (1-based): what a too high rate ends in."""
    from faceage import training

    make = training.make_loss

    def making(*args, **kwargs):
        loss_fn = make(*args, **kwargs)

        def loss(logits, target, inputs):
            calls[0] += 1
            value = loss_fn(logits, target, inputs)
            return value * float("nan") if calls[0] >= call else value

        return loss

    monkeypatch.setattr(training, "make_loss", making)


def test_a_run_whose_loss_turns_nan_mid_epoch_stops_there_and_stays_resumable(tmp_path, store, monkeypatch):
    _faces(tmp_path / "faces", n_train=16)
    p = replace(Params().train, **{**TINY, "epochs": 3})  # 16 faces, batch 4: 4 steps an epoch
    calls = [0]
    _nan_loss_at(monkeypatch, 4 + 2, calls)  # epoch 2's second step
    with pytest.raises(TrainingDivergedError) as raised:
        _train(p, tmp_path)
    assert calls[0] == 6, "epoch 2 trained on after its loss stopped being a number"
    assert raised.match(r"epoch 2: training loss nan.*lower train\.lr.*step 2 of 4")
    assert _saved(tmp_path).epoch == 1  # the run stays resumable from epoch 1, nothing of epoch 2 kept
    with open(tmp_path / "reports" / "history.csv", newline="") as f:
        assert [r["epoch"] for r in csv.DictReader(f)] == ["1"]


def _rank_with_nan(rank: int, world: int, tmp: str, port: int, results) -> None:
    """One torchrun-like rank of a real 2-process gloo run whose rank 1 alone gets a NaN loss at its first step."""
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
                      MLFLOW_TRACKING_URI=f"sqlite:///{tmp}/mlflow.db")
    from faceage import training

    training._cores_per_rank = lambda: 1
    calls = [0]
    make = training.make_loss

    def making(*args, **kwargs):
        loss_fn = make(*args, **kwargs)

        def loss(logits, target, inputs):
            calls[0] += 1
            value = loss_fn(logits, target, inputs)
            return value * float("nan") if rank == 1 else value

        return loss

    training.make_loss = making
    p = replace(Params().train, **{**TINY, "epochs": 1})
    try:
        training.train_model(p, Path(tmp) / "faces", Path(tmp) / "model.pt", Path(tmp) / "reports",
                             Path(tmp) / "run.json", Path(tmp) / "state.pt")
        results.put((rank, "returned", "", calls[0]))
    except BaseException as e:  # noqa: BLE001 - reported to the test
        results.put((rank, type(e).__name__, str(e), calls[0]))


def test_under_ddp_a_nan_loss_on_one_rank_stops_every_rank_at_that_step(tmp_path):
    """Each rank reads its own loss: a rank that stopped alone would leave the others in the next step's
    collectives (gloo's "Connection closed by peer", NCCL's timeout). Every rank stops at the same step."""
    import multiprocessing

    _faces(tmp_path / "faces", n_train=16)  # global batch 4: 4 steps an epoch
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank_with_nan, args=(r, 2, str(tmp_path), port, results)) for r in (0, 1)]
    try:
        for proc in procs:
            proc.start()
        got = {r: (kind, text, calls) for r, kind, text, calls in (results.get(timeout=300) for _ in procs)}
    finally:
        for proc in procs:
            proc.join(30)
            if proc.is_alive():  # (a hang: the test fails, its processes do not outlive it)
                proc.kill()
    assert got[0][0] == got[1][0] == "TrainingDivergedError", got
    assert got[0][2] == got[1][2] == 1, got  # one step each, not the whole epoch
    assert got[0][1] == got[1][1] and "step 1 of 4" in got[0][1], got
