"""fp16 loss scaling: an overflowing step is skipped and counted, a real divergence still stops the run.

Real fp16 autocast and a real ``torch.amp.GradScaler("cpu")`` on CPU: the scaler skips a step whose gradients are not
finite and halves its scale, exactly as the CUDA one does on a GPU without bf16.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from faceage.training import (
    MAX_CONSECUTIVE_SKIPPED_STEPS, Amp, Distributed, TrainingDivergedError, check_amp_step, check_epoch,
    train_one_epoch,
)

CPU = torch.device("cpu")
OVERFLOW = 1e6  # over fp16's largest finite value (65504): the autocast forward pass gives inf


def _loss(logits, target, _x):
    return F.cross_entropy(logits.float(), target)


def _batch(value: float, n: int = 4):
    return torch.full((n, 3), value), torch.full((n,), 30), torch.full((n,), 30.0)


def _net():
    torch.manual_seed(0)
    return nn.Linear(3, 101)


def _epoch(net, batches, amp):
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 1.0)
    return train_one_epoch(net, batches, opt, sched, _loss, lambda x: x, CPU, amp, Distributed())


def _fp16():
    return Amp(True, torch.float16, torch.amp.GradScaler("cpu", init_scale=2.0 ** 16))


def _fp32():  # what Amp.for_device gives on CPU
    return Amp(False, torch.float16, torch.amp.GradScaler("cuda", enabled=False))


def test_an_fp16_overflow_step_is_skipped_and_counted_not_taken_for_divergence():
    """The overflowing batch's loss was inf: its inf entered the epoch's mean, and the run stopped as diverged,
    although the scaler had skipped the step and the weights were untouched."""
    amp = _fp16()
    net = _net()
    train = _epoch(net, [_batch(0.5), _batch(OVERFLOW), _batch(-0.5)], amp)
    assert train["skipped_steps"] == 1
    assert amp.scaler.get_scale() == 2.0 ** 15  # the scaler lowered its scale, as on a GPU
    assert math.isfinite(train["train_loss"]) and math.isfinite(train["train_mae"])
    check_epoch(1, train, val_mae=20.0)  # no divergence
    # The skipped step left the weights alone: the same as training on the two good batches only.
    ref_amp, ref = _fp16(), _net()
    ref_train = _epoch(ref, [_batch(0.5), _batch(-0.5)], ref_amp)
    assert all(torch.allclose(a, b, rtol=0, atol=1e-6) for a, b in zip(net.parameters(), ref.parameters()))
    assert train["train_loss"] == pytest.approx(ref_train["train_loss"], rel=1e-3)
    assert train["seen"] == 12  # images/s still counts every face the epoch read


def test_a_non_finite_loss_in_fp32_is_still_a_divergence_with_the_clear_message():
    train = _epoch(_net(), [_batch(0.5), _batch(float("inf")), _batch(-0.5)], _fp32())
    assert train["skipped_steps"] == 0
    with pytest.raises(TrainingDivergedError, match=r"epoch 3: training loss nan, validation MAE 12.0: the weights "
                                                    r"are no longer numbers"):
        check_epoch(3, train, val_mae=12.0)


def test_persistent_fp16_overflow_stops_the_run_at_the_bound_across_epochs():
    amp = _fp16()
    net = _net()
    half = MAX_CONSECUTIVE_SKIPPED_STEPS // 2
    train = _epoch(net, [_batch(OVERFLOW)] * half, amp)  # an epoch without one step taken: not yet divergence
    assert train["skipped_steps"] == half and math.isnan(train["train_loss"])
    check_epoch(1, train, val_mae=20.0)
    with pytest.raises(TrainingDivergedError, match=rf"{MAX_CONSECUTIVE_SKIPPED_STEPS} consecutive fp16 steps"):
        _epoch(net, [_batch(OVERFLOW)] * MAX_CONSECUTIVE_SKIPPED_STEPS, amp)


def test_a_taken_step_resets_the_count_of_consecutive_skips():
    amp = _fp16()
    n = MAX_CONSECUTIVE_SKIPPED_STEPS - 1
    train = _epoch(_net(), ([_batch(OVERFLOW)] * n + [_batch(0.5)]) * 2, amp)
    assert train["skipped_steps"] == 2 * n and amp.consecutive_skips == 0


def test_check_amp_step_decisions_on_real_tensors():
    inf, nan, finite = torch.tensor(float("inf")), torch.tensor(float("nan")), torch.tensor(2.5)
    # fp32/bf16 (no scaling): every loss counts, a non-finite one makes the epoch's mean non-finite
    assert check_amp_step(nan, skipped=False, consecutive=7, scaling=False) == (True, 0)
    # fp16: a step the scaler took resets the count
    assert check_amp_step(finite, skipped=False, consecutive=7, scaling=True) == (True, 0)
    # a forward overflow: skipped, its loss left out of the epoch's mean
    assert check_amp_step(inf, skipped=True, consecutive=0, scaling=True) == (False, 1)
    assert check_amp_step(nan, skipped=True, consecutive=3, scaling=True) == (False, 4)
    # a backward overflow (scale too high): skipped, but its finite loss is a real measurement
    assert check_amp_step(finite, skipped=True, consecutive=0, scaling=True) == (True, 1)
    with pytest.raises(TrainingDivergedError, match="3 consecutive fp16 steps"):
        check_amp_step(inf, skipped=True, consecutive=2, scaling=True, limit=3)
