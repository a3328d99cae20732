"""Round-34 review of `faceage predict` as a new user runs it on the shared ``wild`` photos: a photo over the
pixel cap names the option that reads it, a closed stdout stops at once with one line (it was a traceback after
all the work), ``--help`` gives the exit status, an unexpanded glob and a missing ``--detector`` folder are named
as such, and ``-`` with a terminal (or nothing) on standard input is an error row, not a silent wait."""

from __future__ import annotations

import csv
import io
import os
import sys

import numpy as np
import pytest
from PIL import Image

from faceage.cli import build_parser, main
from tests.unit.test_predict import model_files


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    made = model_files(tmp_path_factory.mktemp("cli_r34"))
    return ["--model", str(made["checkpoint"]), "--detector", str(made["detector"])]


def run_csv(argv, capsys):
    code = main(["predict", *argv, "--csv"])
    return code, list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_a_photo_over_the_pixel_cap_names_the_option_that_reads_it(model, tmp_path, capsys):
    """`faceage predict` on a 48 MP phone photo said "image too large: 8064x6048 = 48771072 pixels, the limit is
    40000000" and no more: the service's message names its setting (FACEAGE_MAX_PIXELS), the CLI's named none."""
    photo = tmp_path / "big.png"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(photo)  # 3072 pixels
    code, rows = run_csv([*model, "--max-pixels", "1000", str(photo)], capsys)
    assert code == 1 and len(rows) == 1
    error = rows[0]["error"]
    assert "64x48 = 3072 pixels" in error and "--max-pixels 3072" in error
    # The value it names reads the photo.
    code, rows = run_csv([*model, "--max-pixels", "3072", str(photo)], capsys)
    assert code == 0 and rows[0]["error"] == ""


def test_a_photo_over_pillow_s_own_cap_is_not_sent_to_max_pixels(model, tmp_path, capsys, monkeypatch):
    """Past Pillow's own decompression-bomb cap no --max-pixels reads a photo: the message must not say it would."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 500)  # Pillow refuses over 2x this at open: 1000 pixels
    photo = tmp_path / "bomb.png"
    Image.fromarray(np.full((48, 64, 3), 128, np.uint8)).save(photo)
    code, rows = run_csv([*model, "--max-pixels", "500", str(photo)], capsys)
    assert code == 1 and "image too large" in rows[0]["error"]
    assert "--max-pixels" not in rows[0]["error"]


def test_a_closed_stdout_is_one_error_line_before_any_work(model, wild_dir, monkeypatch, capsys):
    """`faceage predict photos/ >&-` (stdout closed: Python's sys.stdout is None) read every photo, then ended in
    a traceback (AttributeError: 'NoneType' object has no attribute 'write'): the results were lost."""
    monkeypatch.setattr(sys, "stdout", None)
    try:
        code = main(["predict", "-v", *model, str(wild_dir / "fr_obama.jpg")])
    finally:
        monkeypatch.undo()
    err = capsys.readouterr().err
    assert code == 1 and "Traceback" not in err
    errors = [line for line in err.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "stdout is closed" in errors[0] and "> results.txt" in errors[0]
    assert "age model" not in err  # stopped before the model loaded (-v logs its line)


def test_predict_help_gives_the_exit_status(capsys):
    """The README documents the exit status (0, 1 when a photo failed, 130 after Ctrl-C); `faceage predict --help`,
    where a new user looks, said nothing of it."""
    with pytest.raises(SystemExit) as done:
        build_parser().parse_args(["predict", "--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "exit status" in text
    for words in ("0 when every photo was read", "1 when a photo could not be read", "130"):
        assert words in text


def test_a_pattern_the_shell_did_not_expand_says_so(model, tmp_path, capsys):
    """`faceage predict "photos/*.JPG"` (quoted, or matching no file: the shell passes it as typed) said only
    "no such file or folder: photos/*.JPG", though photos/ holds photos: the row now says it is an unexpanded
    pattern."""
    Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "blank.jpg")
    code, rows = run_csv([*model, str(tmp_path / "*.JPG")], capsys)
    assert code == 1 and len(rows) == 1
    assert rows[0]["error"].startswith(f"no such file or folder: {tmp_path / '*.JPG'}")
    assert "pattern" in rows[0]["error"] and "unquoted" in rows[0]["error"]
    # A plain missing name keeps the plain message.
    code, rows = run_csv([*model, str(tmp_path / "nope.jpg")], capsys)
    assert rows[0]["error"] == f"no such file or folder: {tmp_path / 'nope.jpg'}"


def test_a_detector_folder_that_is_not_there_is_named_as_such(model, tmp_path, wild_dir, capsys):
    """`--detector models/detectr` (a typo) stopped with "detector file models/detectr/frontal_face_detector.svm
    not found (the checkpoint was trained with frontal_face_detector.svm)": as if the folder lacked one file."""
    missing = tmp_path / "detectr"
    assert main(["predict", model[0], model[1], "--detector", str(missing), str(wild_dir / "fr_obama.jpg")]) == 1
    errors = [line.split(" ERROR faceage.cli: ", 1)[-1] for line in capsys.readouterr().err.splitlines()
              if " ERROR " in line]
    assert errors == [f"--detector {missing} is not a folder: pass the detector folder the model was trained with "
                      "(the fetch_detector output, models/detector)"]


@pytest.fixture
def stdin_fd():
    """Puts file descriptor 0 back as it was after a test that replaces or closes it."""
    saved = os.dup(0)
    try:
        yield
    finally:
        os.dup2(saved, 0)
        os.close(saved)


def test_a_photo_path_of_dash_with_a_terminal_on_stdin_is_an_error_row_not_a_wait(model, tmp_path, capsys, stdin_fd):
    """`faceage predict -` typed with nothing piped in sat silent, waiting for a photo from the keyboard (Ctrl-D
    then said "empty image: /dev/stdin gave 0 bytes"): its row now says at once how to give one."""
    leader, follower = os.openpty()
    try:
        os.dup2(follower, 0)
        os.write(leader, b"\x04")  # Ctrl-D typed ahead: a run that reads the terminal ends, not waits
        Image.fromarray(np.full((40, 60, 3), 200, np.uint8)).save(tmp_path / "blank.png")
        code, rows = run_csv([*model, "-", str(tmp_path / "blank.png")], capsys)
    finally:
        os.close(leader)
        os.close(follower)
    assert code == 1 and [r["file"] for r in rows] == ["-", str(tmp_path / "blank.png")]
    assert rows[0]["error"].startswith("standard input is a terminal, not a photo: pipe one in")
    assert rows[1]["error"] == ""


def test_a_photo_path_of_dash_with_stdin_closed_says_so(model, capsys, stdin_fd):
    """`faceage predict - <&-` said "no such file or folder: -", as if `-` were a file name."""
    os.close(0)
    code, rows = run_csv([*model, "-"], capsys)
    assert code == 1 and rows[0]["file"] == "-"
    assert rows[0]["error"].startswith("standard input is closed: pipe a photo in")
