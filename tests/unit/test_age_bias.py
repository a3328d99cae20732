"""The per-age-bin bias table of ``benchmarks/age_bias.py``."""

import pytest
import torch

from benchmarks.age_bias import by_age, priced_shift


def test_by_age_gives_each_bins_mean_truth_prediction_and_mae():
    truth = torch.tensor([1.0, 2.0, 16.0, 17.0, 85.0, 95.0])
    pred = torch.tensor([2.0, 2.0, 22.0, 20.0, 75.0, 80.0])
    bins = by_age(pred, truth, edges=(0, 3, 15, 80))
    assert [b.name for b in bins] == ["0-2", "3-14", "15-79", "80+"]
    assert [b.n for b in bins] == [2, 0, 2, 2]
    assert bins[0].truth == pytest.approx(1.5) and bins[0].pred == pytest.approx(2.0)
    assert bins[0].mae == pytest.approx(0.5) and bins[0].bias == pytest.approx(0.5)
    assert bins[2].bias == pytest.approx(4.5) and bins[2].mae == pytest.approx(4.5)
    assert bins[3].bias == pytest.approx(-12.5) and bins[3].mae == pytest.approx(12.5)  # the top bin is open
    assert bins[1].n == 0 and bins[1].truth != bins[1].truth  # NaN: no faces


def test_priced_shift_replaces_only_the_young_bins_mae():
    edges = (0, 10, 20)
    ext = by_age(torch.tensor([9.0, 9.0, 30.0, 50.0]), torch.tensor([5.0, 5.0, 25.0, 45.0]), edges)  # MAE 4, -, 5
    ref = by_age(torch.tensor([6.0, 12.0, 30.0]), torch.tensor([5.0, 11.0, 20.0]), edges)  # MAE 1, 1, 10
    assert priced_shift(ext, ref, young=10) == pytest.approx((2 * 1.0 + 2 * 5.0) / 4)
    assert priced_shift(ext, ref, young=0) == pytest.approx((2 * 4.0 + 2 * 5.0) / 4)
