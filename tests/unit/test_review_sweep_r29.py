"""Round-29 review of the sweep and the recipe: one data source per sweep report, a deleted MLflow experiment is one
line (as the README says) in both, and the recipe's cross-dataset column is the MAE evaluate.external reports."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

import faceage.recipe as recipe
import faceage.sweep as sweep
from faceage.tracking import EXPERIMENT, mlflow_env, setup_mlflow

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def sample_runs(source: str | None) -> dict:
    """The runs file of a CPU sweep with ``--source source`` (None: without ``--source``)."""
    return {b: {"run_id": f"run-{b}", "overrides": sweep.sweep_overrides(b, "cpu", source)}
            for b in ("dlib_face", "resnet18", "resnet50")}


@pytest.fixture
def no_run(monkeypatch):
    """A `dvc exp run` that fails the test if it starts; every recorded run is taken as in this store, so the
    return code is the source check's."""
    def run_profile(overrides):
        raise AssertionError(f"dvc exp run started: {overrides}")

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "unknown_runs", lambda runs: [])
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler


@pytest.mark.parametrize("new_source", ["/data/appa-real-release.zip", None])
def test_a_partial_resweep_with_another_source_is_refused_before_the_first_run(tmp_path, no_run, caplog, new_source):
    """`--backbones resnet18 --source <full release>` on the sample's runs file trained, then wrote one report whose
    resnet18 row was scored on another test set than the rows it is ranked against (and the verdict drawn from
    them); without --source the run took the committed URL, the same mix."""
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(sample_runs("/data/appa-real-sample")))
    argv = ["--profile", "cpu", "--backbones", "resnet18", "--runs", str(runs)]
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(argv + (["--source", new_source] if new_source else [])) == 1
    assert "different data" in caplog.text and "resnet50" in caplog.text and "--source" in caplog.text
    assert json.loads(runs.read_text()) == sample_runs("/data/appa-real-sample")  # nothing recorded


def test_the_same_source_resweeps_and_a_mixed_runs_file_is_not_reported(tmp_path, monkeypatch, no_run, caplog):
    """The check refuses only a mix: the same --source sweeps again; `--report-only` on a runs file that mixes
    sources (written before this check, or merged by hand) is refused rather than ranked in one table."""
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(sample_runs("/data/a,b/sample")))

    class Started(Exception):
        pass

    def run_profile(overrides):
        raise Started

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    with pytest.raises(Started):
        sweep.main(["--profile", "cpu", "--backbones", "resnet18", "--source", "/data/a,b/sample", "--runs", str(runs)])
    mixed = {**sample_runs("/data/a,b/sample"), "resnet50": sample_runs(None)["resnet50"]}
    assert sweep.runs_source(sample_runs(None)) is None
    runs.write_text(json.dumps(mixed))
    written = []
    monkeypatch.setattr(sweep, "collect", lambda r: [])
    monkeypatch.setattr(sweep, "write_report", lambda *a: written.append(a))
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert written == [] and "different data" in caplog.text


def deleted_store(tmp_path: Path) -> str:
    """A sqlite store whose `face-age` experiment is deleted (the MLflow UI's bin icon); its URI."""
    import mlflow

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        setup_mlflow()
    client = mlflow.MlflowClient(uri)
    client.delete_experiment(client.get_experiment_by_name(EXPERIMENT).experiment_id)
    return uri


@pytest.mark.parametrize("argv", [["--report-only"],
                                  ["--profile", "cpu", "--backbones", "resnet18", "--source", "/data/sample"]])
def test_a_deleted_experiment_stops_the_sweep_in_one_line(tmp_path, monkeypatch, caplog, argv):
    """README ("Tracking"): a deleted `face-age` experiment stops "the sweep ... with one line naming its id and both
    fixes"; `--report-only`, and a partial sweep (which checks the runs it keeps), ended in a TrackingError
    traceback."""
    def run_profile(overrides):
        raise AssertionError(f"dvc exp run started: {overrides}")

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(sample_runs("/data/sample")))
    uri = deleted_store(tmp_path)
    with mlflow_env("MLFLOW_TRACKING_URI", uri), caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main([*argv, "--runs", str(runs)]) == 1
    assert "is deleted" in caplog.text and "mlflow experiments restore --experiment-id" in caplog.text


