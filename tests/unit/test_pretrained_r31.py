"""Round 31: pretrained weights and external MAEs.

- ``train.pretrained=<weights file>`` with ``train.backbone=dlib_age`` loaded dlib's own network without a word
  (any value but ``none`` did): refused up front, as ``dlib_face`` refuses it, by the torch-free check that
  ``check_sources`` runs; the default and ``make quick`` params still pass.
- A cached torchvision ImageNet file (``~/.cache/torch/hub/checkpoints/resnet18-f37072fd.pth``) was used
  without its sha256 prefix being checked: a damaged one failed inside ``torch.load`` with advice to
  ``torch.save`` a state dict. Now one line naming the file and what to do.
- ``external_maes`` counted an external set whose latest evaluation found no face, from the MAE an earlier
  evaluation logged (MLflow cannot delete a metric).

Real files in ``tmp_path``, the real ``check_sources`` stage in a subprocess; only the network download is
replaced (by a function writing a file of the wrong bytes).
"""

from dataclasses import replace
from pathlib import Path

import pytest
import yaml
from torch import nn

from faceage.config import ConfigError, TrainParams, params_from_dict
from faceage.external import external_maes
from tests.conftest import REPO
from tests.unit.test_config_r30 import check_sources, raw_params

WEIGHTS = "weights.pth"


# --- 1. dlib_age with a weights file -----------------------------------------------------------------------

def test_dlib_age_with_a_weights_file_is_refused_by_check_sources(tmp_path):
    """It was recorded as "dlib" by check_sources and train loaded dlib's age network instead of the user's file."""
    (tmp_path / WEIGHTS).write_bytes(b"weights")
    done = check_sources(tmp_path, backbone="dlib_age", pretrained=WEIGHTS)
    assert done.returncode == 1, done.stderr[-2000:]
    assert "train.pretrained='weights.pth': backbone dlib_age" in done.stderr, done.stderr[-2000:]
    assert "imagenet" in done.stderr and "none" in done.stderr and "Traceback" not in done.stderr
    from faceage.finetune import check_params

    with pytest.raises(ConfigError, match="train.pretrained='weights.pth': backbone dlib_age"):  # recipe/sweep rows
        check_params(replace(TrainParams(), backbone="dlib_age", pretrained=WEIGHTS))


@pytest.mark.parametrize("pretrained", ["imagenet", "dlib"])
def test_dlib_age_with_dlibs_weights_still_passes_check_sources(tmp_path, pretrained):
    """imagenet (params.yaml's default, which make quick keeps) and dlib (test_sources) name dlib's weights."""
    done = check_sources(tmp_path, backbone="dlib_age", pretrained=pretrained)
    assert done.returncode == 0, done.stderr[-2000:]


def test_the_default_and_quick_profiles_params_are_not_refused():
    """params.yaml as committed, and with make quick's / quick-finetune's / quick-resnet's overrides."""
    makefile = (REPO / "Makefile").read_text()
    assert "QUICK := -S \"fetch_data.source=$(SAMPLE)\" -S train.backbone=dlib_age\n" in makefile
    assert yaml.safe_load((REPO / "params.yaml").read_text())["train"]["pretrained"] == "imagenet"
    for train in ({}, {"backbone": "dlib_age"},
                  {"backbone": "dlib_age", "epochs": 12, "lr": 0.003, "layer_lr_decay": 0.316, "freeze_blocks": 4,
                   "distill_weight": 1.0, "wise_ft": True},
                  {"pretrained": "none", "epochs": 5, "image_size": 112, "low_res": 0.0}):
        assert params_from_dict(raw_params(**train)).train.pretrained == train.get("pretrained", "imagenet")
    from faceage.recipe import AGE_BASE

    assert AGE_BASE["pretrained"] == "imagenet"


