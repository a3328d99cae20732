"""Profiles run on top of the committed params.yaml, not on what an earlier `dvc exp run -S` left."""

import shutil
import subprocess
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

from faceage.config import load_params, parse_params
from faceage.experiment import committed_params, leftover_resets, override_value

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
QUICK = ["fetch_data.source=/data/appa-real-sample", "train.backbone=dlib_age"]
FINETUNE = [*QUICK, "train.epochs=12", "train.lr=0.003", "train.layer_lr_decay=0.316", "train.freeze_blocks=4",
            "train.distill_weight=1.0", "train.wise_ft=true"]


@pytest.fixture
def repo(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=tmp_path, check=True)
    return tmp_path


def test_a_profile_after_another_runs_with_the_committed_values_of_what_it_does_not_set(repo, tmp_path_factory):
    """`make quick-finetune` then `make quick`: DVC's -S (its own override code, called here) left the
    fine-tuning keys in params.yaml, and quick ran the fine-tuning recipe again."""
    params = repo / "params.yaml"
    apply_overrides(params, FINETUNE)  # what `dvc exp run -S ...` leaves in the workspace
    resets = leftover_resets(QUICK, parse_params(params.read_text()), committed_params(repo))
    assert sorted(r.split("=")[0] for r in resets) == ["train.distill_weight", "train.epochs", "train.freeze_blocks",
                                                       "train.layer_lr_decay", "train.lr", "train.wise_ft"]
    apply_overrides(params, [*QUICK, *resets])
    expected = tmp_path_factory.mktemp("expected") / "params.yaml"
    shutil.copy(REPO / "params.yaml", expected)
    apply_overrides(expected, QUICK)
    assert load_params(params) == load_params(expected)
    assert leftover_resets(QUICK, parse_params(params.read_text()), committed_params(repo)) == []


def test_every_committed_value_survives_the_trip_through_dvcs_override_parser(repo):
    """Each reset is parsed by Hydra's grammar in DVC: URLs, relative paths, lists, 'auto', floats."""
    committed = parse_params((repo / "params.yaml").read_text())
    everything = [f"{section}.{key}={override_value(value)}" for section, keys in committed.items()
                  for key, value in keys.items()]
    apply_overrides(repo / "params.yaml", everything)
    assert parse_params((repo / "params.yaml").read_text()) == committed
    assert override_value('a "quoted" path\\x') == '"a \\"quoted\\" path\\\\x"'


def test_outside_git_there_is_nothing_to_reset(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert committed_params(tmp_path) is None
