"""The sweep's source override reaches params.yaml unchanged; a failed run is a message; the GPU instructions hold;
what would stop the report stops the sweep before its first run; it runs at the repo root from any folder."""

import json
import logging
import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

import faceage.sweep as sweep
from faceage.config import load_params

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("source", ["/data/appa-real-release.zip", "/data/Jürgen/appa-real-release.zip",
                                    "/data/a,b/appa.zip", "/data/[2024]/appa.zip", "/data/k=v/appa.zip",
                                    "/data/my datasets/appa.zip"])
def test_the_source_reaches_params_yaml_unchanged_in_the_gpu_profile(tmp_path, monkeypatch, source):
    """--source went into `-S fetch_data.source=<path>` unquoted: Hydra's LexerNoViableAltException on ü , [ ] =."""
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    calls = []

    def run_profile(overrides):  # what `dvc exp run -S` does to params.yaml (DVC's own override code)
        calls.append(overrides)
        apply_overrides(params, overrides)

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "read_run_file", lambda path: {"run_id": "abc"})
    runs = sweep.run_sweep(["resnet18"], "gpu", source, tmp_path / "runs.json")
    assert load_params(params).fetch_data.source == source
    assert runs["resnet18"]["overrides"] == calls[0]
    assert "train.pretrained=imagenet" in calls[0]


def test_a_failed_dvc_exp_run_is_a_message_and_a_nonzero_exit(tmp_path, monkeypatch, caplog):
    def run_profile(overrides):
        raise subprocess.CalledProcessError(2, ["dvc", "exp", "run"])

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler
    runs = tmp_path / "runs.json"
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--profile", "gpu", "--source", "/data/a,b.zip", "--runs", str(runs)]) == 2
    assert "`dvc exp run` failed (exit 2)" in caplog.text and str(runs) in caplog.text


def test_the_gpu_instructions_pass_the_source_to_the_sweep(tmp_path):
    """The report said `dvc exp run -S fetch_data.source=...` then `--profile gpu`, whose runs put back the
    committed URL (each runs on the committed params.yaml)."""
    row = {"backbone": "resnet18", "run_id": "0123456789", "overrides": [], "params_m": 11.2, "gflops": 1.8,
           "image_size": 224, "epochs": 30, "train_time_s": 100.0, "val_mae": 5.0, "test_mae": 5.5, "cs5": 0.6,
           "coverage_1std": 0.7, "baseline_mae": 12.0, "external": {}}
    md = tmp_path / "backbones.md"
    sweep.write_report([row], md, tmp_path / "backbones.png", "gpu")
    text = md.read_text()
    assert "python -m faceage.sweep --profile gpu --source /abs/path/appa-real-release.zip" in text
    assert "dvc exp run -S fetch_data.source" not in text


class Stop(Exception):
    """Raised by a fake `dvc exp run` once the test has what it wanted."""


def cpu_runs() -> dict:
    return {b: {"run_id": f"run-{b}", "overrides": [f"train.backbone={b}", *sweep.PROFILES["cpu"][kind]]}
            for b, kind in (("dlib_face", "face"), ("resnet18", "cnn"), ("resnet50", "cnn"))}


@pytest.fixture
def no_run(monkeypatch):
    """A `dvc exp run` that fails the test if it starts."""
    def run_profile(overrides):
        raise AssertionError(f"dvc exp run started: {overrides}")

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler


def test_a_profile_mix_is_refused_before_the_first_run(tmp_path, no_run, caplog):
    """`--profile gpu --backbones resnet18` on the CPU sweep's runs file trained (hours on a GPU), then refused to
    write the report: one report cannot describe both profiles."""
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(cpu_runs()))
    with caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--profile", "gpu", "--backbones", "resnet18", "--runs", str(runs)]) == 1
    assert "different profiles" in caplog.text and "resnet18: gpu" in caplog.text


def test_runs_this_mlflow_store_does_not_hold_are_refused_before_the_first_run(tmp_path, monkeypatch, no_run, caplog):
    """A fresh clone's `--backbones resnet18` trained, then failed with MlflowException 'Run with id=df3fb03e... not
    found': the committed reports/sweep_runs.json names the runs of the machine that wrote it."""
    from faceage.tracking import mlflow_env

    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(cpu_runs()))
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"), \
            caplog.at_level(logging.ERROR, logger="faceage.sweep"):
        assert sweep.main(["--profile", "cpu", "--backbones", "resnet18", "--runs", str(runs)]) == 1
        assert "not in sqlite:///" in caplog.text and "(dlib_face, resnet50)" in caplog.text

        def run_profile(overrides):  # every recorded backbone swept again: nothing of another store is read
            raise Stop

        monkeypatch.setattr(sweep, "run_profile", run_profile)
        with pytest.raises(Stop):
            sweep.main(["--profile", "cpu", "--backbones", "dlib_face", "resnet18", "resnet50", "--runs", str(runs)])


def test_from_a_subdirectory_the_sweep_reads_and_writes_at_the_repo_root(tmp_path, monkeypatch):
    """The experiment ran at the DVC root, then the sweep crashed: FileNotFoundError 'models/run.json'."""
    (tmp_path / ".dvc").mkdir()
    (tmp_path / "models").mkdir()
    (tmp_path / "stages").mkdir()
    monkeypatch.chdir(tmp_path / "stages")

    def run_profile(overrides):  # what `dvc exp run` leaves: the run file at the root
        (tmp_path / "models" / "run.json").write_text(json.dumps({"run_id": "abc"}))

    monkeypatch.setattr(sweep, "run_profile", run_profile)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)
    monkeypatch.setattr(sweep, "collect", lambda runs: [])
    written = []
    monkeypatch.setattr(sweep, "write_report", lambda rows, md, png, profile: written.append(Path(md).resolve()))
    assert sweep.main(["--profile", "cpu", "--backbones", "resnet18"]) == 0
    assert json.loads((tmp_path / "reports" / "sweep_runs.json").read_text())["resnet18"]["run_id"] == "abc"
    assert written == [(tmp_path / "reports" / "backbones.md").resolve()]
    assert Path.cwd() == (tmp_path / "stages").resolve()
