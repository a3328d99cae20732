"""`faceage predict --model <store>/face_age/latest`: BentoML's pointer file is named as such, with the folder to pass."""

from pathlib import Path

import numpy as np
from PIL import Image

from faceage.cli import main
from tests.unit.test_predict import make_checkpoint, make_detector_dir


def make_store(root: Path) -> Path:
    """A BentoML model store's layout for one model: ``face_age/<version>/{model.pt, detector/}`` and
    ``face_age/latest`` naming the version (as ``bentoml.models.create`` writes it)."""
    version = root / "face_age" / "vrvui5hrpsdrsax4"
    detector = make_detector_dir(version / "detector")
    make_checkpoint(version / "model.pt", detector)
    (root / "face_age" / "latest").write_text(version.name)
    return version


def test_the_latest_pointer_is_named_with_the_folder_to_pass(tmp_path, capsys):
    version = make_store(tmp_path / "models")
    photo = tmp_path / "blank.jpg"
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(photo)
    assert main(["predict", str(photo), "--json", "--model", str(version.parent / "latest")]) == 1
    err = capsys.readouterr().err
    assert f"pass --model {version} " in err and "--bento face_age:latest" in err
    assert "not a FaceAge checkpoint" not in err and "Traceback" not in err
    # The folder it names is a model the CLI reads.
    assert main(["predict", str(photo), "--json", "--model", str(version)]) == 0


def test_other_files_are_not_pointers(tmp_path):
    from faceage.cli import store_pointer

    version = make_store(tmp_path / "models")
    assert store_pointer(version.parent / "latest") == version
    assert store_pointer(version / "model.pt") is None  # a checkpoint
    (tmp_path / "latest").write_text("nothing-here")
    assert store_pointer(tmp_path / "latest") is None  # names no model folder
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "latest").write_bytes(b"\x80\x02 binary")
    assert store_pointer(tmp_path / "other" / "latest") is None
