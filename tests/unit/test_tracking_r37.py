"""Round 37 review of MLflow tracking (``faceage.tracking``) and the backbone sweep's report (``faceage.sweep``).

- The sweep's report was written with ``Path.write_text``: in the locale's encoding and in place. Under an ASCII
  locale (``LANG=C`` with ``PYTHONUTF8=0``, a minimal container) a report with a non-ASCII character (a ``--source``
  folder named ``Müller``, the † mark of a run scored on other faces) failed with ``UnicodeEncodeError`` after all
  the MLflow reads, and left ``reports/backbones.md`` (committed) empty; a Ctrl-C during the write left it cut.
- A repo in a folder whose name holds ``%`` (``100%-faces``) or ``?``: the default store ``sqlite:///<root>/mlflow.db``
  was handed to SQLAlchemy unquoted, which reads ``%xx`` as an escape and ``?`` as the start of the query, and opened
  another file (``unable to open database file`` in a traceback from every stage that logs).

Every store is a real SQLite MLflow store in ``tmp_path``; the locale test runs a real Python subprocess.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faceage.tracking import check_writable, mlflow_env, setup_mlflow, sqlite_path, tracking_uri

REPO = Path(__file__).resolve().parents[2]


def _row(backbone: str, test_mae: float) -> dict:
    return {"backbone": backbone, "run_id": "0123456789abcdef0123456789abcdef", "overrides": [], "params_m": 11.2,
            "gflops": 0.3, "image_size": 64, "epochs": 5, "train_time_s": 120.0, "val_mae": test_mae + 0.5,
            "test_mae": test_mae, "cs5": 0.4, "coverage_1std": 0.6, "baseline_mae": 20.0, "external": {},
            "external_sha256": {}, "external_faces_sha256": {}, "external_n_faces": {}, "start_time_ms": 1,
            "data_source": "/data/Müller/appa-real-sample", "device": "cpu", "threads": "2"}


def test_the_report_is_written_utf8_and_whole_under_an_ascii_locale(tmp_path):
    md, png = tmp_path / "reports" / "backbones.md", tmp_path / "reports" / "backbones.png"
    md.parent.mkdir()
    md.write_text("# the previous report\n")
    rows = [_row("resnet18", 9.0), _row("resnet50", 8.0)]
    (tmp_path / "rows.json").write_text(json.dumps(rows), encoding="utf-8")
    script = ("import json, sys; from pathlib import Path; import faceage.sweep as s; "
              "rows = json.loads(Path(sys.argv[1]).read_text(encoding='utf-8')); "
              "s.write_report(rows, Path(sys.argv[2]), Path(sys.argv[3]), 'cpu')")
    # An ASCII locale as a minimal container has it: no C.UTF-8 coercion, no UTF-8 mode
    env = {**os.environ, "LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0",
           "PYTHONPATH": str(REPO), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    done = subprocess.run([sys.executable, "-c", script, str(tmp_path / "rows.json"), str(md), str(png)], env=env,
                          cwd=tmp_path, capture_output=True, text=True, encoding="utf-8", timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    text = md.read_text(encoding="utf-8")
    assert "`/data/Müller/appa-real-sample`" in text and "| `resnet50` |" in text
    assert png.read_bytes().startswith(b"\x89PNG")
    assert [p.name for p in md.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left


@pytest.mark.parametrize("folder", ["100%41-faces", "what?-faces"])
def test_the_default_store_of_a_repo_in_a_folder_named_with_percent_or_question_mark(tmp_path, monkeypatch, folder):
    root = tmp_path / folder
    root.mkdir()
    monkeypatch.chdir(root)  # repo_root(): the working folder outside a DVC temp run
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    assert sqlite_path(tracking_uri()) == root / "mlflow.db"
    check_writable()
    uri = tracking_uri()
    with mlflow_env("MLFLOW_TRACKING_URI", uri):  # mlflow_env restores MLflow's global URI after the test
        mlflow = setup_mlflow()
        with mlflow.start_run() as run:
            mlflow.log_metric("x", 1.0)
            mlflow.log_text("hi", "note.txt")
        assert mlflow.MlflowClient().get_run(run.info.run_id).data.metrics == {"x": 1.0}
    assert (root / "mlflow.db").stat().st_size > 0
    assert (root / "mlruns" / run.info.run_id / "artifacts" / "note.txt").read_text() == "hi"  # beside it
    # No other database made elsewhere (MLflow itself makes the folder of the URI's unparsed path, empty:
    # mlflow.store.db.utils._make_parent_dirs_if_sqlite)
    assert list(tmp_path.rglob("mlflow.db")) == [root / "mlflow.db"]


def test_a_relative_sqlite_path_in_the_variable_is_quoted_from_the_root_too(tmp_path, monkeypatch):
    root = tmp_path / "100%41-faces"
    (root / "sub").mkdir(parents=True)
    monkeypatch.chdir(root)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "sqlite:///sub/mlflow.db")
    assert sqlite_path(tracking_uri()) == root / "sub" / "mlflow.db"
    # A URI the user quoted is read as SQLAlchemy reads it
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path}/a%20b/mlflow.db")
    assert sqlite_path(tracking_uri()) == tmp_path / "a b" / "mlflow.db"


def test_an_exported_mlflow_run_id_does_not_take_train_into_another_run(tmp_path, monkeypatch, caplog):
    """``MLFLOW_RUN_ID`` in the shell (exported to inspect a run with ``mlflow runs``, or set by ``mlflow run``):
    ``mlflow.start_run()`` without a run id continues that run, so train logged its params and metrics into it (and
    each backbone of a sweep into the same one: "Changing param values is not allowed" at the second)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", uri):
        mlflow = setup_mlflow()
        client = mlflow.MlflowClient()
        other = client.create_run(client.get_experiment_by_name("face-age").experiment_id, run_name="someone's")
        client.log_param(other.info.run_id, "train.backbone", "resnet18")
        client.set_terminated(other.info.run_id)
        monkeypatch.setenv("MLFLOW_RUN_ID", other.info.run_id)
        with caplog.at_level("WARNING", logger="faceage.tracking"):
            mlflow = setup_mlflow()
        with mlflow.start_run(run_name="exp-resnet50") as run:  # as train starts its run
            mlflow.log_params({"train.backbone": "resnet50"})
            mlflow.log_metric("val_mae", 9.0, step=1)
        assert run.info.run_id != other.info.run_id
        assert client.get_run(other.info.run_id).data.params == {"train.backbone": "resnet18"}
        assert client.get_run(other.info.run_id).data.metrics == {}
        assert client.get_run(run.info.run_id).data.params == {"train.backbone": "resnet50"}
    assert "MLFLOW_RUN_ID" not in os.environ
    assert any("MLFLOW_RUN_ID" in r.getMessage() and other.info.run_id in r.getMessage() for r in caplog.records)
