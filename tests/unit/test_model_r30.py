"""Round 30 review of the model path: weights files as other tools write them, and one-row statistics.

Real small models (randomly initialised ResNet-18, the ensemble head) and real files in ``tmp_path``.
"""

import pytest
import torch

from faceage.dlib_age import AgeEnsemble
from faceage.model import PretrainedWeightsError, build_model, load_pretrained


@pytest.fixture()
def donor() -> torch.nn.Module:
    torch.manual_seed(1)
    return build_model("resnet18", num_ages=10)  # another head width than the model's 101: dropped either way


def _prefixed(state: dict, prefix: str) -> dict:
    return {prefix + k: v for k, v in state.items()}


@pytest.mark.parametrize("wrap", [
    # DistributedDataParallel / DataParallel's state_dict()
    pytest.param(lambda sd: _prefixed(sd, "module."), id="ddp-module-prefix"),
    # torch.compile's OptimizedModule
    pytest.param(lambda sd: _prefixed(sd, "_orig_mod."), id="torch-compile-prefix"),
    # a DDP model compiled: both
    pytest.param(lambda sd: _prefixed(sd, "module._orig_mod."), id="ddp-and-compile"),
    # torchvision references' checkpoint, and this project's own training state (TrainState.model)
    pytest.param(lambda sd: {"model": sd, "optimizer": {"state": {}}, "epoch": 3}, id="full-checkpoint-model-key"),
    # the PyTorch tutorials' checkpoint
    pytest.param(lambda sd: {"model_state_dict": sd, "epoch": 3}, id="full-checkpoint-model-state-dict"),
    # a DDP run's full checkpoint
    pytest.param(lambda sd: {"model": _prefixed(sd, "module."), "epoch": 3}, id="full-checkpoint-of-ddp"),
    # a Lightning checkpoint of a module holding the network as self.model
    pytest.param(lambda sd: {"state_dict": _prefixed(sd, "model."), "epoch": 3}, id="lightning-checkpoint"),
])
def test_a_weights_file_as_other_tools_save_it_loads_the_same_body(tmp_path, donor, wrap):
    """Each was refused with "does not fit backbone 'resnet18' (e.g. ['conv1.weight', ...])": the right
    network, in the file as DDP, torch.compile or a training checkpoint writes it, read as another network."""
    path = tmp_path / "w.pth"
    torch.save(wrap(donor.state_dict()), path)
    model = build_model("resnet18")
    head_before = model.fc.weight.detach().clone()
    assert load_pretrained(model, "resnet18", str(path)) == str(path)
    body = {k: v for k, v in donor.state_dict().items() if not k.startswith("fc.")}
    for k, v in body.items():
        torch.testing.assert_close(model.state_dict()[k], v, msg=k)
    torch.testing.assert_close(model.fc.weight, head_before)  # the 101-way head stays the model's own


def test_a_plain_state_dict_still_loads_and_another_network_is_still_refused(tmp_path, donor):
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet18")
    load_pretrained(model, "resnet18", str(tmp_path / "w.pth"))
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)
    # prefixes are only taken off a file that fits once they are: a DDP file of another network still fails
    torch.save(_prefixed(build_model("mobilenet_v3_small").state_dict(), "module."), tmp_path / "m.pth")
    with pytest.raises(PretrainedWeightsError, match="train.pretrained=.*does not fit backbone 'resnet18'"):
        load_pretrained(build_model("resnet18"), "resnet18", str(tmp_path / "m.pth"))


def test_a_weights_file_with_a_non_tensor_at_a_weights_name_names_the_param(tmp_path, donor):
    """It crashed with AttributeError: 'int' object has no attribute 'shape'."""
    state = dict(donor.state_dict())
    state["conv1.weight"] = 3
    torch.save(state, tmp_path / "w.pth")
    with pytest.raises(PretrainedWeightsError, match=r"train.pretrained=.*does not fit backbone 'resnet18'.*conv1.weight"):
        load_pretrained(build_model("resnet18"), "resnet18", str(tmp_path / "w.pth"))


def test_the_ensembles_input_statistics_of_one_row_are_finite():
    """One row has no sample standard deviation: torch gave NaN, which clamp_min keeps, and every
    prediction of the head was NaN."""
    torch.manual_seed(0)
    head = AgeEnsemble(101, members=2, hidden=8, in_features=6).eval()
    x = torch.randn(1, 6)
    head.fit_input_stats(x)
    assert torch.isfinite(head.in_std).all() and torch.equal(head.in_mean, x[0])
    assert torch.isfinite(head(x)).all()


def test_the_ensembles_input_statistics_of_many_rows_are_unchanged():
    """The default recipe's numbers: the sample standard deviation (n - 1), floored at 1e-6."""
    x = torch.randn(50, 6)
    x[:, 2] = 4.0  # a constant input
    head = AgeEnsemble(101, members=1, hidden=8, in_features=6)
    head.fit_input_stats(x)
    torch.testing.assert_close(head.in_mean, x.mean(0))
    torch.testing.assert_close(head.in_std, x.std(0).clamp_min(1e-6))
