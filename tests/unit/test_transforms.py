"""Lower-resolution faces: the degradation train.low_res trains on and evaluate.low_res scores with."""

import numpy as np
import pytest
import torch

from faceage.finetune import _Views
from faceage.transforms import (RandomLowResolution, low_res_sides, low_resolution, low_resolution_each,
                                train_augment)


def checkerboard(n: int = 2, size: int = 64) -> torch.Tensor:
    """uint8 (n, 3, size, size): 1-px black/white squares, detail that only full resolution can hold."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    board = ((yy + xx) % 2 * 255).to(torch.uint8)
    return board.expand(n, 3, size, size).clone()


def test_low_resolution_keeps_the_size_and_removes_detail():
    x = checkerboard()
    y = low_resolution(x, 32)
    assert y.shape == x.shape and y.dtype == torch.uint8
    assert x.float().std() > 120 and y.float().std() < 5  # the 1-px pattern is gone
    assert y.float().mean().item() == pytest.approx(127.5, abs=2)  # its average brightness stays
    assert torch.equal(low_resolution(x, 64), x) and torch.equal(low_resolution(x, 80), x)


def test_low_resolution_leaves_smooth_images_nearly_unchanged():
    ramp = torch.linspace(0, 255, 64).expand(1, 3, 64, 64).round().to(torch.uint8)
    assert (low_resolution(ramp, 32).float() - ramp.float()).abs().max() <= 6


def test_low_resolution_each_degrades_each_image_at_its_own_side():
    x = torch.randint(0, 256, (5, 3, 64, 64), dtype=torch.uint8)
    sides = torch.tensor([64, 20, 40, 20, 64])
    before = x.clone()
    y = low_resolution_each(x, sides)
    assert torch.equal(x, before)  # the input is not modified
    for i, s in enumerate(sides.tolist()):
        assert torch.equal(y[i], low_resolution(x[i:i + 1], s)[0])


def test_low_res_sides_cover_the_range():
    sides = low_res_sides(2000, 64, 0.45, torch.Generator().manual_seed(0))
    assert sides.min().item() == 29 and sides.max().item() == 64  # round(0.45 * 64) .. 64, both ends drawn
    assert low_res_sides(10, 64, 1.0).eq(64).all()


def test_random_low_resolution_applies_with_its_probability():
    x = checkerboard(1)[0]
    torch.manual_seed(0)
    assert all(torch.equal(RandomLowResolution(0.0, 0.45)(x), x) for _ in range(20))
    changed = [not torch.equal(RandomLowResolution(0.5, 0.45)(x), x) for _ in range(400)]
    assert 0.4 < np.mean(changed) < 0.6
    assert all(not torch.equal(RandomLowResolution(1.0, 0.45)(x), x) for _ in range(20))  # side 63 or less


def test_train_augment_includes_low_resolution_only_with_augmentation():
    steps = train_augment(augment=True, low_res=0.5, low_res_min=0.3).transforms
    assert isinstance(steps[-1], RandomLowResolution) and (steps[-1].p, steps[-1].min_fraction) == (0.5, 0.3)
    x = checkerboard(1)[0]
    assert torch.equal(train_augment(augment=False, low_res=1.0)(x), x)


def test_cached_views_draw_lower_resolution_copies_with_probability_low_res():
    n = 4
    clean = torch.zeros(n, 2, 1)  # cached outputs of the chip and its mirror image
    low = torch.ones(n, 8, 1)  # of 4 lower-resolution copies and theirs
    ages, stds = torch.arange(n).float(), torch.zeros(n)
    torch.manual_seed(0)
    assert all(_Views(clean, ages, stds, low, 0.0)[i % n][0].item() == 0 for i in range(50))
    assert all(_Views(clean, ages, stds, low, 1.0)[i % n][0].item() == 1 for i in range(50))
    half = [_Views(clean, ages, stds, low, 0.5)[i % n][0].item() for i in range(400)]
    assert 0.4 < np.mean(half) < 0.6
    assert torch.equal(_Views(clean, ages, stds, low, 0.5).images, clean[:, 0])  # validation: the chip itself
