"""ONNX export at packaging time: every checkpoint kind, checked on real crops, served without torch.

Real faces: the crops dlib finds in scikit-image's astronaut (public domain) and its mirror image.
The networks are small and untrained: the tests compare runtimes, never accuracy.
"""

from __future__ import annotations

import csv
import json

import numpy as np
import onnx
import pytest
import torch
from PIL import Image

from faceage.export import META_KEY, ExportError, export_onnx
from faceage.model import EmbeddingAgeHead, save_checkpoint
from faceage import predict as predict_module
from faceage.onnx_model import OnnxAgeModel, cpu_session
from faceage.predict import AgePredictor, FaceLocator, default_threads
from tests.unit.test_predict import make_checkpoint

# A declared test dependency (pyproject's test extra): missing, the run fails rather than skipping these tests.
from skimage import data as skimage_data

CROP_SIZE = 96


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()


@pytest.fixture(scope="module")
def crops(detector_dir, astronaut) -> list[np.ndarray]:
    """Real face crops: the astronaut's face in the photo, its mirror image and two scales."""
    locator = FaceLocator(detector_dir, kind="hog", upsample=1, margin=0.4, crop_size=CROP_SIZE)
    found = []
    for image in (astronaut, np.ascontiguousarray(astronaut[:, ::-1]),
                  np.asarray(Image.fromarray(astronaut).resize((400, 400))), astronaut[40:, 60:]):
        found += locator.locate(np.ascontiguousarray(image)).crops
    assert len(found) >= 4
    return found


def make_face_checkpoint(path, detector_dir):
    """A ``dlib_face`` checkpoint: the 128-D descriptor head with its checkpoint settings."""
    torch.manual_seed(0)
    head = EmbeddingAgeHead().eval()
    meta = {"backbone": "dlib_face", "input": "dlib_face_embedding", "min_age": 0, "max_age": 100, "image_size": 0,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "temperature": 0.8, "val_mae": 6.0,
            "mlflow_run_id": "r2", "encoder": {},
            "crop": {"margin": 0.4, "size": CROP_SIZE, "detector": "hog", "upsample": 1,
                     "detector_file": "frontal_face_detector.svm",
                     "detector_sha256": json.loads((detector_dir / "manifest.json").read_text())["files"][
                         "frontal_face_detector.svm"]}}
    save_checkpoint(path, head, meta)
    return path


def make_faces_dir(path, crops: list[np.ndarray]):
    """A ``preprocess``-like folder: crops as PNG and their ``manifest.csv`` rows."""
    path.mkdir(parents=True)
    with open(path / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["split", "file_name", "crop"])
        w.writeheader()
        for i, crop in enumerate(crops):
            Image.fromarray(crop).save(path / f"{i}.png")
            w.writerow({"split": "test", "file_name": f"{i}.jpg", "crop": f"{i}.png"})
    return path


@pytest.mark.parametrize("kind", ["cnn", "dlib_face"])
def test_export_is_checked_on_real_crops_and_serves_the_same_ages(tmp_path, detector_dir, crops, astronaut, kind):
    checkpoint = (make_checkpoint(tmp_path / "model.pt", detector_dir) if kind == "cnn"
                  else make_face_checkpoint(tmp_path / "model.pt", detector_dir))
    report = export_onnx(checkpoint, detector_dir, crops, tmp_path / "model.onnx")
    assert report["onnx_check_faces"] == len(crops)
    assert 0 <= report["onnx_max_abs_diff_probs"] <= 1e-4 == report["onnx_tolerance"]

    proto = onnx.load(str(tmp_path / "model.onnx"))
    batch = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch.dim_param and not batch.dim_value  # a dynamic batch axis
    meta = json.loads({p.key: p.value for p in proto.metadata_props}[META_KEY])
    assert meta["backbone"] == ("mobilenet_v3_small" if kind == "cnn" else "dlib_face")

    # The one inference path: torch (CLI, evaluate) and ONNX Runtime (service) on a whole photo.
    torch_side = AgePredictor(checkpoint, detector_dir, threads=1).predict(astronaut)
    onnx_side = AgePredictor(tmp_path / "model.onnx", detector_dir, runtime="onnx", threads=1).predict(astronaut)
    assert len(onnx_side) == len(torch_side) >= 1
    for a, b in zip(torch_side, onnx_side):
        assert a.box == b.box
        assert b.age == pytest.approx(a.age, abs=1e-3) and b.age_std == pytest.approx(a.age_std, abs=1e-3)


