"""Round 31: the recipe and the exploration benchmarks on missing inputs (one line, not a traceback) and the
recipe's report (never a committed one overwritten unasked; written atomically)."""

import csv
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import faceage.recipe as recipe
import faceage.tracking

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmarks"))
GIT = ["git", "-c", "user.email=t@t", "-c", "user.name=t"]


@pytest.fixture
def repo(tmp_path, monkeypatch):
    """A workspace with the committed params.yaml and a faces folder whose manifest has crops but no chips.npz."""
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    subprocess.run(["git", "add", "params.yaml"], cwd=tmp_path, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "params"], cwd=tmp_path, check=True)
    faces = tmp_path / "data" / "faces"
    faces.mkdir(parents=True)
    with open(faces / "manifest.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "split", "crop", "apparent_age", "apparent_age_std", "real_age"])
        w.writeheader()
        for i, split in enumerate(("train", "valid", "test")):
            w.writerow({"image": f"{i}.jpg", "split": split, "crop": f"{split}/{i}.png", "apparent_age": 30,
                        "apparent_age_std": 0, "real_age": 30})
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(faceage.tracking, "setup_mlflow", lambda: None)  # no mlflow.db written by the test
    monkeypatch.setattr(recipe, "setup_logging", lambda: None)
    monkeypatch.setattr(recipe, "train_model", lambda *a, **k: pytest.fail("a variant trained"))
    return tmp_path


def test_recipe_refuses_to_overwrite_an_existing_report_before_any_work(repo, capsys):
    """`python -m faceage.recipe` wrote reports/recipe.md (committed) over the old one after hours of runs,
    without asking: the committed report was lost to a smoke run of one variant."""
    out = repo / "reports" / "recipe.md"
    out.parent.mkdir()
    out.write_text("committed\n")
    with pytest.raises(SystemExit) as e:
        recipe.main(["--dlib-age", "--no-dlib-face", "--variants", "zero-shot", "--out", str(out)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "--force" in err and str(out) in err
    assert out.read_text() == "committed\n"


def test_recipe_missing_chips_is_one_line(repo):
    """--dlib-age on a faces folder without chips.npz: FileNotFoundError traceback."""
    with pytest.raises(SystemExit) as e:
        recipe.main(["--dlib-age", "--no-dlib-face", "--variants", "zero-shot", "--out", str(repo / "new.md")])
    assert isinstance(e.value.code, str) and "chips.npz" in e.value.code and "\n" not in e.value.code
    assert not (repo / "new.md").exists()


def test_recipe_missing_faces_is_one_line(repo):
    """dlib_face rows with no data/faces (no embeddings.npz either): FileNotFoundError traceback."""
    with pytest.raises(SystemExit) as e:
        recipe.main(["--faces", str(repo / "nowhere"), "--out", str(repo / "new.md")])
    assert isinstance(e.value.code, str) and "nowhere" in e.value.code


def test_recipe_missing_external_folder_is_refused_before_any_work(repo, capsys):
    """--external ../shared/datasets/utk-external without ../shared: FileNotFoundError traceback."""
    with pytest.raises(SystemExit) as e:
        recipe.main(["--external", str(repo / "no-shared" / "utk-external"), "--out", str(repo / "new.md")])
    assert e.value.code == 2 and "gt_avg_test.csv" in capsys.readouterr().err


def test_recipe_writes_its_report_atomically(repo, monkeypatch):
    """The report is written through faceage.atomic (a killed write leaves the old contents, not half)."""
    import faceage.atomic

    written = []
    monkeypatch.setattr(faceage.atomic, "write_text", lambda path, text: written.append((Path(path), text)))
    out = repo / "new.md"
    recipe.main(["--no-dlib-face", "--out", str(out)])  # no section: the report header alone
    assert written and written[0][0] == out and written[0][1].startswith("# Recipe by measurement")


def test_bench_heads_cache_dir_without_faces_is_one_line(tmp_path):
    """benchmarks/dlib_age_heads.py (and shift_groups, band_regret, age_bias through it) with no data/faces:
    FileNotFoundError traceback on data/faces/preprocess.json."""
    import dlib_age_heads

    with pytest.raises(SystemExit) as e:
        dlib_age_heads.cache_dir(tmp_path, detector=tmp_path / "detector", wild=tmp_path / "wild")
    assert isinstance(e.value.code, str) and "preprocess.json" in e.value.code


def test_bench_heads_missing_chips_is_one_line(tmp_path, monkeypatch, repo):
    """No chips.npz beside the crops: a traceback from np.load after the wild photos were checked."""
    import dlib_age_heads

    monkeypatch.setattr(dlib_age_heads, "REPO", repo)
    monkeypatch.setattr(dlib_age_heads, "cache_dir", lambda **k: tmp_path / "cache")
    monkeypatch.setattr(dlib_age_heads, "_wild_files", lambda: ["a.jpg"])
    monkeypatch.setattr(dlib_age_heads, "_external_faces", lambda: repo / "data" / "faces")
    with pytest.raises(SystemExit) as e:
        dlib_age_heads.load_inputs(tmp_path / "detector")
    assert isinstance(e.value.code, str) and "chips.npz" in e.value.code


def test_sweep_missing_chips_is_one_line(repo, monkeypatch):
    """benchmarks/dlib_age_sweep.py with no data/embeddings.npz (the chips): FileNotFoundError traceback."""
    import dlib_age_sweep

    monkeypatch.setattr(dlib_age_sweep, "REPO", repo)
    monkeypatch.setattr(dlib_age_sweep, "current_external_faces", lambda name, r: repo / "data" / "faces")
    with pytest.raises(SystemExit) as e:
        dlib_age_sweep.main(["4"])
    assert isinstance(e.value.code, str) and "embeddings.npz" in e.value.code
