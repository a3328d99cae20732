"""What the benchmarks read: the crop settings ``bench_external_crops`` crops with, the utk-external
cache entry ``dlib_age_heads`` / ``dlib_age_sweep`` pick, ``kill_resume``'s ``--workdir``, and the
shared-datasets default (``$FACEAGE_SHARED_DATASETS``)."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from faceage.config import PreprocessParams, load_params
from faceage.detector import CNN_FILE, HOG_FILE, SHAPE5_FILE
from faceage.external import CROP_KEYS, cache_key, crop_params
from faceage.preprocess import crop_settings
from tests.unit.test_config import raw_params
from tests.unit.test_external import make_set, noise

REPO = Path(__file__).resolve().parents[2]
MANIFEST = {"files": {HOG_FILE: "hog-sha", CNN_FILE: "cnn-sha", SHAPE5_FILE: "shape-sha"}}


def test_crop_settings_are_what_preprocess_records_in_its_order():
    crop = crop_settings(PreprocessParams(), MANIFEST)
    assert list(crop) == ["margin", "size", "detector", "upsample", "retry_pad", "cnn_retry_side", "cnn_retry_sha256",
                          "detector_file", "detector_sha256", "no_face"]  # preprocess.json's order (its bytes)
    assert set(CROP_KEYS) <= set(crop)
    assert crop["cnn_retry_sha256"] == "cnn-sha" and crop["detector_sha256"] == "hog-sha"
    cnn = crop_settings(PreprocessParams(detector="cnn"), MANIFEST)
    assert cnn["cnn_retry_side"] == 0 and "cnn_retry_sha256" not in cnn and cnn["detector_file"] == CNN_FILE


def test_external_crops_benchmark_crops_with_both_looks_and_reports_the_ratio(tmp_path, monkeypatch, capsys):
    import benchmarks.bench_external_crops as bench

    asked = []

    def external_faces(ext, crop, detector, cache, workers):
        asked.append(crop)
        return tmp_path

    monkeypatch.setattr(bench, "read_manifest", lambda folder: MANIFEST)
    monkeypatch.setattr(bench, "resolve_external", lambda paths, root: [SimpleNamespace(name="utk_external")])
    monkeypatch.setattr(bench, "external_faces", external_faces)
    monkeypatch.setattr(bench, "crop_counts", lambda faces: {"n_images": 1, "n_faces": 1})
    monkeypatch.setattr(sys, "argv", ["bench_external_crops.py", "--params", str(REPO / "params.yaml"),
                                      "--detector", str(tmp_path)])
    bench.main()
    pre = load_params(REPO / "params.yaml").preprocess
    assert len(asked) == 2 and asked[0] == asked[1] == crop_settings(pre, MANIFEST)
    used = crop_params(asked[0])  # what external_faces detects with
    assert (used.retry_pad, used.cnn_retry_side) == (pre.retry_pad, pre.cnn_retry_side)
    printed = json.loads(capsys.readouterr().out)
    assert "cached_over_first" in printed["sets"]["utk_external"]


@pytest.fixture
def workspace(tmp_path):
    """A repo with params.yaml (evaluate.external: one set), data/faces/preprocess.json, models/detector's
    manifest and two cached utk-external entries: one made with the current settings, one not."""
    repo = tmp_path / "repo"
    ext = make_set(repo / "sets" / "utk-external", {"a.jpg": noise()})
    raw = raw_params()
    raw["evaluate"]["external"] = ["sets/utk-external"]
    repo.joinpath("params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    crop = crop_settings(PreprocessParams(), MANIFEST)
    (repo / "data" / "faces").mkdir(parents=True)
    (repo / "data" / "faces" / "preprocess.json").write_text(json.dumps(crop))
    (repo / "models" / "detector").mkdir(parents=True)
    (repo / "models" / "detector" / "manifest.json").write_text(json.dumps(MANIFEST))
    cache = repo / ".cache" / "external"
    current = cache / f"utk_external-{cache_key(ext, crop, 'shape-sha')}"
    stale = cache / "utk_external-ffffffffffffffff"  # other settings; sorts last
    for entry in (current, stale):
        entry.mkdir(parents=True)
        (entry / "preprocess.json").write_text("{}")
    return SimpleNamespace(repo=repo, current=current, stale=stale)


def test_heads_benchmark_reads_the_utk_external_crops_of_the_current_crop_settings(workspace, monkeypatch):
    import benchmarks.dlib_age_heads as heads

    monkeypatch.setattr(heads, "REPO", workspace.repo)
    assert heads._external_faces() == workspace.current
    (workspace.current / "preprocess.json").unlink()  # only the stale entry is left: an error, not a pick
    with pytest.raises(SystemExit, match="no utk_external crops made with the current crop settings"):
        heads._external_faces()


def test_kill_resume_refuses_a_workdir_from_an_earlier_run(tmp_path, monkeypatch, capsys):
    import benchmarks.kill_resume as kill_resume

    made = []
    monkeypatch.setattr("tests.conftest.make_subset",
                        lambda sample, dest, per_split: made.append(dest) or dest.mkdir(parents=True) or dest)
    (tmp_path / "work" / "project").mkdir(parents=True)  # what an earlier run with --workdir work left
    with pytest.raises(SystemExit) as e:
        kill_resume.main(["--workdir", str(tmp_path / "work"), "--sample", str(tmp_path)])
    assert e.value.code == 2 and not made
    assert "is not an empty folder" in capsys.readouterr().err


def _default_photos(module: str, shared: Path) -> str:
    code = f"import sys; sys.path.insert(0, {str(REPO)!r}); import {module} as m; print(m.DEFAULT_PHOTOS)"
    env = {**os.environ, "FACEAGE_SHARED_DATASETS": str(shared)}
    return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True,
                          timeout=120).stdout.strip()


@pytest.mark.parametrize("module", ["benchmarks.bench_detect", "benchmarks.bench_cnn_retry"])
def test_detection_benchmarks_take_their_photos_from_faceage_shared_datasets(module, tmp_path):
    assert str(tmp_path / "elsewhere" / "wild") in _default_photos(module, tmp_path / "elsewhere")


def test_sweep_has_a_help_and_refuses_a_config_that_is_not_json_from_any_folder(tmp_path):
    script = str(REPO / "benchmarks" / "dlib_age_sweep.py")
    shown = subprocess.run([sys.executable, script, "--help"], cwd=tmp_path, capture_output=True, text=True,
                           timeout=120)
    assert shown.returncode == 0 and "usage:" in shown.stdout and "CONFIG" in shown.stdout
    bad = subprocess.run([sys.executable, script, "4", "{lr: 1}"], cwd=tmp_path, capture_output=True, text=True,
                         timeout=120)
    assert bad.returncode == 2 and "is not JSON" in bad.stderr


def test_heads_benchmark_cache_is_keyed_by_the_crops_it_was_computed_from(workspace):
    import benchmarks.dlib_age_heads as heads

    repo = workspace.repo
    first = heads.cache_dir(repo)
    assert first.parent == repo / ".cache" / "bench-heads" and first == heads.cache_dir(repo)  # stable
    settings = repo / "data" / "faces" / "preprocess.json"
    crop = json.loads(settings.read_text())
    settings.write_text(json.dumps({**crop, "data_sha256": "other data"}))  # same settings, other faces
    other_data = heads.cache_dir(repo)
    manifest = repo / "models" / "detector" / "manifest.json"
    manifest.write_text(json.dumps({"files": {**MANIFEST["files"], "other.dat": "x"}}))
    other_detector = heads.cache_dir(repo)
    elsewhere = repo / "detector-elsewhere"  # --detector: the folder the descriptors are computed with
    elsewhere.mkdir()
    (elsewhere / "manifest.json").write_text(json.dumps(MANIFEST))
    given_detector = heads.cache_dir(repo, elsewhere)
    assert other_detector == heads.cache_dir(repo, repo / "models" / "detector") != given_detector
    wild = repo / "wild"
    wild.mkdir()
    (wild / "a.jpg").write_bytes(b"one photo")
    one_wild = heads.cache_dir(repo, wild=wild)
    (wild / "a.jpg").write_bytes(b"another photo")
    other_wild = heads.cache_dir(repo, wild=wild)
    assert len({first, other_data, other_detector, one_wild, other_wild}) == 5


UTK_HEADER = ('file_name,age,"utk_gender(0=male,1=female)","utk_race(0=White,1=Black,2=Asian,3=Indian,4=Others)"\n')
MANIFEST_HEADER = "split,file_name,crop,apparent_age,apparent_age_std,real_age\n"


def test_shift_groups_reads_the_labels_beside_the_faces_the_crops_came_from(workspace, monkeypatch):
    """The sample's labels as fetch_data copied them and utk-external's from evaluate.external's folder: the
    shared folder beside the repo gave another sample's faces its own faces' labels (same file names), and
    ignored $FACEAGE_SHARED_DATASETS."""
    import benchmarks.dlib_age_heads as heads
    import benchmarks.shift_groups as shift_groups

    repo = workspace.repo
    raw = repo / "data" / "raw" / "appa-real"
    raw.mkdir(parents=True)
    # 000000.jpg is a white woman in the shared sample and in the shared utk-external: here a black man.
    (raw / "sources.csv").write_text(UTK_HEADER + "000000.jpg,30,0,1\n000001.jpg,40,1,2\n000002.jpg,50,0,3\n")
    (repo / "sets" / "utk-external" / "sources.csv").write_text(UTK_HEADER + "000000.jpg,30,0,1\n")
    crop = json.loads((repo / "data" / "faces" / "preprocess.json").read_text())  # the set's bytes changed: its key
    entry = workspace.current.rename(workspace.current.with_name(
        f"utk_external-{cache_key(repo / 'sets' / 'utk-external', crop, 'shape-sha')}"))
    (repo / "data" / "faces" / "manifest.csv").write_text(
        MANIFEST_HEADER + "train,000000.jpg,train/000000.png,30,0,30\nvalid,000001.jpg,valid/000001.png,40,0,40\n"
        "test,000002.jpg,test/000002.png,50,0,50\n")
    (entry / "manifest.csv").write_text(MANIFEST_HEADER + "test,000000.jpg,test/000000.png,30,0,30\n")
    monkeypatch.setattr(heads, "REPO", repo)
    monkeypatch.setattr(shift_groups, "REPO", repo)
    monkeypatch.setenv("FACEAGE_SHARED_DATASETS", str(repo / "nowhere"))
    assert shift_groups.groups() == {"train": {"race": ["Black"], "gender": ["male"]},
                                     "valid": {"race": ["Asian"], "gender": ["female"]},
                                     "test": {"race": ["Indian"], "gender": ["male"]},
                                     "ext": {"race": ["Black"], "gender": ["male"]}}
    (raw / "sources.csv").unlink()
    with pytest.raises(SystemExit, match="race and gender labels"):
        shift_groups.groups()
