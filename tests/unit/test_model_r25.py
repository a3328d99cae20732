"""Round 25 review of model building and export: MNASNet's state dicts, VGG/AlexNet exports at other sizes.

No shared data: random crops and untrained networks (the tests compare runtimes and weights, never accuracy).
"""

import copy

import numpy as np
import pytest
import torch
import torchvision
from torch import nn

from faceage.export import export_onnx
from faceage.inference import AgeModel
from faceage.model import build_model, load_checkpoint, load_pretrained, save_checkpoint
from faceage.onnx_model import OnnxAgeModel

MNASNET = "mnasnet0_5"


def test_an_mnasnet_state_dict_without_versions_loads():
    """torch keeps module versions in ``state_dict._metadata``, which a dict copy drops; MNASNet refused such a
    copy ("version should be set to 1 or 2 instead of None"), so every mnasnet run failed after its last epoch,
    where training loads the best epoch's copied weights."""
    torch.manual_seed(0)
    model = build_model(MNASNET)
    best = {k: v.detach().clone() + (0.5 if v.is_floating_point() else 0) for k, v in model.state_dict().items()}
    model.load_state_dict(best)
    torch.testing.assert_close(model.state_dict()["layers.0.weight"], best["layers.0.weight"])


def test_an_mnasnet_checkpoint_loads_and_gives_the_same_logits(tmp_path):
    torch.manual_seed(0)
    model = build_model(MNASNET).eval()
    save_checkpoint(tmp_path / "m.pt", model, {"backbone": MNASNET, "min_age": 0, "max_age": 100})
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_an_mnasnet_weights_file_loads(tmp_path):
    """torchvision's own file (with its versions): load_pretrained's copy of it without the head lost them."""
    donor = torchvision.models.get_model(MNASNET)
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    model = build_model(MNASNET)
    assert load_pretrained(model, MNASNET, str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    torch.testing.assert_close(model.layers[0].weight, donor.layers[0].weight)


def test_a_copied_mnasnet_loads_into_itself_not_the_original():
    """The loader is bound to the instance: a deepcopy (WiSE-FT, the best-epoch copies) must load into the copy."""
    model = build_model(MNASNET)
    before = model.layers[0].weight.detach().clone()
    twin = copy.deepcopy(model)
    twin.load_state_dict({k: torch.zeros_like(v) for k, v in model.state_dict().items()})
    assert torch.count_nonzero(twin.layers[0].weight) == 0
    torch.testing.assert_close(model.layers[0].weight, before)


@pytest.mark.parametrize(("in_hw", "out_hw"), [((2, 2), (7, 7)), ((1, 1), (6, 6)), ((8, 5), (7, 7)), ((13, 3), (6, 2))])
def test_the_exported_pool_has_torchs_bins(in_hw, out_hw):
    from faceage.ort_module import _PoolByMatrices

    x = torch.randn(2, 3, *in_hw)
    torch.testing.assert_close(_PoolByMatrices(in_hw, out_hw)(x), nn.functional.adaptive_avg_pool2d(x, out_hw))


def test_alexnet_at_64_px_exports_and_serves_torchs_ages(tmp_path):
    """AlexNet's 6x6 pool (VGG's is 7x7) over a 1x1 map at 64 px: the TorchScript exporter refused it ("output
    size that are not factor of input size") after the training run; at 224 it exported."""
    torch.manual_seed(0)
    model = build_model("alexnet").eval()
    with torch.no_grad():
        model.classifier[-1].weight.mul_(200)  # a peaked age distribution, so the comparison means something
    meta = {"backbone": "alexnet", "min_age": 0, "max_age": 100, "image_size": 64, "input": "image",
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "temperature": 1.2,
            "crop": {"margin": 0.4, "size": 96}}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    rng = np.random.default_rng(0)
    crops = [rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(3)]
    report = export_onnx(tmp_path / "m.pt", None, crops, tmp_path / "m.onnx")
    assert report["onnx_max_abs_diff_probs"] <= 1e-4
    served = OnnxAgeModel(tmp_path / "m.onnx")
    loaded, _ = load_checkpoint(tmp_path / "m.pt")
    assert isinstance(loaded.avgpool, nn.AdaptiveAvgPool2d)  # the swap is the export's alone
    ages, _ = served.predict_crops(crops)
    want, _ = AgeModel(tmp_path / "m.pt", device="cpu").predict_crops(crops)
    assert np.ptp(want) > 0.1  # not the same age for every crop
    np.testing.assert_allclose(ages, want, atol=1e-3)
