"""Round 35 second read: what the contender rule left to a run that can never win.

The compared validation faces are voted by the runs that can win (finite validation and test MAEs), but the run
whose preprocess settings stand for those faces (what a run "validated on other photos" is told to train again with)
was still the newest run on them, a diverged one included: a sweep's last, diverged run (NaN validation MAE, another
detector, the same photos with ``no_face=release_crop``) sent the skip run to ``dvc exp run -S
preprocess.detector=cnn``, a setting no run that can win was trained with.
"""

from __future__ import annotations

import math

from faceage.packaging import Candidate, rank_candidates

WORKSPACE, OTHER = "a" * 64, "b" * 64  # validation faces: the compared runs', a skip run's
HOG = {"no_face": "release_crop", "detector": "hog", "upsample": "1"}


def run(name: str, val: float, start: int, *, val_faces: str = WORKSPACE, **preprocess: str) -> Candidate:
    """A candidate as :func:`faceage.packaging.candidate` builds it from a run (no external sets)."""
    return Candidate(name, name, val, val, start, {}, "", {}, val_faces_sha256=val_faces,
                     val_n_faces="1500" if val_faces == WORKSPACE else "1412", preprocess={**HOG, **preprocess})


def test_the_rerun_hint_names_the_settings_of_a_run_that_can_win_not_a_diverged_one():
    runs = [run("hog-a", 4.0, 1), run("hog-b", 4.1, 2),
            run("skip", 3.5, 3, val_faces=OTHER, no_face="skip"),
            run("cnn-diverged", math.nan, 4, detector="cnn")]  # newest, on the compared photos, NaN
    ranked = {c.run_name: c for c in rank_candidates(runs)}
    assert ranked["hog-a"].excluded == ""
    skip = ranked["skip"].excluded
    assert "validated on other photos" in skip
    assert "-S preprocess.no_face=release_crop" in skip
    # The diverged run's detector is not a setting of the compared runs
    assert "detector" not in skip, skip
    assert "cnn" not in skip, skip


def test_a_diverged_run_still_stands_for_the_photos_when_no_run_on_them_can_win():
    """The workspace's photos, on which only a diverged run was validated: its settings are all there is to name."""
    runs = [run("skip", 3.5, 1, val_faces=OTHER, no_face="skip"),
            run("cnn-diverged", math.nan, 2, detector="cnn")]
    skip = {c.run_name: c for c in rank_candidates(runs, val_faces=WORKSPACE)}["skip"].excluded
    assert "-S preprocess.no_face=release_crop" in skip and "-S preprocess.detector=cnn" in skip
