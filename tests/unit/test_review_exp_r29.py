"""Round 29 review of the profile runner (faceage.experiment) and the params reader (faceage.config)."""

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from dvc.utils.hydra import apply_overrides

import faceage.experiment as experiment
from faceage.config import load_params, parse_params
from faceage.experiment import committed_params, leftover_resets

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]
QUICK = ["fetch_data.source=/data/appa-real-sample", "train.backbone=dlib_age"]


@pytest.fixture
def repo(tmp_path):
    """A git + DVC folder whose committed params.yaml is the project's."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=tmp_path, check=True)
    return tmp_path


@pytest.mark.parametrize("left", [["train.epochs=30.0"], ["train.label_jitter=1", "train.amp=1"],
                                  ["train.wise_ft=0", "train.seed=42.0"]])
def test_a_value_left_equal_to_the_committed_one_but_of_another_type_is_put_back(repo, left, tmp_path_factory):
    """`dvc exp run -S train.epochs=30.0` (it failed: train.epochs must be an integer) left `epochs: 30.0`; 30.0 == 30
    and 1 == True in Python, so the runner saw no change, put nothing back, and every later `make quick` stopped at
    check_sources on the same ConfigError, with no warning naming the key."""
    params = repo / "params.yaml"
    apply_overrides(params, left)  # DVC's own -S code: what the failed run left in the workspace
    resets = leftover_resets(QUICK, parse_params(params.read_text()), committed_params(repo))
    assert sorted(r.split("=")[0] for r in resets) == sorted(o.split("=")[0] for o in left)
    apply_overrides(params, [*QUICK, *resets])
    expected = tmp_path_factory.mktemp("expected") / "params.yaml"
    shutil.copy(REPO / "params.yaml", expected)
    apply_overrides(expected, QUICK)
    assert load_params(params) == load_params(expected)  # loads: no ConfigError on the left value


def test_a_float_key_written_as_an_integer_is_put_back_as_the_committed_float(repo):
    """The same value in another type counts as a change either way (cs_years: 5 for 5.0), and the reset
    writes the committed float, which DVC's parser reads back as a float."""
    params = repo / "params.yaml"
    apply_overrides(params, ["evaluate.cs_years=5"])
    resets = leftover_resets(QUICK, parse_params(params.read_text()), committed_params(repo))
    assert resets == ["evaluate.cs_years=5.0"]
    apply_overrides(params, resets)
    assert parse_params(params.read_text())["evaluate"]["cs_years"] == 5.0
    assert isinstance(parse_params(params.read_text())["evaluate"]["cs_years"], float)
    assert leftover_resets(QUICK, parse_params(params.read_text()), committed_params(repo)) == []


@pytest.fixture
def killed_dvc(tmp_path, monkeypatch):
    """A `dvc` on PATH killed by SIGKILL (the kernel's OOM killer, `kill -9`)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text("#!/bin/sh\nkill -9 $$\n")
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)  # keep caplog's handler


def test_a_dvc_killed_by_a_signal_exits_as_a_shell_reports_it(repo, killed_dvc, monkeypatch, caplog):
    """The runner returned Popen's -9: `python -m faceage.experiment` then exited 247 (-9 & 255), which make
    reported as "Error 247", and the log said "exit -9: its output is above" over no output."""
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=5"]) == 128 + 9
    assert "killed by signal 9 (SIGKILL)" in caplog.text
    # the process itself, as make runs it
    done = subprocess.run([sys.executable, "-m", "faceage.experiment", "-S", "train.epochs=5"], cwd=repo,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 137, done.stderr


def test_a_duplicated_key_in_params_yaml_is_refused_as_dvc_refuses_it(tmp_path):
    """DVC (ruamel.yaml) refuses a params.yaml with a key twice ("found duplicate key"); PyYAML kept the last
    silently, so the runner warned that "train.epochs is 5 in the workspace ... runs with the committed 30" and
    started `dvc exp run`, which then failed on the file, and a stage run by hand trained with the second value."""
    text = (REPO / "params.yaml").read_text().replace("  epochs: 30\n", "  epochs: 30\n  epochs: 5\n", 1)
    with pytest.raises(yaml.YAMLError, match="duplicate key 'epochs'"):
        parse_params(text)
    (tmp_path / "params.yaml").write_text(text)
    with pytest.raises(yaml.YAMLError, match="duplicate key 'epochs'"):
        load_params(tmp_path / "params.yaml")
    with pytest.raises(experiment.ProfileError, match=r"not valid YAML at line \d+ \(found duplicate key 'epochs'"):
        experiment.read_params(tmp_path)
    # the same key in two sections, and the merge key, are fine
    assert parse_params("a: {epochs: 1}\nb: {epochs: 2}\n") == {"a": {"epochs": 1}, "b": {"epochs": 2}}
    assert parse_params("x: &d {k: 1}\ny:\n  <<: *d\n  j: 2\n") == {"x": {"k": 1}, "y": {"k": 1, "j": 2}}


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch):
    """A `dvc` on PATH that records its arguments, one a line, and succeeds."""
    bin_dir, record = tmp_path / "bin", tmp_path / "dvc-call.txt"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\nprintf "%s\\n" "$@" > "$FAKE_DVC_RECORD"\n')
    (bin_dir / "dvc").chmod(0o755)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_DVC_RECORD", str(record))
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)
    return record


def test_the_logged_command_is_the_one_dvc_gets_when_pasted_into_a_shell(repo, fake_dvc, monkeypatch, caplog):
    """The runner logged `dvc exp run -S fetch_data.source=/data/my sample -S train.ensemble_weight="auto"`: pasted
    (the README's plain `dvc exp run -S`), the shell split the path in two and took the reset's Hydra quotes off."""
    apply_overrides(repo / "params.yaml", ["train.ensemble_weight=0.5", 'fetch_data.md5=""'])
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.INFO, logger="faceage.experiment"):
        assert experiment.main(["-S", "fetch_data.source=/data/my sample", "-S", "train.backbone=dlib_age"]) == 0
    given = fake_dvc.read_text().splitlines()
    [logged] = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert shlex.split(logged) == ["dvc", *given]
    assert 'train.ensemble_weight="auto"' in given
