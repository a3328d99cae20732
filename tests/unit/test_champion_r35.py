"""Round 35: a run the champion rule excludes for itself neither wins nor judges the runs that can.

The external-MAE guard vetoes a run that trails the *best* run on a cross-dataset set by more than the margin. That
best was taken over every run scored on the set, including the runs the same rule excludes whatever their
external MAEs: a run validated on other photos than the workspace's (an old ``preprocess.no_face=skip`` run, an
earlier preprocess) and a run whose validation or test MAE is NaN or infinite (a diverged training). Such a run with
a good external MAE vetoed every run that could win, so packaging refused ("no run qualifies", naming the excluded
run) or shipped a run with a worse validation MAE. The same runs
- shrank the faces the guard pairs runs on (another detector's faces: the eligible runs, scored on the same faces,
  were compared on the part they share with a run that cannot win),
- voted on the validation faces and the external-set versions the others are compared on (with no workspace record:
  two diverged runs outvoted the one good run, which was then "validated on other photos"),
- and hid the "each trails the other on some set" error behind their own exclusion.

Now the guard's best, the paired faces and those votes come from the runs that can win but for the guard.

Every store is a real SQLite MLflow store in ``tmp_path``.
"""

from __future__ import annotations

import logging
import math

import pytest

from faceage.packaging import Candidate, PackagingError, rank_candidates, select_winner, selection_table
from faceage.training import faces_fingerprint
from tests.unit.test_champion_r34b import RELEASE_CROP, SKIP, add_run, client, log_predictions, store, verdicts

FIXTURES = (client, store)  # shared fixtures, used by name

WORKSPACE, OTHER = "a" * 64, "b" * 64  # validation faces: the workspace's, an older preprocess output's


def run(name: str, val: float, utk: float | None, start: int, *, val_faces: str = WORKSPACE, test: float | None = None,
        version: str | None = None) -> Candidate:
    """A candidate as :func:`faceage.packaging.candidate` builds it from a run."""
    return Candidate(name, name, val, val if test is None else test, start, {} if utk is None else {"utk": utk}, "",
                     {"utk": version} if version and utk is not None else {},
                     val_faces_sha256=val_faces, val_n_faces="1500" if val_faces == WORKSPACE else "1412")


def test_a_run_validated_on_other_photos_does_not_veto_the_runs_that_can_win(client, caplog):
    """An old skip run (utk 5.0) made the guard's best: both runs on the workspace's faces were vetoed, and packaging
    refused, naming the skip run, which can never win."""
    add_run(client, "crop-a", 4.0, val_faces=(WORKSPACE, 1500), ext={"utk": 7.0})
    add_run(client, "crop-b", 4.2, val_faces=(WORKSPACE, 1500), ext={"utk": 7.2})
    add_run(client, "old-skip", 3.0, preprocess=SKIP, val_faces=(OTHER, 1412), ext={"utk": 5.0})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}, val_faces=WORKSPACE).run_name == "crop-a"
    text = verdicts(caplog)
    assert "validated on other photos (1412 photos, faces bbbbbbbb" in text
    assert "> best 5.000" not in text
    rows = {line.split()[1]: line for line in text[text.index("champion rule"):].splitlines()[2:] if line.split()}
    assert rows["crop-a"].endswith("WINNER") and rows["crop-b"].endswith("eligible")


def test_an_excluded_run_does_not_make_the_guard_pick_a_worse_run():
    """With the old run's 4.8 as best, crop-a (5.4) was vetoed and crop-b won on a worse validation MAE."""
    ranked = rank_candidates([run("crop-a", 4.0, 5.4, 1), run("crop-b", 4.2, 5.0, 2),
                              run("old", 3.0, 4.8, 0, val_faces=OTHER)], {"utk": "v1"}, WORKSPACE)
    assert [(c.run_id, c.excluded == "") for c in ranked] == [("crop-a", True), ("crop-b", True), ("old", False)]
    assert ranked[2].excluded.startswith("validated on other photos") and not ranked[2].vetoed


@pytest.mark.parametrize("val, test, why", [(math.nan, 3.0, "validation MAE is nan"),
                                            (3.0, math.inf, "test MAE is inf")])
def test_a_run_whose_validation_or_test_failed_does_not_veto(val, test, why):
    ranked = rank_candidates([run("broken", val, 3.0, 2, test=test), run("good", 4.5, 7.0, 1)], {"utk": "v1"})
    assert [(c.run_id, c.excluded) for c in ranked] == [("good", ""), ("broken", why)]


def faces(first: int, last: int, error: float) -> dict[str, float]:
    return {f"{i:05d}.jpg": error for i in range(first, last)}


def test_the_paired_faces_are_those_of_the_runs_that_can_win(client, tmp_path, caplog):
    """hog and cnn scored the same 200 utk faces (own MAEs 6.0 both: hog wins on validation). An old skip run with
    another detector scored faces 100-299: pairing all three compared hog and cnn on faces 100-199 alone, where hog
    is 2 years worse, and cnn won."""
    hog = {**faces(0, 100, 4.0), **faces(100, 200, 8.0)}
    cnn = faces(0, 200, 6.0)
    old = faces(100, 300, 7.0)
    for name, val, scored, preprocess, val_faces in (("hog", 4.0, hog, RELEASE_CROP, WORKSPACE),
                                                     ("cnn", 4.2, cnn, RELEASE_CROP, WORKSPACE),
                                                     ("old-skip", 3.0, old, {**SKIP, "upsample": "2"}, OTHER)):
        run_id = add_run(client, name, val, preprocess=preprocess, val_faces=(val_faces, 1500),
                         ext={"utk": sum(scored.values()) / len(scored)}, ext_faces={"utk": faces_fingerprint(scored)},
                         n_faces={"utk": len(scored)})
        log_predictions(client, run_id, tmp_path, {"utk": scored})
    with caplog.at_level(logging.INFO, logger="faceage.packaging"):
        assert select_winner(client, external_sha256={"utk": "v1"}, val_faces=WORKSPACE).run_name == "hog"
    text = verdicts(caplog)
    assert "common faces" not in text and "the guard compares their MAEs on" not in text
    assert "utk common" not in text[text.index("champion rule"):]


