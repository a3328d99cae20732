"""Round 34d: second read of the champion rule's faces fingerprints (train.val_faces_sha256).

- A workspace whose preprocess output (data/faces) no run was validated on (``dvc repro preprocess`` after a
  params edit, or a sweep's runs queued with other preprocess settings) excluded every tagged run with "train it
  again with the compared runs' preprocess settings (dvc exp run -S preprocess.<key>=<value>)": there are no
  compared runs, and the placeholder names no setting. The reason now says that no run was validated on the
  workspace's faces and what to do: train on them, or put the runs' preprocess output back in the workspace.
- A run evaluated on an external set whose detector settings found none of its faces (``external_<set>_n_faces``
  0, no MAE logged) was "not scored on" the set, and where no run qualified the error said "evaluate the runs on
  the same evaluate.external sets": evaluating it again finds no face again. Its reason now says so, and the
  advice to evaluate again is kept for runs that were not scored on a set (or on another version of it).

Every store is a real SQLite MLflow store in ``tmp_path``.
"""

from __future__ import annotations

import logging

import pytest

from faceage.packaging import PackagingError, select_winner
from faceage.tracking import EXPERIMENT
from tests.unit.test_champion_r34b import SKIP, add_run, client, store

FIXTURES = (client, store)  # shared fixtures, used by name


def test_a_workspace_no_run_was_validated_on_is_said_so_with_what_to_do(client):
    add_run(client, "crop", 3.0, val_faces=("b" * 64, 1412))
    add_run(client, "crop-2", 3.1, val_faces=("b" * 64, 1412))
    with pytest.raises(PackagingError) as err:
        select_winner(client, val_faces="a" * 64)
    message = str(err.value)
    assert "validated on other photos (1412 photos, faces bbbbbbbb; the workspace's: faces aaaaaaaa)" in message
    assert "no run was validated on the workspace's preprocess output" in message
    assert "dvc repro" in message and "dvc exp apply" in message
    assert "the compared runs'" not in message and "preprocess.<key>=<value>" not in message


def test_a_run_on_the_workspace_faces_still_names_the_settings_to_train_with(client, caplog):
    add_run(client, "crop", 4.0, val_faces=("a" * 64, 1500))
    add_run(client, "skip", 3.0, preprocess=SKIP, val_faces=("b" * 64, 1412))
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, val_faces="a" * 64).run_name == "crop"
    text = "\n".join(r.getMessage() for r in caplog.records if r.name == "faceage.packaging")
    assert "dvc exp run -S preprocess.no_face=release_crop" in text
    assert "no run was validated on the workspace's preprocess output" not in text


def test_a_run_that_found_no_face_of_a_set_is_not_sent_to_evaluate_it_again(client):
    """Run "a" was evaluated on utk, but its detector settings found none of its faces (n_faces 0: no MAE logged);
    "b" trails "a" on fgnet by more than the margin. No run qualifies, and evaluating them again on the same sets
    (what the error said: "not scored on utk") changes nothing."""
    add_run(client, "a", 3.0, ext={"fgnet": 5.0}, n_faces={"fgnet": 300})
    client.log_metric(client.search_runs([client.get_experiment_by_name(EXPERIMENT).experiment_id],
                                         "attributes.run_name = 'a'")[0].info.run_id, "external_utk_n_faces", 0)
    add_run(client, "b", 3.5, ext={"utk": 7.0, "fgnet": 8.0}, n_faces={"utk": 400, "fgnet": 300})
    with pytest.raises(PackagingError) as err:
        select_winner(client, external_sha256={"utk": "v1", "fgnet": "v1"})
    message = str(err.value)
    assert "evaluate the runs on the same evaluate.external sets" not in message
    assert "not scored on utk" not in message
    assert "no face of utk scored (external_utk_n_faces=0" in message
