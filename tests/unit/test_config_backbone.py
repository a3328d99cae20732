"""train.backbone is checked when the params are built, so a typo fails in the first stage, not at train."""

import subprocess
import sys
from pathlib import Path

import pytest

from faceage.config import FAST_BACKBONES, ConfigError, Params, load_params, params_from_dict, parse_params

REPO = Path(__file__).resolve().parents[2]


def raw_params(backbone: str) -> dict:
    """The repo's params.yaml, parsed as the stages parse it, with only train.backbone changed."""
    raw = parse_params((REPO / "params.yaml").read_text(encoding="utf-8"))
    raw["train"]["backbone"] = backbone
    return raw


def test_a_typo_fails_in_params_from_dict_naming_the_key_and_the_names():
    with pytest.raises(ConfigError) as caught:
        params_from_dict(raw_params("resnt18"))
    message = str(caught.value)
    assert message.startswith("train.backbone must be a torchvision classification model with a linear head, "
                              "got 'resnt18'; available: dlib_face, dlib_age, ")
    available = message.split("; available: ")[1].split(", ")
    assert {"resnet18", "resnet50", "efficientnet_b0", "dlib_age", "dlib_face"} <= set(available)
    assert "squeezenet1_0" not in available


def test_a_typo_fails_in_load_params(tmp_path):
    lines = ["  backbone: resnt18" if line.startswith("  backbone:") else line
             for line in (REPO / "params.yaml").read_text(encoding="utf-8").splitlines()]
    assert "  backbone: resnt18" in lines
    (tmp_path / "params.yaml").write_text("\n".join(lines) + "\n", encoding="utf-8")
    with pytest.raises(ConfigError,
                       match=r"^train\.backbone .* got 'resnt18'; available: dlib_face, dlib_age, .*resnet18"):
        load_params(tmp_path / "params.yaml")


def test_build_model_gives_the_same_message():
    """One check behind both: the config's error is build_model's, word for word."""
    from faceage.model import build_model

    with pytest.raises(ConfigError) as from_config:
        params_from_dict(raw_params("resnt18"))
    with pytest.raises(ConfigError) as from_model:
        build_model("resnt18")
    assert str(from_config.value) == str(from_model.value)


@pytest.mark.parametrize("backbone", ["squeezenet1_0", "squeezenet1_1"])
def test_a_model_without_a_linear_head_is_rejected_with_the_reason(backbone):
    from faceage.model import NO_LINEAR_HEAD

    assert backbone in NO_LINEAR_HEAD
    with pytest.raises(ConfigError, match=rf"^train\.backbone .* got '{backbone}' \(its head is a convolution, "
                                          r"not a linear layer\); available: "):
        params_from_dict(raw_params(backbone))


@pytest.mark.parametrize("backbone", ["resnet18", "dlib_age", "dlib_face", "efficientnet_b0", "regnet_y_400mf"])
def test_valid_names_pass(backbone):
    params = params_from_dict(raw_params(backbone))
    assert isinstance(params, Params) and params.train.backbone == backbone


def test_the_unusual_valid_name_above_takes_the_torchvision_path():
    assert "regnet_y_400mf" not in FAST_BACKBONES


def test_every_fast_path_name_is_one_build_model_takes():
    """The fast path skips torchvision's list: it must never admit a name that list lacks."""
    from faceage.chips import DLIB_AGE
    from faceage.face_encoder import FACE_ENCODER
    from faceage.model import check_backbone, torchvision_backbones

    assert FAST_BACKBONES - {FACE_ENCODER, DLIB_AGE} <= set(torchvision_backbones())
    for backbone in sorted(FAST_BACKBONES):
        check_backbone(backbone)  # raises ConfigError for a name build_model refuses


def test_the_default_and_the_sweeps_backbones_take_the_fast_path():
    from faceage.config import TrainParams
    from faceage.sweep import BACKBONES

    assert TrainParams().backbone in FAST_BACKBONES
    assert set(BACKBONES) <= FAST_BACKBONES


def test_loading_params_with_a_fast_path_backbone_imports_no_torchvision():
    code = ("import sys\n"
            "from faceage.config import params_from_dict, parse_params\n"
            f"raw = parse_params(open({str(REPO / 'params.yaml')!r}, encoding='utf-8').read())\n"
            "for backbone in ('resnet18', 'dlib_age', 'dlib_face', 'efficientnet_b0'):\n"
            "    raw['train']['backbone'] = backbone\n"
            "    assert params_from_dict(raw).train.backbone == backbone\n"
            "print(sorted(m for m in ('torch', 'torchvision', 'faceage.model') if m in sys.modules))\n")
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120,
                            check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_without_torchvision_an_unusual_name_is_left_to_build_model(monkeypatch):
    """The service (ONNX Runtime, no torch) reaches faceage.config: it must not import torch, and builds no model."""
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args: None if name == "torchvision" else find_spec(name, *args))
    assert params_from_dict(raw_params("resnt18")).train.backbone == "resnt18"
