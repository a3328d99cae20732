"""Round 34: the sweep report put external MAEs measured on different faces of a set in one column, unmarked.

A set without release crops (utk-external) is scored on the faces the run's own detector found
(``evaluate.external_faces_sha256``, ``external_<name>_n_faces``): a partial re-sweep after a change of
``preprocess.detector`` or ``upsample`` (``--backbones resnet50`` after editing ``params.yaml``) put resnet50's MAE on
its 250 faces beside the others' on their 150, as if comparable. The report marked MAEs on another *version* of the
set's files (``*``); it now marks those on other faces than the newest run's (``†``, with a note naming the backbones
and their face counts) and, as packaging's champion rule does (:func:`faceage.packaging.paired_maes`), shows each
run's MAE on the faces all of them scored, from their ``evaluation/external_predictions.csv``. A backbone sweep
(every run on the same faces) gives the report it gave before, and downloads nothing.

Every store is a real SQLite MLflow store in ``tmp_path`` with real logged artifacts.
"""

from __future__ import annotations

import json
import time

import mlflow
import pytest

import faceage.sweep as sweep
from faceage.evaluation import EXTERNAL_FACES_TAG
from faceage.external import EXTERNAL_SHA256_TAG
from faceage.tracking import mlflow_env
from faceage.training import faces_fingerprint
from tests.unit.test_champion_r34b import client, log_predictions, store
from tests.unit.test_champion_r34c import faces

FIXTURES = (client, store)  # shared fixtures, used by name
VERSION = "1111aaaa" * 8


def add_backbone_run(client, tmp_path, backbone: str, test_mae: float, utk: dict[str, float] | None, *,
                     version: str = VERSION, artifact: bool = True) -> dict:
    """A finished sweep run of ``backbone`` as train and evaluate log it, scored on the utk faces ``utk``
    {file: |error|} (None: not scored on utk); its runs-file entry."""
    exp = client.get_experiment_by_name("face-age")
    tags = {"data_sha256": "d" * 64}
    if utk is not None:
        tags.update({"evaluate.external": json.dumps(["/sets/utk"]), EXTERNAL_SHA256_TAG: json.dumps({"utk": version}),
                     EXTERNAL_FACES_TAG: json.dumps({"utk": faces_fingerprint(utk)})})
    run = client.create_run(exp.experiment_id, run_name=f"exp-{backbone}", tags=tags)
    run_id = run.info.run_id
    for key, value in {"train.backbone": backbone, "train.num_parameters": "11200000", "train.image_size": "64",
                       "train.epochs": "5"}.items():
        client.log_param(run_id, key, value)
    metrics = {"best_val_mae": test_mae - 0.5, "test_mae_years": test_mae, "model_gflops": 0.15, "elapsed_s": 60.0}
    if utk is not None:
        metrics.update({"external_utk_mae": sum(utk.values()) / len(utk), "external_utk_n_faces": len(utk)})
    for key, value in metrics.items():
        client.log_metric(run_id, key, value)
    if utk is not None and artifact:
        log_predictions(client, run_id, tmp_path, {"utk": utk})
    client.set_terminated(run_id, "FINISHED")
    time.sleep(0.01)  # start times order the runs: the newest is the reference
    return {"run_id": run_id, "overrides": [f"train.backbone={backbone}", *sweep.PROFILES["cpu"]["cnn"]]}


@pytest.fixture()
def report(store, tmp_path, monkeypatch):
    """Collects ``runs`` from the store (as ``--report-only`` does) and writes the report; its text and rows."""
    monkeypatch.chdir(tmp_path)

    def write(runs: dict) -> tuple[str, dict[str, str]]:
        with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{store[1] / 'mlflow.db'}"):
            write.rows = sweep.collect(runs)
        text = written(write.rows, tmp_path)
        table = {line.split("|")[1].strip().strip("`"): line for line in text.splitlines() if line.startswith("| `")}
        return text, table

    return write


def written(rows: list[dict], folder) -> str:
    md = folder / "backbones.md"
    sweep.write_report(rows, md, folder / "backbones.png", "cpu")
    return md.read_text()


