"""Round 37: user-facing errors of the model files read one clear line a user can act on.

Real files in ``tmp_path``; nothing of the component under test is mocked.
"""

from __future__ import annotations

import pytest

from faceage.detector import AGE_MODEL_FILE
from faceage.errors import FaceAgeError
from faceage.model import PretrainedWeightsError, build_model, load_pretrained


def test_dlib_age_without_detector_folder_says_so_and_how_to_fix():
    """train.backbone=dlib_age with no detector folder printed "(looked in None)"."""
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("dlib_age"), "dlib_age", "imagenet", model_dir=None)
    message = str(info.value)
    assert "None" not in message
    assert "\n" not in message
    assert AGE_MODEL_FILE in message
    assert "no detector folder was given" in message and "--detector" in message
    assert "dvc repro fetch_detector" in message
    assert "train.pretrained=none" in message


def test_dlib_age_with_empty_detector_folder_names_folder_and_fixes(tmp_path):
    folder = tmp_path / "detector"
    folder.mkdir()
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("dlib_age"), "dlib_age", "imagenet", model_dir=folder)
    message = str(info.value)
    assert f"no {AGE_MODEL_FILE} in {folder}" in message
    assert "\n" not in message
    assert "dvc repro fetch_detector" in message
    assert "train.pretrained=none" in message
    # The suggested fix works: pretrained=none builds without any detector file.
    assert load_pretrained(build_model("dlib_age"), "dlib_age", "none", model_dir=folder).startswith("none")


@pytest.mark.parametrize("content", [b"", b"\x08\x07garbage not a protobuf" * 3])
def test_corrupt_onnx_graph_is_a_faceage_error(tmp_path, content):
    """A truncated/corrupt exported .onnx raised a bare ValueError: a traceback in a stage or the service."""
    from faceage.onnx_model import OnnxAgeModel

    path = tmp_path / "model.onnx"
    path.write_bytes(content)
    with pytest.raises(FaceAgeError, match=r"model.onnx is not an ONNX graph ONNX Runtime can load") as info:
        OnnxAgeModel(path)
    assert isinstance(info.value, ValueError)  # callers that caught ValueError still do


def test_onnx_graph_without_faceage_metadata_is_a_faceage_error(tmp_path):
    """A valid ONNX graph not exported by faceage.export (another model given by mistake)."""
    import onnx
    from onnx import TensorProto, helper

    from faceage.onnx_model import OnnxAgeModel

    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])
    graph = helper.make_graph([helper.make_node("Identity", ["x"], ["y"])], "g", [x], [y])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    path = tmp_path / "other.onnx"
    onnx.save(model, str(path))
    with pytest.raises(FaceAgeError, match=r"other.onnx has no .* metadata: export it with faceage.export"):
        OnnxAgeModel(path)


def test_fused_head_without_face_network_names_that_file(detector_dir, tmp_path):
    """dlib's real age network present, the fused head's face network absent: the message names the missing file
    and the folder it looked in, not the age network."""
    import shutil

    from faceage.detector import RECOGNITION_FILE
    from faceage.dlib_age import HEAD_FUSED

    if not (detector_dir / AGE_MODEL_FILE).is_file():
        pytest.skip(f"the shared detector fixture has no {AGE_MODEL_FILE}")
    folder = tmp_path / "detector"
    folder.mkdir()
    shutil.copyfile(detector_dir / AGE_MODEL_FILE, folder / AGE_MODEL_FILE)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("dlib_age", head=HEAD_FUSED), "dlib_age", "dlib", model_dir=folder)
    message = str(info.value)
    assert f"no {RECOGNITION_FILE} in {folder}" in message
    assert "dvc repro fetch_detector" in message and "train.pretrained=none" in message

