"""What makes resume exact and N processes equal one: sampler, seeded samples, state file, global BatchNorm."""

import os
import socket

import torch
from torch import nn
from torch.utils.data import Dataset

from faceage.training import (
    EpochSampler, GlobalBatchNorm2d, SeededSamples, TrainState, _plain, _set_batchnorm_class, load_state, save_state,
)


class Noisy(Dataset):
    """Items draw from torch's global generator, as torchvision's random transforms do."""

    def __len__(self):
        return 10

    def __getitem__(self, i):
        return torch.rand(3), torch.tensor(30.0 + i), torch.tensor(2.0)


def _global_batches(world: int, epoch: int, batch: int = 4) -> list[set[int]]:
    per_rank = []
    for rank in range(world):
        sampler = EpochSampler(Noisy(), num_replicas=world, rank=rank, shuffle=True, seed=7, drop_last=True)
        sampler.set_epoch(epoch)
        keys = list(sampler)
        assert {e for _, e in keys} == {epoch}
        local = batch // world
        per_rank.append([[i for i, _ in keys[k:k + local]] for k in range(0, len(keys) - local + 1, local)])
    steps = min(len(r) for r in per_rank)
    return [set().union(*(r[s] for r in per_rank)) for s in range(steps)]


def test_a_global_step_holds_the_same_faces_for_one_or_two_processes():
    assert _global_batches(1, epoch=3)[:2] == _global_batches(2, epoch=3)[:2]
    assert _global_batches(1, epoch=3) != _global_batches(1, epoch=4)  # a new order each epoch


def test_a_sample_draws_the_same_randomness_whatever_was_drawn_before():
    ds = SeededSamples(Noisy(), seed=1, label_jitter=True)
    first = ds[(5, 2)]
    torch.rand(100)  # another sample, another worker, another rank: the global stream moves on
    again = ds[(5, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not torch.equal(first[0], ds[(5, 3)][0])  # the next epoch draws afresh
    assert first[1] != first[2] and first[2] == 35.0  # jittered target, true apparent age


def test_the_state_round_trips_and_other_params_or_a_torn_file_are_ignored(tmp_path):
    path = tmp_path / "state.pt"
    state = TrainState("abc", run_id="r1", epoch=2, model={"w": torch.ones(2)}, history=[{"epoch": 1, "val_mae": 3.0}],
                       best_val_mae=3.0, best_epoch=1)
    save_state(path, state)
    loaded = load_state(path, "abc")
    assert loaded.epoch == 2 and loaded.run_id == "r1" and torch.equal(loaded.model["w"], torch.ones(2))
    assert loaded.history == state.history and loaded.best_model is None
    assert load_state(path, "other params") is None
    path.write_bytes(path.read_bytes()[:100])  # what a non-atomic write could leave
    assert load_state(path, "abc") is None
    assert not (tmp_path / "state.pt.tmp").exists()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _bn_rank(rank: int, world: int, port: int, x: torch.Tensor, out: str) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    net = _set_batchnorm_class(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)), GlobalBatchNorm2d)
    local = x[rank::world].clone().requires_grad_(True)
    y = net(local)
    (y**2).mean().backward()  # this rank's mean; DDP would average the parameter gradients
    grads = {n: t.grad / world for n, t in net.named_parameters()}
    for g in grads.values():
        dist.all_reduce(g)
    torch.save({"y": y.detach(), "grads": grads, "buffers": dict(net.named_buffers())}, f"{out}/{rank}.pt")
    dist.destroy_process_group()


def test_global_batchnorm_over_two_gloo_processes_equals_batchnorm_over_the_whole_batch(tmp_path):
    import torch.multiprocessing as mp

    x = torch.randn(8, 3, 6, 6) * 3 + 1
    mp.start_processes(_bn_rank, args=(2, _free_port(), x, str(tmp_path)), nprocs=2, start_method="spawn")
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
    y = ref(x)
    (y**2).mean().backward()
    for rank in (0, 1):
        got = torch.load(tmp_path / f"{rank}.pt", weights_only=True)
        torch.testing.assert_close(got["y"], y[rank::2].detach(), rtol=1e-5, atol=1e-5)
        for name, t in ref.named_parameters():
            torch.testing.assert_close(got["grads"][name], t.grad, rtol=1e-4, atol=1e-5)
        for name, b in ref.named_buffers():
            torch.testing.assert_close(got["buffers"][name], b, rtol=1e-5, atol=1e-6)


def test_the_model_shipped_has_plain_batchnorm():
    net = _set_batchnorm_class(nn.Sequential(nn.BatchNorm2d(2)), GlobalBatchNorm2d)
    assert type(_plain(net)[0]) is nn.BatchNorm2d and type(net[0]) is GlobalBatchNorm2d


def test_epochs_zero_is_a_valid_run():
    from faceage.config import params_from_dict
    from tests.unit.test_config import raw_params

    raw = raw_params()
    raw["train"].update(epochs=0)
    assert params_from_dict(raw).train.epochs == 0
