"""Cross-dataset test sets: resolving evaluate.external, cropping with the checkpoint's settings, the cache."""

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from faceage.config import ConfigError, EvaluateParams, params_from_dict
from faceage.external import cache_key, crop_counts, external_faces
from faceage.sources import ExternalSetError, external_name, resolve_external
from tests.unit.test_config import raw_params

COLUMNS = ["file_name", "num_ratings", "apparent_age_avg", "apparent_age_std", "real_age"]


def make_set(root: Path, images: dict[str, np.ndarray], ages: dict[str, float] | None = None) -> Path:
    """A release-layout test set: gt_avg_test.csv + test/NAME.jpg (no _face.jpg crops)."""
    (root / "test").mkdir(parents=True)
    with open(root / "gt_avg_test.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(COLUMNS)
        for name, pixels in images.items():
            Image.fromarray(pixels).save(root / "test" / name, quality=95)
            age = (ages or {}).get(name, 30.0)
            w.writerow([name, 0, age, 0.0, age])
    return root


def noise(seed=0, h=120, w=160):
    return np.random.default_rng(seed).integers(0, 255, (h, w, 3), dtype=np.uint8)


def test_external_is_a_list_of_paths_in_params():
    raw = raw_params()
    raw["evaluate"]["external"] = ["/a/b", "rel/c"]
    assert params_from_dict(raw).evaluate.external == ("/a/b", "rel/c")
    raw["evaluate"]["external"] = []
    assert params_from_dict(raw).evaluate.external == ()
    raw["evaluate"]["external"] = "/a/b"
    with pytest.raises(ConfigError, match=r"evaluate\.external must be a list, got '/a/b'"):
        params_from_dict(raw)
    raw["evaluate"]["external"] = ["/a", 3]
    with pytest.raises(ConfigError, match=r"evaluate\.external\[1\] must be a string, got 3"):
        params_from_dict(raw)
    assert EvaluateParams().external == ("../shared/datasets/utk-external",)


@pytest.mark.parametrize(("path", "name"), [("../shared/datasets/utk-external", "utk_external"),
                                            ("/data/FG-NET/", "fg_net"), ("x", "x")])
def test_set_names_are_metric_safe(path, name):
    assert external_name(path) == name


def test_relative_paths_resolve_against_the_root_and_a_missing_set_is_named(tmp_path):
    make_set(tmp_path / "root" / "sets" / "one", {"a.jpg": noise()})
    [ext] = resolve_external(["sets/one"], tmp_path / "root")
    assert (ext.name, ext.given, ext.path) == ("one", "sets/one", (tmp_path / "root" / "sets" / "one").resolve())
    with pytest.raises(ExternalSetError, match=r"evaluate\.external: 'sets/two' not found \(resolved to .*/sets/two\)"):
        resolve_external(["sets/one", "sets/two"], tmp_path / "root")


def test_layout_errors_name_the_set(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ExternalSetError, match=r"'.*empty'.*missing gt_avg_test\.csv"):
        resolve_external([str(tmp_path / "empty")], tmp_path)
    make_set(tmp_path / "gap", {"a.jpg": noise(), "b.jpg": noise(1)})
    (tmp_path / "gap" / "test" / "b.jpg").unlink()
    with pytest.raises(ExternalSetError, match=r"1 of 2 images listed in gt_avg_test\.csv are missing .*\['b\.jpg'\]"):
        resolve_external([str(tmp_path / "gap")], tmp_path)
    make_set(tmp_path / "x" / "same", {"a.jpg": noise()})
    make_set(tmp_path / "y" / "same", {"a.jpg": noise()})
    with pytest.raises(ExternalSetError, match="two sets share a name"):
        resolve_external([str(tmp_path / "x" / "same"), str(tmp_path / "y" / "same")], tmp_path)
    make_set(tmp_path / "faces", {"a.jpg": noise()})
    make_set(tmp_path / "faces-baseline", {"a.jpg": noise()})  # name faces_baseline: its MAE is faces' baseline key
    with pytest.raises(ExternalSetError, match="'faces' and 'faces_baseline' would log the same MLflow metric"):
        resolve_external([str(tmp_path / "faces-baseline"), str(tmp_path / "faces")], tmp_path)
    assert [e.name for e in resolve_external([str(tmp_path / "faces"), str(tmp_path / "x" / "same")], tmp_path)] == [
        "faces", "same"]


CROP = {"detector": "hog", "upsample": 1, "margin": 0.4, "size": 64, "no_face": "release_crop",
        "detector_file": "frontal_face_detector.svm", "detector_sha256": "s" * 64, "data_sha256": "d" * 64}


def test_cache_key_follows_the_pixels_and_the_crop_settings_only(tmp_path):
    folder = make_set(tmp_path / "set", {"a.jpg": noise()})
    key = cache_key(folder, CROP)
    assert cache_key(folder, {**CROP, "data_sha256": "other training data", "workers": 2}) == key
    assert cache_key(folder, {**CROP, "margin": 0.3}) != key
    assert cache_key(folder, {**CROP, "no_face": "whole_image"}) != key
    Image.fromarray(noise(5)).save(folder / "test" / "a.jpg")
    assert cache_key(folder, CROP) != key


def checkpoint_crop(detector_dir, **overrides):
    from faceage.detector import read_manifest

    sha = read_manifest(detector_dir)["files"]["frontal_face_detector.svm"]
    return {**CROP, "detector_sha256": sha, **overrides}


def test_crops_are_the_preprocess_crops_and_no_face_follows_the_policy(detector_dir, tmp_path):
    """The astronaut's crop equals detect -> choose_subject -> crop_face; noise has no face and is skipped."""
    from skimage.data import astronaut

    from faceage.faces import FaceDetector, choose_subject, crop_face
    from faceage.images import load_image
    from faceage.preprocess import read_faces_manifest

    folder = make_set(tmp_path / "set", {"astronaut.jpg": astronaut(), "noise.jpg": noise()},
                      {"astronaut.jpg": 53.0, "noise.jpg": 20.0})
    [ext] = resolve_external([str(folder)], tmp_path)
    crop = checkpoint_crop(detector_dir)
    faces = external_faces(ext, crop, detector_dir, tmp_path / "cache", workers=1)
    assert faces.parent == tmp_path / "cache" and faces.name.startswith("set-")
    assert crop_counts(faces) == {"n_images": 2, "n_faces": 1, "face": 1, "release_crop": 0, "whole_image": 0,
                                  "no_face": 1, "unreadable": 0}
    [row] = read_faces_manifest(faces, "test")
    assert (row["file_name"], row["apparent_age"]) == ("astronaut.jpg", "53.0")
    image = load_image(folder / "test" / "astronaut.jpg")
    box = choose_subject(FaceDetector(detector_dir, "hog", 1).detect(image), image.shape[1], image.shape[0])
    expected = crop_face(image, box, 0.4, 64)
    assert np.array_equal(np.asarray(Image.open(faces / row["crop"])), expected)

    # Same settings: the cached crops are reused, not redone.
    stamp = os.stat(faces / row["crop"]).st_mtime_ns
    assert external_faces(ext, crop, detector_dir, tmp_path / "cache", workers=1) == faces
    assert os.stat(faces / row["crop"]).st_mtime_ns == stamp
    # Another policy is another cache entry: whole_image scores the noise image too.
    whole = external_faces(ext, {**crop, "no_face": "whole_image"}, detector_dir, tmp_path / "cache", workers=1)
    assert whole != faces and crop_counts(whole)["n_faces"] == 2 and crop_counts(whole)["whole_image"] == 1
    assert json.loads((whole / "preprocess.json").read_text())["no_face"] == "whole_image"


def _crop_set(ext, crop, detector_dir, cache, barrier, results):
    """One process of the test below: reports the folder it got and whether it ran the detector."""
    import logging

    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logging.getLogger("faceage.external").addHandler(handler)
    logging.getLogger("faceage.external").setLevel(logging.INFO)
    barrier.wait()
    faces = external_faces(ext, crop, detector_dir, cache, workers=1)
    results.put((str(faces), any("detecting and cropping" in m for m in seen), crop_counts(faces)))


def test_runs_side_by_side_crop_a_set_once_and_both_read_it(detector_dir, tmp_path):
    """Two evaluations of one external set at once (``dvc queue start -j 2``): one crops, the other
    waits for it and reuses the entry, instead of both cropping and the later one deleting the
    folder the earlier one is reading."""
    import multiprocessing

    from skimage.data import astronaut

    faces = {f"astronaut{i}.jpg": np.asarray(Image.fromarray(astronaut()).resize((512 + 64 * i,) * 2))
             for i in range(6)}
    [ext] = resolve_external([str(make_set(tmp_path / "set", faces))], tmp_path)
    ctx = multiprocessing.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    args = (ext, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", barrier, results)
    procs = [ctx.Process(target=_crop_set, args=args) for _ in range(2)]
    for proc in procs:
        proc.start()
    got = [results.get(timeout=300) for _ in procs]
    for proc in procs:
        proc.join(60)
    assert [proc.exitcode for proc in procs] == [0, 0]
    assert got[0][0] == got[1][0] and Path(got[0][0]).parent == tmp_path / "cache"
    assert sorted(detected for _, detected, _ in got) == [False, True]
    assert got[0][2] == got[1][2] and got[0][2]["n_faces"] == 6


def test_a_detector_other_than_the_checkpoints_is_refused(detector_dir, tmp_path):
    folder = make_set(tmp_path / "set", {"a.jpg": noise()})
    [ext] = resolve_external([str(folder)], tmp_path)
    with pytest.raises(ExternalSetError, match="but the checkpoint's crops were made with s{64}"):
        external_faces(ext, CROP, detector_dir, tmp_path / "cache", workers=1)


def test_evaluate_names_a_missing_external_set_before_any_work(tmp_path):
    from faceage.evaluation import evaluate_model

    p = EvaluateParams(external=("nowhere/utk-external",))
    with pytest.raises(ExternalSetError, match=r"evaluate\.external: 'nowhere/utk-external' not found"):
        evaluate_model(tmp_path / "no-checkpoint.pt", tmp_path / "faces", tmp_path / "out", p, detector_dir=tmp_path)
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="needs the detector folder"):
        evaluate_model(tmp_path / "no-checkpoint.pt", tmp_path / "faces", tmp_path / "out", p)


def test_the_cache_entry_records_the_set_version_it_was_cut_from(detector_dir, tmp_path, monkeypatch):
    """evaluate's ``sha256`` (the MAE's set version) is the fingerprint the crops were cut from, hashed once:
    an edit after cropping must not relabel the old crops' MAE as the new files'."""
    import faceage.external as external
    from faceage.appa_real import dataset_fingerprint

    folder = make_set(tmp_path / "set", {"a.jpg": noise()})
    [ext] = resolve_external([str(folder)], tmp_path)
    before = dataset_fingerprint(folder)
    calls = []
    monkeypatch.setattr(external, "dataset_fingerprint", lambda f: calls.append(f) or dataset_fingerprint(f))
    faces = external_faces(ext, checkpoint_crop(detector_dir), detector_dir, tmp_path / "cache", workers=1)
    assert len(calls) == 1
    Image.fromarray(noise(5)).save(folder / "test" / "a.jpg")  # edited after its crops were cut
    assert external.set_version(faces, folder) == before != dataset_fingerprint(folder)
    assert len(calls) == 1
