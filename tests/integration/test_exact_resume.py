"""kill -9 of the real `train` stage at 3 random points, then `dvc repro`: the same results as an uninterrupted run.

The CI size of ``benchmarks/kill_resume.py`` (64/16/16 real faces, ResNet-18 from scratch, 64 px,
3 epochs, batch 16); the script also runs the full sample. The kill seed is printed, so a failure
can be replayed with ``python benchmarks/kill_resume.py --seed N``.
"""

import argparse

import pytest

from benchmarks.kill_resume import run

pytestmark = pytest.mark.integration


def test_killed_train_resumes_exactly_and_the_first_rerun_succeeds(sample_dir, tmp_path):
    args = argparse.Namespace(sample=sample_dir, train=64, valid=16, test=16, epochs=3, image_size=64, batch_size=16,
                              kills=3, seed=None, workdir=tmp_path / "work")
    summary = run(args)
    print(summary)
    assert not summary["reference_mlflow_problems"]
    assert len(summary["kills"]) == 3
    for kill in summary["kills"]:
        assert kill["rerun_rc"] == 0, kill.get("rerun_output")
        assert kill["mismatched"] == [], kill
        assert kill["mlflow_problems"] == [], kill
        assert kill["resumed"] is not False, f"a state was left but the rerun started over: {kill}"
    # The first kill lands while training, after the state's first write: the rerun must resume that run.
    # (Training is deterministic, so a rerun from scratch gives the same bytes: only this tells them apart.)
    first = summary["kills"][0]
    assert not first["missed"] and first["state_left"] and first["resumed"] is True, summary
