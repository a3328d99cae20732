"""The sweep's source override reaches params.yaml unchanged; a failed run is a message; the GPU instructions hold."""

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