def test_any_batch_size_runs(tmp_path, detector_dir, crops):
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    export_onnx(checkpoint, detector_dir, crops, tmp_path / "model.onnx")
    model = OnnxAgeModel(tmp_path / "model.onnx", detector_dir)
    for n in (1, 3, len(crops)):
        age, std = model.predict_crops(crops[:n])
        assert age.shape == std.shape == (n,) and np.all((age >= 0) & (age <= 100))
    assert model.predict_crops([])[0].shape == (0,)


def test_the_served_graph_uses_every_core_without_spinning_and_gives_the_same_ages(tmp_path, detector_dir, crops,
                                                                                  monkeypatch):
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    export_onnx(checkpoint, detector_dir, crops, tmp_path / "model.onnx")
    monkeypatch.setattr(predict_module, "available_cores", lambda: 4)
    assert default_threads("onnx") == 4 and default_threads("torch") == 2
    served = AgePredictor(tmp_path / "model.onnx", detector_dir, runtime="onnx")
    assert served.threads == 4
    options = served.age_model.session.get_session_options()
    assert options.intra_op_num_threads == 4
    assert options.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    single = OnnxAgeModel(tmp_path / "model.onnx", detector_dir, threads=1)
    assert single.spinning is single.session  # one thread: nothing to spin
    one = single.predict_crops(crops)
    four = served.age_model.predict_crops(crops)
    np.testing.assert_allclose(four[0], one[0], atol=1e-4)
    np.testing.assert_allclose(four[1], one[1], atol=1e-4)
    # Callers that know the cores are free (the service with no photo in detection) get spinning threads.
    spinning = served.age_model.spinning.get_session_options()
    assert spinning.intra_op_num_threads == 4
    assert spinning.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    idle = served.estimate(crops, idle=True)
    np.testing.assert_allclose(idle[0], four[0], atol=1e-5)
    np.testing.assert_allclose(idle[1], four[1], atol=1e-5)
    # Training's frozen-feature sessions keep ONNX Runtime's default (spinning) threads.
    assert cpu_session(str(tmp_path / "model.onnx"), 1).get_session_options().get_session_config_entry(
        "session.intra_op.allow_spinning") == "1"


def test_export_needs_real_crops(tmp_path, detector_dir, crops):
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    with pytest.raises(ExportError, match="needs real face crops, got 1"):
        export_onnx(checkpoint, detector_dir, crops[:1], tmp_path / "model.onnx")


def test_a_disagreeing_graph_is_refused(tmp_path, detector_dir, crops):
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    with pytest.raises(ExportError, match="differs from torch by .* in the age distribution"):
        export_onnx(checkpoint, detector_dir, crops, tmp_path / "model.onnx", tolerance=-1.0)
    assert not (tmp_path / "model.onnx").exists()  # nothing half-checked is left to package


def test_a_new_input_kind_needs_only_its_input_preparation(tmp_path, detector_dir, crops, monkeypatch):
    """How dlib_age plugs in: an InputKind (preparation outside the graph), nothing else."""
    from faceage import inputs

    def build(meta, detector_dir):
        size = int(meta["image_size"])

        def prepare(batch):  # grey chips, as float in [0, 1]: another stored form than "image"
            grey = [np.asarray(Image.fromarray(c).convert("L").convert("RGB").resize((size, size))) for c in batch]
            return np.stack(grey).transpose(0, 3, 1, 2).astype(np.float32) / 255 if grey else np.zeros((0, 3, size, size),
                                                                                                        np.float32)
        return prepare

    monkeypatch.setitem(inputs.INPUT_KINDS, "grey_chip", inputs.InputKind("grey_chip", build, np.float32))
    checkpoint = make_checkpoint(tmp_path / "model.pt", detector_dir)
    payload = torch.load(checkpoint, weights_only=True)
    payload["input"] = "grey_chip"
    torch.save(payload, checkpoint)
    report = export_onnx(checkpoint, detector_dir, crops, tmp_path / "model.onnx")
    assert report["onnx_max_abs_diff_probs"] <= 1e-4
    age, _ = OnnxAgeModel(tmp_path / "model.onnx", detector_dir).predict_crops(crops)
    from faceage.inference import AgeModel

    want, _ = AgeModel(checkpoint, detector_dir, device="cpu").predict_crops(crops)
    assert age == pytest.approx(want, abs=1e-3)


def test_a_file_that_is_not_an_onnx_graph_is_a_value_error(tmp_path):
    """A truncated model.onnx or a .pt given by mistake raised ONNX Runtime's InvalidProtobuf, which is
    not the ValueError callers are told to expect."""
    from faceage.onnx_model import OnnxAgeModel

    (tmp_path / "cut.onnx").write_bytes(b"\x08\x07\x12\x04" + b"\x00" * 100)
    with pytest.raises(ValueError, match=r"cut.onnx is not an ONNX graph ONNX Runtime can load"):
        OnnxAgeModel(tmp_path / "cut.onnx")
