"""Round 31's review of tracking: ``benchmarks/kill_resume.py`` when the reference run never shows a train
process, and :mod:`faceage.tracking` against stores a user can have (a server that is down, a read-only
``mlflow.db``)."""

import os
from pathlib import Path

import pytest

from tests.unit.test_bench_r24 import make_sample

# The benchmarks' main() turn SIGTERM into SystemExit (_server.exit_on_sigterm): put back for pytest.
pytestmark = pytest.mark.usefixtures("sigterm_restored")


def fake_dvc(tmp_path: Path, monkeypatch, script: str) -> None:
    """``dvc`` on PATH is ``script`` (a shell script), and the project kill_resume builds is a bare folder."""
    import benchmarks.kill_resume as kill_resume

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\n" + script)
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(kill_resume, "make_project", lambda root, source, **kwargs: dict(os.environ))


@pytest.mark.parametrize("script, said", [
    # The pipeline ends before train (a preprocess error): dvc's own output, then one line naming what failed.
    ("echo \"ERROR: failed to reproduce 'preprocess': no faces\"\nexit 1\n", "reference `dvc repro` failed (exit 1)"),
    # dvc succeeds but no train process was ever seen (train cached, or over before the first poll).
    ("echo 'Stage train didn'\"'\"'t change, skipping'\nexit 0\n", "never showed a running stages/train.py"),
])
def test_kill_resume_without_a_train_process_in_the_reference_is_one_line_and_exit_1(
        tmp_path, monkeypatch, capsys, script, said):
    """A reference run that never showed the train process crashed in ``round(None, 1)`` (TypeError) and a failed
    one ended in a RuntimeError traceback; both now end in one line naming the cause, exit 1, project removed."""
    import benchmarks.kill_resume as kill_resume

    fake_dvc(tmp_path, monkeypatch, script)
    temp = tmp_path / "temp"
    temp.mkdir()
    monkeypatch.setenv("TMPDIR", str(temp))
    monkeypatch.setattr("tempfile.tempdir", None)  # read TMPDIR again
    sample = make_sample(tmp_path / "sample")
    assert kill_resume.main(["--sample", str(sample), "--kills", "1", "--seed", "0"]) == 1
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.startswith("kill_resume:")]
    assert len(lines) == 1 and said in lines[0], err
    assert "Traceback" not in err
    if "exit 1" in said:
        assert "failed to reproduce 'preprocess'" in err  # dvc's output is shown, not swallowed
    assert not list(temp.iterdir()), "the temporary project was left behind"


# --- faceage.tracking: a store this user cannot write ---------------------------------------------------


@pytest.fixture
def read_only():
    """Makes paths read-only for this user (``chmod``; as root, whom modes do not stop, ``chattr +i``) and puts
    them back after the test."""
    import stat
    import subprocess

    done = []

    def make(path: Path) -> None:
        if os.geteuid() != 0:
            path.chmod(path.stat().st_mode & ~(stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH))
            done.append(("chmod", path, path.stat().st_mode | stat.S_IWUSR))
            return
        if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
            pytest.skip("cannot make a file read-only for root here (chattr +i)")
        done.append(("chattr", path, None))

    yield make
    for how, path, mode in reversed(done):
        if how == "chmod":
            path.chmod(mode)
        else:
            subprocess.run(["chattr", "-i", str(path)], check=True)


def store_with_a_run(tmp_path: Path) -> tuple[str, str]:
    """A sqlite store with the face-age experiment and one finished run; its URI and the run id."""
    from faceage.tracking import mlflow_env, setup_mlflow

    uri = f"sqlite:///{tmp_path / 'store' / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        mlflow = setup_mlflow()
        with mlflow.start_run() as run:
            mlflow.log_params({"train.num_parameters": "1000", "train.image_size": "64", "train.epochs": "1"})
            mlflow.log_metrics({"best_val_mae": 5.0, "test_mae_years": 5.5})
    return uri, run.info.run_id


