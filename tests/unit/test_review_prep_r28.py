"""Round 28 review of the crop path: dlib files that the manifest does not vouch for, or that dlib cannot read."""

import json
import shutil

import numpy as np
import pytest
from PIL import Image
from skimage.data import astronaut

from faceage.appa_real import Sample
from faceage.chips import ChipExtractor
from faceage.config import PreprocessParams
from faceage.detector import MANIFEST, SHAPE5_FILE, DetectorFilesError
from faceage.preprocess import crop_samples


def _copy_detector(detector_dir, dest):
    shutil.copytree(detector_dir, dest)
    return dest


def test_a_cut_short_shape_predictor_is_named_when_the_chip_cutter_loads_it(tmp_path, detector_dir):
    """ChipExtractor loaded the 5-point model with dlib directly: a cut-short file failed with dlib's own
    "Error deserializing a floating point number", naming neither the file nor what to do (the face encoder,
    which loads the same file, and the detectors already said both)."""
    det = _copy_detector(detector_dir, tmp_path / "det")
    whole = (detector_dir / SHAPE5_FILE).read_bytes()
    (det / SHAPE5_FILE).write_bytes(whole[:5000])
    with pytest.raises(DetectorFilesError, match=rf"{SHAPE5_FILE} is not a dlib model file.*fetch_detector"):
        ChipExtractor(det, 0.4)


def test_a_manifest_that_does_not_list_the_shape_predictor_stops_the_crops_before_any_work(tmp_path, detector_dir):
    """crop_samples read the shape predictor's sha256 from the manifest only after every photo was cropped: a
    manifest without that entry (the file unverified all along) ended the run in a bare KeyError after the work."""
    _crops_stop_without(SHAPE5_FILE, tmp_path, detector_dir, PreprocessParams(workers=1, cnn_retry_side=0))


def _crops_stop_without(unlisted: str, tmp_path, detector_dir, params: PreprocessParams) -> None:
    """With ``unlisted`` taken out of a copy of the detector manifest, cropping one real photo stops with the
    manifest's error before any crop is written."""
    det = _copy_detector(detector_dir, tmp_path / "det")
    manifest = json.loads((det / MANIFEST).read_text())
    del manifest["files"][unlisted]
    (det / MANIFEST).write_text(json.dumps(manifest))
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    Image.fromarray(astronaut()).save(data / "test" / "astronaut.png")
    out = tmp_path / "faces"
    out.mkdir()
    with pytest.raises(DetectorFilesError, match=rf"{MANIFEST} lists no {unlisted}.*fetch_detector"):
        crop_samples({"test": [Sample("test", "astronaut.png", 30.0, 0.0, 30.0)]}, data, det, out, params)
    assert list(out.iterdir()) == []  # nothing cropped


def test_the_crop_path_still_cuts_a_real_face_with_a_complete_manifest(tmp_path, detector_dir):
    """The check above lets a complete folder through: one real face, one crop and one chip pair."""
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    Image.fromarray(astronaut()).save(data / "test" / "astronaut.png")
    out = tmp_path / "faces"
    out.mkdir()
    rows = crop_samples({"test": [Sample("test", "astronaut.png", 30.0, 0.0, 30.0)]}, data, detector_dir, out,
                        PreprocessParams(workers=1, cnn_retry_side=0, size=64))
    assert [r["status"] for r in rows] == ["face"]
    assert np.asarray(Image.open(out / "test" / "astronaut.png")).shape == (64, 64, 3)
    with np.load(out / "chips.npz") as z:
        assert z["crops"].tolist() == ["test/astronaut.png"] and z["chips"].shape == (1, 3, 64, 64)


def test_a_manifest_without_the_cnn_file_its_last_look_reads_stops_the_crops_before_any_work(tmp_path, detector_dir):
    """The up-front check takes its list of files from the rules that record them (``crop_settings``): a HOG run
    whose CNN last look is on needs the CNN detector's sha256 too, and is stopped before any photo is cropped."""
    from faceage.detector import CNN_FILE

    _crops_stop_without(CNN_FILE, tmp_path, detector_dir, PreprocessParams(workers=1, detector="hog", cnn_retry_side=320))
