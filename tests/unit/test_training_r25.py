"""Round-25 review of training's distributed paths: what a relaunched (``train.nproc_per_node > 1``) or torchrun
stage does when its launcher is killed, when a process fails, when it gets SIGTERM, and when the params are wrong.

No network is trained and no shared data is read: the workers either fail at once (a missing faces folder) or
run a stand-in ``train_model`` that opens the MLflow run (a sqlite store in tmp_path) and waits.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO
from tests.unit.test_tracking_r24 import _SIGTERM_TRAIN as _WORKER  # the stage, its train_model waiting in its run

STAGE = REPO / "stages" / "train.py"


def _params(tmp_path: Path, **train) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["train"].update(device="cpu", **train)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _args(tmp_path: Path, params: Path) -> list[str]:
    missing = tmp_path / "absent"
    return ["--params", str(params), "--faces", str(missing), "--embeddings", str(missing / "e.npz"), "--detector",
            str(missing), "--model", str(tmp_path / "model.pt"), "--reports", str(tmp_path / "reports"),
            "--run-file", str(tmp_path / "run.json"), "--state", str(tmp_path / "state.pt")]


def _alive(pid: int) -> bool:
    """Running (a zombie left to a parent that does not reap it counts as ended)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def _workers(pid: int) -> list[int]:
    """The training processes ``pid`` has started: its children running the train stage. Not any child: an
    import runs ``ldconfig -p`` (ctypes' find_library) before the stage's SIGTERM handler is set."""
    kids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
                cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid and str(STAGE).encode() in cmdline:
                kids.append(int(entry.name))
    return kids


# The worker (_WORKER, above) runs the stage with a train_model that opens the MLflow run and waits, as a worker
# does while it trains; the launcher: starts the worker as torchrun's SubprocessHandler does, prints its PID, waits for it.
_LAUNCHER = """
import os, subprocess, sys
env = {**os.environ, "LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "1", "LOCAL_WORLD_SIZE": "1",
       "TORCHELASTIC_RUN_ID": "test", "FACEAGE_TRAIN_LAUNCHER_PID": str(os.getpid())}
worker = subprocess.Popen([sys.executable, "-c", sys.argv[1], *sys.argv[3:]], env=env, start_new_session=True,
                          stdout=open(sys.argv[2], "w"), stderr=subprocess.STDOUT)
print(worker.pid, flush=True)
worker.wait()
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the launcher watch is Linux's PR_SET_PDEATHSIG")
def test_a_worker_whose_launcher_is_killed_outright_stops_and_ends_its_run_killed(tmp_path):
    """kill -9 of `python stages/train.py` with train.nproc_per_node=2 (or of torchrun) left both workers training
    in sessions of their own: they wrote the state, the outputs and the MLflow run beside the rerun's workers."""
    import mlflow

    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    out = tmp_path / "worker.log"
    env = {**os.environ, "MLFLOW_TRACKING_URI": store}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    launcher = subprocess.Popen([sys.executable, "-c", _LAUNCHER, _WORKER % str(STAGE), str(out),
                                 *_args(tmp_path, _params(tmp_path))],
                                cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)
    worker = None
    try:
        worker = int(launcher.stdout.readline())
        deadline = time.monotonic() + 60
        while "RUN " not in out.read_text() and time.monotonic() < deadline and _alive(worker):
            time.sleep(0.1)
        assert "RUN " in out.read_text(), out.read_text()[-3000:]
        run_id = out.read_text().split("RUN ", 1)[1].split()[0]
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 30
        while _alive(worker) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _alive(worker), "the worker trains on after its launcher was killed"
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
        if worker is not None and _alive(worker):
            os.kill(worker, signal.SIGKILL)
    assert mlflow.MlflowClient(store).get_run(run_id).info.status == "KILLED"
    assert (tmp_path / "state.pt").is_file()  # the rerun continues it
    assert "stopped by SIGTERM" in out.read_text()


