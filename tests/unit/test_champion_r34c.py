"""Round 34c: a preprocess sweep (``preprocess.upsample`` 0/1/2, ``preprocess.detector`` hog/cnn) is judged on the
faces its runs have in common, not thrown away.

Round 34b stopped the external-MAE guard from comparing MAEs measured on different faces of a set without release
crops (utk-external: each run is scored on the faces its own detector found), by excluding every run scored on
other faces than most runs. In a preprocess sweep every run finds its own subset, so all runs but the newest were
excluded, and the advice was to retrain them with the other's settings: the sweep itself. The guard now compares
such runs on the faces every compared run scored (the intersection), from each run's per-face predictions
(``evaluation/external_predictions.csv``, which ``evaluate`` logs): a paired comparison. Nothing is downloaded where
the runs scored the same faces; a run without the artifact, or too few common faces, falls back to own MAEs, said
in the log.

Every store is a real SQLite MLflow store in ``tmp_path`` with real logged artifacts.
"""

from __future__ import annotations

import logging

import pytest

from faceage.packaging import select_winner
from faceage.training import faces_fingerprint
from tests.unit.test_champion_r34b import RELEASE_CROP, add_run, client, log_predictions, store, verdicts

FIXTURES = (client, store)  # shared fixtures, used by name

def faces(first: int, last: int, error: float) -> dict[str, float]:
    """``{file name: absolute error}`` for faces ``first`` .. ``last - 1`` of utk."""
    return {f"{i:05d}.jpg": error for i in range(first, last)}


def add_scored_run(client, tmp_path, name: str, val: float, utk: dict[str, float], *, preprocess=None,
                   artifact: bool = True, artifact_faces: dict[str, float] | None = None) -> str:
    """A finished run scored on the utk faces ``utk`` {file: |error|}: its MAE, n_faces and faces fingerprint as
    evaluate logs them, and (``artifact``) its predictions (``artifact_faces``: another evaluation's)."""
    own = sum(utk.values()) / len(utk)
    run_id = add_run(client, name, val, preprocess=preprocess, ext={"utk": own},
                     ext_faces={"utk": faces_fingerprint(utk)}, n_faces={"utk": len(utk)})
    if artifact:
        log_predictions(client, run_id, tmp_path, {"utk": artifact_faces if artifact_faces is not None else utk})
    return run_id


class Downloads:
    """Counts the artifact downloads of a real client (delegating to it)."""

    def __init__(self, client, monkeypatch):
        self.calls: list[tuple[str, str]] = []
        real = client.download_artifacts

        def download(run_id, path, dst_path=None):
            self.calls.append((run_id, path))
            return real(run_id, path, dst_path)

        monkeypatch.setattr(client, "download_artifacts", download)


def upsample(n: int) -> dict[str, str]:
    return {**RELEASE_CROP, "upsample": str(n)}


def sweep(client, tmp_path, **kwargs) -> dict[str, str]:
    """An upsample 0/1/2 sweep on utk: upsample 0 finds faces 0-149, 1 also 150-199, 2 also 200-249 (small faces,
    hard: error 12). On the 150 common faces u0 is 2 years worse than u1 and u2, yet its own MAE (7.0, on easy faces
    only) is near the others' own (6.75, 7.92, with the hard faces)."""
    return {
        "u0": add_scored_run(client, tmp_path, "u0", 3.9, faces(0, 150, 7.0), preprocess=upsample(0), **kwargs),
        "u1": add_scored_run(client, tmp_path, "u1", 4.0, {**faces(0, 150, 5.0), **faces(150, 200, 12.0)},
                             preprocess=upsample(1)),
        "u2": add_scored_run(client, tmp_path, "u2", 4.2, {**faces(0, 150, 5.2), **faces(150, 250, 12.0)},
                             preprocess=upsample(2)),
    }


def test_an_upsample_sweep_is_compared_on_the_faces_every_run_scored(client, tmp_path, caplog):
    sweep(client, tmp_path)
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client, external_sha256={"utk": "v1"})
    # Not the newest alone (34b), nor u0 by its own MAE on easy faces (7.0 within 0.5 of u1's 6.75 on harder ones)
    assert winner.run_name == "u1"
    text = verdicts(caplog)
    assert "scored on other faces" not in text and "train it again" not in text
    assert "utk: the 3 compared runs were scored on 3 different sets of faces" in text
    assert "on the 150 faces all 3 scored" in text
    assert "utk MAE 7.000 on the 150 common faces > best 5.000 + 0.500" in text  # u0, on paired MAEs
    # The table shows what the guard compared: each run's MAE on the common faces, and how many
    table = text[text.index("champion rule"):]
    assert "utk common" in table
    rows = {line.split()[1]: line for line in table.splitlines()[2:] if line.split()}
    assert "5.00 on 150" in rows["u1"] and "5.20 on 150" in rows["u2"] and "7.00 on 150" in rows["u0"]
    assert "WINNER" in rows["u1"] and "eligible" in rows["u2"] and "excluded: utk MAE 7.000" in rows["u0"]


def test_a_detector_sweep_pairs_partly_overlapping_faces(client, tmp_path, caplog):
    """hog finds faces 0-199, cnn 20-219: neither set holds the other; the guard compares on faces 20-199."""
    add_scored_run(client, tmp_path, "hog", 4.0, {**faces(0, 20, 1.0), **faces(20, 200, 8.0)})
    add_scored_run(client, tmp_path, "cnn", 4.4, {**faces(20, 200, 6.0), **faces(200, 220, 1.0)},
                   preprocess={**RELEASE_CROP, "detector": "cnn"})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client, external_sha256={"utk": "v1"})
    assert winner.run_name == "cnn"  # hog's 8.0 on the 180 common faces trails cnn's 6.0 by 2 years
    assert "utk MAE 8.000 on the 180 common faces > best 6.000 + 0.500" in verdicts(caplog)


