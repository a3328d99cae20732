"""Inference precision: ``evaluate`` on a GPU scores what the CPU service serves."""

import pytest
import torch

from faceage.inference import ieee_fp32


@pytest.fixture
def tf32_on():
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = True
    yield
    torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def test_on_cuda_tf32_is_off_inside_and_restored_after(tf32_on):
    # (The flags are plain process settings: no GPU is needed to check them.)
    with ieee_fp32(torch.device("cuda")):
        assert not torch.backends.cudnn.allow_tf32 and not torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_restored_after_an_error(tf32_on):
    with pytest.raises(RuntimeError, match="boom"), ieee_fp32(torch.device("cuda")):
        raise RuntimeError("boom")
    assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32


def test_a_no_op_on_cpu(tf32_on):
    with ieee_fp32(torch.device("cpu")):
        assert torch.backends.cudnn.allow_tf32 and torch.backends.cuda.matmul.allow_tf32
