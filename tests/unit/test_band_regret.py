"""The age-band regret rule of ``benchmarks/band_regret.py`` (which chooses train.ensemble_distill's default)."""

import pytest
import torch

from benchmarks.band_regret import DECADES, Regret, band_regret, decade, robust_choice


def test_decades_put_80_and_older_together():
    assert decade(torch.tensor([0.0, 9.9, 10.0, 35.0, 79.0, 80.0, 116.0])).tolist() == [0, 0, 1, 3, 7, 8, 8]


def test_band_regret_is_the_paired_difference_of_absolute_errors_per_decade():
    truth = torch.tensor([5.0, 6.0, 7.0, 34.0, 35.0, 36.0, 37.0])
    reference = truth + torch.tensor([1.0, -1.0, 1.0, 2.0, -2.0, 2.0, -2.0])
    pred = truth + torch.tensor([0.0, 0.0, 0.0, 3.0, 3.0, -3.0, 4.0])
    r = band_regret(pred, reference, truth)
    assert r.n[0] == 3 and r.n[3] == 4 and sum(r.n) == 7 and len(r.gap) == DECADES
    assert r.gap[0] == pytest.approx(-1.0) and r.se[0] == pytest.approx(0.0)
    diff = torch.tensor([1.0, 1.0, 1.0, 2.0])  # |pred| - |reference| in the 30s
    assert r.gap[3] == pytest.approx(diff.mean().item())
    assert r.se[3] == pytest.approx((diff.std() / 2).item())
    assert r.worst == 3 and r.z == pytest.approx(r.gap[3] / r.se[3])
    assert r.gap[5] == 0.0 and r.n[5] == 0  # an empty decade is no regret


def _regret(gap: float, se: float) -> Regret:
    return Regret((-1.0,) * (DECADES - 1) + (gap,), (0.5,) * (DECADES - 1) + (se,), (100,) * DECADES)


def test_robust_choice_takes_the_smallest_weight_without_a_significant_regret():
    regrets = {0.0: _regret(1.0, 0.4), 1.0: _regret(1.1, 0.4), 4.0: _regret(1.0, 0.35),
               8.0: _regret(0.5, 0.3), 16.0: _regret(0.1, 0.25)}
    assert robust_choice(regrets) == 8.0  # 1.7 SE; 4 is 2.9 SE behind
    assert robust_choice(regrets, z=0.5) == 16.0
    # none qualifies: the least significant worst decade
    assert robust_choice({0.0: _regret(2.0, 0.4), 1.0: _regret(1.5, 0.5)}, z=1.0) == 1.0