@pytest.mark.parametrize("what", ["file", "folder"])
def test_a_read_only_store_fails_the_stages_before_their_work_in_one_line(tmp_path, read_only, what):
    """A read-only mlflow.db (or its folder, where SQLite writes its journal) passed every check: train failed at
    its run's start after the data load, evaluate at its logging after the whole evaluation, each with MLflow's
    "attempt to write a readonly database" / "unable to open database file" traceback."""
    import json

    from faceage.tracking import TrackingError, check_reachable, check_run, mlflow_env, setup_mlflow

    uri, run_id = store_with_a_run(tmp_path)
    db = tmp_path / "store" / "mlflow.db"
    read_only(db if what == "file" else db.parent)
    run_file = tmp_path / "run.json"
    run_file.write_text(json.dumps({"run_id": run_id}))
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        for check in (check_reachable, setup_mlflow, lambda: check_run(run_file)):  # train's, both, evaluate's
            with pytest.raises(TrackingError) as e:
                check()
            message = str(e.value)
            assert "\n" not in message and "read-only" in message and "MLFLOW_TRACKING_URI" in message
            assert str(db if what == "file" else db.parent) in message


def test_a_read_only_store_still_serves_the_sweeps_report(tmp_path, read_only):
    """Reading needs no write access: ``--report-only`` on a team's read-only store keeps working."""
    import faceage.sweep as sweep
    from faceage.tracking import mlflow_env

    uri, run_id = store_with_a_run(tmp_path)
    read_only(tmp_path / "store" / "mlflow.db")
    read_only(tmp_path / "store")
    runs = {"resnet18": {"run_id": run_id, "overrides": ["train.backbone=resnet18", *sweep.PROFILES["cpu"]["cnn"]]}}
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        assert sweep.unknown_runs(runs) == []
        rows = sweep.collect(runs)
    assert rows[0]["test_mae"] == 5.5


# --- faceage.tracking: a proxy whose server is down -----------------------------------------------------


@pytest.mark.parametrize("answer", [502, 503, 504])
def test_a_proxy_whose_tracking_server_is_down_fails_at_once_in_one_line(answer):
    """A proxy (nginx, a load balancer) in front of a stopped MLflow server answers 502/503/504: the probe took
    any answer for a live store, and MLflow then retried those answers for minutes before its traceback."""
    from faceage.tracking import TrackingError, check_reachable
    from tests.unit.test_tracking_r24 import _local_server

    with _local_server(answer) as port:
        with pytest.raises(TrackingError, match=f"answers {answer}") as e:
            check_reachable(f"http://user:s3cret@127.0.0.1:{port}")
    assert "s3cret" not in str(e.value) and "\n" not in str(e.value)
    assert e.value.status == answer  # what packaging's artifact probe reads, not the sentence
    with _local_server(404) as port:  # any other answer is a server that answers
        check_reachable(f"http://127.0.0.1:{port}")


def test_packaging_refuses_a_read_only_store_before_selecting_the_champion(tmp_path, read_only):
    """Registering the champion writes to the store: on a read-only mlflow.db packaging selected the winner,
    downloaded and exported it, then failed in MLflow's traceback at the registration."""
    from faceage.packaging import package_champion
    from faceage.tracking import TrackingError, mlflow_env

    uri, _ = store_with_a_run(tmp_path)
    read_only(tmp_path / "store" / "mlflow.db")
    with mlflow_env("MLFLOW_TRACKING_URI", uri), pytest.raises(TrackingError, match="read-only"):
        package_champion(tmp_path / "model.pt", tmp_path / "detector", tmp_path / "faces")


def test_a_read_only_artifacts_folder_beside_the_store_is_named_before_training(tmp_path, read_only):
    """MLflow's artifacts (the model summary, history, checkpoint, logged model) go to mlruns/ beside the
    database: a read-only one failed train at its very end, after every epoch."""
    from faceage.tracking import TrackingError, check_reachable, mlflow_env

    uri, _ = store_with_a_run(tmp_path)
    (tmp_path / "store" / "mlruns").mkdir(exist_ok=True)
    read_only(tmp_path / "store" / "mlruns")
    with mlflow_env("MLFLOW_TRACKING_URI", uri), pytest.raises(TrackingError, match="mlruns is read-only"):
        check_reachable()
