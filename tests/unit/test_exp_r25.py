"""The profile runner puts back keys an earlier `dvc exp run -S` added (+key=) or removed (~key), not only changed."""

import logging
import shutil
from pathlib import Path

import pytest
from dvc.utils.hydra import apply_overrides

import faceage.experiment as experiment
from tests.unit import test_experiment
from faceage.config import ConfigError, load_params, parse_params
from faceage.experiment import committed_params, leftover_resets

REPO = Path(__file__).resolve().parents[2]
repo = test_experiment.repo  # the fixture: a git repo holding the committed params.yaml


def workspace(repo: Path) -> dict:
    return parse_params((repo / "params.yaml").read_text())


@pytest.mark.parametrize("left", [
    ["+train.epoch=1"],  # DVC's own advice for a mistyped key ("To append to your config use +train.epoch=1")
    ["~train.seed"],
    ["+extra.x=1", "++top=2"],
    ["~embed", "~fetch_data"],  # whole sections: the committed ones come back as Hydra dicts
])
def test_a_key_an_earlier_run_added_or_removed_is_put_back(repo, left, tmp_path_factory):
    """After `dvc exp run -S +train.epoch=1` every stage stops on 'Unknown config key: train.epoch', and the
    runner passed nothing for it: every later profile stopped the same way until `git checkout params.yaml`."""
    apply_overrides(repo / "params.yaml", [*left, "train.epochs=3"])
    with pytest.raises(ConfigError):  # what every stage stopped on
        load_params(repo / "params.yaml")
    profile = ["train.epochs=2"]
    resets = leftover_resets(profile, workspace(repo), committed_params(repo))
    experiment.check_overrides(resets)  # each one DVC reads
    apply_overrides(repo / "params.yaml", [*profile, *resets])
    expected = tmp_path_factory.mktemp("expected") / "params.yaml"
    shutil.copy(REPO / "params.yaml", expected)
    apply_overrides(expected, profile)
    assert load_params(repo / "params.yaml") == load_params(expected)
    assert leftover_resets(profile, workspace(repo), committed_params(repo)) == []


def test_a_key_the_profile_removes_or_adds_itself_is_left_alone(repo):
    apply_overrides(repo / "params.yaml", ["+train.epoch=1", "~train.seed"])
    assert leftover_resets(["~train.epoch", "++train.seed=7"], workspace(repo), committed_params(repo)) == []
    apply_overrides(repo / "params.yaml", ["embed.workers=3"])  # a whole section set by the profile
    assert leftover_resets(["~train.epoch", "++train.seed=7", "++embed={workers:1}"], workspace(repo),
                           committed_params(repo)) == []


@pytest.fixture
def fake_dvc(repo, tmp_path, monkeypatch):
    """A `dvc` on PATH that records its arguments, in a DVC repo holding the committed params.yaml."""
    bin_dir, record = tmp_path / "bin", tmp_path / "dvc-call.txt"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_DVC_RECORD"\n')
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}:{Path(experiment.sys.executable).parent}:/usr/bin:/bin")
    monkeypatch.setenv("FAKE_DVC_RECORD", str(record))
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)
    (repo / ".dvc").mkdir()
    return record


def test_the_warning_names_an_added_key_and_the_run_gets_it_removed(repo, fake_dvc, monkeypatch, caplog):
    """The runner passed nothing for a key an earlier run added or removed; now each is named and put back."""
    record = fake_dvc
    apply_overrides(repo / "params.yaml", ["+train.epoch=1", "~train.seed"])
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.WARNING, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=2"]) == 0
    args = record.read_text().splitlines()
    seed = committed_params(repo)["train"]["seed"]
    assert args == ["exp", "run", "-S", "train.epochs=2", "-S", f"++train.seed={seed}", "-S", "~train.epoch"]
    assert "train.epoch is 1 in the workspace" in caplog.text and "runs without it" in caplog.text
    assert "train.seed is missing in the workspace" in caplog.text


def test_a_taken_name_can_be_replaced_as_dvc_advises(repo, fake_dvc, monkeypatch):
    """`-n quick` a second time: DVC stops with "To overwrite the existing experiment run: dvc exp run -f ...",
    and the runner refused -f (argparse: unrecognized arguments), so only a plain `dvc exp run -f`, without the
    put-back of leftover overrides, could replace it."""
    monkeypatch.chdir(repo)
    assert experiment.main(["-f", "-n", "quick", "-S", "train.epochs=2"]) == 0
    assert fake_dvc.read_text().splitlines() == ["exp", "run", "-f", "-n", "quick", "-S", "train.epochs=2"]
