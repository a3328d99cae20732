"""Round 38: malformed weights files and checkpoints fail with the module's own one-line errors.

Real files in ``tmp_path`` written with ``torch.save``; nothing of the component under test is mocked.
"""

from __future__ import annotations

import pytest
import torch

from faceage.model import (CHECKPOINT_FORMAT, CheckpointError, PretrainedWeightsError, build_model, load_checkpoint,
                           load_pretrained, save_checkpoint)


def test_weights_file_with_non_string_keys_is_refused_by_name(tmp_path):
    """A dict keyed by numbers (not layer names) crashed with "'int' object has no attribute 'startswith'"."""
    path = tmp_path / "numbered.pth"
    torch.save({0: torch.zeros(3), 1: torch.ones(2)}, path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("resnet18"), "resnet18", str(path))
    message = str(info.value)
    assert "\n" not in message
    assert f"train.pretrained={str(path)!r}" in message
    assert "not a state dict" in message and "torch.save(model.state_dict(), path)" in message


def _checkpoint(path, **fields):
    payload = {"format": CHECKPOINT_FORMAT, "backbone": "resnet18", "min_age": 0, "max_age": 100, "state_dict": {}}
    payload.update(fields)
    torch.save(payload, path)
    return path


@pytest.mark.parametrize("fields, named", [
    ({"state_dict": [1, 2]}, "state_dict"),           # TypeError: Expected state_dict to be dict-like
    ({"max_age": -5}, "max_age"),                     # RuntimeError: Trying to create tensor with negative dimension
    ({"max_age": "100"}, "max_age"),                  # TypeError: unsupported operand type(s) for -: 'str' and 'int'
    ({"min_age": 1.5}, "min_age"),                    # TypeError from nn.Linear
    ({"backbone": ["resnet18"]}, "backbone"),         # TypeError: unhashable type: 'list'
    ({"backbone": "dlib_age", "head": 3}, "head"),    # TypeError / a head compared to ints
    ({"backbone": "dlib_age", "head": "fused", "face_features": None}, "face_features"),
])
def test_malformed_checkpoint_fields_raise_checkpoint_error(tmp_path, fields, named):
    """load_checkpoint promises CheckpointError for a damaged checkpoint; these raised TypeError/RuntimeError,
    which the CLI and the service show as tracebacks."""
    path = _checkpoint(tmp_path / "model.pt", **fields)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(path)
    message = str(info.value)
    assert "\n" not in message
    assert str(path) in message and named in message


def test_well_formed_checkpoint_still_loads(tmp_path):
    model = build_model("resnet18")
    save_checkpoint(tmp_path / "model.pt", model, {"backbone": "resnet18", "min_age": 0, "max_age": 100})
    loaded, meta = load_checkpoint(tmp_path / "model.pt")
    assert meta["backbone"] == "resnet18" and not loaded.training
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_weights_of_another_shape_name_both_shapes(tmp_path):
    """A file of another architecture was refused with "(e.g. ['conv1.weight'])": the same words for a tensor of
    another shape and for one the file lacks, so the user could not tell which (a resnet50 file for resnet18)."""
    state = build_model("resnet18").state_dict()
    state["conv1.weight"] = torch.zeros(64, 3, 3, 3)
    path = tmp_path / "other.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("resnet18"), "resnet18", str(path))
    message = str(info.value)
    assert "does not fit backbone 'resnet18'" in message and "\n" not in message
    assert "conv1.weight" in message and "[64, 3, 3, 3] in the file" in message and "[64, 3, 7, 7] in resnet18" in message


def test_weights_missing_a_tensor_say_it_is_missing(tmp_path):
    state = build_model("resnet18").state_dict()
    del state["layer2.0.conv1.weight"]
    path = tmp_path / "partial.pth"
    torch.save(state, path)
    with pytest.raises(PretrainedWeightsError) as info:
        load_pretrained(build_model("resnet18"), "resnet18", str(path))
    message = str(info.value)
    assert "layer2.0.conv1.weight (not in the file)" in message


def test_a_text_file_given_as_checkpoint_says_it_is_not_a_torch_file(tmp_path):
    """`faceage predict --model notes.pt` on a text file said "notes.pt is not a FaceAge checkpoint: 105" (the
    legacy pickle loader's KeyError on the text's first byte): now that it is not a torch file."""
    from faceage.model import CheckpointError, read_payload

    path = tmp_path / "notes.pt"
    path.write_text("hello world\n")  # torch reads its first byte as a pickle opcode: KeyError 101
    with pytest.raises(CheckpointError) as caught:
        read_payload(path)
    assert "not a torch file" in str(caught.value) and str(path) in str(caught.value), caught.value
