"""Review round 29, the crop path's datasets: memory while a split loads.

A split is held in memory as one uint8 array. Building it from a list of per-image arrays and then
``np.stack`` held every image twice; the chip pairs of ``train.head=fused`` were built for every crop
of ``chips.npz`` (all three splits) when one split was asked for.
"""

import csv
import tracemalloc

import numpy as np
from PIL import Image

from faceage.chips import FACE_CHIP_SIZE, CHIP_SIZE, PAIR_SHAPE, load_chips, make_pair, save_chips
from faceage.data import load_split
from faceage.preprocess import FIELDS


def _write_manifest(folder, crops):
    with open(folder / "manifest.csv", "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS, restval="")
        writer.writeheader()
        writer.writerows({"split": c.split("/")[0], "file_name": c, "crop": c, "apparent_age": "30.5",
                          "apparent_age_std": "2.0", "real_age": "31", "status": "face", "n_faces": "1"}
                         for c in crops)


def _peak_bytes(build):
    """``build()`` and the peak of the memory it allocated (numpy's buffers included), past its start."""
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        start = tracemalloc.get_traced_memory()[0]
        result = build()
        return result, tracemalloc.get_traced_memory()[1] - start
    finally:
        tracemalloc.stop()


def test_a_split_of_crops_is_held_once_while_it_loads(tmp_path):
    """300 crops at 96 px: the split's 8.3 MB array was stacked from a list of the same 8.3 MB (a peak of
    17.1 MB, now 8.7); the train split of APPA-REAL at 224 px holds 619 MB."""
    rng = np.random.default_rng(0)
    (tmp_path / "train").mkdir()
    crops = [f"train/{i:04d}.png" for i in range(300)]
    for c in crops:
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(tmp_path / c, compress_level=0)
    _write_manifest(tmp_path, crops)

    data, peak = _peak_bytes(lambda: load_split(tmp_path, "train", "resnet18", 96))
    held = data.images.numel()
    assert data.images.shape == (300, 3, 96, 96)
    assert np.array_equal(data.images[7].numpy(), np.asarray(Image.open(tmp_path / crops[7])).transpose(2, 0, 1))
    assert peak < 1.4 * held, f"peak {peak / 1e6:.1f} MB to hold {held / 1e6:.1f} MB"


def test_one_split_of_chip_pairs_builds_no_pairs_of_the_other_splits(tmp_path):
    """chips.npz holds every split; loading the 60 test pairs (5.8 MB) built the pairs of all 600 crops
    (58 MB) beside the file's chips (48 MB): a peak of 106 MB, now 54. At APPA-REAL's size (7,591 crops,
    train 4,113: 396 MB of pairs) the train split's load peaked at 1.34 GB, now 1.01."""
    rng = np.random.default_rng(1)
    crops = [f"{'test' if i % 10 == 0 else 'train'}/{i:04d}.png" for i in range(600)]
    chips = list(rng.integers(0, 256, (600, 3, CHIP_SIZE, CHIP_SIZE), dtype=np.uint8))
    faces = list(rng.integers(0, 256, (600, 3, FACE_CHIP_SIZE, FACE_CHIP_SIZE), dtype=np.uint8))
    save_chips(tmp_path / "chips.npz", crops, chips, 0.4, "sha", face_chips=faces)
    _write_manifest(tmp_path, crops)
    file_bytes = sum(c.nbytes for c in chips) + sum(f.nbytes for f in faces)

    data, peak = _peak_bytes(lambda: load_split(tmp_path, "test", "dlib_age", 64, tmp_path / "chips.npz", pairs=True))
    held = data.images.numel()
    assert data.images.shape == (60, *PAIR_SHAPE)
    assert np.array_equal(data.images[3].numpy(), make_pair(chips[30], faces[30]))
    assert peak < file_bytes + 2.5 * held, f"peak {peak / 1e6:.1f} MB: file {file_bytes / 1e6:.1f}, split {held / 1e6:.1f}"

    # the table a caller asks for by crop holds those crops alone; without a list, every crop, as before
    table, info = load_chips(tmp_path / "chips.npz", pairs=True, crops=["test/0010.png", "nowhere.png"])
    assert list(table) == ["test/0010.png"] and np.array_equal(table["test/0010.png"], make_pair(chips[10], faces[10]))
    assert len(load_chips(tmp_path / "chips.npz")[0]) == 600 and info["face_chips"]
