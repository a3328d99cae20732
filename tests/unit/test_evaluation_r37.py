"""Round-37 review of evaluation and its transforms.

``evaluate``'s ``mae_low_res`` degrades the whole test split (and each external set) at one side, and
:func:`faceage.transforms.low_resolution` interpolated all of it in one float32 batch: three or four float copies of
the set at once. On APPA-REAL's 1,978 test faces at 224 px (283 MB of uint8 crops) it took 3.5-4.1 GB more memory
(measured), enough to end ``evaluate`` on a laptop after the test split was scored. It now works through the batch
in chunks, the same bytes as before.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from faceage.transforms import low_resolution, low_resolution_at
from tests.conftest import PEAK_KB, REPO
from tests.unit.test_transforms_r35 import faces, low_resolution_before_round_35

# Peak memory of one low_resolution call in a fresh process (its own peak RSS grows only: what the call added to it).
_PEAK = PEAK_KB + r"""
import json, sys, torch
from faceage.transforms import low_resolution, low_resolution_at
how, (n, size, side) = sys.argv[1], map(int, sys.argv[2:5])
images = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
before = peak_kb()
# "at": what evaluation.low_res_mae calls, one side for every face
out = low_resolution(images, side) if how == "one" else low_resolution_at(images, torch.full((n,), side))
after = peak_kb()
assert out.shape == images.shape and out.dtype == torch.uint8
print(json.dumps({"input_mb": images.numel() / 2**20, "added_mb": (after - before) / 1024}))
"""


def _peak(how: str, n: int, size: int, side: int) -> dict:
    done = subprocess.run([sys.executable, "-c", _PEAK, how, str(n), str(size), str(side)], cwd=REPO,
                          capture_output=True, text=True, timeout=300, check=True)
    return json.loads(done.stdout.splitlines()[-1])


@pytest.mark.parametrize("how", ["one", "at"])
def test_a_lower_resolution_copy_of_a_whole_split_takes_memory_for_the_copy_not_many_float_copies(how):
    """512 faces at 224 px (73.5 MB): the one float32 batch added ~920 MB (12.5x the crops), ~1,070 MB through
    low_resolution_at (its clone and gathered copy on top); the copy itself is 1x. Measured by the child's own peak
    (conftest's PEAK_KB), the chunked copy adds 180-235 MB here (the copy, a chunk's float temporaries, torch's
    allocator and thread pool): the bound keeps a margin for that, far under the whole-batch float copies."""
    peak = _peak(how, 512, 224, 168)
    assert peak["added_mb"] < peak["input_mb"] + 300, peak


@pytest.mark.parametrize("n,size,side,seed", [(70, 224, 168, 1), (33, 224, 112, 2), (65, 64, 29, 3), (1, 150, 75, 4),
                                              (0, 64, 32, 5)])
def test_the_chunked_copy_is_the_one_batch_copy_byte_for_byte(n, size, side, seed):
    """Chunks change no pixel (every metric of a README run stays to the digit): what one float batch gave on one
    thread, as the round-35 formula did, including a batch that is not a multiple of the chunk and an empty one."""
    x = faces(max(n, 1), size, seed)[:n]
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = low_resolution_before_round_35(x, side)
    finally:
        torch.set_num_threads(before)
    got = low_resolution(x, side)
    assert got.dtype == torch.uint8 and got.shape == x.shape
    assert torch.equal(got, expected)


def test_the_chunked_copy_leaves_its_input_alone_and_serves_chip_pairs():
    from faceage.chips import PAIR_SHAPE

    pairs = faces(40, 0, 6, shape=PAIR_SHAPE[1:])
    kept = pairs.clone()
    out = low_resolution_at(pairs, torch.full((40,), 32))
    assert torch.equal(pairs, kept) and out.shape == pairs.shape and not torch.equal(out, pairs)


def test_evaluates_mae_low_res_is_the_mae_on_the_one_batch_copies(tmp_path):
    """The evaluate path (low_res_mae, a real checkpoint): the MAE on the faces degraded as one float batch was."""
    import numpy as np

    from faceage.evaluation import low_res_mae
    from faceage.inference import AgeModel
    from tests.conftest import make_detector_dir
    from tests.unit.test_predict import make_checkpoint

    model = AgeModel(make_checkpoint(tmp_path / "model.pt", make_detector_dir(tmp_path / "detector")), device="cpu")
    images = faces(70, 32, 7)
    true = np.linspace(1.0, 90.0, 70)
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        expected = {f"{f:g}": float(np.abs(model.predict_inputs(low_resolution_before_round_35(images, round(f * 32)),
                                                                 16)[0] - true).mean()) for f in (0.75, 0.5)}
    finally:
        torch.set_num_threads(before)
    got = low_res_mae(model, images, true, (0.75, 0.5), 16)
    assert set(got) == {"0.75", "0.5"} and got == pytest.approx(expected, abs=1e-9)
