"""Round-25 review of evaluate's outputs: the plots with edge-case data, a zero-shot model's card, and the
error for an external set with no face to score."""

from __future__ import annotations

import logging
import re
from pathlib import Path

import numpy as np
import pytest

from faceage.config import EvaluateParams
from faceage.evaluation import _plots, errors_by_group, evaluate_external
from faceage.model_card import write_model_card
from faceage.sources import resolve_external
from tests.unit.test_external import checkpoint_crop, make_set, noise

HISTORY_HEADER = "epoch,train_loss,train_mae,val_mae,lr\n"


@pytest.fixture
def drawn(monkeypatch) -> dict[str, dict]:
    """What each saved figure shows, by file name: axis limits, texts and the points of its lines."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    seen, savefig = {}, Figure.savefig

    def recording(fig, path, *args, **kwargs):
        ax = fig.axes[0]
        seen[Path(path).name] = {"xlim": ax.get_xlim(), "ylim": ax.get_ylim(),
                                 "texts": [t.get_text() for t in ax.texts],
                                 "points": sum(len(line.get_xdata()) for line in ax.lines)}
        return savefig(fig, path, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", recording)
    return seen


def test_pred_vs_true_shows_faces_labelled_above_100(tmp_path, drawn):
    """The axes were fixed at 0..100: a test face of 104 or 110 (UTKFace goes to 116) fell outside the
    plot, while the title's MAE counted it."""
    true, pred = np.array([20.0, 45.0, 104.0, 110.0]), np.array([22.0, 40.0, 92.0, 95.0])
    _plots(tmp_path, pred, true, errors_by_group(pred, true), None)
    plot = drawn["pred_vs_true.png"]
    assert plot["xlim"][0] == plot["ylim"][0] == 0 and plot["xlim"][1] > 110 and plot["ylim"][1] > 110
    true, pred = np.array([20.0, 90.0]), np.array([25.0, 80.0])  # ages in the model's range: 0..100 as before
    _plots(tmp_path, pred, true, errors_by_group(pred, true), None)
    assert drawn["pred_vs_true.png"]["xlim"] == drawn["pred_vs_true.png"]["ylim"] == (0, 100)


def test_training_curves_of_a_zero_epoch_run_say_so(tmp_path, drawn):
    """train.epochs=0 writes history.csv as its header alone: the plot (a DVC output) was empty axes
    from -0.04 to 0.04 with a legend of two lines that had no point."""
    true, pred = np.array([20.0, 40.0]), np.array([22.0, 38.0])
    (tmp_path / "history.csv").write_text(HISTORY_HEADER)
    paths = _plots(tmp_path, pred, true, errors_by_group(pred, true), tmp_path / "history.csv")
    assert tmp_path / "training_curves.png" in paths and (tmp_path / "training_curves.png").stat().st_size > 0
    assert any("train.epochs=0" in t for t in drawn["training_curves.png"]["texts"])
    (tmp_path / "history.csv").write_text(HISTORY_HEADER + "1,2.0,9.0,8.0,0.001\n2,1.5,7.0,6.5,0.0005\n")
    _plots(tmp_path, pred, true, errors_by_group(pred, true), tmp_path / "history.csv")
    assert drawn["training_curves.png"] == {**drawn["training_curves.png"], "texts": [], "points": 4}


def _card(tmp_path: Path, epochs: int) -> str:
    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "input": "image",
            "crop": {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 224, "no_face": "release_crop",
                     "detector_sha256": "f" * 64},
            "train_params": {"epochs": epochs, "loss": "label_distribution", "optimizer": "adamw", "lr": 0.001,
                             "batch_size": 64, "augment": True, "low_res": 0.5, "pretrained": "imagenet"},
            "best_epoch": min(epochs, 3), "val_mae": 5.7, "temperature": 1.1}
    groups = [{"group": "20-29", "n": 3, "mae_years": 4.0, "bias_years": 1.0}]
    metrics = {"mae_years": 5.85, "mae_real_years": 5.85, "rmse_years": 7.0, "cs5": 0.5, "baseline_mae_years": 20.0,
               "n_test_faces": 3, "coverage_1std": 0.7, "coverage_2std": 0.95, "mean_predicted_std": 5.0,
               "temperature": 1.1, "external": {}}
    return write_model_card(tmp_path / f"card{epochs}.md", metrics, {"age_group": groups}, meta,
                            {"counts": {"train": 1500}}, None, None).read_text()


def test_a_zero_shot_models_card_does_not_describe_training(tmp_path):
    """With train.epochs=0 the card said "0 epochs, ... augmentation True (share of faces at a lower
    resolution: 0.5); best epoch 0 by validation MAE" and "Trained on 1500 images"."""
    card = _card(tmp_path, 0)
    assert "- Training: none (`train.epochs=0`)" in card and "(5.70 years)" in card
    assert "best epoch 0" not in card and "augmentation" not in card and "Trained on 1500 images" not in card
    trained = _card(tmp_path, 30)
    assert "- Training: 30 epochs, loss `label_distribution`" in trained and "best epoch 3 by validation MAE" in trained
    assert "- Trained on 1500 images." in trained


class _Checkpoint:
    """What evaluate_external reads of an AgeModel before it scores anything."""

    def __init__(self, crop: dict):
        self.meta = {"crop": crop, "backbone": "resnet18", "image_size": 64}


@pytest.mark.parametrize("files, counts", [
    ({"a.jpg": None, "b.jpg": None}, "0 without a detected face .*2 unreadable"),
    ({"a.jpg": None, "n.jpg": "noise"}, "1 without a detected face .*1 unreadable"),
])
def test_a_set_without_a_face_to_score_counts_its_unreadable_images(detector_dir, tmp_path, files, counts, caplog):
    """A set of files Pillow cannot read was reported with "no face found in any of its 2 images
    (detector=hog, ...)": the detector never saw them. (Since round 31 such a set is a warning, not an error.)"""
    folder = make_set(tmp_path / "set", {name: noise() for name, kind in files.items() if kind})
    (folder / "gt_avg_test.csv").write_text("file_name,num_ratings,apparent_age_avg,apparent_age_std,real_age\n"
                                            + "".join(f"{name},0,30,0,30\n" for name in files))
    for name, kind in files.items():
        if kind is None:
            (folder / "test" / name).write_bytes(b"not an image")
    sets = resolve_external([str(folder)], tmp_path)
    with caplog.at_level(logging.WARNING, logger="faceage.evaluation"):
        results, _, _ = evaluate_external(_Checkpoint(checkpoint_crop(detector_dir)), sets,
                                          EvaluateParams(external=(str(folder),)), detector_dir, 30.0, tmp_path / "cache")
    assert re.search(f"none of its 2 images has a face to score: {counts}", caplog.text), caplog.text
    assert [m["n_faces"] for m in results.values()] == [0]
