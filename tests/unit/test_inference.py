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


@pytest.mark.gpu
def test_on_cuda_the_ages_are_the_cpu_ages(tmp_path):
    """What ieee_fp32 is for: ``evaluate`` on a GPU gives the ages the CPU service serves (the predictor
    tests' small random network on random crops: agreement is checked, not accuracy)."""
    import numpy as np

    from faceage.inference import AgeModel
    from tests.unit.test_predict import make_checkpoint, make_detector_dir

    checkpoint = make_checkpoint(tmp_path / "model.pt", make_detector_dir(tmp_path / "detector"))
    crops = list(np.random.default_rng(0).integers(0, 256, (6, 96, 96, 3), dtype=np.uint8))
    cpu_age, cpu_std = AgeModel(checkpoint, device="cpu").predict_crops(crops)
    cuda_age, cuda_std = AgeModel(checkpoint, device="cuda").predict_crops(crops)
    assert len(cpu_age) == 6 and np.ptp(cpu_age) > 0  # six different answers, not one constant
    np.testing.assert_allclose(cuda_age, cpu_age, atol=1e-3)
    np.testing.assert_allclose(cuda_std, cpu_std, atol=1e-3)
