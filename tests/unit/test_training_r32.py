"""Review round 32 of training: the number of training processes checked against the machine before any starts
(more CUDA ranks than visible GPUs is one ConfigError line, not torch's "invalid device ordinal" in every rank;
more CPU ranks than cores is one warning), and ``train.head: auto`` logged to MLflow as the head it resolved to.

No GPU here: CUDA's availability and device count are simulated with monkeypatch (unit level only). The MLflow
store is a real sqlite one in the test's tmp_path.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
import yaml

from faceage.config import ConfigError, TrainParams
from tests.unit.test_training_r30 import store  # noqa: F401 - the fixture

FIXTURES = (store,)  # pytest finds the fixture by its name in this module
REPO = Path(__file__).resolve().parents[2]
TORCHRUN_ENV = ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE", "FACEAGE_TRAIN_LAUNCHER_PID")


def _stage():
    spec = importlib.util.spec_from_file_location("faceage_stage_train_r32", REPO / "stages" / "train.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _argv(tmp_path: Path, **train) -> list[str]:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(batch_size=64, **train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    missing = tmp_path / "absent"
    return ["--params", str(path), "--faces", str(missing), "--embeddings", str(missing / "e.npz"), "--detector",
            str(missing), "--model", str(tmp_path / "model.pt"), "--reports", str(tmp_path / "reports"),
            "--run-file", str(tmp_path / "run.json"), "--state", str(tmp_path / "state.pt")]


@pytest.fixture
def launches(tmp_path, monkeypatch):
    """The stage run plainly (no torchrun around it), its relaunch recorded instead of started."""
    from faceage import launch, logs

    monkeypatch.setattr(logs, "setup_logging", lambda: None)  # (its basicConfig(force=True) drops caplog's handler)
    for key in TORCHRUN_ENV:
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    calls = []
    monkeypatch.setattr(launch, "relaunch", lambda n, script, argv: calls.append(n))
    return calls


def _gpus(monkeypatch, count: int) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: count > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)

    def set_device(device):  # what torch does for an ordinal past the GPUs (the error users saw)
        if torch.device(device).index >= count:
            raise RuntimeError("CUDA error: invalid device ordinal")

    monkeypatch.setattr(torch.cuda, "set_device", set_device)


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_more_cuda_processes_than_gpus_is_one_line_before_any_process_starts(tmp_path, monkeypatch, launches,
                                                                               device):
    """train.nproc_per_node=4 on 2 GPUs started 4 processes, each failing in torch with "invalid device ordinal"."""
    _gpus(monkeypatch, 2)
    with pytest.raises(ConfigError) as e:
        _stage().main(_argv(tmp_path, device=device, nproc_per_node=4))
    message = str(e.value)
    assert "train.nproc_per_node=4" in message and "2 GPU" in message and "\n" not in message, message
    assert launches == [], "processes were started"
    _stage().main(_argv(tmp_path, device=device, nproc_per_node=2))
    assert launches == [2]


def test_a_torchrun_started_by_hand_with_more_ranks_than_gpus_is_one_line_not_invalid_device_ordinal(monkeypatch):
    """``torchrun --nproc_per_node=4 stages/train.py`` on 2 GPUs: rank 3 failed in torch.cuda.set_device."""
    from faceage import training

    _gpus(monkeypatch, 2)
    monkeypatch.setattr(training.dist, "init_process_group", lambda *a, **k: None)
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    for key, value in {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "4", "LOCAL_WORLD_SIZE": "4"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError, match=r"4 .*2 GPU"):
        training.init_distributed(TrainParams(device="cuda", nproc_per_node=1, batch_size=64))


def test_more_cpu_processes_than_cores_warns_once_naming_the_setting_and_the_cores(tmp_path, monkeypatch, launches,
                                                                                   caplog):
    """4 gloo ranks on 2 cores trained many times slower than 1, without a word."""
    from faceage import training

    _gpus(monkeypatch, 0)
    monkeypatch.setattr(training, "usable_cores", lambda: 2)
    with caplog.at_level(logging.WARNING):
        _stage().main(_argv(tmp_path, device="cpu", nproc_per_node=4))
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert launches == [4]
    assert len(warnings) == 1, warnings
    assert "train.nproc_per_node=4" in warnings[0] and "2 CPU core" in warnings[0], warnings[0]
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        _stage().main(_argv(tmp_path, device="cpu", nproc_per_node=2))
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]


def test_the_relaunched_ranks_do_not_warn_again_but_a_hand_started_torchrun_warns_once(tmp_path, monkeypatch,
                                                                                        launches, caplog):
    """Each rank of a torchrun started by hand (``torchrun --nproc_per_node=4`` on 2 cores) checks; one warns."""
    from faceage import training

    _gpus(monkeypatch, 0)
    monkeypatch.setattr(training, "usable_cores", lambda: 2)
    trained = []
    monkeypatch.setattr(training, "train_model", lambda *a, **k: trained.append(1))
    argv = _argv(tmp_path, device="cpu", nproc_per_node=1)

    def warnings(rank: int, relaunched: bool) -> list[str]:
        for key, value in {"RANK": rank, "LOCAL_RANK": rank, "WORLD_SIZE": 4, "LOCAL_WORLD_SIZE": 4}.items():
            monkeypatch.setenv(key, str(value))
        if relaunched:
            monkeypatch.setenv("FACEAGE_TRAIN_LAUNCHER_PID", "1")
        else:
            monkeypatch.delenv("FACEAGE_TRAIN_LAUNCHER_PID", raising=False)
        caplog.clear()
        with caplog.at_level(logging.WARNING):
            _stage().main(argv)
        return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]

    assert warnings(0, relaunched=True) == [] and warnings(1, relaunched=True) == []
    assert warnings(1, relaunched=False) == []
    (line,) = warnings(0, relaunched=False)
    assert "torchrun --nproc_per_node=4" in line and "2 CPU core" in line, line
    assert len(trained) == 4 and launches == []


def test_head_auto_is_logged_with_the_head_it_resolved_to(tmp_path, store):  # noqa: F811 - the fixture
    """``train.head: auto`` was the only head in MLflow's params: runs of the fused head and of dlib's own
    (fine-tuned, or zero-shot at epochs 0) looked alike in ``mlflow ui``."""
    from faceage.training import Distributed, _Tracker

    crop = {"data_sha256": "d" * 64, "data_source": "synthetic"}
    expected = {TrainParams(backbone="dlib_age", head="auto", epochs=2): "fused",
                TrainParams(backbone="dlib_age", head="auto", epochs=0): "pretrained",
                TrainParams(backbone="dlib_age", head="auto", epochs=2, freeze_blocks=2): "pretrained",
                TrainParams(backbone="dlib_age", head="ensemble", epochs=2): "ensemble"}
    for i, (p, head) in enumerate(expected.items()):
        tracker = _Tracker(p, Distributed(), crop, torch.device("cpu"), 0, 1, f"fp{i}", None, tmp_path / f"s{i}.pt")
        with tracker.run() as state:
            run_id = state.run_id
        params = store.get_run(run_id).data.params
        assert params["train.head"] == p.head and params["train.head_resolved"] == head, params
    tracker = _Tracker(TrainParams(), Distributed(), crop, torch.device("cpu"), 0, 1, "fpx", None, tmp_path / "x.pt")
    with tracker.run() as state:
        run_id = state.run_id
    assert "train.head_resolved" not in store.get_run(run_id).data.params  # a torchvision backbone has no head choice
