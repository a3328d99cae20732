"""Packaging, round 25: what a user sees with a tracking server that does not answer, a store whose runs all
failed, a deleted experiment, a --model that is not a checkpoint, SIGTERM, a commit since the last package;
the bento lock made for the image's Python and honouring the versions its requirements allow."""

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import mlflow
import pytest
import torch
from packaging.requirements import Requirement

from faceage.packaging import PackagingError, Winner, _same_model, resolve_checkpoint, select_winner
from faceage.tracking import EXPERIMENT, TrackingError

REPO = Path(__file__).resolve().parents[2]


def load_lock_script():
    spec = importlib.util.spec_from_file_location("lock_bento_r25", REPO / "scripts" / "lock_bento.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    return mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}"), root


def experiment(client, root: Path, name: str) -> str:
    return client.create_experiment(name, artifact_location=(root / name).as_uri())


def add_run(client, experiment_id, name, status="FINISHED", metrics=None):
    run = client.create_run(experiment_id, run_name=name, tags={"data_sha256": "d" * 64})
    for key, value in (metrics or {}).items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    return run.info.run_id


def test_an_unreachable_tracking_server_is_one_line_at_once(monkeypatch, tmp_path):
    """Packaging did not probe the server as the stages do: MLflow retried for ~4 minutes, then a traceback
    printed the URI with its password."""
    from faceage.packaging import package_champion

    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"http://bob:s3cret@127.0.0.1:{port}")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the old code fails in seconds, not minutes
    start = time.monotonic()
    with pytest.raises(TrackingError, match="does not answer") as e:
        package_champion(tmp_path / "model.pt", tmp_path, tmp_path)
    assert "s3cret" not in str(e.value) and time.monotonic() - start < 30


def test_a_store_whose_runs_all_failed_says_so(store):
    """Only FAILED / KILLED runs: the message said "run the train and evaluate stages first", no more."""
    client, root = store
    exp = experiment(client, root, "face-age-failed")
    add_run(client, exp, "a", "FAILED", {"best_val_mae": 5.0, "test_mae_years": 5.1})
    add_run(client, exp, "b", "KILLED", {"best_val_mae": 5.0})
    with pytest.raises(PackagingError, match=r"no finished run .*\(2 other runs: 1 FAILED, 1 KILLED; a run that "
                                             r"failed, was stopped or is still running is not a candidate\)"):
        select_winner(client, "face-age-failed")
    experiment(client, root, "face-age-empty")
    with pytest.raises(PackagingError, match=r"has both best_val_mae and test_mae_years: run the train"):
        select_winner(client, "face-age-empty")


def test_a_deleted_experiment_is_named(store):
    """Deleting the experiment deletes its runs: packaging said to run the stages, which cannot log into it."""
    client, root = store
    exp = experiment(client, root, "face-age-deleted")
    add_run(client, exp, "a", metrics={"best_val_mae": 5.0, "test_mae_years": 5.1})
    client.delete_experiment(exp)
    with pytest.raises(PackagingError, match=rf"'face-age-deleted' \(id {exp}\) is deleted in .*mlflow experiments "
                                             rf"restore --experiment-id {exp}"):
        select_winner(client, "face-age-deleted")


def test_a_model_file_that_is_not_a_checkpoint_is_one_line_and_the_runs_artifact_is_used(store, tmp_path, caplog):
    """`--model` pointing at another file ended in torch's traceback advising weights_only=False."""
    client, root = store
    exp = experiment(client, root, EXPERIMENT + "-ckpt")
    run_id = add_run(client, exp, "best")
    winner = Winner(run_id, "best", 6.0, 7.0, 0, None, None)
    photo = tmp_path / "photo.jpg"
    photo.write_bytes(b"\xff\xd8\xff\xe0 not a torch file" * 10)
    with pytest.raises(PackagingError, match=r"photo.jpg is not a FaceAge checkpoint: not a torch file .*and the run "
                                             r"logged no model.pt artifact"):
        resolve_checkpoint(client, winner, photo, tmp_path / "work")
    logged = tmp_path / "logged" / "model.pt"
    logged.parent.mkdir()
    torch.save({"format": "faceage-checkpoint/1", "mlflow_run_id": run_id}, logged)
    client.log_artifact(run_id, str(logged), artifact_path="checkpoint")
    (tmp_path / "work").mkdir()
    with caplog.at_level("INFO", logger="faceage.packaging"):
        got = resolve_checkpoint(client, winner, photo, tmp_path / "work")
    assert got.name == "model.pt" and got.parent != photo.parent
    assert "photo.jpg is not a FaceAge checkpoint" in caplog.text
    assert "the winner's own checkpoint instead" in caplog.text


def test_a_commit_since_the_last_package_reuses_the_stored_model(tmp_path):
    """The packaging commit was part of the compared lineage: `make bento` after any commit stored
    another 84 MB copy of the same champion."""
    import json

    def folder(name, **lineage):
        d = tmp_path / name
        (d / "detector").mkdir(parents=True)
        (d / "model.onnx").write_bytes(b"graph")
        (d / "detector" / "manifest.json").write_text("{}")
        (d / "faceage.json").write_text(json.dumps({"mlflow_run_id": "r1", "git_commit": "a" * 40, **lineage}))
        return d

    stored = folder("stored", package_git_commit="1" * 40)
    assert _same_model(stored, folder("later", package_git_commit="2" * 40))
    assert not _same_model(stored, folder("retrained", package_git_commit="1" * 40, git_commit="b" * 40))


