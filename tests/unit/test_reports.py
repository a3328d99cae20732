"""The sweep report and recipe tables: the conclusion follows the numbers given."""

import pytest

from faceage.recipe import _table
from faceage.external import external_maes
from faceage.sweep import _conclusion, write_report


def row(backbone, gflops, params_m, test_mae):
    return {"backbone": backbone, "run_id": "0123456789abcdef", "overrides": [], "params_m": params_m,
            "gflops": gflops, "image_size": 64, "epochs": 5, "train_time_s": 60.0, "val_mae": test_mae,
            "test_mae": test_mae, "cs5": 0.4, "coverage_1std": 0.7, "baseline_mae": 21.7}


def test_saturation_verdict_follows_the_numbers(tmp_path):
    flat = [row("resnet18", 0.30, 11.2, 12.9), row("resnet34", 0.60, 21.3, 14.2), row("resnet50", 0.67, 23.7, 17.3),
            row("mobilenet_v3_large", 0.04, 4.3, 22.1), row("dlib_face", 0.0002, 0.1, 5.2)]
    text = _conclusion(flat)
    assert "**no gain from size: saturated**" in text and "`dlib_face`) reaches 5.20" in text
    assert "`resnet18` 12.90 -> `resnet34` 14.20 -> `resnet50` 17.30: depth alone does not lower" in text
    assert "`mobilenet_v3_large` stayed near the always-the-training-mean baseline (21.70)" in text
    improving = [row("resnet18", 0.3, 11.2, 12.0), row("resnet34", 0.6, 21.3, 10.0), row("resnet50", 0.67, 23.7, 9.0)]
    assert "**bigger backbones reduce the error**" in _conclusion(improving)
    write_report(flat, tmp_path / "b.md", tmp_path / "b.png", "cpu")
    md = (tmp_path / "b.md").read_text()
    assert "| `dlib_face` |" in md and "train.image_size=64" in md and (tmp_path / "b.png").stat().st_size > 1000


def test_recipe_table_shows_the_change_against_default():
    rows = [{"variant": "default", "val_mae": 5.0, "test_mae": 5.2, "coverage_1std": 0.7, "coverage_2std": 0.93,
             "run_id": "abcdef123456"},
            {"variant": "loss=expectation_l1", "val_mae": 5.1, "test_mae": 5.5, "coverage_1std": float("nan"),
             "coverage_2std": 0.9, "run_id": "-"}]
    table = _table(rows)
    assert "| loss=expectation_l1 | 5.10 | 5.50 | +0.30 | - | 0.900 | `-` |" in table
    assert "| default | 5.00 | 5.20 | +0.00 | 0.700 | 0.930 | `abcdef12` |" in table


def test_sweep_report_has_a_column_per_external_set(tmp_path):
    logged = {"external_utk_external_mae": 9.4, "external_utk_external_baseline_mae": 20.0,
              "external_utk_external_mae_70plus": 15.0, "external_utk_external_n_faces": 1650.0,
              "external_utk_external_cs5": 0.3, "test_mae_years": 5.2}
    assert external_maes(logged) == {"utk_external": 9.4}
    rows = [{**row("dlib_face", 0.0002, 0.1, 5.2), "external": external_maes(logged)},
            {**row("resnet18", 0.30, 11.2, 12.9), "external": {}}]
    write_report(rows, tmp_path / "b.md", tmp_path / "b.png", "cpu")
    md = (tmp_path / "b.md").read_text()
    assert "| CS@5 | `utk_external` MAE | MLflow run |" in md
    assert "| 5.20 | 0.400 | 9.40 | `01234567` |" in md and "| 12.90 | 0.400 | - | `01234567` |" in md


