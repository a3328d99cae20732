"""Round 32, second read of the profile runner's params check (faceage.experiment.check_result), config's
did_you_mean and logs.setup_logging.

1. check_result refused every `-S` override of a key nested deeper than `section.key` (`evaluate.external.0=...`,
   a dict-valued param's subkey) with "params.yaml has no key", though `dvc exp run -S` applies them (Hydra's
   dotted keys: a dict's key, or a list's index from 0 to its length - 1).
2. A params.yaml section with a non-string key (`1: x`) made did_you_mean's `sorted(known)` raise TypeError, so a
   mistyped `-S` key ended the profile runner in a traceback.
3. A non-numeric WORLD_SIZE in the environment made setup_logging, which every stage and the CLI run first, raise
   ValueError with a traceback.
"""

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from faceage import experiment
from faceage.config import did_you_mean
from tests.unit.test_review_exp_r29 import fake_dvc  # the fixture: a dvc on PATH that records its arguments

FIXTURES = (fake_dvc,)  # pytest finds the fixture by its name in this module

REPO = Path(__file__).resolve().parents[2]
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


def _repo(root: Path, params: str) -> Path:
    """A git + DVC folder at ``root`` whose committed params.yaml is ``params``."""
    root.mkdir()
    (root / "params.yaml").write_text(params)
    (root / ".dvc").mkdir()
    subprocess.run(["git", "init", "-q"], cwd=root, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=root, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=root, check=True)
    return root


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """The project's params.yaml, committed, as the working folder."""
    root = _repo(tmp_path / "repo", (REPO / "params.yaml").read_text())
    monkeypatch.chdir(root)
    return root


def _error_line(caplog) -> str:
    [line] = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    return line


# 1. nested keys -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override", ["evaluate.external.0=/data/other-set", "evaluate.low_res.1=0.25",
                                      "fetch_data.mirrors.0=https://example.org/appa.zip"])
def test_an_override_of_a_list_item_runs_as_dvc_applies_it(repo, fake_dvc, caplog, override):
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", override]) == 0, [r.getMessage() for r in caplog.records]
    assert fake_dvc.read_text().splitlines()[:4] == ["exp", "run", "-S", override]


@pytest.mark.parametrize(("override", "expected"), [
    # a dict-valued key's subkey is set by DVC: the check then refuses the unknown key itself (as every stage would),
    # not the subkey as missing
    ("evaluate.extra.alpha=2", "Unknown config key: evaluate.extra"),
    ("evaluate.extra.inner.beta=3", "Unknown config key: evaluate.extra"),
    # a mistyped subkey is named with the one meant
    ("evaluate.extra.alpah=2", "params.yaml has no key evaluate.extra.alpah (did you mean evaluate.extra.alpha?)"),
    ("evaluate.extra.inner.bta=2",
     "params.yaml has no key evaluate.extra.inner.bta (did you mean evaluate.extra.inner.beta?)"),
    # a mistyped step on the way: the key meant is the whole path
    ("evaluate.extar.alpha=2", "params.yaml has no key evaluate.extar.alpha (did you mean evaluate.extra.alpha?)"),
    ("evalute.external.0=/x", "params.yaml has no key evalute.external.0 (did you mean evaluate.external.0?)"),
    # an index past the list's end, or not a number (DVC itself crashed on that one: int('x'))
    ("evaluate.external.1=/x", "evaluate.external has 1 item"),
    ("evaluate.external.x=/x", "evaluate.external has 1 item"),
    # a key below a plain value
    ("train.lr.x=1", "train.lr is a value (0.001)"),
    # removing a key the file lacks
    ("~evaluate.extra.alpah", "params.yaml has no key evaluate.extra.alpah (did you mean evaluate.extra.alpha?)"),
])
def test_nested_overrides_are_checked_as_dvc_applies_them(tmp_path, monkeypatch, fake_dvc, caplog, override, expected):
    params = (REPO / "params.yaml").read_text().replace(
        "evaluate:\n", "evaluate:\n  extra: {alpha: 1, inner: {beta: 2}}\n", 1)
    root = _repo(tmp_path / "nested", params)
    monkeypatch.chdir(root)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", override]) == 1
    assert not fake_dvc.exists(), "dvc exp run was started"
    assert (root / "params.yaml").read_text() == params
    line = _error_line(caplog)
    assert expected in line, line
    assert "params.yaml is unchanged" in line
    if "has no key" not in expected:
        assert "params.yaml has no key" not in line, line


def test_a_key_an_earlier_override_added_is_not_refused_as_missing(repo, fake_dvc, caplog):
    """DVC applies the overrides in order: `+evaluate.extra={a: 1}` then `evaluate.extra.a=2` sets the key the first
    added (the stages then refuse the unknown key, which is the check's own message)."""
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "+evaluate.extra={a:1}", "-S", "evaluate.extra.a=2"]) == 1
    assert "Unknown config key: evaluate.extra" in _error_line(caplog)


# 2. a non-string key -----------------------------------------------------------------------------------------

def test_did_you_mean_ignores_keys_that_are_not_strings():
    assert did_you_mean("lrr", {"lr": 1, 1: "x", None: 2}, "train.") == " (did you mean train.lr?)"
    assert did_you_mean("1", {1: "x", "lr": 2}) == ""


def test_a_mistyped_key_beside_a_number_key_is_one_line(tmp_path, monkeypatch, fake_dvc, caplog):
    """`1: x` in a section (committed): the mistyped -S key's did-you-mean raised TypeError (`sorted` of int and str)
    and the profile runner ended in a traceback."""
    params = (REPO / "params.yaml").read_text().replace("train:\n", "train:\n  1: x\n", 1)
    monkeypatch.chdir(_repo(tmp_path / "numkey", params))
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.lrr=0.1"]) == 1
    assert not fake_dvc.exists()
    assert "params.yaml has no key train.lrr (did you mean train.lr?)" in _error_line(caplog)


# 3. WORLD_SIZE ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("world_size", ["abc", "2.0", "two"])
def test_a_non_numeric_world_size_does_not_stop_the_logging_set_up(world_size):
    code = "import logging; from faceage.logs import setup_logging; setup_logging(); logging.getLogger('x').warning('hi')"
    env = {**os.environ, "WORLD_SIZE": world_size, "RANK": "1"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    assert done.stderr.rstrip().endswith("x: hi"), done.stderr



def test_a_rank_with_a_percent_sign_keeps_every_log_line():
    """RANK went into the log format as it was: a `%` in it made every line a "--- Logging error ---" instead."""
    code = "import logging; from faceage.logs import setup_logging; setup_logging(); logging.getLogger('x').warning('hi')"
    env = {**os.environ, "WORLD_SIZE": "2", "RANK": "5%d"}
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0 and "Logging error" not in done.stderr, done.stderr
    assert "[rank 5%d] x: hi" in done.stderr, done.stderr
