"""`faceage predict` run from a subfolder of the project (`cd reports && faceage predict ../photos`): the default
``--model`` was ``models/model.pt`` under the working folder, so it stopped with "checkpoint models/model.pt not
found" although the pipeline's checkpoint was there, one folder up. It is now the project root's (the nearest
folder up holding ``dvc.yaml``/``params.yaml``, :func:`faceage.paths.repo_root`), as the MLflow store is."""

from __future__ import annotations

import json

from faceage.cli import main
from tests.unit.test_cli_r26 import blank_photo, repo_like

FIXTURES = (blank_photo, repo_like)


def test_the_default_model_from_a_subfolder_is_the_projects(repo_like, blank_photo, monkeypatch, capsys):
    root = repo_like["root"]
    (root / "params.yaml").write_text("{}\n")  # what makes the folder a project, as dvc.yaml does
    (root / "reports").mkdir(exist_ok=True)
    monkeypatch.chdir(root / "reports")
    assert main(["predict", "--json", str(blank_photo)]) == 0, capsys.readouterr().err
    out = capsys.readouterr()
    assert json.loads(out.out) == [{"file": str(blank_photo), "width": 48, "height": 48, "faces": []}], out.err


def test_outside_any_project_the_default_model_is_still_the_working_folders(blank_photo, tmp_path, monkeypatch,
                                                                           capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert main(["predict", "--json", str(blank_photo)]) == 1
    err = capsys.readouterr().err
    assert "checkpoint models/model.pt not found" in err and "Traceback" not in err, err
