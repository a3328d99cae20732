"""Round 35 review of how settings reach the pipeline: the profile runner's committed params.yaml, and the one
line a params.yaml older than the code gets."""

import logging
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

import faceage.experiment as experiment
from faceage.config import ConfigError, load_params, params_from_dict, parse_params
from faceage.experiment import ProfileError, committed_base

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _commit(folder: Path, text: str) -> None:
    (folder / "params.yaml").write_text(text)
    subprocess.run(["git", "init", "-q"], cwd=folder, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=folder, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=folder, check=True)


def _with_duplicate_epochs() -> str:
    """The project's params.yaml with `epochs:` twice in train (what a merge that kept both sides leaves)."""
    text = (REPO / "params.yaml").read_text()
    assert "\n  epochs: 30\n" in text
    return text.replace("\n  epochs: 30\n", "\n  epochs: 30\n  epochs: 12\n", 1)


@pytest.fixture
def broken_commit(tmp_path):
    """A DVC repo whose committed params.yaml repeats a key, with the workspace's fixed but not yet committed."""
    broken = _with_duplicate_epochs()
    _commit(tmp_path, broken)
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    line = broken.splitlines().index("  epochs: 12") + 1
    return tmp_path, line


def test_a_committed_params_yaml_that_is_not_yaml_stops_the_runner_with_one_line(broken_commit, monkeypatch, caplog):
    """`make quick` with a committed params.yaml that repeats a key (a merge kept both sides) and the workspace's
    already fixed: the runner died with PyYAML's 20-line traceback, before its own checks."""
    repo, line = broken_commit
    monkeypatch.chdir(repo)
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no dvc: it must not get that far
    before = (repo / "params.yaml").read_bytes()
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=2"]) == 1
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert "\n" not in message
    assert "committed" in message and f"line {line}" in message and "duplicate key 'epochs'" in message
    assert "commit" in message.split("):")[-1]  # what to do: commit the fixed file
    assert (repo / "params.yaml").read_bytes() == before


def test_the_recipe_gets_the_same_one_line_for_a_committed_params_yaml_that_is_not_yaml(broken_commit):
    repo, line = broken_commit
    with pytest.raises(ProfileError, match=rf"committed.*line {line}.*duplicate key 'epochs'"):
        committed_base(repo, user="the recipe")


@pytest.mark.parametrize("text", ["- train\n- evaluate\n", "just a string\n"])
def test_a_committed_params_yaml_that_is_not_a_mapping_is_one_line(tmp_path, text):
    _commit(tmp_path, text)
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    with pytest.raises(ProfileError, match="committed.*must be a mapping of sections"):
        experiment.committed_params(tmp_path)
    with pytest.raises(ProfileError, match="committed.*must be a mapping of sections"):
        committed_base(tmp_path, user="the recipe")


def _project_raw() -> dict:
    return parse_params((REPO / "params.yaml").read_text())


@pytest.mark.parametrize(("section", "key", "accepts", "line"), [
    ("train", "face_features", r"one of \['descriptor', 'layers'\]", "face_features: descriptor"),
    ("train", "distill_open_top", "true or false", "distill_open_top: true"),
    ("train", "ensemble_weight", r"auto or a number", "ensemble_weight: auto"),
    ("preprocess", "cnn_retry_side", "an integer", "cnn_retry_side: 400"),
    ("train", "lr", "a number", "lr: 0.001"),
    ("evaluate", "low_res", "a list of numbers", "low_res: [0.75, 0.5]"),
    ("fetch_data", "mirrors", "a list of strings",
     "mirrors: ['http://158.109.8.102/AppaRealAge/appa-real-release.zip']"),
])
def test_a_key_an_older_params_yaml_lacks_is_named_with_what_it_accepts_and_the_line_to_add(
        tmp_path, section, key, accepts, line):
    """A params.yaml from an older checkout (or a branch made before the key) said only `Missing config key:
    train.face_features`: nothing of what the key takes nor of the line that makes every stage run again."""
    raw = _project_raw()
    del raw[section][key]
    with pytest.raises(ConfigError) as caught:
        params_from_dict(raw)
    message = str(caught.value)
    assert message.startswith(f"Missing config key: {section}.{key}")
    assert "\n" not in message
    assert re.search(accepts, message), message
    assert f"`{line}`" in message
    # The line offered, added under its section, is what the code's default is: the file loads again.
    [added] = yaml.safe_load(line).items()
    raw[section][added[0]] = added[1]
    assert params_from_dict(raw) == load_params(REPO / "params.yaml")


