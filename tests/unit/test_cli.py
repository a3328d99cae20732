"""`faceage predict`: files and folders -> table / JSON / CSV / annotated PNGs, with the service's predictor."""

import csv
import io
import json
import os
import shutil
import re
import signal
import subprocess
import sys

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceage.cli import build_parser, collect_images, main
from tests.unit.test_predict import model_files

# A declared test dependency (pyproject's test extra): missing, the run fails rather than skipping these tests.
from skimage import data as skimage_data


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    made = model_files(tmp_path_factory.mktemp("cli"))
    root, detector, checkpoint = made["root"], made["detector"], made["checkpoint"]
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
    assert collect_images([folder / "missing"]) == [folder / "missing"]  # its row says it is missing


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
    assert main(["predict", photo, "--json", *photos["model"]]) == 0
    [want] = json.loads(capsys.readouterr().out)
    faces = want["faces"]
    assert faces and all(f["age"] != pytest.approx(f["age_std"], abs=0.2) for f in faces)  # a swap would show
    assert main(["predict", photo, "--csv", *photos["model"]]) == 0
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [r["face"] for r in rows] == [str(i) for i in range(1, len(faces) + 1)] and not any(r["error"] for r in rows)
    assert [[int(r[k]) for k in ("x1", "y1", "x2", "y2")] for r in rows] == [f["box"] for f in faces]
    assert [float(r["age"]) for r in rows] == pytest.approx([f["age"] for f in faces], abs=1e-3)
    assert [float(r["age_std"]) for r in rows] == pytest.approx([f["age_std"] for f in faces], abs=1e-3)
    assert [float(r["score"]) for r in rows] == pytest.approx([f["score"] for f in faces], abs=1e-4)
    assert main(["predict", photo, str(photos["folder"] / "blank.jpg"), *photos["model"]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "face", "age", "age_std", "box", "score", "note"]
    assert table[-1].endswith("no face") and len(table) == 2 + len(rows)
    cells = [line.split() for line in table[1:-1]]  # file face age age_std x1 y1 x2 y2 score
    assert [c[0] for c in cells] == [photo] * len(faces) and [c[1] for c in cells] == [r["face"] for r in rows]
    assert [float(c[2]) for c in cells] == pytest.approx([f["age"] for f in faces], abs=0.051)
    assert [float(c[3]) for c in cells] == pytest.approx([f["age_std"] for f in faces], abs=0.051)
    assert [[int(v) for v in c[4:8]] for c in cells] == [f["box"] for f in faces]


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


def test_annotate_never_replaces_an_input_or_an_existing_file(photos, tmp_path):
    same = tmp_path / "same"  # `faceage predict same --annotate same`
    same.mkdir()
    original = (photos["folder"] / "astronaut.png").read_bytes()
    (same / "astronaut.png").write_bytes(original)
    assert main(["predict", str(same), "--annotate", str(same), *photos["model"]]) == 0
    assert (same / "astronaut.png").read_bytes() == original
    with Image.open(same / "astronaut-1.png") as im:  # the annotated copy, beside its input
        assert not np.array_equal(np.asarray(im.convert("RGB")), skimage_data.astronaut())
    out = tmp_path / "out"  # an earlier run's output (or any file) of the same name survives too
    out.mkdir()
    (out / "blank.png").write_bytes(b"earlier")
    assert main(["predict", str(photos["folder"] / "blank.jpg"), "--annotate", str(out), *photos["model"]]) == 0
    assert (out / "blank.png").read_bytes() == b"earlier"
    assert sorted(p.name for p in out.iterdir()) == ["blank-1.png", "blank.png"]


def test_annotate_keeps_long_names_within_the_name_limit(photos, tmp_path):
    if os.pathconf(tmp_path, "PC_NAME_MAX") < 255:
        pytest.skip("this file system's names are shorter than 255 bytes")
    stem = "x" * 251  # <stem>.png is 255 bytes; the second one's <stem>-1.png would be 257
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        shutil.copy(photos["folder"] / "blank.jpg", tmp_path / folder / f"{stem}.jpg")
    out = tmp_path / "out"
    assert main(["predict", str(tmp_path / "a"), str(tmp_path / "b"), "--annotate", str(out), *photos["model"]]) == 0
    names = sorted(p.name for p in out.iterdir())
    assert len(names) == 2 and all(len(os.fsencode(n)) <= 255 for n in names)
    assert names[0].endswith("-1.png") and names[1] == f"{stem}.png"


@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE (POSIX) to make a write fail")
def test_a_failed_annotated_write_keeps_every_result(photos, tmp_path, capsys):
    import resource

    out = tmp_path / "out"
    # A file-size limit makes the write fail as a full disk would: the annotated astronaut (~470 kB)
    # fails with EFBIG, while the blank photo's PNG (~1 kB) and the HOG detector file the predictor
    # writes to a temporary folder (~155 kB) fit.
    from faceage.annotate import to_png
    from faceage.detector import HOG_FILE

    limit = 2 * (photos["root"] / "detector" / HOG_FILE).stat().st_size
    assert len(to_png(skimage_data.astronaut())) > limit, "the astronaut's PNG must exceed the limit"
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    if hard != resource.RLIM_INFINITY and hard < limit:
        pytest.skip(f"the hard file-size limit ({hard} bytes) is already below {limit}")
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, hard))
    try:
        code = main(["predict", str(photos["folder"] / "astronaut.png"), str(photos["folder"] / "blank.jpg"),
                     "--json", "--annotate", str(out), *photos["model"]])
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)
    captured = capsys.readouterr()
    assert code == 1  # not everything asked for was written
    results = json.loads(captured.out)
    assert [len(r["faces"]) >= 1 for r in results] == [True, False]  # the astronaut's ages are kept
    assert "could not write the annotated copy of" in captured.err and "astronaut.png" in captured.err
    assert "Traceback" not in captured.err
    assert results[0]["annotated"] is None and "File too large" in results[0]["annotate_error"]
    assert results[1]["annotated"] == str(out / "blank.png") and results[1]["annotate_error"] is None
    assert [p.name for p in out.iterdir()] == ["blank.png"]  # no truncated astronaut PNG left behind