def test_runs_that_cannot_win_do_not_outvote_the_validation_faces():
    """No workspace record: two diverged runs validated on other photos were the majority, and the one good run was
    excluded as "validated on other photos"."""
    ranked = rank_candidates([run("good", 4.5, None, 1), run("nan-1", math.nan, None, 2, val_faces=OTHER),
                              run("nan-2", math.nan, None, 3, val_faces=OTHER)])
    assert ranked[0].run_id == "good" and ranked[0].excluded == ""
    for c in ranked[1:]:  # both reasons, each true; the compared photos are the good run's
        assert c.excluded.startswith("validation MAE is nan; test MAE is nan; validated on other photos (1412 photos, "
                                     "faces bbbbbbbb; the compared runs': 1500 photos, faces aaaaaaaa)")


def test_runs_that_cannot_win_do_not_outvote_the_external_set_version():
    """No workspace record of utk: three old runs validated on other photos, scored on utk's old files, made the old
    files the compared version, and both runs that can win were sent to rerun their evaluate."""
    old, new = "o" * 64, "n" * 64
    ranked = rank_candidates([run("a", 4.0, 7.0, 4, version=new), run("b", 4.3, 7.1, 5, version=new),
                              *(run(f"old-{i}", 3.0, 6.0, i, val_faces=OTHER, version=old) for i in range(3))],
                             None, WORKSPACE)
    assert [(c.run_id, c.excluded) for c in ranked[:2]] == [("a", ""), ("b", "")]
    assert all("another version" not in c.excluded for c in ranked)


def test_runs_that_each_trail_the_other_are_said_so_beside_a_run_that_cannot_win(client):
    """x and y each trail the other on one set: packaging said "no run qualifies (best candidate old-skip: validated
    on other photos ...)", as if retraining the skip run were the way out."""
    add_run(client, "x", 4.0, val_faces=(WORKSPACE, 1500), ext={"a": 6.0, "b": 9.0})
    add_run(client, "y", 4.5, val_faces=(WORKSPACE, 1500), ext={"a": 7.0, "b": 7.0})
    add_run(client, "old-skip", 3.0, preprocess=SKIP, val_faces=(OTHER, 1412), ext={"a": 8.0, "b": 8.0})
    with pytest.raises(PackagingError) as err:
        select_winner(client, external_sha256={"a": "v1", "b": "v1"}, val_faces=WORKSPACE)
    message = str(err.value)
    assert "no run passes the external-MAE guard" in message and "none generalises on every set" in message
    assert "x: b MAE 9.000 > best 7.000 + 0.500" in message and "y: a MAE 7.000 > best 6.000 + 0.500" in message
    assert "best candidate" not in message


def test_the_table_still_shows_an_excluded_runs_numbers_and_why():
    ranked = rank_candidates([run("crop", 4.0, 7.0, 1), run("old", 3.0, 5.0, 0, val_faces=OTHER)], {"utk": "v1"},
                             WORKSPACE)
    table = selection_table(ranked)
    rows = {line.split()[1]: line for line in table.splitlines()[1:]}
    assert rows["crop"].endswith("WINNER") and "5.00" in rows["old"] and "excluded: validated on other photos" in rows["old"]
    assert "> best" not in rows["old"]  # not judged against runs it is not compared with


def test_the_runs_that_could_win_are_listed_before_those_that_cannot():
    ranked = rank_candidates([run("x", 4.0, 9.0, 1), run("y", 4.5, 6.0, 2), run("old", 3.0, 5.0, 0, val_faces=OTHER),
                              run("nan", math.nan, 4.0, 3)], {"utk": "v1"}, WORKSPACE)
    assert [(c.run_id, c.contender) for c in ranked] == [("y", True), ("x", True), ("old", False), ("nan", False)]
    assert ranked[1].excluded == "utk MAE 9.000 > best 6.000 + 0.500" and ranked[1].vetoed


def test_a_refusal_names_a_run_that_could_win_not_one_that_cannot(client):
    """"new" is not scored on set b, and the old skip run (lowest validation MAE) can never win: the refusal named
    the skip run as the best candidate and its photos, where evaluating "new" on b is what helps."""
    add_run(client, "old-skip", 3.0, preprocess=SKIP, val_faces=(OTHER, 1412), ext={"a": 9.0, "b": 9.0})
    new = add_run(client, "new", 4.0, val_faces=(WORKSPACE, 1500), ext={"a": 6.0})
    with pytest.raises(PackagingError) as err:
        select_winner(client, external_sha256={"a": "v1", "b": "v1"}, val_faces=WORKSPACE)
    message = str(err.value)
    assert f"best candidate {new}: not scored on b)" in message
    assert "evaluate the runs on the same evaluate.external sets" in message
    assert "validated on other photos" not in message


def test_a_store_of_runs_that_cannot_win_is_still_refused_with_their_reasons(client):
    add_run(client, "old-skip", 3.0, preprocess=SKIP, val_faces=(OTHER, 1412), ext={"a": 5.0})
    with pytest.raises(PackagingError, match="no run qualifies by the champion rule .*validated on other photos"):
        select_winner(client, external_sha256={"a": "v1"}, val_faces=WORKSPACE)