def test_sigterm_removes_the_temporary_folders(tmp_path):
    """Killed outright by SIGTERM (`timeout`, a cancelled CI job), packaging left its temporary folders
    (the downloaded checkpoint, the staged model: up to ~125 MB) behind."""
    code = (
        "import runpy, sys, tempfile, time\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import faceage.packaging as packaging\n"
        "def fake(*args, **kwargs):\n"
        "    with tempfile.TemporaryDirectory(prefix='faceage-package-') as tmp:\n"
        "        print(tmp, flush=True)\n"
        "        time.sleep(60)\n"
        "packaging.package_champion = fake\n"
        f"runpy.run_path({str(REPO / 'stages' / 'package.py')!r}, run_name='__main__')\n")
    temp = tmp_path / "temp"
    temp.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**os.environ, "TMPDIR": str(temp)})
    try:
        staged = Path(proc.stdout.readline().strip())
        assert staged.parent == temp and staged.is_dir(), proc.stderr.read() if proc.poll() is not None else ""
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGTERM
    assert not staged.exists(), "a temporary folder left behind by SIGTERM"


def test_the_lock_honours_the_versions_the_requirements_allow():
    """`numpy<2` in bento-requirements.in with numpy 2.x installed was pinned to 2.x, silently."""
    lock = load_lock_script()
    with pytest.raises(Exception, match=r"numpy .* is installed, but bento-requirements.in requires numpy<1") as e:
        lock.closure([Requirement("numpy<1")])
    assert type(e.value).__name__ == "LockError"
    assert lock.main(["--check"]) == 0  # the lock as it stands breaks no requirement
    assert lock.closure([Requirement('numpy; python_version < "3"')]) == {"numpy": __import__("numpy").__version__}


def test_the_lock_is_made_for_the_images_python(monkeypatch, tmp_path):
    """Made in a .venv on Python 3.13 (the project takes 3.11+), the lock took gradio's `audioop-lts;
    python_version >= "3.13"`, a package that does not install on the image's Python 3.11."""
    import packaging.markers

    lock = load_lock_script()
    want = {Requirement(line).name: str(Requirement(line).specifier)[2:] for line in
            (REPO / "bento-requirements.txt").read_text().splitlines() if line and not line.startswith("#")}
    real = packaging.markers.default_environment

    def on_313():
        return {**real(), "python_version": "3.13", "python_full_version": "3.13.1"}

    monkeypatch.setattr(packaging.markers, "default_environment", on_313)
    assert lock.closure(lock.read_roots()) == want  # not gradio's audioop-lts
    assert lock.image_python() == "3.11"
    roots = tmp_path / "roots.in"
    roots.write_text('numpy\npillow; python_version >= "3.13"  # only on a newer Python than the image\n')
    assert [r.name for r in lock.read_roots(roots)] == ["numpy"]


def test_chips_cut_before_the_checkpoints_kind_needed_them_are_one_line(tmp_path):
    """A workspace whose chips.npz predates the face chips (an older experiment applied) and a fused dlib_age
    winner: load_chips' ValueError ended packaging in a traceback."""
    import csv

    import numpy as np

    from faceage.packaging import load_check_crops

    with open(tmp_path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["split", "file_name", "crop"])
        w.writeheader()
        w.writerows({"split": "test", "file_name": f"{i}.jpg", "crop": f"{i}.png"} for i in range(3))
    np.savez(tmp_path / "chips.npz", kind=np.array("dlib_age"), crops=np.array([f"{i}.png" for i in range(3)]),
             chips=np.zeros((3, 3, 64, 64), np.uint8), margin=np.array(0.4), shape_predictor_sha256=np.array("x"))
    assert len(load_check_crops(tmp_path, 64, chips=True)) == 3
    with pytest.raises(PackagingError, match=r"checked on the workspace's chips: .*holds no face chips .*rerun the "
                                             r"preprocess and embed stages"):
        load_check_crops(tmp_path, 64, chips=True, pairs=True)


def test_a_sqlite_store_that_is_not_there_is_refused_not_created(tmp_path, monkeypatch):
    """A typo in MLFLOW_TRACKING_URI (``mlfow.db``) created an empty store of 954 KB, and packaging then said
    the experiment was not found, as if the pipeline had never run."""
    from faceage.packaging import package_champion

    typo = tmp_path / "mlfow.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{typo}")
    with pytest.raises(PackagingError, match=r"no MLflow store at .*mlfow\.db"):
        package_champion(tmp_path / "model.pt", tmp_path, tmp_path)
    assert not typo.exists()


def test_out_into_a_folder_that_is_not_there_is_made_before_the_work(tmp_path):
    """`stages/package.py --out new/lineage.json` registered the champion and saved the BentoML model, then failed
    with a FileNotFoundError traceback, reporting failure for work it had done."""
    out = tmp_path / "new" / "lineage.json"
    code = (
        "import runpy, sys\n"
        f"sys.path.insert(0, {str(REPO)!r})\n"
        "import faceage.packaging as packaging\n"
        "packaging.package_champion = lambda *a, **k: {'bento_model': 'face_age:x', 'registered_model': 'face-age', "
        "'registered_version': '1'}\n"
        f"sys.argv = ['package.py', '--out', {str(out)!r}]\n"
        f"runpy.run_path({str(REPO / 'stages' / 'package.py')!r}, run_name='__main__')\n")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads(out.read_text())["bento_model"] == "face_age:x"
