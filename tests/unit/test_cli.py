"""`faceage predict`: files and folders -> table / JSON / CSV / annotated PNGs, with the service's predictor."""

import csv
import io
import json

import numpy as np
import pytest
from PIL import Image

from faceage.cli import collect_images, main
from tests.unit.test_predict import make_checkpoint, make_detector_dir

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    detector = make_detector_dir(root / "detector")
    checkpoint = make_checkpoint(root / "model.pt", detector)
    folder = root / "photos"
    (folder / "sub").mkdir(parents=True)
    Image.fromarray(skimage_data.astronaut()).save(folder / "astronaut.png")
    Image.fromarray(np.full((80, 120, 3), 200, np.uint8)).save(folder / "blank.jpg")
    (folder / "broken.jpg").write_bytes(b"")
    (folder / "notes.txt").write_text("not an image, and not listed")
    Image.fromarray(skimage_data.astronaut()).save(folder / "sub" / "astronaut.png")
    return {"root": root, "folder": folder, "model": ["--model", str(checkpoint), "--detector", str(detector)]}


def test_collect_images_filters_folders_by_suffix_and_sorts(photos):
    folder = photos["folder"]
    assert [p.name for p in collect_images([folder])] == ["astronaut.png", "blank.jpg", "broken.jpg"]
    assert len(collect_images([folder], recursive=True)) == 4
    assert collect_images([folder / "notes.txt"]) == [folder / "notes.txt"]  # named files are taken as given
    with pytest.raises(FileNotFoundError, match="no such file or folder: .*missing"):
        collect_images([folder / "missing"])


def test_json_has_one_entry_per_photo_and_exit_1_for_the_unreadable_one(photos, capsys):
    assert main(["predict", str(photos["folder"]), "--json", *photos["model"]]) == 1
    out = json.loads(capsys.readouterr().out)
    by_name = {e["file"].rsplit("/", 1)[-1]: e for e in out}
    assert set(by_name) == {"astronaut.png", "blank.jpg", "broken.jpg"}
    assert by_name["astronaut.png"]["width"] == 512 and len(by_name["astronaut.png"]["faces"]) >= 1
    # The CLI prints the predictor's answer for the photo (not just any number in 0..100).
    from faceage.images import load_image
    from faceage.predict import AgePredictor

    want = AgePredictor(photos["model"][1], photos["model"][3], threads=1).predict(
        load_image(photos["folder"] / "sub" / "astronaut.png"))
    assert [f["age"] for f in by_name["astronaut.png"]["faces"]] == pytest.approx([f.age for f in want], abs=1e-3)
    assert by_name["blank.jpg"]["faces"] == []
    assert "empty image file" in by_name["broken.jpg"]["error"]


def test_csv_and_table_list_every_face(photos, capsys):
    photo = str(photos["folder"] / "astronaut.png")
    assert main(["predict", photo, "--csv", *photos["model"]]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert rows and rows[0]["face"] == "1" and int(rows[0]["x2"]) > int(rows[0]["x1"]) and not rows[0]["error"]
    assert main(["predict", photo, str(photos["folder"] / "blank.jpg"), *photos["model"]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "face", "age", "age_std", "box", "score", "note"]
    assert table[-1].endswith("no face") and len(table) == 2 + len(rows)


def test_annotate_writes_one_png_per_readable_photo(photos, tmp_path):
    out = tmp_path / "annotated"
    main(["predict", str(photos["folder"]), "--recursive", "--annotate", str(out), *photos["model"]])
    names = sorted(p.name for p in out.iterdir())
    assert names == ["astronaut-1.png", "astronaut.png", "blank.png"]  # same stem twice: disambiguated
    with Image.open(out / "astronaut.png") as im:
        assert im.size == (512, 512)
        assert not np.array_equal(np.asarray(im.convert("RGB")), skimage_data.astronaut())  # boxes drawn


def test_missing_checkpoint_is_one_clear_error(photos, tmp_path, capsys):
    assert main(["predict", str(photos["folder"]), "--model", str(tmp_path / "none.pt")]) == 1
    err = capsys.readouterr().err
    assert "none.pt not found: run `dvc repro`" in err and "Traceback" not in err


def test_json_and_csv_are_exclusive():
    with pytest.raises(SystemExit) as e:
        main(["predict", "x.jpg", "--json", "--csv"])
    assert e.value.code == 2
