"""A checkpoint naming a backbone or head this version cannot build is one CheckpointError, not a traceback."""

import pytest
import torch

from faceage.cli import main
from faceage.model import CHECKPOINT_FORMAT, CheckpointError, load_checkpoint


def save(path, **fields):
    torch.save({"format": CHECKPOINT_FORMAT, "min_age": 0, "max_age": 100, "state_dict": {}, **fields}, path)
    return path


@pytest.mark.parametrize(("fields", "why"), [
    ({"backbone": "dlib_age", "head": "future_head"}, "head must be one of"),
    ({"backbone": "future_net"}, "train.backbone must be a torchvision classification model"),
])
def test_a_model_this_version_cannot_build_is_a_checkpoint_error(tmp_path, fields, why):
    path = save(tmp_path / "model.pt", **fields)
    with pytest.raises(CheckpointError, match=rf"model\.pt names a model this FaceAge version cannot build \({why}"):
        load_checkpoint(path)


def test_the_cli_says_it_in_one_line(tmp_path, capsys):
    path = save(tmp_path / "model.pt", backbone="dlib_age", head="future_head")
    (tmp_path / "photo.jpg").write_bytes(b"")
    assert main(["predict", str(tmp_path / "photo.jpg"), "--json", "--model", str(path)]) == 1
    err = capsys.readouterr().err
    assert "cannot build (head must be one of" in err and "Traceback" not in err
