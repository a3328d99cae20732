"""Packaging and the model card, round 31: what `make bento` / `python stages/package.py` costs and what the card
claims, after several `dvc exp run`s."""

from __future__ import annotations

import csv
import tracemalloc
from pathlib import Path

import numpy as np

from faceage.chips import PAIR_SHAPE, make_pair
from faceage.model_card import write_model_card
from faceage.packaging import load_check_crops


def _faces_with_chip_pairs(folder: Path, n: int) -> tuple[np.ndarray, np.ndarray]:
    """A preprocess output of ``n`` crops (test split first) with the age and face chips embed cuts for a fused
    dlib_age checkpoint (``chips.npz``)."""
    with open(folder / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["split", "file_name", "crop"])
        w.writeheader()
        w.writerows({"split": "test" if i < n // 4 else "train", "file_name": f"{i}.jpg", "crop": f"{i}.png"}
                    for i in range(n))
    rng = np.random.default_rng(0)
    chips = rng.integers(0, 256, (n, 3, 64, 64), dtype=np.uint8)
    faces = rng.integers(0, 256, (n, 3, 150, 150), dtype=np.uint8)
    np.savez(folder / "chips.npz", kind=np.array("dlib_age"), crops=np.array([f"{i}.png" for i in range(n)]),
             chips=chips, face_chips=faces, margin=np.array(0.4), shape_predictor_sha256=np.array("x"))
    return chips, faces


def test_the_onnx_check_on_chip_pairs_builds_the_pairs_of_its_faces_only(tmp_path):
    """`make bento` with the default (fused dlib_age) champion built the 96 KB chip pair of every crop in the
    workspace (APPA-REAL: ~7,600, ~730 MB on top of the chips themselves) to check the export on 32 of them."""
    n, limit = 600, 4
    chips, faces = _faces_with_chip_pairs(tmp_path, n)
    loaded_arrays = chips.nbytes + faces.nbytes  # what reading chips.npz itself takes
    every_pair = n * int(np.prod(PAIR_SHAPE))
    tracemalloc.start()
    try:
        got = load_check_crops(tmp_path, 64, limit=limit, chips=True, pairs=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert len(got) == limit
    for i, pair in enumerate(got):  # the test split's first faces, as before
        np.testing.assert_array_equal(pair, make_pair(chips[i], faces[i]))
    assert peak < loaded_arrays + every_pair // 4, (peak, loaded_arrays, every_pair)


def test_age_chips_alone_are_still_the_test_splits_first(tmp_path):
    chips, _ = _faces_with_chip_pairs(tmp_path, 40)
    got = load_check_crops(tmp_path, 64, limit=3, chips=True)
    assert len(got) == 3
    for i, chip in enumerate(got):
        np.testing.assert_array_equal(chip, chips[i])


GROUP = {"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 0.5}
METRICS = {"mae_years": 4.0, "rmse_years": 5.0, "cs5": 0.6, "baseline_mae_years": 9.0, "n_test_faces": 3,
           "temperature": 1.0, "mean_predicted_std": 3.0, "coverage_1std": 0.7, "coverage_2std": 0.95}
META = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "val_mae": 4.0,
        "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "detector_sha256": "f" * 64},
        "train_params": {"epochs": 3}}


def _counts(face: int, no_face: int, unreadable: int = 0) -> dict:
    split = {"face": face, "release_crop": 0, "whole_image": 0, "no_face": no_face, "unreadable": unreadable}
    return {"train": split, "total": split, "detection_rate": face / (face + no_face + unreadable)}


def test_the_card_counts_the_faces_trained_on_not_the_images_of_the_split(tmp_path):
    """With preprocess.no_face=skip (or unreadable photos) the card said "Trained on 1500 images" of a model that
    saw 1,200 faces: the release's image count, not the crops training read."""
    card = write_model_card(tmp_path / "card.md", METRICS, {"age_group": [GROUP]}, META,
                            {"source": "s", "sha256": "d" * 64, "counts": {"train": 1500}}, _counts(1200, 290, 10),
                            None).read_text()
    assert "Trained on 1500 images" not in card
    assert "Trained on 1200 faces of the 1500 training images (300 skipped: no face or unreadable)." in card


def test_where_every_training_image_has_a_crop_the_card_reads_as_before(tmp_path):
    card = write_model_card(tmp_path / "card.md", METRICS, {"age_group": [GROUP]}, META,
                            {"source": "s", "sha256": "d" * 64, "counts": {"train": 1500}}, _counts(1500, 0),
                            None).read_text()
    assert "- Trained on 1500 images. " in card
    no_counts = write_model_card(tmp_path / "card2.md", METRICS, {"age_group": [GROUP]}, META,
                                 {"source": "s", "sha256": "d" * 64, "counts": {"train": 1500}}, None, None)
    assert "- Trained on 1500 images. " in no_counts.read_text()


def test_the_bento_lineage_names_the_dvc_experiment_the_champion_trained_in():
    """After several `dvc exp run`s, faceage.json gave the baseline git commit (whose params.yaml did not train the
    model: the -S values live in the experiment) and no experiment: nothing in the bento said what to apply."""
    import types

    from faceage.packaging import Winner, model_metadata

    meta = {"backbone": "resnet18", "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64,
                                            "detector_sha256": "f" * 64}}
    version = types.SimpleNamespace(name="face-age", version=3)
    trained = Winner("r", "n", 4.0, 4.1, 0, "d" * 64, "c0", dvc_experiment="exp-lr3", evaluated_in="exp-lr3")
    assert model_metadata(trained, meta, version)["dvc_experiment"] == "exp-lr3"
    assert "dvc_evaluated_in" not in model_metadata(trained, meta, version)
    again = Winner("r", "n", 4.0, 4.1, 0, "d" * 64, "c0", dvc_experiment="exp-lr3", evaluated_in="exp-ext")
    lineage = model_metadata(again, meta, version)
    assert (lineage["dvc_experiment"], lineage["dvc_evaluated_in"]) == ("exp-lr3", "exp-ext")
    # `dvc repro` in the workspace: no experiment, and the lineage (so the reuse of stored copies) as before
    plain = model_metadata(Winner("r", "n", 4.0, 4.1, 0, "d" * 64, "c0"), meta, version)
    assert "dvc_experiment" not in plain and "dvc_evaluated_in" not in plain