def _relaunch(tmp_path: Path) -> subprocess.Popen:
    """`python stages/train.py` with train.nproc_per_node=2: it relaunches 2 processes (a missing faces folder)."""
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    for key in ("LOCAL_RANK", "RANK", "WORLD_SIZE", "LOCAL_WORLD_SIZE"):
        env.pop(key, None)
    return subprocess.Popen([sys.executable, str(STAGE), *_args(tmp_path, _params(tmp_path, nproc_per_node=2))],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_failed_process_is_one_line_not_torchs_traceback(tmp_path):
    """A process's error (logged by that process) was followed by torch's ChildFailedError traceback and its
    ======== table in the relaunching process."""
    proc = _relaunch(tmp_path)
    try:
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 1, err[-3000:]
    assert "ChildFailedError" not in err and "Root Cause" not in err, err[-3000:]
    assert "TrainProcessesFailedError: train: " in err and "rank 0" in err, err[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the relaunched processes")
def test_sigterm_to_the_relaunching_process_stops_the_stage_as_without_torchrun(tmp_path):
    """SIGTERM reached torch's handler, which raised its SignalException: a traceback and exit code 1 instead of
    "stopped by SIGTERM" and death by the signal (what DVC, shells and the one-process stage give)."""
    proc = _relaunch(tmp_path)
    try:
        deadline = time.monotonic() + 60
        while not _workers(proc.pid) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _workers(proc.pid), proc.communicate(timeout=60)[1][-3000:]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM, err[-3000:]
    assert "SignalException" not in err and "Traceback" not in err.split("stopped by SIGTERM")[-1], err[-3000:]
    assert "stopped by SIGTERM" in err


INVALID = {"backbone": "dlib_age", "pretrained": "none", "head": "ensemble"}  # finetune.check_params refuses it


def test_wrong_params_are_refused_before_the_processes_are_launched(tmp_path, monkeypatch):
    """Each relaunched process found the ConfigError, after joining the process group: the other one's gloo
    'Connection closed by peer' traceback and torch's ChildFailedError came with it."""
    import torch.distributed.launcher.api as launcher

    from faceage.config import ConfigError

    def launched(*_a, **_kw):
        raise AssertionError("the processes were launched")

    monkeypatch.setattr(launcher, "elastic_launch", launched)
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    sys.path.insert(0, str(STAGE.parent))
    try:
        import train as stage
    finally:
        sys.path.remove(str(STAGE.parent))
    with pytest.raises(ConfigError, match="pretrained=none"):
        stage.main(_args(tmp_path, _params(tmp_path, nproc_per_node=2, batch_size=16, **INVALID)))


def test_a_torchrun_rank_refuses_wrong_params_before_joining_the_process_group(tmp_path, monkeypatch):
    """Under the user's own torchrun the same check runs in every rank, before init_process_group."""
    import faceage.training as training
    from faceage.config import ConfigError, TrainParams

    def joined(*_a, **_kw):
        raise AssertionError("joined the process group before checking the params")

    monkeypatch.setattr(training.dist, "init_process_group", joined)
    monkeypatch.setattr(training.dist, "is_initialized", lambda: False)
    for key, value in {"RANK": "0", "WORLD_SIZE": "2", "LOCAL_RANK": "0", "LOCAL_WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    p = TrainParams(device="cpu", batch_size=16, **INVALID)
    with pytest.raises(ConfigError, match="pretrained=none"):
        training.train_model(p, tmp_path / "faces", tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                             tmp_path / "state.pt")


@pytest.mark.parametrize("cut", [1, 10, 30])
def test_a_state_cut_within_its_last_bytes_is_ignored_not_a_crash_at_every_rerun(tmp_path, cut, caplog):
    """A file cut at its end lost torch's zip directory: its reader raised OSError (Invalid argument), which
    load_state did not catch, so every rerun crashed on the state instead of starting over."""
    import torch

    from faceage.training import TrainState, load_state, save_state

    path = tmp_path / "state.pt"
    save_state(path, TrainState("abc", run_id="r1", epoch=2, model={"w": torch.zeros(1000)},
                                history=[{"epoch": 1, "val_mae": 3.0}]))
    path.write_bytes(path.read_bytes()[:-cut])
    caplog.set_level("WARNING", logger="faceage")
    assert load_state(path, "abc") is None
    assert f"ignoring {path}: unreadable" in caplog.text
    path.write_text("not a state\n")  # torch's legacy format reader: KeyError
    assert load_state(path, "abc") is None


def test_nearby_seeds_do_not_share_their_data_orders():
    """torch's DistributedSampler seeds its shuffle with seed + epoch: train.seed=43's epoch 1 was train.seed=42's
    epoch 2, so a seed sweep's runs saw the same orders shifted by an epoch."""
    from faceage.training import EpochSampler

    def order(seed: int, epoch: int, world: int = 1, rank: int = 0, n: int = 50, drop_last: bool = False) -> list[int]:
        sampler = EpochSampler(range(n), num_replicas=world, rank=rank, shuffle=True, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
        return [i for i, _ in sampler]

    assert order(43, 1) != order(42, 2) and order(42, 1) != order(42, 2)
    assert order(42, 2) == order(42, 2) and sorted(order(42, 2)) == list(range(50))
    # two ranks: the same count each; without drop_last every face, one repeated to even out 51
    shards = [order(7, 3, world=2, rank=r, n=51) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 26 and set(shards[0] + shards[1]) == set(range(51))
    shards = [order(7, 3, world=2, rank=r, n=51, drop_last=True) for r in range(2)]
    assert len(shards[0]) == len(shards[1]) == 25 and len(set(shards[0] + shards[1])) == 50


def test_a_batch_of_one_face_is_refused_for_a_batchnorm_backbone_only():
    """train.batch_size=1 with resnet18 failed in its first step with torch's "Expected more than 1 value per
    channel" traceback, after the MLflow run was created; dlib's heads (no BatchNorm) train with it."""
    from dataclasses import replace

    import torch.nn as nn
    import torchvision

    from faceage.config import TrainParams
    from faceage.errors import FaceAgeError
    from faceage.training import check_batch

    cnn, head = torchvision.models.resnet18(num_classes=101), nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 101))
    one = replace(TrainParams(), backbone="resnet18", batch_size=1)
    with pytest.raises(FaceAgeError, match=r"train.batch_size=1 gives 1 face per batch .* raise train.batch_size"):
        check_batch(one, cnn, 1)
    with pytest.raises(FaceAgeError, match=r"train.batch_size=2 gives 1 face per batch and process \(2 process"):
        check_batch(replace(one, batch_size=2), cnn, 2)
    check_batch(replace(one, batch_size=2), cnn, 1)  # two faces a batch: fine
    check_batch(one, head, 1)  # no BatchNorm: fine
    check_batch(replace(one, epochs=0), cnn, 1)  # nothing trains
