"""Round 30 review of the prediction path (predict, inference, inputs, export, onnx_model).

Real faces: scikit-image's astronaut (public domain) through the checkpoint's own detector and crop.
The networks are small and untrained: the tests compare computations and runtimes, never accuracy.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from faceage.detector import HOG_FILE
from faceage.download import file_digest
from faceage.export import ExportError, export_onnx
from faceage.inference import AgeModel
from faceage.model import build_model, save_checkpoint
from faceage.onnx_model import OnnxAgeModel
from faceage.predict import AgePredictor, FaceLocator

# A declared test dependency (pyproject's test extra): missing, the run fails rather than skipping these tests.
from skimage import data as skimage_data


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def crops(hog_detector_dir, astronaut) -> list[np.ndarray]:
    """Real face crops: the astronaut's faces and their mirror images, as the predictor cuts them."""
    locator = FaceLocator(hog_detector_dir, kind="hog", upsample=1, margin=0.4, crop_size=96)
    found = locator.locate(astronaut).crops + locator.locate(np.ascontiguousarray(astronaut[:, ::-1])).crops
    assert len(found) >= 2
    return found


def make_checkpoint(path, detector_dir, *, min_age: int = 0, max_age: int = 100, temperature: float = 0.7,
                    sharpen: float = 1.0):
    """A small CNN checkpoint with ages ``min_age..max_age``; ``sharpen`` scales its last layer (narrower,
    input-dependent age distributions than a random network's)."""
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small", max_age - min_age + 1).eval()
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.mul_(sharpen)
        last.bias.mul_(sharpen)
    meta = {"backbone": "mobilenet_v3_small", "input": "image", "min_age": min_age, "max_age": max_age,
            "image_size": 32, "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225],
            "temperature": temperature,
            "crop": {"margin": 0.4, "size": 96, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": file_digest(detector_dir / HOG_FILE)}}
    save_checkpoint(path, model, meta)
    return path


def reference_ages(checkpoint, crops, min_age: int, temperature: float) -> tuple[np.ndarray, np.ndarray]:
    """Age and std in float64 from the network's logits, the ages counted from the checkpoint's ``min_age``."""
    age_model = AgeModel(checkpoint, device="cpu")
    with torch.no_grad():
        logits = age_model.model(age_model.graph.prepare(age_model.prepare(crops))).double()
    ages = torch.arange(min_age, min_age + logits.shape[1], dtype=torch.float64)
    mean = torch.softmax(logits, 1) @ ages
    probs = torch.softmax(logits / temperature, 1)
    centre = probs @ ages
    std = (probs * (ages - centre[:, None]) ** 2).sum(1).sqrt()
    return mean.numpy(), std.numpy()


def test_a_checkpoint_whose_ages_start_above_zero_is_read_from_its_own_min_age(tmp_path, hog_detector_dir, crops,
                                                                                  astronaut):
    """The checkpoint records ``min_age``; the age graph counted ages from 0 whatever it said, so a checkpoint
    over ages 10..100 (another version's, or a hand-made one) answered every age 10 years too young."""
    checkpoint = make_checkpoint(tmp_path / "model.pt", hog_detector_dir, min_age=10)
    want_age, want_std = reference_ages(checkpoint, crops, 10, 0.7)
    age, std = AgeModel(checkpoint, device="cpu").predict_crops(crops)
    np.testing.assert_allclose(age, want_age, atol=1e-3)
    np.testing.assert_allclose(std, want_std, atol=1e-3)
    assert (age >= 10).all()

    # The service's graph is the same computation: exported, it answers the same ages.
    export_onnx(checkpoint, hog_detector_dir, crops, tmp_path / "model.onnx")
    served, _ = OnnxAgeModel(tmp_path / "model.onnx", threads=1).predict_crops(crops)
    np.testing.assert_allclose(served, want_age, atol=1e-3)
    cli = AgePredictor(checkpoint, hog_detector_dir, threads=1).predict(astronaut)
    service = AgePredictor(tmp_path / "model.onnx", hog_detector_dir, runtime="onnx", threads=1).predict(astronaut)
    assert [f.box for f in cli] == [f.box for f in service] and cli
    assert [f.age for f in cli] == pytest.approx([f.age for f in service], abs=1e-3)
    assert min(f.age for f in cli) >= 10


def test_a_checkpoint_starting_at_zero_keeps_its_ages(tmp_path, hog_detector_dir, crops):
    checkpoint = make_checkpoint(tmp_path / "model.pt", hog_detector_dir, sharpen=20.0)
    want_age, want_std = reference_ages(checkpoint, crops, 0, 0.7)
    age, std = AgeModel(checkpoint, device="cpu").predict_crops(crops)
    np.testing.assert_allclose(age, want_age, atol=1e-3)
    np.testing.assert_allclose(std, want_std, atol=1e-3)


@pytest.mark.parametrize("output", [0, 1])
def test_an_export_whose_age_or_age_std_disagrees_is_refused(tmp_path, hog_detector_dir, crops, monkeypatch, output):
    """The check refused an export only on the age distribution at temperature 1: an age or an age_std (the
    calibrated, tempered spread, computed apart from ``probs``) off by 0.01 years passed, although the CLI and
    the service must agree to 1e-3."""
    checkpoint = make_checkpoint(tmp_path / "model.pt", hog_detector_dir)
    run = OnnxAgeModel.run

    def off(self, inputs, *, idle=False):
        out = list(run(self, inputs, idle=idle))
        out[output] = out[output] + np.float32(0.01)
        return tuple(out)

    monkeypatch.setattr(OnnxAgeModel, "run", off)
    name = ("age", "age_std")[output]
    with pytest.raises(ExportError, match=f"by .* in {name}"):
        export_onnx(checkpoint, hog_detector_dir, crops, tmp_path / "model.onnx")
    assert not (tmp_path / "model.onnx").exists()


def test_an_export_whose_one_face_pass_disagrees_in_age_is_refused(tmp_path, hog_detector_dir, crops, monkeypatch):
    """The one-face pass (another batch size than the traced one) was checked on the distribution alone."""
    checkpoint = make_checkpoint(tmp_path / "model.pt", hog_detector_dir)
    run = OnnxAgeModel.run

    def off_alone(self, inputs, *, idle=False):
        age, std, probs = run(self, inputs, idle=idle)
        return (age + np.float32(0.01), std, probs) if len(inputs) == 1 else (age, std, probs)

    monkeypatch.setattr(OnnxAgeModel, "run", off_alone)
    with pytest.raises(ExportError, match="by .* in age"):
        export_onnx(checkpoint, hog_detector_dir, crops, tmp_path / "model.onnx")
