"""Round-30 review of evaluation: labels that are not ages, NaN predictions in the shares, a zero baseline."""

from __future__ import annotations

import math

import numpy as np
import pytest

import faceage.evaluation as evaluation
from faceage.config import EvaluateParams
from faceage.data import SplitDataError
from faceage.evaluation import _labels, age_group, age_metrics, coverage, errors_by_group
from tests.unit.test_mutants_r26 import two_face_external_set


@pytest.mark.parametrize("age", [math.nan, -1.0, -0.001, math.inf, -math.inf])
def test_age_group_refuses_a_value_that_is_not_an_age(age):
    """age_group(nan) and age_group(-1) were "0-9" and age_group(inf) "70+": a bad label was binned silently."""
    with pytest.raises(ValueError, match=r"finite number >= 0"):
        age_group(age)


def test_age_group_bins_real_ages_as_before():
    assert [age_group(a) for a in (0, 9.99, 10, 69.9, 70, 116)] == ["0-9", "0-9", "10-19", "60-69", "70+", "70+"]


@pytest.mark.parametrize("text", ["nan", "-3", "inf"])
def test_a_label_that_is_not_an_age_is_an_error_naming_the_face(text):
    """A NaN label entered every metric (MAE NaN) and the 0-9 group; a negative one was scored and binned as 0-9."""
    rows = [{"file_name": "ok.jpg", "apparent_age": "20"}, {"file_name": "bad.jpg", "apparent_age": text}]
    with pytest.raises(SplitDataError, match=rf"'bad.jpg'.*apparent_age={text!r}"):
        _labels(rows, "apparent_age")
    assert _labels(rows[:1], "apparent_age").tolist() == [20.0]


def test_an_external_set_with_a_nan_label_names_the_face(tmp_path, monkeypatch):
    rows = [{"file_name": "a.jpg", "apparent_age": "20"}, {"file_name": "b.jpg", "apparent_age": "nan"}]
    model, ext = two_face_external_set(monkeypatch, tmp_path, rows)
    with pytest.raises(SplitDataError, match=r"external set 'utk'.*'b.jpg'"):
        evaluation.evaluate_external(model, [ext], EvaluateParams(low_res=()), tmp_path, 50.0)


def test_a_nan_prediction_makes_the_shares_nan_like_the_mae():
    """A model that output NaN for a face had MAE NaN (so packaging excludes it) but CS@5 0.5 and coverage 0.5:
    NaN compares False, so the face counted as a plain miss and the headline share looked like a real one."""
    pred, true, std = np.array([30.0, math.nan]), np.array([28.0, 40.0]), np.array([3.0, 3.0])
    m = age_metrics(pred, true)
    assert math.isnan(m["mae_years"]) and math.isnan(m["rmse_years"]) and math.isnan(m["cs5"])
    assert math.isnan(coverage(pred, std, true, 1.0))
    assert math.isnan(coverage(np.array([30.0, 38.0]), np.array([3.0, math.nan]), true, 1.0))
    # finite predictions: the shares as before, the 5-year line included
    assert age_metrics(np.array([25.0, 46.0]), np.array([20.0, 40.0]))["cs5"] == 0.5
    assert coverage(np.array([30.0, 38.0]), np.array([2.0, 1.0]), true, 1.0) == 0.5


def test_the_ratio_to_a_zero_baseline_is_nan_not_a_crash():
    """One test face (or all of them) at the training mean: the baseline MAE is 0 and evaluate stopped with a
    ZeroDivisionError after scoring, before writing anything."""
    from faceage.evaluation import vs_baseline

    assert math.isnan(vs_baseline(3.0, 0.0))
    assert vs_baseline(3.0, 12.0) == 0.25


def test_one_face_gives_one_group_and_finite_metrics():
    pred, true = np.array([31.0]), np.array([28.0])
    assert errors_by_group(pred, true) == [{"group": "20-29", "n": 1, "mae_years": 3.0, "bias_years": 3.0}]
    assert age_metrics(pred, true) == {"mae_years": 3.0, "rmse_years": 3.0, "cs5": 1.0}