def test_runs_scored_on_the_same_faces_download_nothing(client, tmp_path, monkeypatch, caplog):
    """make quick, a backbone sweep: every run scored the same faces; the guard costs no artifact download."""
    same = faces(0, 300, 6.0)
    add_scored_run(client, tmp_path, "resnet", 4.0, same)
    add_scored_run(client, tmp_path, "vit", 3.8, {**same, "00000.jpg": 60.0})  # same faces, one bad prediction
    downloads = Downloads(client, monkeypatch)
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}).run_name == "vit"
    assert downloads.calls == []
    assert "common" not in verdicts(caplog)


def test_each_run_predictions_are_downloaded_once(client, tmp_path, monkeypatch):
    ids = sweep(client, tmp_path)
    downloads = Downloads(client, monkeypatch)
    select_winner(client, external_sha256={"utk": "v1"})
    assert sorted(r for r, _ in downloads.calls) == sorted(ids.values())
    assert {p for _, p in downloads.calls} == {"evaluation/external_predictions.csv"}


def test_a_run_without_predictions_is_compared_by_its_own_mae_said_once(client, tmp_path, caplog):
    """u0 evaluated before its predictions were logged (or they were deleted): compared as before pairing, by its own
    MAE (7.0, on its 150 faces), against u1 and u2 paired on the 200 faces they share (6.75 and 6.90): within the
    margin, so u0 wins on validation MAE, as it did before the faces were fingerprinted, and the log says why."""
    ids = sweep(client, tmp_path, artifact=False)
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client, external_sha256={"utk": "v1"})
    assert winner.run_name == "u0"
    text = verdicts(caplog)
    lines = [line for line in text.splitlines() if "no readable evaluation/external_predictions.csv" in line]
    assert len(lines) == 1 and f"u0 ({ids['u0'][:8]}) has no readable" in lines[0]
    assert "its own MAE on its own 150 faces" in lines[0] and "rerun its evaluate" in lines[0]
    assert "3 different sets of faces (evaluate.external_faces_sha256; faces per run: u1 200, u2 250)" in text
    assert "on the 200 faces all 2 scored: u1 6.750 (own 6.750), u2 6.900 (own 7.920)" in text
    table = text[text.index("champion rule"):]
    assert [line.split()[1] for line in table.splitlines()[2:5]] == ["u0", "u1", "u2"]


def test_predictions_of_another_evaluation_are_not_paired(client, tmp_path, caplog):
    """An artifact whose faces are not the ones the run's tag fingerprints (a later evaluate failed to upload its
    own): pairing on it would compare the wrong predictions; the run falls back to its own MAE."""
    add_scored_run(client, tmp_path, "hog", 4.0, faces(0, 200, 5.0))
    add_scored_run(client, tmp_path, "cnn", 4.4, faces(0, 180, 5.1), artifact_faces=faces(0, 170, 5.1),
                   preprocess={**RELEASE_CROP, "detector": "cnn"})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}).run_name == "hog"
    text = verdicts(caplog)
    assert "not the faces its evaluate.external_faces_sha256 names" in text
    assert "the guard compares their MAEs on" not in text  # one run left to pair: nothing paired


@pytest.mark.parametrize("second, why", [
    (faces(60, 400, 6.0), "only 40 faces in common"),  # < 100 faces
    ({**faces(0, 100, 6.0), **faces(2000, 2020, 6.0), **faces(1000, 1300, 6.0)},
     "only 120 faces in common"),  # >= 100, but < 50% of the fewest a run scored (a's 300)
])
def test_too_few_common_faces_fall_back_to_own_maes_and_say_so(client, tmp_path, caplog, second, why):
    first = add_scored_run(client, tmp_path, "a", 4.0, {**faces(0, 100, 20.0), **faces(2000, 2200, 6.0)})
    add_scored_run(client, tmp_path, "b", 4.5, second, preprocess={**RELEASE_CROP, "detector": "cnn"})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        winner = select_winner(client, external_sha256={"utk": "v1"})
    text = verdicts(caplog)
    assert why in text and "too few to compare on" in text and "their own MAEs compare" in text
    # Own MAEs: a's 10.67 trails b's 6.0: vetoed as before pairing existed (on 20 years on 40 common faces: also)
    assert winner.run_name == "b" and first
    assert "utk MAE 10.667 > best 6.000" in text
    assert "the guard compares their MAEs on" not in text


def test_validation_faces_still_exclude_while_external_faces_are_paired(client, tmp_path, caplog):
    """A skip run validated on other photos stays excluded (34b), whatever its utk faces; the others are paired."""
    add_scored_run(client, tmp_path, "hog", 4.0, faces(0, 200, 6.0))
    add_scored_run(client, tmp_path, "cnn", 4.2, faces(0, 180, 6.1), preprocess={**RELEASE_CROP, "detector": "cnn"})
    add_run(client, "skip", 3.0, preprocess={**RELEASE_CROP, "no_face": "skip"}, val_faces=("b" * 64, 1412),
            ext={"utk": 6.0}, ext_faces={"utk": faces_fingerprint(faces(0, 200, 0))}, n_faces={"utk": 200})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}, val_faces="a" * 64).run_name == "hog"
    assert "validated on other photos (1412 photos, faces bbbbbbbb" in verdicts(caplog)
