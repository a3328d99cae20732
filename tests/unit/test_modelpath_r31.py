"""Round 31, the dlib_age model path: damaged network files give one clear line, not a traceback;
frozen graphs run in ONNX Runtime take the input dtypes torch takes."""

from __future__ import annotations

import shutil

import pytest
import torch
from torch import nn

from faceage.detector import AGE_MODEL_FILE, RECOGNITION_FILE
from faceage.dlib_age import HEAD_FUSED, DlibAgeNet
from faceage.errors import FaceAgeError
from faceage.model import load_pretrained
from faceage.ort_module import OrtModule
from tests.unit.test_dlib_age import model_dir  # noqa: F401 - the fixture: dlib's files, offline once cached

FIXTURES = (model_dir,)  # pytest finds the fixture by its name in this module


def _damaged(model_dir, tmp_path, name: str, how: str):  # noqa: F811
    out = tmp_path / "detector"
    shutil.copytree(model_dir, out)
    data = (out / name).read_bytes()
    if how == "truncated":
        (out / name).write_bytes(data[: len(data) // 2])
    elif how == "another graph":  # a valid ONNX file of another network
        torch.onnx.export(nn.Linear(3, 2), (torch.zeros(1, 3),), str(out / name), dynamo=False)
    else:  # the other network's file under this name
        other = RECOGNITION_FILE if name == AGE_MODEL_FILE else AGE_MODEL_FILE
        shutil.copyfile(model_dir / other, out / name)
    return out


@pytest.mark.parametrize(("name", "how"), [(AGE_MODEL_FILE, "truncated"), (AGE_MODEL_FILE, "another file"),
                                           (AGE_MODEL_FILE, "another graph"), (RECOGNITION_FILE, "truncated"),
                                           (RECOGNITION_FILE, "another file")])
def test_a_damaged_pretrained_network_file_is_one_clear_error(model_dir, tmp_path, name, how):  # noqa: F811
    """train.backbone=dlib_age with a truncated or wrong age-v1.onnx / face network file: the stage runner
    prints a FaceAgeError as one line; a protobuf DecodeError, KeyError or plain ValueError was a traceback."""
    folder = _damaged(model_dir, tmp_path, name, how)
    model = DlibAgeNet(101, HEAD_FUSED)
    with pytest.raises(FaceAgeError) as info:
        load_pretrained(model, "dlib_age", "imagenet", folder)
    assert isinstance(info.value, ValueError)  # what callers caught before
    message = str(info.value)
    assert str(folder / name) in message and "fetch_detector" in message, message


class _Double(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x * 2).sum(dim=1)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float16])
def test_ort_module_takes_the_dtypes_torch_takes(dtype):
    """A float32 graph fed float64/float16 input (torch casts through the module's own ops): ONNX Runtime
    refused it with "Unexpected input data type"; the input is cast to the graph's type."""
    runner = OrtModule(_Double(), torch.randn(4, 3))
    x = torch.randn(5, 3).to(dtype)
    got = runner(x)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, (x.float() * 2).sum(dim=1), rtol=1e-3, atol=1e-3)


def test_ort_module_takes_a_non_contiguous_batch():
    runner = OrtModule(_Double(), torch.randn(4, 3))
    x = torch.randn(3, 6)[:, ::2]
    torch.testing.assert_close(runner(x), (x * 2).sum(dim=1))
