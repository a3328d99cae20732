"""A near-miss key in params.yaml or `dvc exp run -S` (train.epoch, trian, train.learning_rate): the message
listed thirty keys and left the user to find the one meant; it now names it."""

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from faceage.config import ConfigError, load_params, params_from_dict, parse_params

REPO = Path(__file__).resolve().parents[2]


def _raw() -> dict:
    return copy.deepcopy(parse_params((REPO / "params.yaml").read_text(encoding="utf-8")))


@pytest.mark.parametrize(("section", "key", "meant"), [
    ("train", "epoch", "train.epochs"),
    ("train", "Epochs", "train.epochs"),
    ("train", "learning_rate", "train.lr"),
    ("train", "batchsize", "train.batch_size"),
    ("preprocess", "detecter", "preprocess.detector"),
])
def test_an_unknown_key_names_the_key_meant(section, key, meant):
    raw = _raw()
    raw[section][key] = raw[section].pop(meant.partition(".")[2])
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    assert f"Unknown config key: {section}.{key}" in str(e.value)
    assert f"did you mean {meant}?" in str(e.value)


def test_an_extra_near_miss_key_beside_the_real_one_names_it_too():
    """`dvc exp run -S +train.epoch=5` (DVC's advice for a key it does not know) leaves epochs and epoch both."""
    raw = _raw()
    raw["train"]["epoch"] = 5
    with pytest.raises(ConfigError, match=r"Unknown config key: train\.epoch .*did you mean train\.epochs\?"):
        params_from_dict(raw)


def test_an_unknown_section_names_the_section_meant():
    raw = _raw()
    raw["trian"] = raw.pop("train")
    with pytest.raises(ConfigError, match=r"Unknown config key: trian .*did you mean train\?"):
        params_from_dict(raw)


def test_an_unrelated_unknown_key_suggests_nothing():
    raw = _raw()
    raw["train"]["colour"] = 1
    with pytest.raises(ConfigError) as e:
        params_from_dict(raw)
    assert "did you mean" not in str(e.value)
    assert "known keys of train" in str(e.value)


@pytest.mark.parametrize(("edit", "problem"), [
    (("  epochs: 30\n", "\tepochs: 30\n"), "found character '\\t' that cannot start any token"),
    (("  epochs: 30\n", "  epochs: 30\n  epochs: 5\n"), "found duplicate key 'epochs'"),
    (("  lr: 0.001\n", "  lr: 0.001\n   seed: 1\n"), "mapping values are not allowed here"),
])
def test_a_hand_edit_yaml_refuses_is_one_line_naming_the_file_and_line(tmp_path, edit, problem):
    """A tab, a key twice, a bad indent in params.yaml: every stage (load_params) died with PyYAML's traceback,
    "in '<unicode string>', line 32", instead of the one line a ConfigError gives. Still a yaml.YAMLError."""
    text = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert edit[0] in text
    path = tmp_path / "params.yaml"
    path.write_text(text.replace(*edit, 1), encoding="utf-8")
    line = next(i + 1 for i, t in enumerate(path.read_text().splitlines()) if t != text.splitlines()[i])
    with pytest.raises(ConfigError) as e:
        load_params(path)
    assert isinstance(e.value, yaml.YAMLError)
    message = str(e.value)
    assert "\n" not in message
    assert str(path) in message and problem in message
    assert re.search(rf"line {line}\b", message) or re.search(rf"line {line + 1}\b", message), message


def test_a_stage_given_a_params_yaml_with_a_tab_prints_one_line(tmp_path):
    text = (REPO / "params.yaml").read_text(encoding="utf-8").replace("  epochs: 30\n", "\tepochs: 30\n", 1)
    (tmp_path / "params.yaml").write_text(text, encoding="utf-8")
    done = subprocess.run([sys.executable, str(REPO / "stages" / "fetch_detector.py"), "--params",
                           str(tmp_path / "params.yaml"), "--out", str(tmp_path / "out")],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "Traceback" not in done.stderr, done.stderr
    assert "is not valid YAML at line 32" in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_params_yaml_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_bytes((REPO / "params.yaml").read_bytes().replace(b"  seed: 42", b"  seed: 42 # \xe9t\xe9", 1))
    with pytest.raises(ConfigError, match="not valid UTF-8"):
        load_params(path)


def test_unknown_keys_of_mixed_types_are_named_not_a_traceback():
    """`1: x` beside a mistyped key in a section: sorting the unknown keys raised TypeError (int < str)."""
    raw = _raw()
    raw["train"][1] = "x"
    raw["train"]["epoch"] = 5
    raw[2] = {}
    raw["trian"] = {}
    with pytest.raises(ConfigError, match="Unknown config key: 2"):
        params_from_dict(raw)
    del raw[2], raw["trian"]
    with pytest.raises(ConfigError, match=r"Unknown config key: train\.1 "):
        params_from_dict(raw)
