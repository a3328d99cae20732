"""Round 34, second read of `faceage predict`'s messages: the unexpanded-pattern hint (a missing path holding ``*``
or ``?``) also fired for a photo's URL, whose query string holds a ``?``: it told the user to leave the "pattern"
unquoted, which reads nothing either. A URL is named as one, with the way to read it (``curl ... | faceage predict
-``)."""

from __future__ import annotations

import csv
import io

import numpy as np
import pytest
from PIL import Image

from faceage.cli import main
from tests.unit.test_predict import model_files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    made = model_files(tmp_path_factory.mktemp("cli_r34b"))
    return ["--model", str(made["checkpoint"]), "--detector", str(made["detector"])]


def run_csv(argv, capsys):
    code = main(["predict", *argv, "--csv"])
    return code, list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


@pytest.mark.parametrize("url", ["https://images.example.com/photo.jpg?w=800&q=80",
                                 "http://example.com/face.png"])
def test_a_url_is_named_as_one_not_as_an_unexpanded_pattern(model, tmp_path, capsys, url):
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "blank.png")
    code, rows = run_csv([*model, url, str(tmp_path / "blank.png")], capsys)
    assert code == 1 and len(rows) == 2
    error = rows[0]["error"]
    assert "pattern" not in error and "unquoted" not in error, error
    assert "URL" in error and "faceage predict -" in error and "curl" in error, error
    assert rows[1]["error"] == ""


def test_a_quoted_pattern_keeps_its_hint(model, tmp_path, capsys):
    code, rows = run_csv([*model, str(tmp_path / "*.JPG")], capsys)
    assert code == 1 and "pattern" in rows[0]["error"] and "URL" not in rows[0]["error"]
