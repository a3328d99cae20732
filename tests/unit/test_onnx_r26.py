"""Round 26 review of the ONNX runtime: bounded passes, one arena for both sessions, VGG-like pools in ORT.

Small hand-built graphs only (no shared data, no trained model): they test the runtime's plumbing,
never accuracy.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from faceage.onnx_model import MAX_PASS_FACES, OnnxAgeModel
from faceage.ort_module import OrtModule, cpu_runner

SIDE = 4


def _mean_graph(path) -> str:
    """A FaceAge-like ONNX file: uint8 (N, 3, 4, 4) -> age = the pixels' mean, age_std = age / 10, probs (N, 1)."""
    nodes = [helper.make_node("Cast", ["input"], ["x"], to=TensorProto.FLOAT),
             helper.make_node("ReduceMean", ["x"], ["age"], axes=[1, 2, 3], keepdims=0),
             helper.make_node("Constant", [], ["tenth"], value=helper.make_tensor("t", TensorProto.FLOAT, [], [0.1])),
             helper.make_node("Mul", ["age", "tenth"], ["age_std"]),
             helper.make_node("Unsqueeze", ["age", "one"], ["probs"])]
    graph = helper.make_graph(
        nodes, "mean", [helper.make_tensor_value_info("input", TensorProto.UINT8, ["faces", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("age", TensorProto.FLOAT, ["faces"]),
         helper.make_tensor_value_info("age_std", TensorProto.FLOAT, ["faces"]),
         helper.make_tensor_value_info("probs", TensorProto.FLOAT, ["faces", 1])],
        initializer=[helper.make_tensor("one", TensorProto.INT64, [1], [1])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    entry = model.metadata_props.add()
    entry.key, entry.value = "faceage", json.dumps({"backbone": "mean", "input": "image", "image_size": SIDE})
    onnx.save(model, str(path))
    return str(path)


def _crops(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, (SIDE, SIDE, 3), dtype=np.uint8) for _ in range(n)]


def test_predict_crops_runs_in_passes_of_at_most_max_pass_faces(tmp_path):
    """All faces went through one pass, and ONNX Runtime's arena keeps the memory of the largest pass a
    session ran: 200 faces of the fused graph left the process 510 MB larger for good."""
    model = OnnxAgeModel(_mean_graph(tmp_path / "m.onnx"))
    passes = []
    run = model.session.run

    def counting(names, feed):
        passes.append(len(next(iter(feed.values()))))
        return run(names, feed)

    model.session.run = counting
    crops = _crops(2 * MAX_PASS_FACES + 3)
    age, std = model.predict_crops(crops)
    assert passes == [MAX_PASS_FACES, MAX_PASS_FACES, 3]
    want = np.array([c.astype(np.float64).mean() for c in crops])
    assert age.dtype == std.dtype == np.float64 and age.shape == std.shape == (len(crops),)
    assert age == pytest.approx(want, abs=1e-4) and std == pytest.approx(want / 10, abs=1e-5)
    assert [a.shape for a in model.predict_crops([])] == [(0,), (0,)]


def test_the_sleeping_and_spinning_sessions_share_one_arena(tmp_path):
    """Each session kept its own arena: a pass through each (the service alternates them) kept the pass's
    memory twice (32 faces of the fused graph: 621 MB against 377 MB with one session)."""
    model = OnnxAgeModel(_mean_graph(tmp_path / "m.onnx"), threads=2)
    assert model.spinning is not model.session
    for session in (model.session, model.spinning):
        assert session.get_session_options().get_session_config_entry("session.use_env_allocators") == "1"
    crops = _crops(5)
    busy, idle = model.predict_crops(crops), model.predict_crops(crops, idle=True)
    assert np.array_equal(busy[0], idle[0]) and np.array_equal(busy[1], idle[1])


class _SmallVgg(nn.Module):
    """VGG's head in small: a 3x3 adaptive pool over an 8x8 map (3 does not divide 8), then a linear layer."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.avgpool = nn.AdaptiveAvgPool2d((3, 3))
        self.fc = nn.Linear(36, 5)

    def forward(self, x):
        return self.fc(torch.flatten(self.avgpool(torch.relu(self.conv(x.float() / 255.0))), 1))


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (n, 3, 8, 8), generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def test_an_adaptive_pool_that_does_not_divide_its_input_runs_in_onnx_runtime(caplog):
    """evaluate's age graph of VGG or AlexNet at another image size than 224 failed to export (and printed the
    whole traced graph to stdout): evaluate fell back to torch, not the graph packaging exports and serves."""
    net = _SmallVgg().eval()
    with caplog.at_level(logging.INFO, logger="faceage.ort_module"):
        runner = cpu_runner(net, _images(4, 1), "cpu", "the small vgg")
    assert isinstance(runner, OrtModule), caplog.text
    x = _images(11, 2)
    with torch.no_grad():
        want = net(x)
    assert torch.allclose(runner(x), want, atol=1e-5)
    assert isinstance(net.avgpool, nn.AdaptiveAvgPool2d)  # the pool is put back after the export