class Downloads:
    """Counts the artifact downloads of every real MlflowClient (delegating to it)."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real = mlflow.MlflowClient.download_artifacts

        def download(client, run_id, path, dst_path=None):
            self.calls.append((run_id, path))
            return real(client, run_id, path, dst_path)

        monkeypatch.setattr(mlflow.MlflowClient, "download_artifacts", download)


def upsample_sweep(client, tmp_path, **kwargs) -> dict:
    """resnet18 and resnet34 swept with upsample 0 (faces 0-149), then resnet50 alone after upsample 2 (also the
    small, hard faces 150-249, error 12): resnet50's own MAE (7.92) looks worse than resnet18's (7.0), yet on the 150
    faces all three scored it is the best (5.2 against 7.0)."""
    return {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, faces(0, 150, 7.0), **kwargs),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, faces(0, 150, 6.0), **kwargs),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", 8.5,
                                         {**faces(0, 150, 5.2), **faces(150, 250, 12.0)}, **kwargs)}


def test_maes_on_other_faces_are_marked_and_compared_on_the_common_faces(client, tmp_path, report):
    text, rows = report(upsample_sweep(client, tmp_path))
    head = next(line for line in text.splitlines() if line.startswith("| backbone"))
    assert "| `utk` MAE | `utk` MAE, 150 common faces |" in head
    # Own MAEs stay, marked against the newest run's faces; beside them, the MAE on the faces all three scored
    assert "| 7.00† | 7.00 |" in rows["resnet18"] and "| 6.00† | 6.00 |" in rows["resnet34"]
    assert "| 7.92 | 5.20 |" in rows["resnet50"]
    assert ("`utk` MAE marked † was measured on other faces of the set than the newest run's (`resnet50`, "
            "250 faces): `resnet18` 150 faces, `resnet34` 150 faces") in text
    assert ("the `utk` MAE, 150 common faces column compares `resnet18`, `resnet34`, `resnet50` on the 150 faces all "
            "of them scored (their `evaluation/external_predictions.csv`); sweep") in text
    assert "--backbones resnet18 resnet34" in text
    assert "another version" not in text


def test_without_predictions_the_maes_are_marked_and_not_compared(client, tmp_path, report):
    """Runs evaluated before their predictions were logged: their own MAEs, marked, and the note says why no common
    column."""
    text, rows = report(upsample_sweep(client, tmp_path, artifact=False))
    assert "common faces" not in next(line for line in text.splitlines() if line.startswith("| backbone"))
    assert "| 7.00† |" in rows["resnet18"] and "| 7.92 |" in rows["resnet50"]
    assert "`resnet18` 150 faces, `resnet34` 150 faces" in text
    assert "not compared on the faces they have in common" in text


def test_a_run_without_predictions_is_left_out_of_the_common_faces_column(client, tmp_path, report):
    """resnet18 evaluated before the predictions were logged: resnet34 and resnet50 are still compared on the faces
    both scored; resnet18 keeps its own MAE, marked, and the note says it is not in the column."""
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, faces(0, 120, 7.0), artifact=False),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, faces(0, 150, 6.0)),
            "resnet50": add_backbone_run(client, tmp_path, "resnet50", 8.5,
                                         {**faces(0, 150, 5.2), **faces(150, 250, 12.0)})}
    text, rows = report(runs)
    assert "| 7.00† | - |" in rows["resnet18"] and "| 6.00† | 6.00 |" in rows["resnet34"]
    assert "| 7.92 | 5.20 |" in rows["resnet50"]
    assert ("the `utk` MAE, 150 common faces column compares `resnet34`, `resnet50` on the 150 faces all of them "
            "scored (their `evaluation/external_predictions.csv`); `resnet18` not: no readable predictions") in text
    assert "`resnet18` 120 faces, `resnet34` 150 faces" in text


def test_a_backbone_sweep_on_the_same_faces_gives_the_report_it_gave_before(client, tmp_path, report, monkeypatch):
    """Every run scored on the same faces (a backbone sweep does not change preprocess): nothing downloaded, nothing
    marked, the report byte for byte as without the faces fingerprints."""
    same = faces(0, 300, 6.0)
    runs = {"resnet18": add_backbone_run(client, tmp_path, "resnet18", 9.5, same),
            "resnet34": add_backbone_run(client, tmp_path, "resnet34", 9.0, {**same, "00000.jpg": 60.0}),
            "dlib_face": add_backbone_run(client, tmp_path, "dlib_face", 7.0, None)}
    downloads = Downloads(monkeypatch)
    text, _ = report(runs)
    assert downloads.calls == []
    assert "†" not in text and "common faces" not in text
    # The rows as collect gave them before it read which faces each run scored: the same report
    before = [{k: v for k, v in r.items() if k not in ("external_faces_sha256", "external_n_faces", "external_common")}
              for r in report.rows]
    assert written(before, tmp_path) == text


def test_a_row_on_another_version_is_marked_for_its_version_only(tmp_path):
    """A row scored on another version of the files is not comparable at all (``*``): its faces differ too, but
    the note does not count it among the runs scored on other faces."""
    base = {"overrides": [], "params_m": 11.2, "gflops": 0.15, "image_size": 64, "epochs": 5, "train_time_s": 60.0,
            "val_mae": 9.0, "cs5": 0.3, "coverage_1std": 0.6, "baseline_mae": 12.0, "data_source": "s",
            "device": "cpu", "threads": "2"}
    rows = [{**base, "backbone": "resnet18", "run_id": "a" * 32, "test_mae": 9.5, "external": {"utk": 7.0},
             "external_sha256": {"utk": "0ld" * 20}, "external_faces_sha256": {"utk": "f1" * 32},
             "external_n_faces": {"utk": 150}, "start_time_ms": 1},
            {**base, "backbone": "resnet50", "run_id": "b" * 32, "test_mae": 8.5, "external": {"utk": 7.9},
             "external_sha256": {"utk": VERSION}, "external_faces_sha256": {"utk": "f2" * 32},
             "external_n_faces": {"utk": 250}, "start_time_ms": 2}]
    text = written(rows, tmp_path)
    assert "| 7.00* |" in text and "†" not in text
