"""`faceage predict`'s inputs: which files a run reads (reruns into the photos' folder, formats, links,
duplicates, missing paths), on real photos from the shared ``wild`` folder and a tiny real checkpoint."""

import csv
import io
import json
import shutil

import pytest
from PIL import Image, features

from faceage.cli import IMAGE_SUFFIXES, collect_images, main
from tests.unit.test_predict import make_checkpoint, make_detector_dir


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli_inputs")
    detector = make_detector_dir(root / "detector")
    return ["--model", str(make_checkpoint(root / "model.pt", detector)), "--detector", str(detector)]


def put(wild_dir, name, dest):
    """Copies the shared photo ``name`` to ``dest`` (its bytes only: the shared files are read-only)."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(wild_dir / name, dest)
    return dest


def run_csv(argv, capsys):
    code = main(["predict", *argv, "--csv"])
    return code, list(csv.DictReader(io.StringIO(capsys.readouterr().out)))


def test_a_rerun_into_the_photos_own_folder_does_not_read_its_annotated_copies(wild_dir, model, tmp_path, capsys):
    same = tmp_path / "same"  # the reviewer's case: `faceage predict same --annotate same --csv`, twice
    put(wild_dir, "fr_two_people.jpg", same / "party.jpg")
    code, first = run_csv([str(same), "--annotate", str(same), *model], capsys)
    assert code == 0 and len(first) == 2  # the two people
    code, second = run_csv([str(same), "--annotate", str(same), *model], capsys)
    assert code == 0 and [r["file"] for r in second] == [str(same / "party.jpg")] * 2  # not 4 rows
    assert sorted(p.name for p in same.iterdir()) == ["party-1.png", "party.jpg", "party.png"]  # no party-1-1.png
    with Image.open(same / "party.png") as im:  # the mark a scan knows its copies by
        assert im.info["Software"] == "faceage"
    code, named = run_csv([str(same / "party.png"), *model], capsys)  # named on the command line: read
    assert code == 0 and [r["file"] for r in named] == [str(same / "party.png")] * 2


def test_an_annotate_folder_inside_a_recursive_scan_is_left_out(wild_dir, model, tmp_path, capsys):
    photos = tmp_path / "photos"
    put(wild_dir, "fr_obama_small.jpg", photos / "obama.jpg")
    out = photos / "annotated"
    # A PNG there without the mark (written by hand, or by an older version): left out with its folder.
    put(wild_dir, "fr_obama_small.jpg", out / "tmp" / "x.jpg")
    Image.open(out / "tmp" / "x.jpg").save(out / "older.png")
    shutil.rmtree(out / "tmp")
    for _ in range(2):
        code, rows = run_csv([str(photos), "--recursive", "--annotate", str(out), *model], capsys)
        assert code == 0 and [r["file"] for r in rows] == [str(photos / "obama.jpg")]
    assert sorted(p.name for p in out.iterdir()) == ["obama-1.png", "obama.png", "older.png"]
    assert collect_images([photos], recursive=True, skip_dir=photos / "." / "annotated") == [photos / "obama.jpg"]


def test_folder_scans_read_every_photo_format_pillow_decodes(wild_dir, model, tmp_path, capsys):
    assert {".jpg", ".jpeg", ".jfif", ".png", ".gif", ".webp", ".bmp", ".tif", ".tiff"} <= IMAGE_SUFFIXES
    assert not {".pdf", ".eps", ".txt", ".mpg", ".ico"} & IMAGE_SUFFIXES  # not photos, though Pillow knows them
    if not features.check("avif"):
        pytest.skip("this Pillow has no AVIF decoder")
    folder = tmp_path / "formats"
    folder.mkdir()
    with Image.open(wild_dir / "fr_obama_small.jpg") as im:
        im.save(folder / "obama.avif")
        im.save(folder / "obama.JP2")
    assert [p.name for p in collect_images([folder])] == ["obama.JP2", "obama.avif"]
    assert main(["predict", str(folder / "obama.avif"), "--json", *model]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert (entry["width"], entry["height"]) == (320, 240)


def test_a_broken_link_in_a_folder_is_an_error_row(wild_dir, model, tmp_path, capsys):
    folder = tmp_path / "links"
    put(wild_dir, "fr_obama_small.jpg", folder / "a.jpg")
    try:
        (folder / "gone.jpg").symlink_to(tmp_path / "moved-away.jpg")
    except OSError:
        pytest.skip("this file system has no symbolic links")
    (folder / "notes.txt").symlink_to(tmp_path / "moved-away.txt")  # not a photo's suffix: not read
    assert collect_images([folder]) == [folder / "a.jpg", folder / "gone.jpg"]
    assert main(["predict", str(folder), "--json", *model]) == 1
    entries = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in entries] == [str(folder / "a.jpg"), str(folder / "gone.jpg")]
    assert len(entries[0]["faces"]) == 1
    assert entries[1]["error"] == f"broken symbolic link: {folder / 'gone.jpg'} -> {tmp_path / 'moved-away.jpg'}"


def test_a_photo_named_twice_is_predicted_once(wild_dir, model, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    put(wild_dir, "fr_obama_small.jpg", tmp_path / "real" / "b.jpg")
    put(wild_dir, "dlib_2008_001009.jpg", tmp_path / "real" / "c.jpg")
    code, rows = run_csv(["real", "real/b.jpg", "./real/b.jpg", str(tmp_path / "real" / "c.jpg"), *model], capsys)
    assert code == 0 and [r["file"] for r in rows] == ["real/b.jpg", "real/c.jpg", "real/c.jpg"]  # c has 2 faces


def test_recursive_scans_follow_symlinked_folders_once(wild_dir, tmp_path):
    real = tmp_path / "real"
    put(wild_dir, "fr_obama_small.jpg", real / "b.jpg")
    put(wild_dir, "fr_obama_small.jpg", real / "sub" / "c.jpg")
    put(wild_dir, "fr_obama_small.jpg", tmp_path / "elsewhere" / "d.jpg")
    try:
        (real / "linked").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    except OSError:
        pytest.skip("this file system has no symbolic links")
    (real / "sub" / "loop").symlink_to(real, target_is_directory=True)  # back to an ancestor: not again
    (real / "sub" / "again").symlink_to(real / "sub", target_is_directory=True)
    (real / "same.jpg").symlink_to(real / "b.jpg")  # the same photo through a link: read once
    assert collect_images([real], recursive=True) == [real / "b.jpg", real / "linked" / "d.jpg", real / "sub" / "c.jpg"]
    assert collect_images([real]) == [real / "b.jpg"]  # without --recursive, no subfolder, linked or not


def test_a_missing_path_is_one_error_row_and_the_others_are_reported(wild_dir, model, tmp_path, capsys):
    photo = put(wild_dir, "fr_obama_small.jpg", tmp_path / "a.jpg")
    missing = tmp_path / "typo.jpg"
    assert collect_images([photo, missing]) == [photo, missing]
    assert main(["predict", str(photo), str(missing), "--json", *model]) == 1
    captured = capsys.readouterr()
    entries = json.loads(captured.out)
    assert [e["file"] for e in entries] == [str(photo), str(missing)] and len(entries[0]["faces"]) == 1
    assert entries[1] == {"file": str(missing), "error": f"no such file or folder: {missing}"}
    assert "Traceback" not in captured.err
    code, rows = run_csv([str(missing), *model], capsys)
    assert code == 1 and rows[0]["error"] == f"no such file or folder: {missing}"