@pytest.mark.parametrize("option", [["--threads", "0"], ["--threads", "-2"], ["--max-pixels", "0"],
                                    ["--max-detect-pixels", "-1"], ["--threads", "two"]])
def test_bad_numbers_are_usage_errors(photos, option, capsys):
    with pytest.raises(SystemExit) as e:
        main(["predict", str(photos["folder"] / "blank.jpg"), *option, *photos["model"]])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"argument {option[0]}: must be" in err and "Traceback" not in err


def test_zero_max_detect_pixels_still_means_never_downscale(photos, capsys):
    """0 is "never downscale", not a cap of 0 pixels (which would leave nothing to find a face in)."""
    from faceage.images import load_image
    from faceage.predict import AgePredictor

    photo = photos["folder"] / "astronaut.png"
    assert main(["predict", str(photo), "--json", "--max-detect-pixels", "0", "--threads", "1",
                 *photos["model"]]) == 0
    [got] = json.loads(capsys.readouterr().out)
    # The astronaut (512 x 512) is under the default cap: the default predictor detects at full size too.
    want = AgePredictor(photos["model"][1], photos["model"][3], threads=1).predict(load_image(photo))
    assert len(want) >= 1
    assert [f["box"] for f in got["faces"]] == [list(f.box) for f in want]
    assert [f["age"] for f in got["faces"]] == pytest.approx([f.age for f in want], abs=1e-3)