def test_a_deleted_experiment_stops_the_recipe_in_one_line(tmp_path, monkeypatch):
    """The recipe's setup_mlflow raised the TrackingError as a traceback; params.yaml errors were already one line."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(recipe, "setup_logging", lambda: None)
    uri = deleted_store(tmp_path)
    with mlflow_env("MLFLOW_TRACKING_URI", uri), pytest.raises(SystemExit) as exit_:
        recipe.main([])
    assert isinstance(exit_.value.code, str), "a traceback-free exit carries the message"
    assert exit_.value.code.startswith("TrackingError: ") and "is deleted" in exit_.value.code


def test_the_recipe_external_mae_is_against_the_apparent_age_as_evaluate_external(tmp_path):
    """The recipe's `<set> MAE` column (beside test MAE, an apparent-age MAE) scored the set against its real ages,
    where evaluate.external (the product's number, the docstring's "evaluate path") scores the apparent ones: on a
    folder in the release layout whose two labels differ, the column was another quantity than the one it names."""
    from PIL import Image

    from faceage.inference import AgeModel
    from tests.unit.test_predict import model_files

    files = model_files(tmp_path / "model")
    faces = tmp_path / "faces"
    (faces / "test").mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (apparent, real) in enumerate([(20.0, 60), (35.0, 10), (70.0, 30)]):
        crop = f"test/{i}.png"
        Image.fromarray(rng.integers(0, 255, (96, 96, 3), dtype=np.uint8)).save(faces / crop)
        rows.append(f"{i}.jpg,test,{crop},{apparent},3.0,{real}")
    (faces / "manifest.csv").write_text("file_name,split,crop,apparent_age,apparent_age_std,real_age\n"
                                        + "\n".join(rows) + "\n")
    external = object.__new__(recipe.External)  # its __init__ runs preprocess on a folder; this is what it leaves
    external.name, external.detector, external.work, external.faces = "set", files["detector"], tmp_path, faces
    external.features = {}
    model = AgeModel(files["checkpoint"], device="cpu")
    pred, _ = model.predict_crops([np.asarray(Image.open(faces / f"test/{i}.png")) for i in range(3)])
    apparent_mae = float(np.abs(pred - np.array([20.0, 35.0, 70.0])).mean())
    real_mae = float(np.abs(pred - np.array([60.0, 10.0, 30.0])).mean())
    assert abs(apparent_mae - real_mae) > 1  # the two labels tell the quantities apart
    assert external.mae(files["checkpoint"]) == pytest.approx(apparent_mae, abs=1e-3)


def test_a_backbone_typo_is_refused_before_the_first_run(tmp_path, no_run, caplog):
    """`--backbones resnet18 resnt50` trained resnet18 (hours on a GPU: 30 epochs at 224 px), then stopped at
    resnt50's first stage: the typo is now named, with the backbones available, before any run."""
    runs = tmp_path / "runs.json"
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--profile", "gpu", "--backbones", "resnet18", "resnt50", "--runs", str(runs)]) == 1
    assert "'resnt50'" in caplog.text and "resnet50" in caplog.text and not runs.exists()


@pytest.mark.parametrize("text", [None, "{not json"])
def test_report_only_on_a_missing_or_broken_runs_file_is_one_line(tmp_path, monkeypatch, caplog, text):
    """`--report-only --runs <typo>` (or outside the repo, where reports/sweep_runs.json is not) ended in a
    FileNotFoundError traceback; a truncated file in a JSONDecodeError one."""
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)
    runs = tmp_path / "runs.json"
    if text is not None:
        runs.write_text(text)
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--report-only", "--runs", str(runs)]) == 1
    assert str(runs) in caplog.text
