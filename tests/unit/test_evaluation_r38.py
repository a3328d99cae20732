"""Round 38 review of evaluation: metrics.json strict JSON (a faceless external set wrote NaN), and edge cases.

Real evaluations of the session's tiny trained checkpoint (``tiny_run``), real external sets cropped by the real
detector, real MLflow store.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

import pytest

from tests.conftest import own_run_file
from tests.unit.test_external import make_set, noise


def _strict(text: str) -> dict:
    """``json.loads`` refusing NaN and +-Infinity (what ``dvc metrics show``, MLflow's and browsers' readers take)."""
    def refuse(constant: str):
        raise ValueError(f"not JSON: {constant}")

    return json.loads(text, parse_constant=refuse)


def test_a_faceless_external_set_leaves_metrics_json_strict_json(tiny_run, tmp_path):
    """A set where no face is found wrote ``"mae_years": NaN`` (and RMSE, CS@5, baseline, calibration) into
    metrics.json: not JSON, which ``dvc metrics show`` and other strict readers refuse or show as ``nan``. Its
    metric keys are now left out (its counts kept, ``n_faces`` 0), as MLflow has its counts alone and the card ``-``."""
    from mlflow.tracking import MlflowClient

    from faceage.config import Params
    from faceage.evaluation import evaluate_model
    from faceage.tracking import mlflow_env, read_run_file

    blank = make_set(tmp_path / "blank", {"n.jpg": noise()})
    out, card = tmp_path / "eval", tmp_path / "reports" / "model_card.md"
    p = replace(Params().evaluate, external=(str(blank), str(tiny_run["external"])))
    root, run_file = tiny_run["root"], own_run_file(tiny_run, tmp_path)  # not the session's shared run
    with mlflow_env("MLFLOW_TRACKING_URI", tiny_run["tracking_uri"]):
        evaluate_model(tiny_run["model"], tiny_run["faces"], out, p, run_path=run_file,
                       history_csv=root / "reports" / "history.csv", data_dir=tiny_run["data"],
                       preprocess_metrics=root / "preprocess.json", model_card=card, detector_dir=tiny_run["detector"],
                       external_cache=tiny_run["external_cache"])
    written = _strict((out / "metrics.json").read_text())
    [other] = set(written["external"]) - {"blank"}
    blank_m, utk = written["external"]["blank"], written["external"][other]
    assert (blank_m["n_images"], blank_m["n_faces"], blank_m["no_face"]) == (1, 0, 1)
    assert not {"mae_years", "rmse_years", "cs5", "baseline_mae_years", "coverage_1std"} & set(blank_m)
    assert blank_m["sha256"] and blank_m["mae_by_age_group"] == {}
    assert utk["n_faces"] > 0 and math.isfinite(utk["mae_years"])  # the other set scored as usual
    metrics = MlflowClient(tiny_run["tracking_uri"]).get_run(read_run_file(run_file)["run_id"]).data.metrics
    assert metrics["external_blank_n_faces"] == 0 and "external_blank_mae" not in metrics
    row = next(line for line in card.read_text().splitlines() if line.startswith("| `blank` |"))
    assert row == "| `blank` | 1 | 0 | 1 | 0 | - | - | - | - |"


def test_metrics_json_writes_an_undefined_number_as_null():
    """The test split's own NaN (a one-face test split's ratio to a zero baseline, a model that output NaN) went into
    metrics.json as ``NaN`` too; it is ``null`` now (the in-memory value stays NaN: MLflow and the card read it)."""
    from faceage.evaluation import metrics_json

    metrics = {"mae_years": math.nan, "baseline_mae_years": 0.0, "mae_vs_baseline": math.nan, "cs5": 1.0,
               "rmse_years": math.inf, "mae_by_age_group": {"20-29": math.nan}, "n_test_faces": 1,
               "external": {"blank": {"mae_years": math.nan, "n_faces": 0, "n_images": 2, "mae_by_age_group": {}},
                            "some": {"mae_years": 3.0, "cs5": math.nan, "n_faces": 4, "n_images": 4}}}
    written = _strict(metrics_json(metrics))
    assert written["mae_years"] is None and written["mae_vs_baseline"] is None and written["rmse_years"] is None
    assert written["mae_by_age_group"] == {"20-29": None} and written["cs5"] == 1.0
    assert written["external"]["blank"] == {"n_faces": 0, "n_images": 2, "mae_by_age_group": {}}
    assert written["external"]["some"] == {"mae_years": 3.0, "cs5": None, "n_faces": 4, "n_images": 4}
    assert math.isnan(metrics["mae_years"]) and math.isnan(metrics["external"]["blank"]["mae_years"])


def _left_by_a_killed_run(out: Path) -> Path:
    """A staging folder of evaluate's (``scratch_dir(out / "metrics.json", "new")``) made by a process that then
    died without cleaning up, as ``kill -9`` leaves it (tests/integration/test_evaluate_r38.py kills the stage)."""
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from faceage.atomic import scratch_name; "
            "p = scratch_name(Path(sys.argv[1]) / 'metrics.json', 'new'); p.mkdir(); "
            "(p / 'predictions.csv').write_text('x'); print(p)")
    done = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True, check=True,
                          cwd=Path(__file__).resolve().parents[2])
    return Path(done.stdout.strip())


def test_an_evaluate_that_fails_early_still_removes_a_killed_runs_staging_folder(tmp_path):
    """The staging folder of an evaluate killed with SIGKILL (a copy of every output) was removed only once a later
    evaluation reached its own staging, minutes in: a rerun that stopped before (a wrong evaluate.external path, a
    missing checkpoint) left it, and the next, beside every output. It is removed at the start now."""
    from faceage.config import EvaluateParams
    from faceage.evaluation import evaluate_model
    from faceage.sources import ExternalSetError

    out = tmp_path / "eval"
    out.mkdir()
    stale = _left_by_a_killed_run(out)
    assert stale.is_dir()
    with pytest.raises(ExternalSetError):
        evaluate_model(tmp_path / "model.pt", tmp_path / "faces", out,
                       EvaluateParams(external=(str(tmp_path / "no-such-set"),)), detector_dir=tmp_path)
    assert not stale.exists()
