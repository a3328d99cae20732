"""Round 24 review of the model code: weights files that do not fit, checkpoints that describe their
build options, lower resolutions of under a pixel."""

import pytest
import torch
import torchvision

from faceage.model import PretrainedWeightsError, build_model, load_checkpoint, load_pretrained, save_checkpoint
from faceage.transforms import low_resolution, low_resolution_at


@pytest.mark.parametrize(("donor", "backbone"), [("resnet34", "resnet18"), ("efficientnet_b1", "efficientnet_b0")])
def test_a_deeper_networks_weights_file_is_refused(tmp_path, donor, backbone):
    """resnet34's file holds every key of resnet18 at the same shapes: it loaded without a word, the
    weights of 8 of its 16 blocks left unused and resnet18 given the first blocks of each resnet34 stage."""
    torch.save(torchvision.models.get_model(donor).state_dict(), tmp_path / "w.pth")
    with pytest.raises(PretrainedWeightsError, match=rf"does not fit backbone '{backbone}' .*not in {backbone}"):
        load_pretrained(build_model(backbone), backbone, str(tmp_path / "w.pth"))


@pytest.mark.parametrize("backbone", ["googlenet", "inception_v3"])
def test_a_weights_file_with_the_auxiliary_heads_still_loads(tmp_path, backbone):
    """torchvision's ImageNet files for these hold their auxiliary classifiers, which the model is built without."""
    donor = torchvision.models.get_model(backbone, aux_logits=True, init_weights=True)
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    model = build_model(backbone)
    assert load_pretrained(model, backbone, str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    torch.testing.assert_close(model.conv1.conv.weight if backbone == "googlenet" else model.Conv2d_1a_3x3.conv.weight,
                               donor.conv1.conv.weight if backbone == "googlenet" else donor.Conv2d_1a_3x3.conv.weight)


def test_a_checkpoint_keeps_googlenets_input_rescaling(tmp_path):
    """transform_input is a build option, not a weight: a GoogLeNet trained without it (as built before
    round 22's review) was rebuilt with it and gave other ages, with no error."""
    torch.manual_seed(0)
    model = build_model("googlenet").eval()
    model.transform_input = False
    save_checkpoint(tmp_path / "m.pt", model, {"backbone": "googlenet", "min_age": 0, "max_age": 100})
    loaded, meta = load_checkpoint(tmp_path / "m.pt")
    assert loaded.transform_input is False and meta["transform_input"] is False
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x))


def test_a_resolution_under_one_pixel_is_one_pixel():
    """evaluate.low_res=[0.005] on 64 px chips rounds to a side of 0: F.interpolate raised."""
    images = torch.randint(0, 256, (2, 3, 64, 64), dtype=torch.uint8)
    flat = low_resolution(images, 0)
    assert flat.shape == images.shape
    assert torch.equal(flat, low_resolution(images, 1))
    pairs = torch.randint(0, 256, (2, 3, 214, 150), dtype=torch.uint8)
    assert low_resolution_at(pairs, torch.zeros(2, dtype=torch.long)).shape == pairs.shape
