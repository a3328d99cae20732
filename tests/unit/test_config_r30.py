"""Round-30 review of configuration: the train section's cross-field rules checked where every other params rule is,
by the always-run check_sources stage (without importing torch), not first when the train stage starts."""

import os
import subprocess
import sys
from dataclasses import replace

import pytest
import yaml

from faceage.config import ConfigError, TrainParams, params_from_dict
from tests.conftest import REPO

# Combinations that each single key's check accepts but the train stage refused (faceage.finetune.check_params),
# after fetch_data, preprocess and embed had run; the last one failed later still, in faceage.model.load_pretrained.
BAD = {
    "head-with-a-cnn": {"head": "fused"},
    "fine-tuning-with-a-cnn": {"freeze_blocks": 2},
    "fine-tuning-with-the-ensemble-head": {"backbone": "dlib_age", "head": "ensemble", "wise_ft": True},
    "ensemble_weight-without-an-ensemble": {"ensemble_weight": 0.5},
    "zero-shot-ensemble": {"backbone": "dlib_age", "head": "ensemble", "epochs": 0},
    "freeze-every-stage": {"backbone": "dlib_age", "freeze_blocks": 7},
    "dlib_age-without-weights": {"backbone": "dlib_age", "pretrained": "none"},
    "face_features-without-the-fused-head": {"face_features": "layers"},
}
GOOD = {
    "default": {},
    "fused": {"backbone": "dlib_age", "face_features": "layers", "ensemble_weight": 0.5},
    "fine-tuned": {"backbone": "dlib_age", "freeze_blocks": 6, "distill_weight": 1.0, "wise_ft": True},
    "zero-shot": {"backbone": "dlib_age", "epochs": 0},
    "dlib_age-from-scratch": {"backbone": "dlib_age", "pretrained": "none", "head": "pretrained"},
    "dlib_face": {"backbone": "dlib_face", "pretrained": "none"},
    "dlib_face-imagenet": {"backbone": "dlib_face", "pretrained": "imagenet"},
}


def raw_params(**train) -> dict:
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["train"].update(train)
    return raw


def check_sources(tmp_path, importtime: bool = False, **train) -> subprocess.CompletedProcess:
    """The check_sources stage as dvc.yaml runs it, on params.yaml with these train keys (no external sets, a URL
    source: pinned, never read)."""
    raw = raw_params(**train)
    raw["fetch_data"].update(source="https://example.invalid/a.zip", md5="0" * 32)
    raw["evaluate"]["external"] = []
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(raw))
    cmd = [sys.executable, *(["-X", "importtime"] if importtime else []), str(REPO / "stages" / "check_sources.py"),
           "--params", "params.yaml", "--source", "out/source.json", "--external", "out/external.json",
           "--pretrained", "out/pretrained.json"]
    return subprocess.run(cmd, cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True,
                          text=True, timeout=120)


def imported(stderr: str) -> set[str]:
    """Module names in ``-X importtime``'s report."""
    return {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}


@pytest.mark.parametrize("train", BAD.values(), ids=BAD.keys())
def test_params_refuse_what_training_refuses_with_its_message(train):
    """params_from_dict (every stage's load_params) refuses each combination, with the message training gave."""
    from faceage.finetune import check_params

    with pytest.raises(ConfigError) as training:
        check_params(replace(TrainParams(), **train))  # recipe/sweep rows: built with replace, checked by training
    with pytest.raises(ConfigError) as loading:
        params_from_dict(raw_params(**train))
    assert str(loading.value) == str(training.value)
    assert "train." in str(loading.value)


@pytest.mark.parametrize("train", GOOD.values(), ids=GOOD.keys())
def test_params_accept_the_combinations_training_accepts(train):
    from faceage.finetune import check_params

    assert params_from_dict(raw_params(**train)).train == replace(TrainParams(), **train)
    check_params(replace(TrainParams(), **train))


@pytest.mark.parametrize("name", ["head-with-a-cnn", "dlib_age-without-weights",
                                  "face_features-without-the-fused-head"])
def test_check_sources_refuses_a_combination_training_would_refuse_without_importing_torch(tmp_path, name):
    """The always-run first stage refuses it, in a fraction of a second, before fetch_data/preprocess/embed run."""
    done = check_sources(tmp_path, importtime=True, **BAD[name])
    assert done.returncode == 1, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if not line.startswith("import time:")]
    assert any("ConfigError" in line and "train." in line for line in errors), errors
    assert "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()  # nothing recorded
    assert "torch" not in imported(done.stderr)