def test_sweep_report_shows_the_pretrained_age_network_as_a_face_network(tmp_path):
    rows = [{**row("dlib_age", 0.05, 6.3, 4.9), "external": {"utk_external": 7.86}},
            row("resnet18", 0.30, 11.2, 12.9), row("resnet34", 0.60, 21.3, 14.2), row("resnet50", 0.67, 23.7, 17.3)]
    text = _conclusion(rows)
    assert ("(`dlib_age`, frozen, with dlib's face descriptor, an ensemble of heads trained here) reaches 4.90 years, "
            "`utk_external` 7.86") in text
    assert "CNNs trained here: test MAE 12.90-17.30" in text  # dlib_age is not counted among the CNNs
    write_report(rows, tmp_path / "b.md", tmp_path / "b.png", "cpu")
    assert "| `dlib_age` | 6.30 | 0.050 | 64 + 150 (aligned chips) |" in (tmp_path / "b.md").read_text()


def test_the_gpu_profiles_report_describes_its_own_runs(tmp_path):
    """--profile gpu wrote the CPU profile's text: "from scratch: no ImageNet weights", "the shared
    2,100-face sample, not APPA-REAL", "a 2-core machine"."""
    rows = [{**row(b, g, n, m), "external": {}, "data_source": "http://158.109.8.102/AppaRealAge/appa-real-release.zip",
             "device": "cuda", "threads": "16"}
            for b, g, n, m in (("resnet18", 1.8, 11.2, 5.1), ("resnet34", 3.6, 21.3, 5.3), ("resnet50", 4.1, 23.5, 5.4))]
    write_report(rows, tmp_path / "b.md", tmp_path / "b.png", "gpu")
    md = (tmp_path / "b.md").read_text()
    for cpu_only in ("from scratch", "2,100", "2-core", "What was cut to fit a CPU", "downloaded here"):
        assert cpu_only not in md
    assert "in 5 epochs from ImageNet weights" in md and "`train.pretrained=imagenet" in md
    assert "trained on cuda; data (`fetch_data.source`): `http://158.109.8.102/AppaRealAge/appa-real-release.zip`" in md
    cpu = [{**r, "device": "cpu", "threads": "2", "data_source": "/data/sample"} for r in rows]
    write_report(cpu, tmp_path / "c.md", tmp_path / "c.png", "cpu")
    md = (tmp_path / "c.md").read_text()
    assert "in 5 epochs from scratch" in md and "cpu (2 torch threads)" in md and "`/data/sample`" in md


def test_the_report_takes_its_profile_from_the_runs_not_the_flag(tmp_path, monkeypatch, capfd):
    """`--report-only` after a GPU sweep (without --profile) described the runs as the CPU profile's.

    The runs are made up: ``unknown_runs`` (which refuses runs this MLflow store does not hold, a fresh
    clone's committed file; test_sweep_r25.py) is stubbed to find them all, so each return code is the
    profile's.
    """
    import json

    import faceage.sweep as sweep

    gpu = {b: {"run_id": b, "overrides": [f"train.backbone={b}", *sweep.PROFILES["gpu"]["cnn"]]}
           for b in ("resnet18", "resnet34", "resnet50")}
    gpu["dlib_face"] = {"run_id": "f", "overrides": ["train.backbone=dlib_face"]}
    assert sweep.runs_profile(gpu, "cpu") == "gpu"
    assert sweep.runs_profile({"dlib_face": gpu["dlib_face"]}, "cpu") == "cpu"  # no CNN: the flag
    mixed = {**gpu, "resnet50": {"run_id": "x", "overrides": ["train.backbone=resnet50", *sweep.PROFILES["cpu"]["cnn"]]}}
    with pytest.raises(ValueError, match="different profiles .*resnet50: cpu"):
        sweep.runs_profile(mixed, "cpu")
    runs = tmp_path / "runs.json"
    runs.write_text(json.dumps(gpu))
    written = []
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "collect", lambda r: [])
    monkeypatch.setattr(sweep, "write_report", lambda rows, md, png, profile: written.append(profile))
    monkeypatch.setattr(sweep, "unknown_runs", lambda runs: [])
    assert sweep.main(["--report-only", "--runs", str(runs)]) == 0 and written == ["gpu"]
    runs.write_text(json.dumps(mixed))
    capfd.readouterr()
    assert sweep.main(["--report-only", "--runs", str(runs)]) == 1 and written == ["gpu"]
    assert "different profiles" in capfd.readouterr().err
