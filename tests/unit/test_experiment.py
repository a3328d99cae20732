"""Profiles run on top of the committed params.yaml, not on what an earlier `dvc exp run -S` left."""

import logging
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dvc.utils.cli_parse import to_path_overrides
from dvc.utils.hydra import apply_overrides

import faceage.experiment as experiment
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


@pytest.mark.parametrize("value", [
    "/data/appa-real-sample", "/data/my datasets/appa real", "/data/Jürgen/appa-réal", "C:\\data\\appa",
    'a "quoted" path\\x', 'a "quoted" path ending in a backslash\\', "/data/a,b", "/data/[1]/x", "/data/k=v/x",
    "/data/${HOME}/x", "\\\\server\\share\\", "1e-3", "null", "",
])
def test_a_string_comes_back_unchanged_through_dvcs_override_parser(repo, value):
    """DVC's own apply_overrides (Hydra's OverridesParser, then OmegaConf) reads back what override_value wrote:
    JSON's \\u00fc and doubled backslashes were kept literally, and ${...} would be resolved."""
    apply_overrides(repo / "params.yaml", [f"fetch_data.source={override_value(value)}",
                                           f"evaluate.external={override_value([value, 'x'])}"])
    written = parse_params((repo / "params.yaml").read_text(encoding="utf-8"))
    assert written["fetch_data"]["source"] == value
    assert written["evaluate"]["external"] == [value, "x"]


@pytest.mark.parametrize("override", ["params.yaml:train.epochs=5", "./params.yaml:train.epochs=5", "++train.epochs=5",
                                      "train.epochs= 5", "train.epochs=5"])
def test_a_profile_key_in_any_form_dvc_reads_is_not_reset(repo, override, monkeypatch):
    """`-S params.yaml:train.epochs=5` or `-S ++train.epochs=5` after a run that left 12: the reset to the
    committed 30 came after it and won. Applied here as `dvc exp run -S` does: grouped by file, then Hydra."""
    apply_overrides(repo / "params.yaml", ["train.epochs=12"])
    resets = leftover_resets([override], parse_params((repo / "params.yaml").read_text()), committed_params(repo))
    assert resets == []
    monkeypatch.chdir(repo)
    for path, overrides in to_path_overrides([override, *resets]).items():
        apply_overrides(path, overrides)
    assert load_params(repo / "params.yaml").train.epochs == 5


def test_override_keys_follow_dvcs_file_prefix_and_hydras_prefixes():
    assert experiment.override_key("params.yaml:train.epochs=5") == "train.epochs"
    assert experiment.override_key("+train.epochs=5") == "train.epochs"
    assert experiment.override_key("~train.epochs") == "train.epochs"
    assert experiment.override_key("~train.epochs=5") == "train.epochs"
    assert experiment.override_key("fetch_data.source=http://host:8080/a.zip") == "fetch_data.source"
    assert experiment.override_key("other.yaml:train.epochs=5") is None  # another file's key: the reset stays
    assert leftover_resets(["other.yaml:train.epochs=5"], {"train": {"epochs": 12}}, {"train": {"epochs": 30}}) == [
        "train.epochs=30"]


def test_outside_git_there_is_nothing_to_reset(tmp_path):
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    assert committed_params(tmp_path) is None


@pytest.fixture
def fake_dvc(tmp_path, monkeypatch):
    """A `dvc` on PATH that records its folder and arguments (and exits with $FAKE_DVC_RC)."""
    bin_dir, record = tmp_path / "bin", tmp_path / "dvc-call.txt"
    bin_dir.mkdir()
    (bin_dir / "dvc").write_text('#!/bin/sh\nprintf "%s\\n" "$(pwd -P)" "$@" > "$FAKE_DVC_RECORD"\n'
                                 'exit "${FAKE_DVC_RC:-0}"\n')
    (bin_dir / "dvc").chmod(0o755)
    # before this Python's folder, which the runner adds where PATH lacks it (it holds the real dvc)
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    monkeypatch.setenv("FAKE_DVC_RECORD", str(record))
    monkeypatch.setattr(experiment, "setup_logging", lambda: None)  # keep caplog's handler
    return record


def test_from_a_subdirectory_the_profile_runs_at_the_dvc_root(repo, fake_dvc, monkeypatch):
    """`python -m faceage.experiment` from stages/ failed with FileNotFoundError 'params.yaml'."""
    (repo / ".dvc").mkdir()
    (repo / "stages").mkdir()
    apply_overrides(repo / "params.yaml", ["train.epochs=12"])
    monkeypatch.chdir(repo / "stages")
    assert experiment.main(["-S", "train.backbone=dlib_age"]) == 0
    where, *args = fake_dvc.read_text().splitlines()
    assert Path(where).resolve() == repo.resolve()
    assert args == ["exp", "run", "-S", "train.backbone=dlib_age", "-S", "train.epochs=30"]


