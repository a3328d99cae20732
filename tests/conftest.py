"""Shared fixtures: where the shared real data lives, and a small real pipeline run.

``../shared/datasets`` (or ``$FACEAGE_SHARED_DATASETS``) holds real faces; tests that need
it skip with a reason when it is absent, and fail when ``FACEAGE_SHARED_DATASETS`` is set
but the folder (or the subfolder a test needs) is not there: ``.ci/run`` sets it, and a CI
run without the data must not pass with those tests skipped.

Process-wide settings a test changes are put back after it: MLflow's tracking URI (with the
``MLFLOW_TRACKING_URI`` variable ``mlflow.set_tracking_uri`` also writes) and torch's thread
count. Tests marked ``gpu`` skip without CUDA.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

# Tests send Ctrl-C (SIGINT) to the processes they start, as a terminal does. Started in the background by a
# non-interactive shell (`make test &`, nohup), pytest inherits SIGINT ignored, and every child then too (an ignored
# signal stays ignored across exec): those tests failed for how pytest was started. Python's own handler here makes
# the children start with the default action, as from a terminal.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


# For a child script measuring its own memory: ``peak_kb()``, the process's peak RSS in KiB (/proc's VmHWM, Linux).
# Not ``resource.getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries the peak of the process that started the child
# over exec (pytest's, hundreds of MB), so anything the child did under that peak measured 0 (a decode of 28 bytes a
# pixel read as 12, and a regression could pass).
PEAK_KB = """
def peak_kb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
"""
SHARED_ENV = "FACEAGE_SHARED_DATASETS"


@contextmanager
def http_server(handler, **state) -> Iterator:
    """A ``ThreadingHTTPServer`` on 127.0.0.1 (a free port) serving ``handler``, with ``state`` as the server's
    attributes (what the handler reads and records); shut down and closed on exit."""
    import http.server
    import threading

    srv = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    for name, value in state.items():
        setattr(srv, name, value)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.server_close()


def shared_datasets() -> Path:
    return Path(os.environ.get(SHARED_ENV) or REPO.parent / "shared" / "datasets")


def _require(path: Path) -> Path:
    """``path`` (under :func:`shared_datasets`) if it is there. If not: a failure when
    ``FACEAGE_SHARED_DATASETS`` is set (someone, CI, asked for the data), else a skip (a fresh clone)."""
    if path.is_dir():
        return path
    if os.environ.get(SHARED_ENV):
        pytest.fail(f"{SHARED_ENV}={os.environ[SHARED_ENV]} is set, but {path} does not exist: point it at the "
                    "shared datasets folder (with appa-real-sample, wild and utk-external), or unset it to "
                    "skip the tests that need the data", pytrace=False)
    pytest.skip(f"needs the shared real data at {path} (set {SHARED_ENV}); absent here")


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """The 2,100-face APPA-REAL-layout sample (UTKFace crops)."""
    return _require(shared_datasets() / "appa-real-sample")


@pytest.fixture(scope="session")
def wild_dir() -> Path:
    """51 in-the-wild / odd-format photos with labels.csv."""
    return _require(shared_datasets() / "wild")


@pytest.fixture(scope="session")
def external_dir() -> Path:
    """1,743 more UTKFace faces (test split only): the cross-dataset set."""
    return _require(shared_datasets() / "utk-external")


def pytest_collection_modifyitems(config, items):
    """``gpu`` tests skip where torch sees no CUDA device (torch is imported only when there are some)."""
    gpu = [item for item in items if item.get_closest_marker("gpu")]
    if not gpu:
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="marker gpu: needs CUDA, and torch.cuda.is_available() is False here")
    for item in gpu:
        item.add_marker(skip)


_MLFLOW_URI_MODULE = "mlflow.tracking._tracking_service.utils"  # holds set_tracking_uri's process-wide URI


@contextmanager
def _process_settings_restored() -> Iterator[None]:
    """Puts back two process-wide settings after the block:

    - MLflow's tracking URI: ``mlflow.set_tracking_uri`` (``setup_mlflow`` calls it) sets a URI that
      MLflow reads before ``MLFLOW_TRACKING_URI``; left behind, a later test's runs would go to this
      test's store (or to a stopped server). With the variable, which ``set_tracking_uri`` also writes.
    - torch's thread count: ``torch.set_num_threads`` (``AgePredictor(threads=1)`` calls it).

    Neither library is imported here: one a test never imported has nothing to put back (torch is
    imported when the test modules are collected, before any test runs).
    """
    env = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow_utils = sys.modules.get(_MLFLOW_URI_MODULE)
    uri = mlflow_utils._tracking_uri if mlflow_utils is not None else None
    torch = sys.modules.get("torch")
    threads = torch.get_num_threads() if torch is not None else None
    try:
        yield
    finally:
        if threads is not None and torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        mlflow_utils = sys.modules.get(_MLFLOW_URI_MODULE)
        if mlflow_utils is not None and mlflow_utils._tracking_uri != uri:
            mlflow_utils.set_tracking_uri(uri)
        if env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = env


def _restoring(scope: str):
    @pytest.fixture(scope=scope, autouse=True, name=f"_restore_process_settings_{scope}")
    def restore():
        with _process_settings_restored():
            yield

    return restore


# One per scope: a wider-scoped fixture (a module's AgePredictor, the session's tiny_run) is set up before
# any function-scoped fixture could save the settings it changes, so each scope saves what was there before
# its own fixtures, and puts that back when they are torn down. Autouse fixtures of a scope set up first.
_restore_process_settings_session = _restoring("session")
_restore_process_settings_module = _restoring("module")
_restore_process_settings_function = _restoring("function")


def make_detector_dir(path: Path) -> Path:
    """A detector folder at ``path`` holding dlib's HOG face detector alone, with its manifest: enough for a
    HOG ``FaceLocator`` without the CNN (light, no download)."""
    import dlib

    from faceage.detector import HOG_FILE, MANIFEST
    from faceage.download import file_digest

    path.mkdir(parents=True)
    dlib.get_frontal_face_detector().save(str(path / HOG_FILE))
    (path / MANIFEST).write_text(json.dumps({"source": "test", "files": {HOG_FILE: file_digest(path / HOG_FILE)}}))
    return path


@pytest.fixture(scope="session")
def hog_detector_dir(tmp_path_factory) -> Path:
    """:func:`make_detector_dir`, once per session (read-only for the tests that share it)."""
    return make_detector_dir(tmp_path_factory.mktemp("hog") / "detector")


@pytest.fixture
def sigterm_restored() -> Iterator[None]:
    """Puts back this process's SIGTERM handler after the test (code that installs its own: the benchmarks'
    main(), through ``_server.exit_on_sigterm``)."""
    handler = signal.getsignal(signal.SIGTERM)
    yield
    signal.signal(signal.SIGTERM, handler)


def with_fractional_ages(folder: Path, split: str = "test") -> Path:
    """Adds 0.6 to each apparent age of ``split``, as APPA-REAL's averaged ratings are (UTKFace's are whole)."""
    path = folder / f"gt_avg_{split}.csv"
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows({**r, "apparent_age_avg": f"{float(r['apparent_age_avg']) + 0.6:g}"} for r in rows)
    return folder


def make_subset(sample: Path, dest: Path, per_split: dict[str, int]) -> Path:
    """Copies the first N rows of each split (and their images) into a release-layout folder."""
    dest.mkdir(parents=True, exist_ok=True)
    for extra in sample.glob("*.csv"):  # label files beside the ground truth (gender/race)
        if not extra.name.startswith("gt_avg_"):
            shutil.copyfile(extra, dest / extra.name)
    for split, n in per_split.items():
        with open(sample / f"gt_avg_{split}.csv", newline="") as f:
            reader = csv.DictReader(f)
            rows = [r for _, r in zip(range(n), reader)]
            fields = reader.fieldnames
        (dest / split).mkdir(exist_ok=True)
        with open(dest / f"gt_avg_{split}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=fields)
            w.writeheader()
            w.writerows(rows)
        for r in rows:
            for name in (r["file_name"], r["file_name"] + "_face.jpg"):
                if (sample / split / name).exists():
                    shutil.copyfile(sample / split / name, dest / split / name)
    return dest


@pytest.fixture(scope="session")
def detector_dir(tmp_path_factory) -> Path:
    """dlib's model files (HOG and CNN detectors, shape predictors, face encoder) with their manifest,
    from the offline face-recognition-models package: read-only for the tests that share it."""
    from faceage.detector import fetch_detector_files

    out = tmp_path_factory.mktemp("detector") / "dlib"
    fetch_detector_files("face_recognition_models", out)
    return out


def own_run_file(tiny_run: dict, folder: Path) -> Path:
    """A ``run.json`` naming a new, finished MLflow run in ``tiny_run``'s store, for a test whose evaluation logs to
    MLflow: logged into the session's shared run, its tags (``evaluate.external``: ``[]``) replaced the ones the other
    tests of that run read (tests/integration/test_external.py failed after such a test had run)."""
    from mlflow import MlflowClient

    from faceage.tracking import read_run_file, write_run_file

    client = MlflowClient(tiny_run["tracking_uri"])
    experiment_id = client.get_run(read_run_file(tiny_run["run"])["run_id"]).info.experiment_id
    run_id = client.create_run(experiment_id, run_name="own-evaluation").info.run_id
    client.set_terminated(run_id)
    path = folder / "run.json"
    write_run_file(path, run_id, experiment_id)
    return path


@pytest.fixture(scope="session")
def tiny_run(sample_dir, external_dir, tmp_path_factory):
    """A real, small pipeline run through the library: fetch -> detector -> preprocess -> train -> evaluate.

    64/16/16 real faces, ResNet-18 from scratch, 1 epoch at 64 px; MLflow in a temp sqlite store;
    evaluated also on 12 faces of ``utk-external`` (``evaluate.external``).
    Returns a dict of paths (data, detector, faces, model, run, eval, model_card, tracking_uri, external).
    """
    from faceage.appa_real import fetch_appa_real
    from faceage.config import Params
    from faceage.detector import fetch_detector_files
    from faceage.evaluation import evaluate_model
    from faceage.preprocess import preprocess_dataset
    from faceage.tracking import mlflow_env
    from faceage.training import train_model

    root = tmp_path_factory.mktemp("tiny_run")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        source = make_subset(sample_dir, root / "source", {"train": 64, "valid": 16, "test": 16})
        external = with_fractional_ages(make_subset(external_dir, root / "utk-external", {"test": 12}))
        p = Params()
        fetch_appa_real(str(source), root / "data", md5="")
        fetch_detector_files("face_recognition_models", root / "detector")
        counts = preprocess_dataset(root / "data", root / "detector", root / "faces", replace(p.preprocess, workers=1))
        (root / "preprocess.json").write_text(json.dumps(counts))
        tp = replace(p.train, pretrained="none", epochs=1, image_size=64, batch_size=16)
        train_model(tp, root / "faces", root / "model.pt", root / "reports", root / "run.json", root / "state.pt")
        evaluate_model(root / "model.pt", root / "faces", root / "eval", replace(p.evaluate, external=(str(external),)),
                       run_path=root / "run.json", history_csv=root / "reports" / "history.csv",
                       data_dir=root / "data", preprocess_metrics=root / "preprocess.json",
                       model_card=root / "model_card.md", detector_dir=root / "detector",
                       external_cache=root / "external-cache")
    return {
        "root": root, "data": root / "data", "detector": root / "detector", "faces": root / "faces",
        "model": root / "model.pt", "run": root / "run.json", "eval": root / "eval", "tracking_uri": uri,
        "model_card": root / "model_card.md", "external": external, "external_cache": root / "external-cache",
    }
