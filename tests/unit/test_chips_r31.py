"""Round-31 review of ``load_chips``: a few crops asked for read the whole file's face chips."""

from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

from faceage.chips import CHIP_SIZE, FACE_CHIP_SIZE, load_chips, make_pair, save_chips

N_FACES = 800  # face chips: 800 x 67.5 KB = 54 MB in the file


def _chips_file(tmp_path, n: int = N_FACES, compressed: bool = False):
    rng = np.random.default_rng(0)
    crops = [f"train/{i:05d}.jpg_face.jpg" if i % 3 else f"test/{i:05d}.jpg_face.jpg" for i in range(n)]
    chips = rng.integers(0, 256, (n, 3, CHIP_SIZE, CHIP_SIZE), np.uint8)
    faces = rng.integers(0, 256, (n, 3, FACE_CHIP_SIZE, FACE_CHIP_SIZE), np.uint8)
    path = tmp_path / "chips.npz"
    if compressed:
        np.savez_compressed(path, kind=np.array("dlib_age"), crops=np.array(crops, dtype=str), chips=chips,
                            margin=np.array(0.4), shape_predictor_sha256=np.array("abc"), face_chips=faces)
    else:
        save_chips(path, crops, list(chips), 0.4, "abc", list(faces))
    return path, crops, chips, faces


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_a_few_crops_read_only_their_rows(tmp_path):
    """``load_chips(crops=32 names, pairs=True)`` (packaging's ONNX check) read the whole ``face_chips`` array: about
    510 MB for APPA-REAL, 54 MB here, to build 32 pairs (6 MB)."""
    path, crops, _, _ = _chips_file(tmp_path)
    wanted = crops[::25][:32]
    peak = _peak(lambda: load_chips(path, pairs=True, crops=wanted))
    assert peak < 12 * 2**20, f"peak {peak / 2**20:.1f} MB for 32 pairs"
    peak = _peak(lambda: load_chips(path, crops=wanted))
    assert peak < 4 * 2**20, f"peak {peak / 2**20:.1f} MB for 32 chips"


@pytest.mark.parametrize("compressed", [False, True])
def test_the_rows_read_are_the_ones_asked_for(tmp_path, compressed):
    path, crops, chips, faces = _chips_file(tmp_path, 40, compressed)
    wanted = [crops[i] for i in (39, 0, 7, 8, 21)] + ["not/in/the/file.jpg"]
    table, info = load_chips(path, pairs=True, crops=wanted)
    assert list(table) == [crops[i] for i in (0, 7, 8, 21, 39)]  # file order, as before
    for i in (0, 7, 8, 21, 39):
        assert table[crops[i]].dtype == np.uint8 and np.array_equal(table[crops[i]], make_pair(chips[i], faces[i]))
    assert info == {"shape_predictor_sha256": "abc", "margin": 0.4, "face_chips": True}
    plain, _ = load_chips(path, crops=wanted)
    assert list(plain) == list(table) and all(np.array_equal(plain[crops[i]], chips[i]) for i in (0, 7, 8, 21, 39))
    assert all(plain[c].shape == (3, CHIP_SIZE, CHIP_SIZE) for c in plain)
    # every crop, and none
    full, _ = load_chips(path, pairs=True)
    assert list(full) == crops and all(np.array_equal(full[c], make_pair(chips[i], faces[i])) for i, c in enumerate(crops))
    assert load_chips(path, pairs=True, crops=[])[0] == {} and load_chips(path, crops=["x"])[0] == {}
    split = [c for c in crops if c.startswith("test/")]
    table, _ = load_chips(path, pairs=True, crops=split)
    assert list(table) == split and all(np.array_equal(table[c], full[c]) for c in split)
