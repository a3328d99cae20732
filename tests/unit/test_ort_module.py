"""Frozen modules in ONNX Runtime: same outputs as torch on other batches, torch kept when they differ."""

import logging

import pytest
import torch
from torch import nn

from faceage.ort_module import OrtModule, cpu_runner


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.relu(self.conv(x.float() / 255.0)).mean(dim=(2, 3))
        return self.fc(h)


class _TwoOutputs(_Net):
    def forward(self, x):
        logits = super().forward(x)
        return logits, torch.softmax(logits, dim=1)


class _Noisy(_Net):
    def forward(self, x):
        return super().forward(x) + torch.rand(x.shape[0], 5)


def _images(n, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)


def test_ort_module_gives_torchs_outputs_on_another_batch_size():
    net = _Net().eval()
    runner = OrtModule(net, _images(4, 1))
    x = _images(11, 2)
    with torch.no_grad():
        expected = net(x)
    got = runner(x)
    assert got.shape == (11, 5)
    assert torch.allclose(got, expected, atol=1e-5)
    assert runner.max_abs_diff <= 1e-5


def test_ort_module_keeps_every_output_of_a_tuple():
    net = _TwoOutputs().eval()
    logits, probs = cpu_runner(net, _images(3, 1), "cpu", "two outputs")(_images(7, 3))
    with torch.no_grad():
        want_logits, want_probs = net(_images(7, 3))
    assert torch.allclose(logits, want_logits, atol=1e-5)
    assert torch.allclose(probs, want_probs, atol=1e-6)


def test_a_graph_that_disagrees_with_torch_is_refused_and_torch_kept(caplog):
    net = _Noisy().eval()
    with pytest.raises(ValueError, match="differs from torch"):
        OrtModule(net, _images(4, 1))
    with caplog.at_level(logging.WARNING, logger="faceage.ort_module"):
        runner = cpu_runner(net, _images(4, 1), "cpu", "the noisy net")
    assert not isinstance(runner, OrtModule)
    assert "running the noisy net in torch" in caplog.text
    assert runner(_images(2, 5)).shape == (2, 5)


def test_cuda_keeps_torch():
    net = _Net().eval()
    runner = cpu_runner(net, _images(2, 1), "cuda", "on a GPU")
    assert not isinstance(runner, OrtModule)
    with torch.no_grad():
        assert torch.equal(runner(_images(3, 2)), net(_images(3, 2)))