@pytest.mark.parametrize("name", ["fused", "fine-tuned", "zero-shot"])
def test_check_sources_checks_dlib_age_params_without_importing_torch(tmp_path, name):
    """The old rules imported faceage.dlib_age (torch: seconds) for their constants; config keeps its own copies."""
    done = check_sources(tmp_path, importtime=True, **GOOD[name])
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch" not in imported(done.stderr) and "faceage.finetune" not in imported(done.stderr)


def test_configs_copies_of_the_dlib_constants_match_the_modules_that_use_them():
    import faceage.config as config
    from faceage import dlib_age
    from faceage.face_encoder import FACE_ENCODER

    assert config.DLIB_AGE == dlib_age.DLIB_AGE and config.FACE_ENCODER == FACE_ENCODER
    assert config.DLIB_AGE_HEADS == dlib_age.HEADS and config.ENSEMBLE_HEADS == dlib_age.ENSEMBLE_HEADS
    assert config.DLIB_AGE_STAGES == dlib_age.NUM_STAGES
    assert set(config.DLIB_AGE_HEADS) | {"auto"} == set(config.typing.get_args(config.TrainHead))


@pytest.mark.parametrize("pretrained", ["weights.pth", "none"])
def test_dlib_face_with_a_weights_file_is_refused_by_check_sources(tmp_path, pretrained):
    """dlib_face always uses dlib's face encoder: check_sources recorded a weights file as "dlib" and the pipeline
    failed in train (faceage.model.load_pretrained: 'backbone dlib_face always uses dlib's pretrained face
    encoder'), after preprocess and embed."""
    (tmp_path / "weights.pth").write_bytes(b"weights")
    done = check_sources(tmp_path, backbone="dlib_face", pretrained=pretrained)
    if pretrained == "none":
        assert done.returncode == 0, done.stderr[-2000:]
        return
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train.pretrained='weights.pth': backbone dlib_face always uses dlib's pretrained face encoder" \
        in done.stderr and "Traceback" not in done.stderr
    from faceage.finetune import check_params

    with pytest.raises(ConfigError, match="dlib_face always uses"):  # recipe/sweep rows too, before the data load
        check_params(replace(TrainParams(), backbone="dlib_face", pretrained="weights.pth"))


@pytest.mark.parametrize(("train", "refused"), [
    ({"batch_size": 1}, "train.batch_size=1 gives 1 face per batch and process (1 process(es)); resnet18's "
                        "BatchNorm layers need at least 2: raise train.batch_size"),
    ({"batch_size": 2, "nproc_per_node": 2, "backbone": "mobilenet_v3_small"},
     "train.batch_size=2 gives 1 face per batch and process (2 process(es)); mobilenet_v3_small's"),
    ({"batch_size": 1, "epochs": 0}, None),  # nothing trains
    ({"batch_size": 1, "backbone": "convnext_tiny"}, None),  # LayerNorm
    ({"batch_size": 1, "backbone": "dlib_face", "pretrained": "none"}, None),  # dlib's heads train with one face
    ({"batch_size": 1, "backbone": "dlib_age"}, None),
])
def test_a_batch_of_one_face_for_a_batchnorm_backbone_is_refused_by_check_sources(tmp_path, train, refused):
    """`train.batch_size: 1` with the default resnet18 passed check_sources and failed in train, after its data load
    (faceage.training.check_batch: it needs the model; config knows the fast-checked backbones' layers)."""
    done = check_sources(tmp_path, **train)
    if refused is None:
        assert done.returncode == 0, done.stderr[-2000:]
        return
    assert done.returncode == 1 and refused in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]


def test_configs_batchnorm_backbones_are_the_fast_backbones_with_batchnorm_layers():
    """What faceage.training.check_batch finds in the model, for each torchvision name config checks without torch."""
    import torchvision
    from torch import nn

    import faceage.config as config

    for name in sorted(config.FAST_BACKBONES - {config.DLIB_AGE, config.FACE_ENCODER}):
        model = torchvision.models.get_model(name)
        has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
        assert has_bn == (name in config.BATCHNORM_BACKBONES), name
    assert config.BATCHNORM_BACKBONES < config.FAST_BACKBONES