def test_load_pretrained_refuses_a_weights_file_for_dlib_age(tmp_path):
    """For code that calls it directly: the same rule, not "needs age-v1.onnx from the fetch_detector stage"
    (which sent the user to fetch a file that would have been loaded in place of theirs)."""
    from faceage.model import PretrainedWeightsError, load_pretrained

    (tmp_path / WEIGHTS).write_bytes(b"weights")
    with pytest.raises(PretrainedWeightsError, match=r"train.pretrained='.*weights.pth': backbone dlib_age") as e:
        load_pretrained(nn.Linear(1, 1), "dlib_age", str(tmp_path / WEIGHTS), model_dir=tmp_path)
    assert "age-v1.onnx" in str(e.value) and "none" in str(e.value)


# --- 2. a damaged cached ImageNet file ---------------------------------------------------------------------

def _hub_file(torch_home: Path) -> Path:
    import torchvision

    name = Path(torchvision.models.get_model_weights("resnet18").DEFAULT.url).name
    assert name == "resnet18-f37072fd.pth"
    path = torch_home / "hub" / "checkpoints" / name
    path.parent.mkdir(parents=True)
    return path


def test_a_damaged_cached_imagenet_file_is_one_line_naming_it_and_the_fix(tmp_path, monkeypatch):
    """It was returned unchecked: torch.load failed on it and the message said "save one with
    torch.save(model.state_dict(), path)"; a damaged file torch can still read loaded wrong weights silently."""
    from faceage.model import PretrainedWeightsError, build_model, load_pretrained, resolve_imagenet_weights

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    path = _hub_file(tmp_path)
    path.write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(PretrainedWeightsError) as e:
        load_pretrained(build_model("resnet18"), "resnet18", "imagenet")
    text = str(e.value)
    assert str(path) in text and "sha256" in text and "f37072fd" in text and "delete it" in text
    assert "torch.save" not in text and "\n" not in text
    assert path.exists()  # the user's file: named, not removed behind their back
    with pytest.raises(PretrainedWeightsError, match="delete it"):
        resolve_imagenet_weights("resnet18", cache_dir=path.parent)


def test_a_download_failing_its_sha256_check_says_what_to_do(tmp_path, monkeypatch):
    import faceage.model as model

    def download(url, path, **kwargs):
        Path(path).write_bytes(b"not the weights")

    monkeypatch.setattr(model, "download", download)
    with pytest.raises(model.PretrainedWeightsError) as e:
        model.resolve_imagenet_weights("resnet18", cache_dir=tmp_path)
    text = str(e.value)
    assert "failed its sha256 check" in text and "run again" in text and "train.pretrained=none" in text
    assert not (tmp_path / "resnet18-f37072fd.pth").exists()


# --- 3. an external set that stopped yielding faces ---------------------------------------------------------

def test_external_maes_skips_a_set_whose_latest_evaluation_found_no_face():
    """Packaging compared the stale MAE as current (MLflow keeps a run's old external_<name>_mae)."""
    metrics = {"external_utk_mae": 7.05, "external_utk_n_faces": 0.0,
               "external_other_mae": 6.5, "external_other_n_faces": 120.0}
    assert external_maes(metrics) == {"other": 6.5}
    tags = {"evaluate.external": '["../shared/datasets/utk", "../shared/datasets/other"]'}
    assert external_maes(metrics, tags) == {"other": 6.5}
    assert external_maes({**metrics, "external_utk_n_faces": 3.0}) == {"other": 6.5, "utk": 7.05}


def test_a_cached_imagenet_file_matching_its_name_is_used_without_a_download(tmp_path, monkeypatch):
    """The good case (replaces test_model.py's test_imagenet_weights_found_in_hub_cache, whose one-byte file
    named resnet18-f37072fd.pth is now refused): a cached file whose sha256 starts as its name says is used."""
    import hashlib

    import torchvision

    import faceage.model as model

    body = b"x"
    name = f"resnet18-{hashlib.sha256(body).hexdigest()[:8]}.pth"
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(type(weights), "url", property(lambda self: f"http://127.0.0.1:9/{name}"))

    def no_download(*args, **kwargs):
        raise AssertionError("downloaded although the cached file is good")

    monkeypatch.setattr(model, "download", no_download)
    (tmp_path / name).write_bytes(body)
    assert model.resolve_imagenet_weights("resnet18", cache_dir=tmp_path) == tmp_path / name