def test_a_missing_section_is_named_with_the_section_to_add(tmp_path):
    raw = _project_raw()
    del raw["embed"]
    with pytest.raises(ConfigError, match=r"Missing config key: embed\b.*`embed: \{workers: 0\}`"):
        params_from_dict(raw)
    raw["embed"] = {"workers": 0}
    params_from_dict(raw)


def test_the_runner_names_the_key_an_older_params_yaml_lacks(tmp_path, monkeypatch):
    """Through `python -m faceage.experiment`: the same line, with params.yaml left as it was."""
    raw = _project_raw()
    del raw["train"]["face_features"]
    text = yaml.safe_dump(raw, sort_keys=False)
    _commit(tmp_path, text)
    (tmp_path / ".dvc").mkdir()
    with pytest.raises(ProfileError, match=r"Missing config key: train\.face_features.*`face_features: descriptor`"):
        experiment.check_result(tmp_path, ["train.epochs=2"])
    assert (tmp_path / "params.yaml").read_text() == text


@pytest.mark.parametrize(("old", "new", "expected"), [
    ("  lr: 0.001\n", "  lr:\n", r"train\.lr must be a number, got null \(no value\)"),
    ("  lr: 0.001\n", "  lr: ~\n", r"train\.lr must be a number, got null \(no value\)"),
    ("  amp: true  ", "  amp: null  ", r"train\.amp must be true or false, got null \(no value\)"),
    ("  ensemble_weight: auto\n", "  ensemble_weight:\n",
     r"train\.ensemble_weight must be one of \['auto'\] or a number, got null \(no value\)"),
    ("  external: [../shared/datasets/utk-external]", "  external:",
     r"evaluate\.external must be a list, got null \(no value\)"),
    ("embed:\n  workers: 0 ", "embed:\n  # workers: 0 ", r"params section 'embed' must be a mapping, got null \(no value\)"),
])
def test_an_empty_value_is_named_as_yaml_writes_it_not_as_pythons_none(tmp_path, old, new, expected):
    """`lr:` left empty, `~` or `null` (YAML's three spellings of no value) said `got None`, a word the file never
    holds."""
    text = (REPO / "params.yaml").read_text()
    assert old in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(old, new, 1))
    with pytest.raises(ConfigError, match=expected) as caught:
        load_params(path)
    assert "None" not in str(caught.value)


@pytest.mark.parametrize(("overrides", "expected"), [
    (["~train.lr"], r"^-S ~train\.lr removes train\.lr, which the stages read \(a number\): drop it, or set a value "
                    r"\(-S train\.lr=\.\.\.\)"),
    (["~embed"], r"^-S ~embed removes the embed section, which the stages read: drop it; nothing ran"),
    (["train.epochs=2", "~train.face_features"], r"^-S ~train\.face_features removes train\.face_features"),
])
def test_a_key_removed_with_tilde_is_named_as_the_removal_not_as_an_older_params_yaml(tmp_path, overrides, expected):
    """`-S ~train.lr` said `Missing config key: train.lr` (and that params.yaml was older than the code): the file
    has it; the override removes it."""
    _commit(tmp_path, (REPO / "params.yaml").read_text())
    with pytest.raises(ProfileError, match=expected) as caught:
        experiment.check_result(tmp_path, overrides)
    assert "older than" not in str(caught.value)
    assert str(caught.value).endswith("nothing ran, params.yaml is unchanged")


def test_a_key_removed_then_added_back_is_not_refused(tmp_path):
    _commit(tmp_path, (REPO / "params.yaml").read_text())
    experiment.check_result(tmp_path, ["~train.lr", "++train.lr=0.01"])


def test_a_key_the_committed_params_yaml_lacks_but_the_workspace_has_asks_for_the_commit(tmp_path, monkeypatch, caplog):
    """The code got a key, the workspace's params.yaml too, not yet committed: the runner takes it out (profiles run
    on the committed file, `-S ~key` among its resets); the line names the commit, not a `-S ~key` nobody typed."""
    raw = _project_raw()
    del raw["train"]["face_features"]
    _commit(tmp_path, yaml.safe_dump(raw, sort_keys=False))
    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)
    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=2"]) == 1
    [message] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert message.startswith("Missing config key: train.face_features")
    assert "-S ~train.face_features removes" not in message
    assert "commit params.yaml" in message