@pytest.mark.parametrize("kind", ["photo", "truncated", "bento tag"])
def test_a_bad_model_is_one_clear_error(photos, tmp_path, capsys, kind):
    if kind == "photo":
        shutil.copy(photos["folder"] / "blank.jpg", tmp_path / "model.jpg")
        source, want = ["--model", str(tmp_path / "model.jpg")], "model.jpg is not a FaceAge checkpoint"
    elif kind == "truncated":
        data = open(photos["model"][1], "rb").read()
        (tmp_path / "model.pt").write_bytes(data[: len(data) // 2])
        source, want = ["--model", str(tmp_path / "model.pt")], "model.pt is not a FaceAge checkpoint"
    else:
        source, want = ["--bento", "bad tag!!"], "'bad tag!!' is not a BentoML model tag"
    assert main(["predict", str(photos["folder"] / "blank.jpg"), *source]) == 1
    err = capsys.readouterr().err
    assert want in err and "Traceback" not in err
    assert "weights_only" not in err  # torch's advice to load unsafely is not passed on


@pytest.mark.parametrize("where", ["file", "under a file"])
def test_an_annotate_folder_that_cannot_be_made_is_one_clear_error(photos, tmp_path, capsys, where):
    (tmp_path / "notes.txt").write_text("a file")
    target = tmp_path / "notes.txt" if where == "file" else tmp_path / "notes.txt" / "out"
    assert main(["predict", str(photos["folder"] / "blank.jpg"), "--annotate", str(target), *photos["model"]]) == 1
    err = capsys.readouterr().err
    assert f"--annotate{' ' if where == 'file' else ': cannot create the folder '}{target}" in err
    assert "Traceback" not in err


def test_undecodable_file_names_are_printed_as_their_bytes(photos, tmp_path, monkeypatch):
    name = os.fsdecode(b"caf\xe9.jpg")  # Latin-1 bytes: not UTF-8, so Python holds a surrogate
    try:
        shutil.copy(photos["folder"] / "blank.jpg", tmp_path / name)
    except (OSError, UnicodeError):
        pytest.skip("this file system accepts only valid UTF-8 names")
    for fmt in ([], ["--csv"], ["--json"]):
        stdout = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")  # strict, as under PYTHONIOENCODING=utf-8
        monkeypatch.setattr(sys, "stdout", stdout)
        assert main(["predict", str(tmp_path), *fmt, *photos["model"]]) == 0
        stdout.flush()
        raw = stdout.buffer.getvalue()
        assert (b'caf\\udce9.jpg"' if fmt == ["--json"] else b"caf\xe9.jpg") in raw  # JSON escapes instead


def test_folder_scans_skip_hidden_files_and_folders(tmp_path):
    folder = tmp_path / ".photos"  # a hidden folder named on the command line is still read
    for name in ("IMG.JPG", "._IMG.JPG", ".hidden.png", ".thumbs/IMG.JPG", "sub/.cache/c.jpg", "sub/b.jpg"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"\x00\x05\x16\x07 AppleDouble, or any bytes: not read here")
    assert collect_images([folder]) == [folder / "IMG.JPG"]
    assert collect_images([folder], recursive=True) == [folder / "IMG.JPG", folder / "sub" / "b.jpg"]
    assert collect_images([folder / "._IMG.JPG"]) == [folder / "._IMG.JPG"]  # named files are taken as given


def test_each_result_names_its_annotated_copy(wild_dir, photos, tmp_path, capsys):
    """ph/a.jpg and ph/sub/a.jpg become a.png and a-1.png: the output says which is which."""
    ph = tmp_path / "ph"
    (ph / "sub").mkdir(parents=True)
    shutil.copyfile(wild_dir / "fr_obama_small.jpg", ph / "a.jpg")  # 320 x 240
    shutil.copyfile(wild_dir / "dlib_2008_001009.jpg", ph / "sub" / "a.jpg")  # 360 x 480
    out = tmp_path / "out"
    assert main(["predict", str(ph), "--recursive", "--json", "--annotate", str(out), *photos["model"]]) == 0
    entries = json.loads(capsys.readouterr().out)
    assert [e["file"] for e in entries] == [str(ph / "a.jpg"), str(ph / "sub" / "a.jpg")]
    assert sorted(e["annotated"] for e in entries) == [str(out / "a-1.png"), str(out / "a.png")]
    for e in entries:
        assert e["annotate_error"] is None
        with Image.open(e["annotated"]) as im, Image.open(e["file"]) as photo:
            assert im.size == photo.size == (e["width"], e["height"])  # the copy of this photo, not the other
    copies = {e["file"]: e["annotated"] for e in entries}

    assert main(["predict", str(ph), "--recursive", "--csv", "--annotate", str(out), *photos["model"]]) == 0
    reader = csv.DictReader(io.StringIO(capsys.readouterr().out))
    rows = list(reader)
    assert reader.fieldnames[-2:] == ["annotated", "annotate_error"]
    assert {r["file"]: (r["annotated"], r["annotate_error"]) for r in rows} == {
        str(ph / "a.jpg"): (str(out / "a-2.png"), ""), str(ph / "sub" / "a.jpg"): (str(out / "a-3.png"), "")}
    assert main(["predict", str(ph), "--recursive", "--annotate", str(out), *photos["model"]]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["file", "face", "age", "age_std", "box", "score", "annotated", "note"]
    assert {line.split()[0]: line.split()[9] for line in table[1:]} == {  # file face age std x1 y1 x2 y2 score
        str(ph / "a.jpg"): str(out / "a-4.png"), str(ph / "sub" / "a.jpg"): str(out / "a-5.png")}
    assert len(copies) == 2 and sorted(p.name for p in out.iterdir()) == [f"a-{n}.png" for n in range(1, 6)] + ["a.png"]


def test_without_annotate_the_outputs_keep_their_fields(photos, capsys):
    """A plain run's CSV keeps its ten columns and its JSON its keys: scripts that read them still work."""
    photo = str(photos["folder"] / "astronaut.png")
    assert main(["predict", photo, "--csv", *photos["model"]]) == 0
    header = capsys.readouterr().out.splitlines()[0]
    assert header == "file,face,x1,y1,x2,y2,age,age_std,score,error"
    assert main(["predict", photo, "--json", *photos["model"]]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    assert sorted(entry) == ["faces", "file", "height", "width"]


def test_json_ages_are_rounded_to_4_decimals(photos, capsys):
    """The digits past 4 decimals are float32 noise that depends on which photos share the forward pass."""
    from faceage.images import load_image
    from faceage.predict import AgePredictor

    photo = photos["folder"] / "astronaut.png"
    assert main(["predict", str(photo), "--json", *photos["model"]]) == 0
    [entry] = json.loads(capsys.readouterr().out)
    want = AgePredictor(photos["model"][1], photos["model"][3], threads=1).predict(load_image(photo))
    got = entry["faces"]
    assert len(got) == len(want) >= 1
    for g, w in zip(got, want):
        assert (g["age"], g["age_std"]) == (round(g["age"], 4), round(g["age_std"], 4))
        assert g["age"] == pytest.approx(w.age, abs=6e-5) and g["age_std"] == pytest.approx(w.age_std, abs=6e-5)


def test_a_packaged_model_folder_is_a_model(photos, tmp_path, capsys):
    """``--model ~/bentoml/models/face_age/<version>``: the folder ``make bento`` stores (model.pt + detector/)."""
    package = tmp_path / "face_age" / "v1"
    package.mkdir(parents=True)
    shutil.copyfile(photos["model"][1], package / "model.pt")
    shutil.copytree(photos["model"][3], package / "detector")
    photo = str(photos["folder"] / "astronaut.png")
    assert main(["predict", photo, "--json", *photos["model"]]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main(["predict", photo, "--json", "--model", str(package)]) == 0
    assert json.loads(capsys.readouterr().out) == want
    assert main(["predict", photo, "--model", str(package), "--detector", photos["model"][3]]) == 1
    assert "the folder brings its own detector/; leave --detector out" in capsys.readouterr().err
    assert main(["predict", photo, "--model", str(tmp_path / "face_age")]) == 1
    err = capsys.readouterr().err
    assert f"--model {tmp_path / 'face_age'} is a folder without model.pt and detector/" in err
    assert "checkpoint not found" not in err and "Traceback" not in err


BENTO_SERVICE = """
import bentoml


@bentoml.service(name="face_age")
class FaceAge:
    model = bentoml.models.BentoModel("face_age:latest")

    @bentoml.api
    def ping(self) -> str:
        return "pong"
"""

BUILD_AND_PREDICT = """
import shutil, sys
from pathlib import Path

import bentoml
from faceage.cli import main

checkpoint, detector, context, photo = sys.argv[1:]
with bentoml.models.create("face_age") as model:
    shutil.copyfile(checkpoint, Path(model.path) / "model.pt")
    shutil.copytree(detector, Path(model.path) / "detector")
bento = bentoml.bentos.build("service:FaceAge", build_ctx=context)
print(bento.tag, model.tag, main(["predict", photo, "--bento", str(bento.tag)]),
      main(["predict", photo, "--bento", str(model.tag)]))
"""


def test_a_bento_tag_given_as_bento_says_it_is_a_bento(photos, tmp_path):
    """``bentoml build`` prints the bento's tag (``face_age:<its version>``); ``--bento`` wants the model's."""
    context = tmp_path / "context"
    context.mkdir()
    (context / "service.py").write_text(BENTO_SERVICE)
    photo = str(photos["folder"] / "astronaut.png")
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "bentoml"), "BENTOML_DO_NOT_TRACK": "True"}
    out = subprocess.run([sys.executable, "-c", BUILD_AND_PREDICT, photos["model"][1], photos["model"][3],
                          str(context), photo], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    bento_tag, model_tag, code, hinted = out.stdout.split()[-4:]
    assert bento_tag.startswith("face_age:") and bento_tag != model_tag and code == "1"
    assert f"--bento '{bento_tag}' is a bento, not a model" in out.stderr
    assert "`bentoml models list`" in out.stderr and "run `make bento` first" not in out.stderr
    assert f"the models it uses: --bento {model_tag}" in out.stderr, out.stderr[-3000:]
    assert hinted == "0"  # the tag it points to works


def test_the_readme_documents_the_cli_s_own_options():
    """The README's `faceage predict` paragraphs name options the parser has, not the service's variables."""
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    start = readme.index("The CLI (`faceage predict")
    text = readme[start:readme.index("\nBad input gets", start)]
    predict = build_parser()._subparsers._group_actions[0].choices["predict"]
    options = {o for action in predict._actions for o in action.option_strings}
    named = set(re.findall(r"(?<![\w-])--[a-z][a-z-]*", text))
    assert "--max-detect-pixels" in named and named <= options, named - options
    assert "the CLI's\n`--max-detect-pixels`" in text or "the CLI's `--max-detect-pixels`" in text
