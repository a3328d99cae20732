"""The profile runner (`python -m faceage.experiment`, `make quick*`) given a value the stages refuse or a key
params.yaml lacks: it started `dvc exp run`, which wrote the bad value into params.yaml, took DVC's lock and ran
check_sources to fail there (or failed with DVC's bare "Invalid `--set-param` value" for a mistyped key), and left
params.yaml modified. It now checks the params the run would have, on a copy, before starting anything."""

import logging
import shutil
import subprocess
from pathlib import Path

import pytest

from faceage import experiment
from tests.unit.test_review_exp_r29 import fake_dvc  # the fixture: a dvc on PATH that records its arguments

FIXTURES = (fake_dvc,)  # pytest finds the fixture by its name in this module

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A git + DVC folder whose committed params.yaml is the project's, as the working folder."""
    root = tmp_path / "repo"
    root.mkdir()
    shutil.copy(REPO / "params.yaml", root / "params.yaml")
    (root / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=root, check=True)
    monkeypatch.chdir(root)
    return root


@pytest.mark.parametrize(("override", "expected"), [
    ("train.epochs=abc", "train.epochs must be an integer, got 'abc'"),
    ("train.epochs=5.", "train.epochs must be an integer, got 5.0"),
    ("train.epochs=-3", "train.epochs must be >= 0"),
    ("train.batch_size=0", "train.batch_size must be >= 1, got 0"),
    ("train.lr=[1,2]", "train.lr must be a number, got [1, 2]"),
    ("train.amp=1", "train.amp must be true or false, got 1"),
    # Hydra reads 0x10 as a string, and DVC writes it quoted: every stage would refuse it
    ("train.epochs=0x10", "train.epochs must be an integer, got '0x10'"),
    ("train.optimizer=adam", "train.optimizer must be one of ['adamw', 'sgd'], got 'adam'"),
    ("+train.learning_rate=3e-4", "Unknown config key: train.learning_rate"),
])
def test_a_value_the_stages_refuse_stops_before_dvc_and_leaves_params_yaml(repo, fake_dvc, caplog, override, expected):
    before = (repo / "params.yaml").read_bytes()
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.backbone=dlib_age", "-S", override]) == 1
    assert not fake_dvc.exists(), "dvc exp run was started"
    assert (repo / "params.yaml").read_bytes() == before
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert expected in line
    assert "params.yaml is unchanged" in line


@pytest.mark.parametrize(("override", "meant"), [
    ("train.learning_rate=3e-4", "train.lr"),
    ("train.epoch=5", "train.epochs"),
    ("trian.epochs=5", "train.epochs"),
])
def test_a_mistyped_key_is_named_with_the_key_meant(repo, fake_dvc, caplog, override, meant):
    """DVC refuses these with "Invalid `--set-param` value" alone, naming neither the key nor the one meant."""
    before = (repo / "params.yaml").read_bytes()
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", override]) == 1
    assert not fake_dvc.exists()
    assert (repo / "params.yaml").read_bytes() == before
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    key = override.partition("=")[0]
    assert f"params.yaml has no key {key}" in line
    assert f"did you mean {meant}?" in line


def test_a_bad_value_left_in_the_workspace_is_put_back_and_the_run_goes_on(repo, fake_dvc):
    """What an earlier failed `dvc exp run -S train.epochs=abc` left: the reset replaces it, so the check passes."""
    text = (repo / "params.yaml").read_text().replace("  epochs: 30\n", "  epochs: abc\n", 1)
    (repo / "params.yaml").write_text(text)
    assert experiment.main(["-S", "train.lr=3e-4"]) == 0
    args = fake_dvc.read_text().splitlines()
    assert args[:4] == ["exp", "run", "-S", "train.lr=3e-4"]
    assert "train.epochs=30" in args


@pytest.mark.parametrize("override", ["train.lr=1e-3", "train.lr=.5", "train.seed=1_000", "train.lr=3e-4",
                                      "params.yaml:train.epochs=5", "++train.epochs=5"])
def test_good_overrides_still_run(repo, fake_dvc, override):
    assert experiment.main(["-S", override]) == 0
    assert fake_dvc.read_text().splitlines()[:4] == ["exp", "run", "-S", override]
