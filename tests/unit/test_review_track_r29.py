"""Packaging and tracking review, round 29: defects found reading faceage/packaging.py, tracking.py, export.py and
model_card.py, each shown against a real (temporary, SQLite) MLflow store."""

import mlflow

from faceage.packaging import REGISTERED_MODEL, register_champion, select_winner
from faceage.tracking import mlflow_env
import tests.unit.test_packaging as packaging_tests
from tests.unit.test_packaging import add_run

store, client = packaging_tests.store, packaging_tests.client  # its fixtures: a real SQLite store


def log_model(client, run_id):
    """The logged model ``model`` train records for a run (mlflow.pytorch.log_model(name='model')), without weights:
    registration reads only its id."""
    exp_id = client.get_run(run_id).info.experiment_id
    return client.create_logged_model(exp_id, name="model", source_run_id=run_id).model_id


def test_the_champion_is_registered_in_the_store_of_the_client_it_was_given(client, tmp_path):
    """register_champion(client, ...) registered through MLflow's process-wide URI (mlflow.register_model), not the
    client's: with the global URI on another store, the version landed there (or failed: the logged model is not
    in it) while select_winner, the alias and the lineage used the client's store."""
    run_id = add_run(client, "best", {"best_val_mae": 5.0, "test_mae_years": 5.5})
    model_id = log_model(client, run_id)
    winner = select_winner(client)
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with mlflow_env("MLFLOW_TRACKING_URI", other):
        version = register_champion(client, winner)
        elsewhere = mlflow.MlflowClient(other)
        other_models = elsewhere.search_registered_models()
    assert other_models == []  # not even the registered model (mlflow.register_model created it there first)
    mine = client.get_model_version(REGISTERED_MODEL, version.version)
    assert (mine.source, mine.run_id) == (f"models:/{model_id}", run_id)


def test_packaging_a_re_evaluated_run_again_refreshes_its_versions_numbers(client):
    """The version's tags copied the run's val and test MAE at its first registration; the run re-evaluated (its
    test_mae_years logged again) and packaged again reused the version, whose tags kept the old numbers beside a
    bento lineage (faceage.json) holding the new ones."""
    run_id = add_run(client, "best", {"best_val_mae": 5.0, "test_mae_years": 5.5})
    log_model(client, run_id)
    with mlflow_env("MLFLOW_TRACKING_URI", client.tracking_uri):  # as package_champion runs it: one store
        first = register_champion(client, select_winner(client))
        client.log_metric(run_id, "test_mae_years", 6.25)  # evaluate ran again (another test split, a fixed bug)
        winner = select_winner(client)
        again = register_champion(client, winner)
    assert again.version == first.version  # the same logged model: reused, not duplicated
    tags = client.get_model_version(REGISTERED_MODEL, again.version).tags
    assert float(tags["test_mae_years"]) == winner.test_mae_years == 6.25
    assert float(tags["val_mae_years"]) == winner.val_mae_years == 5.0


def test_another_champion_gets_the_next_version_of_the_same_registered_model(client):
    """Registration through the client creates the registered model once and then adds versions to it (the
    "already exists" answer of a second registration is not an error), each linked to its run and logged model."""
    first_run = add_run(client, "first", {"best_val_mae": 6.0, "test_mae_years": 6.5})
    first_model = log_model(client, first_run)
    with mlflow_env("MLFLOW_TRACKING_URI", client.tracking_uri):  # one store, whatever the code registers through
        first = register_champion(client, select_winner(client))
        second_run = add_run(client, "second", {"best_val_mae": 5.0, "test_mae_years": 5.5})
        second_model = log_model(client, second_run)
        winner = select_winner(client)
        assert winner.run_id == second_run
        second = register_champion(client, winner)
    versions = {v.version: (v.run_id, v.source, v.tags["val_mae_years"])
                for v in client.search_model_versions(f"name = '{REGISTERED_MODEL}'")}
    assert int(second.version) == int(first.version) + 1
    assert versions[first.version] == (first_run, f"models:/{first_model}", "6.0")
    assert versions[second.version] == (second_run, f"models:/{second_model}", "5.0")


def test_the_model_cards_lineage_names_the_commit_a_resumed_run_finished_at(tmp_path):
    """A run started at commit A, stopped and resumed at commit B trained its last epochs with B's code; its checkpoint
    records ``resumed_at_commit`` B (round 28 put it in the bento's lineage), but the model card's Lineage named
    only A, as if A's code alone had trained the weights the card describes."""
    from faceage.model_card import write_model_card

    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "input": "image",
            "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 224, "no_face": "release_crop",
                     "detector_sha256": "f" * 64},
            "train_params": {"epochs": 5, "loss": "label_distribution", "optimizer": "adamw", "lr": 0.001,
                             "batch_size": 64, "augment": True, "low_res": 0.5, "pretrained": "imagenet"},
            "best_epoch": 3, "val_mae": 5.7, "temperature": 1.1, "git_commit": "a" * 40, "mlflow_run_id": "r1",
            "data_sha256": "d" * 64}
    groups = [{"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 1.0}]
    metrics = {"mae_years": 5.85, "mae_real_years": 5.85, "rmse_years": 7.0, "cs5": 0.5, "baseline_mae_years": 20.0,
               "n_test_faces": 3, "coverage_1std": 0.7, "coverage_2std": 0.95, "mean_predicted_std": 5.0,
               "temperature": 1.1, "external": {}}

    def lineage(meta):
        card = write_model_card(tmp_path / "card.md", metrics, {"age_group": groups}, meta, {"counts": {"train": 9}},
                                None, None).read_text()
        return card[card.index("## Lineage"):].splitlines()[1:]

    resumed = lineage({**meta, "resumed_at_commit": "b" * 40})
    assert resumed[0] == f"- git commit `{'a' * 40}`, resumed and finished at `{'b' * 40}`"
    assert lineage(meta)[0] == f"- git commit `{'a' * 40}`"  # a run that never resumed elsewhere: as it was
