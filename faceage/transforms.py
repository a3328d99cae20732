"""Train and eval presets on uint8 (3, S, S) tensors: normalisation and training augmentation.

Input: resized crops from :func:`faceage.inputs.resize_crop` (the torch-free resize that
training, ``evaluate`` and the service share). Output: a float (3, S, S) tensor normalised with
the checkpoint's mean/std. :func:`faceage.inputs.resize_crop` + :func:`normalize` are the eval
path (the exported ONNX graph normalises the same way); training adds augmentation between the two.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torchvision.transforms import v2


def normalize(batch: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 (..., 3, S, S) -> float32 normalised, on the tensor's device."""
    m = torch.tensor(mean, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    s = torch.tensor(std, dtype=torch.float32, device=batch.device).view(3, 1, 1)
    return (batch.float() / 255.0 - m) / s


# Images interpolated at a time by low_resolution. evaluate's mae_low_res degrades a whole split at one side: in one
# float32 batch, APPA-REAL's 1,978 test faces at 224 px (283 MB as uint8) took 3.5-4.1 GB more memory; in chunks of
# 32, 0.4 GB (the uint8 copy and a working set that does not grow with the split), and 2.5x less time on one thread.
LOW_RES_CHUNK = 32


def low_resolution(images: torch.Tensor, side: int) -> torch.Tensor:
    """uint8 (N, 3, S, S) -> the same faces as if photographed at ``side`` x ``side`` pixels, uint8 (N, 3, S, S).

    Downscaled with antialiasing, then scaled back up (bilinear): the input keeps its size and
    loses the detail a smaller face in a photo would not have. ``side >= S`` returns the input; a side
    under 1 pixel (``evaluate.low_res`` below 1/128 of a 64 px chip rounds to 0) is read as 1. On one CPU
    thread (:func:`one_cpu_thread`): the same bytes whatever the caller's torch thread count. In chunks of
    :data:`LOW_RES_CHUNK` images (each image's pixels are its own, so the same bytes as one batch).
    """
    size = images.shape[-1]
    if side >= size:
        return images
    side = max(1, int(side))
    out = torch.empty_like(images)
    with one_cpu_thread(images.device):
        for i in range(0, len(images), LOW_RES_CHUNK):
            x = F.interpolate(images[i:i + LOW_RES_CHUNK].float(), size=(side, side), mode="bilinear",
                              antialias=True, align_corners=False)
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
            out[i:i + LOW_RES_CHUNK] = x.round_().clamp_(0, 255)  # whole numbers in 0..255: the uint8 cast is exact
    return out


@contextmanager
def one_cpu_thread(device: torch.device) -> Iterator[None]:
    """Torch's CPU ops on one thread for the block (tensors on ``device``), then the caller's count again.

    F.interpolate splits its work among the threads, and where a chunk starts changes the float sums: on 2
    threads a few pixels of a 224 px batch came out one level apart from one thread's. Loader workers run on
    one thread; the training process (``train.num_workers=0``, dlib_age's cached lower-resolution copies) and
    ``evaluate`` (``mae_low_res``) on every usable core. On one thread they all get the pixels one-thread
    loader workers always got. Switching costs ~2 us a call (OpenMP keeps its threads), and the count is the
    calling thread's own: other threads keep theirs.
    """
    threads = torch.get_num_threads()
    if device.type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def low_res_sides(n: int, size: int, min_fraction: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """``n`` sides drawn uniformly from ``round(min_fraction * size)`` .. ``size`` (for :func:`low_resolution`)."""
    low = max(1, min(size, round(min_fraction * size)))
    return torch.randint(low, size + 1, (n,), generator=generator)


def low_resolution_each(images: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """:func:`low_resolution` of ``images[i]`` at ``sides[i]``, batched by side (a new tensor)."""
    unique = sides.unique().tolist()
    if len(unique) == 1:  # evaluate's mae_low_res: one side for the whole split, which a clone and a gathered copy
        out = low_resolution(images, int(unique[0]))  # of it would each have held once more in memory
        return images.clone() if out is images else out
    out = images.clone()
    for side in unique:
        at = (sides == side).nonzero().flatten()
        out[at] = low_resolution(images[at], int(side))
    return out


def reference_side(images: torch.Tensor) -> int:
    """The side a resolution share refers to: the image's, or for chip pairs the age chip's."""
    from faceage.chips import CHIP_SIZE, PAIR_SHAPE

    return CHIP_SIZE if tuple(images.shape[1:]) == PAIR_SHAPE else int(images.shape[-1])


def low_resolution_at(images: torch.Tensor, sides: torch.Tensor) -> torch.Tensor:
    """:func:`low_resolution_each` that also takes chip pairs: both chips of a pair
    lose the same share of their side (``sides`` are the age chip's; they are cut from the same photo)."""
    from faceage.chips import AGE_COLUMN, CHIP_SIZE, FACE_CHIP_SIZE, PAIR_SHAPE, split_pair

    if tuple(images.shape[1:]) != PAIR_SHAPE:
        return low_resolution_each(images, sides)
    age, face = split_pair(images)
    out = images.clone()
    out[..., :CHIP_SIZE, AGE_COLUMN:AGE_COLUMN + CHIP_SIZE] = low_resolution_each(age.contiguous(), sides)
    out[..., CHIP_SIZE:, :] = low_resolution_each(face.contiguous(), (sides * FACE_CHIP_SIZE / CHIP_SIZE).round().long())
    return out


def low_resolution_chips(images: torch.Tensor, min_fraction: float, generator: torch.Generator) -> torch.Tensor:
    """Each chip (or chip pair) as if its face had been photographed with fewer pixels: a side drawn by
    :func:`low_res_sides` (:func:`low_resolution_at`)."""
    return low_resolution_at(images, low_res_sides(len(images), reference_side(images), min_fraction, generator))


class RandomLowResolution:
    """With probability ``p``, :func:`low_resolution` at a side drawn by :func:`low_res_sides` (uint8 (3, S, S))."""

    def __init__(self, p: float, min_fraction: float):
        self.p, self.min_fraction = p, min_fraction

    def __call__(self, image: torch.Tensor) -> torch.Tensor:
        if self.p <= 0 or float(torch.rand(())) >= self.p:
            return image
        side = int(low_res_sides(1, image.shape[-1], self.min_fraction)[0])
        return low_resolution(image[None], side)[0]


def train_augment(*, augment: bool = True, low_res: float = 0.0, low_res_min: float = 0.45) -> v2.Transform:
    """Random flip, small rotation/scale/shift and colour jitter on uint8 (3, S, S) tensors, and with
    probability ``low_res`` a lower resolution (:class:`RandomLowResolution`)."""
    if not augment:
        return v2.Identity()
    return v2.Compose([
        v2.RandomHorizontalFlip(),
        # Nearest resampling (torchvision's default): bilinear was no better on validation (README, round 29).
        v2.RandomAffine(degrees=10, translate=(0.05, 0.05), scale=(0.9, 1.1)),
        v2.ColorJitter(brightness=0.3, contrast=0.3, saturation=0.3),
        RandomLowResolution(low_res, low_res_min),
    ])