@pytest.mark.parametrize("params_text, message", [
    (None, "params.yaml not found"),
    ("train: [1,\n", "params.yaml is not valid YAML"),
    ("- a list\n", "params.yaml must be a mapping"),
])
def test_a_missing_or_broken_params_file_is_one_clear_line(tmp_path, fake_dvc, monkeypatch, caplog, params_text,
                                                            message):
    (tmp_path / ".dvc").mkdir()
    if params_text is not None:
        (tmp_path / "params.yaml").write_text(params_text)
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=5"]) == 1
    assert [r.levelno for r in caplog.records] == [logging.ERROR] and message in caplog.text
    assert "\n" not in caplog.records[0].getMessage()
    assert not fake_dvc.exists()


def test_outside_a_dvc_repo_the_profile_says_so(tmp_path, fake_dvc, monkeypatch, caplog):
    monkeypatch.chdir(tmp_path)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=5"]) == 1
    assert "not inside a DVC repository" in caplog.text and not fake_dvc.exists()


def test_a_failed_dvc_exp_run_gives_its_exit_code_and_a_message(repo, fake_dvc, monkeypatch, caplog):
    (repo / ".dvc").mkdir()
    monkeypatch.chdir(repo)
    monkeypatch.setenv("FAKE_DVC_RC", "3")
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.epochs=5"]) == 3
    assert "`dvc exp run` failed (exit 3)" in caplog.text


def test_an_override_dvc_cannot_read_is_refused_with_its_quoted_form(repo, fake_dvc, monkeypatch, caplog):
    """`make quick SAMPLE=/home/José/sample` reached `dvc exp run`, which said only "Invalid --set-param value"."""
    (repo / ".dvc").mkdir()
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "train.backbone=dlib_age", "-S", "fetch_data.source=/home/José/sample"]) == 1
    assert not fake_dvc.exists()
    [message] = [r.getMessage() for r in caplog.records]
    assert "'fetch_data.source=/home/José/sample' is not an override DVC can read" in message
    caplog.clear()
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "evaluate.external=[/home/José/set, ../b]"]) == 1
    [listed] = [r.getMessage() for r in caplog.records]
    for shown in (message, listed):
        # the suggestion as a user pastes it into a shell: the shell's words are what DVC gets
        [_, override] = shlex.split(shown.rsplit("as in ", 1)[1])
        experiment.check_overrides([override])
        apply_overrides(repo / "params.yaml", [override])  # DVC reads it back as given
    params = load_params(repo / "params.yaml")
    assert params.fetch_data.source == "/home/José/sample"
    assert params.evaluate.external == ("/home/José/set", "../b")  # still a list
    for fine in ("params.yaml:train.epochs=3", "++train.epochs=3", "evaluate.external=[/a, /b]"):
        experiment.check_overrides([fine])


def suggested(message: str) -> str:
    """The override a refusal suggests, as the shell hands it on when the user pastes it."""
    [_, override] = shlex.split(message.rsplit("as in ", 1)[1])
    return override


def test_a_comma_outside_brackets_is_refused_as_the_sweep_dvc_would_refuse(repo, fake_dvc, monkeypatch, caplog):
    """`make quick SAMPLE=/data/a,b/sample` passed the check (a comma is a Hydra sweep, not a parse error) and
    `dvc exp run` stopped with only "Sweep overrides can't be used without `--queue`"."""
    (repo / ".dvc").mkdir()
    monkeypatch.chdir(repo)
    with caplog.at_level(logging.ERROR, logger="faceage.experiment"):
        assert experiment.main(["-S", "fetch_data.source=/data/a,b/sample"]) == 1
    assert not fake_dvc.exists()
    [message] = [r.getMessage() for r in caplog.records]
    assert "is a sweep to DVC" in message and "--queue" in message
    override = suggested(message)
    experiment.check_overrides([override])
    apply_overrides(repo / "params.yaml", [override])
    assert load_params(repo / "params.yaml").fetch_data.source == "/data/a,b/sample"
    for sweep in ("evaluate.low_res=0.5,0.75", "train.lr=choice(0.1,0.01)"):
        with pytest.raises(experiment.ProfileError, match="is a sweep to DVC"):
            experiment.check_overrides([sweep])


@pytest.mark.parametrize(("typed", "external"), [
    # The hint split `['/a,b', /José]` at every comma: `['/a,"b'","/José"]`, which DVC cannot read.
    ("['/a,b', /José]", ("/a,b", "/José")),
    # `it's` opened a quote that never closed: the hint made `[/a/it's, /b]` one element, `["/a/it's, /b"]`.
    ("[/a/it's, /b,c]", ("/a/it's", "/b", "c")),
])
def test_the_suggested_quoting_keeps_a_lists_elements_as_typed(repo, typed, external):
    with pytest.raises(experiment.ProfileError) as refused:
        experiment.check_overrides([f"evaluate.external={typed}"])
    override = suggested(str(refused.value))
    experiment.check_overrides([override])
    apply_overrides(repo / "params.yaml", [override])
    assert load_params(repo / "params.yaml").evaluate.external == external


def test_an_override_without_a_value_says_so(repo):
    with pytest.raises(experiment.ProfileError, match=r"-S 'train.epochs' is not an override DVC can read \(KEY=VALUE"):
        experiment.check_overrides(["train.epochs"])
