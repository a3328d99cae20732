"""CUDA code paths checked on CPU: what a GPU host runs, with CPU stand-ins (no GPU in CI)."""

import os
import socket

import torch
from torch import nn

from faceage.training import GlobalBatchNorm2d, _set_batchnorm_class


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _amp_bn_rank(rank: int, world: int, port: int, x: torch.Tensor, big: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    result = {}
    try:
        # As train_one_epoch runs the network under torchrun on GPUs with train.amp=true (the default):
        # torch.autocast, here CPU's bf16 stand-in for CUDA's (a conv's output is bf16 either way).
        torch.manual_seed(0)
        net = _set_batchnorm_class(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), GlobalBatchNorm2d)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = net(x[rank::world])
        result["amp_y"] = y.detach().float()
        result["amp_dtype"] = str(y.dtype)
        result["amp_buffers"] = {k: v.clone() for k, v in net.named_buffers()}
    except Exception as e:  # noqa: BLE001 - reported to the test, which names it
        result["error"] = f"bf16: {type(e).__name__}: {e}"
    try:
        # fp16 autocast (a GPU without bf16: T4, V100) hands BatchNorm fp16 activations; their per-channel sum
        # over a batch of 64x64 maps is far above float16's largest value, 65504.
        bn = GlobalBatchNorm2d(big.shape[1])
        half = bn(big[rank::world].half())
        result["fp16_y"] = half.detach().float()
        result["fp16_buffers"] = {k: v.clone() for k, v in bn.named_buffers()}
    except Exception as e:  # noqa: BLE001 - reported to the test, which names it
        result["error"] = result.get("error", "") + f" fp16: {type(e).__name__}: {e}"
    torch.save(result, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batchnorm_under_mixed_precision_matches_float32_batchnorm(tmp_path):
    """Multi-GPU training (torchrun, GlobalBatchNorm2d) with train.amp=true: the statistics are taken in float32.

    Before: bf16 autocast failed at the first step in ``running_mean.lerp_`` ("expected dtype float for `end` but
    got dtype BFloat16"); fp16 activations summed to inf and every output was NaN.
    """
    import torch.multiprocessing as mp

    x = torch.randn(8, 3, 10, 10) * 3 + 1
    big = torch.randn(16, 2, 64, 64) + 3.0  # 8 x 64 x 64 x ~3 per rank and channel: ~100k, over fp16's 65504
    mp.start_processes(_amp_bn_rank, args=(2, _free_port(), x, big, str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    y = ref(x)
    ref_bn = nn.BatchNorm2d(2)
    big_y = ref_bn(big)
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        assert "error" not in got, got["error"]
        assert got["amp_dtype"] == "torch.bfloat16"  # what plain BatchNorm gives under autocast: the input's
        torch.testing.assert_close(got["amp_y"], y[rank::2].detach(), rtol=0.05, atol=0.05)
        for name, b in ref.named_buffers():
            assert got["amp_buffers"][name].dtype == b.dtype
            torch.testing.assert_close(got["amp_buffers"][name], b, rtol=0.02, atol=0.02)
        assert torch.isfinite(got["fp16_y"]).all()
        torch.testing.assert_close(got["fp16_y"], big_y[rank::2].detach(), rtol=0.01, atol=0.01)
        for name, b in ref_bn.named_buffers():
            torch.testing.assert_close(got["fp16_buffers"][name], b, rtol=1e-3, atol=1e-3)


def _fake_gpu(monkeypatch, major: int) -> None:
    """This CPU host as a CUDA host whose GPU has compute capability ``major``.x (torch's own
    ``is_bf16_supported`` runs: only what it asks the driver is answered here)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda _: SimpleNamespace(major=major, minor=5))
    # a bf16 tensor can be made on any CUDA GPU: torch then calls bf16 "supported", emulated
    monkeypatch.setattr(torch.cuda, "_check_bf16_tensor_supported", lambda _: True)


def test_amp_takes_bf16_only_where_the_gpu_runs_it_natively(monkeypatch):
    """A T4 or V100 (compute capability 7.x) has no bf16 units: torch.cuda.is_bf16_supported() still says yes
    (emulation), and train.amp trained in emulated bf16 instead of fp16 on the tensor cores. README: "bf16
    autocast where the GPU supports it, else fp16 with loss scaling"."""
    from faceage.config import TrainParams
    from faceage.training import Amp

    cuda = torch.device("cuda")
    _fake_gpu(monkeypatch, major=7)
    amp = Amp.for_device(TrainParams(), cuda)
    assert amp.enabled and amp.dtype == torch.float16
    assert amp.scaler._enabled  # fp16 needs loss scaling (is_enabled() would ask the real, absent, driver)
    _fake_gpu(monkeypatch, major=9)  # an H100 / H200
    amp = Amp.for_device(TrainParams(), cuda)
    assert amp.enabled and amp.dtype == torch.bfloat16 and not amp.scaler._enabled
    off = Amp.for_device(TrainParams(amp=False), cuda)
    assert not off.enabled and not off.scaler._enabled
    monkeypatch.undo()
    cpu = Amp.for_device(TrainParams(), torch.device("cpu"))  # never on CPU, whatever the GPU
    assert not cpu.enabled and not cpu.scaler._enabled
