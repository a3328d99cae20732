"""AgePredictor and its serving helpers on a real face (skimage's astronaut) and a small random model.

The network is untrained, so ages are checked for range and consistency, never for accuracy.
"""

from __future__ import annotations

import asyncio
import io
import json
from pathlib import Path

import dlib
import numpy as np
import pytest
import torch
from PIL import Image

from faceage.detector import HOG_FILE
from faceage.download import file_digest
from faceage.faces import FaceBox, FaceDetector, crop_faces
from faceage.images import ImageDecodeError
from faceage.model import build_model, save_checkpoint
from faceage.predict import AgePredictor, FaceAge, FaceLocator, PredictorError, split_results
from faceage.serving import AgeBatcher, LocatorPool
from tests.conftest import make_detector_dir

# A declared test dependency (pyproject's test extra): missing, the run fails rather than skipping these tests.
from skimage import data as skimage_data


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return skimage_data.astronaut()  # 512x512 RGB, one frontal face (public domain, NASA)


def make_checkpoint(path, detector_dir, *, detector_sha256=None, image_size=32, **crop):
    torch.manual_seed(0)
    model = build_model("mobilenet_v3_small").eval()
    meta = {"backbone": "mobilenet_v3_small", "min_age": 0, "max_age": 100, "image_size": image_size,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "val_mae": 9.5, "mlflow_run_id": "r1",
            "git_commit": "abc", "data_sha256": "d" * 64,
            "crop": {"margin": 0.4, "size": 96, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": detector_sha256 or file_digest(detector_dir / HOG_FILE), **crop}}
    save_checkpoint(path, model, meta)
    return path


def model_files(root: Path) -> dict:
    """A detector folder and a small checkpoint made with it, under ``root``: ``{"root", "detector", "checkpoint"}``."""
    detector = make_detector_dir(root / "detector")
    return {"root": root, "detector": detector, "checkpoint": make_checkpoint(root / "model.pt", detector)}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    return model_files(tmp_path_factory.mktemp("predictor"))


@pytest.fixture(scope="module")
def predictor(files) -> AgePredictor:
    return AgePredictor(files["checkpoint"], files["detector"], threads=1)


def test_predict_gives_the_age_model_s_answer_for_the_face_crop(predictor, files, astronaut):
    faces = predictor.predict(astronaut)
    assert len(faces) >= 1
    face = faces[0]
    x1, y1, x2, y2 = face.box
    assert 0 <= x1 < x2 <= 512 and 0 <= y1 < y2 <= 512
    # The untrained network's age is no check; equality with the model scoring the one crop path's crop is.
    from faceage.faces import crop_face
    from faceage.inference import AgeModel

    crop = crop_face(astronaut, FaceBox(x1, y1, x2, y2, face.score), 0.4, 96)
    age, std = AgeModel(files["checkpoint"], device="cpu").predict_crops([crop])
    assert (face.age, face.age_std) == pytest.approx((age[0], std[0]), abs=1e-4)
    assert face.as_dict() == {"box": [x1, y1, x2, y2], "age": round(face.age, 4), "age_std": round(face.age_std, 4),
                              "score": face.score}


def two_sizes(astronaut: np.ndarray) -> np.ndarray:
    """The astronaut's face (her 90 px box at (175, 76) with 60 px around it) pasted twice on grey: at 0.8x on
    the left, at 1.5x on the right. dlib scores the small one higher, so it lists it first."""
    face = Image.fromarray(astronaut[16:226, 115:325])
    canvas = np.full((400, 700, 3), 128, np.uint8)
    for scale, x in ((0.8, 20), (1.5, 300)):
        f = np.asarray(face.resize((round(210 * scale), round(210 * scale)), Image.Resampling.BICUBIC))
        canvas[20 : 20 + f.shape[0], x : x + f.shape[1]] = f
    return canvas


def test_faces_come_largest_first(predictor, files, astronaut):
    photo = two_sizes(astronaut)
    rects, _, _ = dlib.get_frontal_face_detector().run(photo, 1, 0.0)
    raw = [r.width() * r.height() for r in rects]
    assert len(raw) == 2 and raw[0] < raw[1]  # dlib's own order is not largest first: the sort is tested

    faces = predictor.predict(photo)
    areas = [(f.box[2] - f.box[0]) * (f.box[3] - f.box[1]) for f in faces]
    assert len(areas) == 2 and areas[0] > areas[1]
    assert faces[0].box[0] > 300 > faces[1].box[2]  # the large copy (right), then the small one (left)
    detector = FaceDetector(files["detector"], "hog", 1)
    for parallel in (False, True):
        boxes = detector.detect(photo, parallel=parallel)
        assert [b.area for b in boxes] == sorted((b.area for b in boxes), reverse=True) and len(boxes) == 2


def test_crops_are_preprocess_crops(predictor, astronaut):
    """One inference path: the checkpoint's detector settings, then faces.crop_faces."""
    located = predictor.locator.locate(astronaut)
    detector = FaceDetector(predictor.locator.detector.path.parent, "hog", 1)
    expected = crop_faces(astronaut, detector.detect(astronaut), 0.4, 96)
    assert len(located.crops) == len(expected) >= 1
    for got, want in zip(located.crops, expected):
        assert got.dtype == np.uint8 and got.shape == (96, 96, 3)
        assert np.array_equal(got, want)


def test_no_face_is_an_empty_list(predictor):
    flat = np.full((200, 300, 3), 127, np.uint8)
    assert predictor.predict(flat) == []
    assert predictor.predict_many([flat, flat]) == [[], []]


def test_batching_many_images_gives_the_same_ages(predictor, astronaut):
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    together = predictor.predict_many([astronaut, np.zeros((64, 64, 3), np.uint8), mirrored])
    alone = [predictor.predict(astronaut), [], predictor.predict(mirrored)]
    assert [len(r) for r in together] == [len(r) for r in alone]
    for batch_faces, single_faces in zip(together, alone):
        for a, b in zip(batch_faces, single_faces):
            assert a.box == b.box
            assert a.age == pytest.approx(b.age, abs=1e-3) and a.age_std == pytest.approx(b.age_std, abs=1e-3)


def test_large_images_are_detected_downscaled_but_cropped_at_full_size(files, astronaut):
    big = np.asarray(Image.fromarray(astronaut).resize((1536, 1536), Image.Resampling.BICUBIC))
    full = FaceLocator(files["detector"], kind="hog", upsample=1, margin=0.4, crop_size=96, max_detect_pixels=0)
    capped = FaceLocator(files["detector"], kind="hog", upsample=1, margin=0.4, crop_size=96,
                         max_detect_pixels=512 * 512)
    want, got = full.locate(big), capped.locate(big)
    assert len(got.boxes) >= 1 and (got.width, got.height) == (1536, 1536)
    a, b = want.boxes[0], got.boxes[0]
    inter = max(0, min(a.right, b.right) - max(a.left, b.left)) * max(0, min(a.bottom, b.bottom) - max(a.top, b.top))
    assert inter / (a.area + b.area - inter) > 0.7  # same face, box in full-image pixels
    assert got.crops[0].shape == (96, 96, 3)
    # Detected on the 512 x 512 box-filtered copy, its boxes scaled by 3: not at full size (the IoU above
    # holds either way, so a detector that never downscaled passed it).
    small = np.asarray(Image.fromarray(big).resize((512, 512), Image.Resampling.BOX))
    on_small = FaceDetector(files["detector"], "hog", 1, max_detect_pixels=0).detect(small)
    assert on_small and got.boxes == [FaceBox(3 * f.left, 3 * f.top, 3 * f.right, 3 * f.bottom, f.score)
                                      for f in on_small]
    assert got.boxes != want.boxes
    # preprocess's detector (FaceDetector itself, which FaceLocator delegates to) cuts the same boxes
    assert FaceDetector(files["detector"], "hog", 1, max_detect_pixels=512 * 512).detect(big) == got.boxes


def test_a_detector_file_other_than_the_checkpoints_is_refused(tmp_path, files):
    bad = make_checkpoint(tmp_path / "m.pt", files["detector"], detector_sha256="0" * 64)
    with pytest.raises(PredictorError, match=f"{HOG_FILE} with sha256 [0-9a-f]{{64}}, but the checkpoint was trained with 0+"):
        AgePredictor(bad, files["detector"], threads=1)


def test_missing_files_are_named(tmp_path, files):
    with pytest.raises(PredictorError, match="checkpoint .*nope.pt not found"):
        AgePredictor(tmp_path / "nope.pt", files["detector"])
    with pytest.raises(PredictorError, match=f"detector file .*{HOG_FILE} not found"):
        AgePredictor(files["checkpoint"], tmp_path)


def test_split_results_checks_row_counts(predictor, astronaut):
    located = predictor.locator.locate(astronaut)
    n = len(located.boxes)
    faces = split_results([located], np.arange(n, dtype=float), np.ones(n))[0]
    assert [f.age for f in faces] == list(range(n))
    with pytest.raises(ValueError, match=f"{n} faces but {n + 1} ages"):
        split_results([located], np.zeros(n + 1), np.zeros(n + 1))


def test_batcher_merges_requests_that_wait_and_routes_rows_back():
    calls: list[int] = []

    def estimate(crops):
        calls.append(len(crops))
        ages = np.array([float(c[0, 0, 0]) for c in crops])
        return ages, ages / 10

    def crops(*values):
        return [np.full((4, 4, 3), v, np.uint8) for v in values]

    async def scenario():
        batcher = AgeBatcher(estimate, max_batch_faces=8)
        first = asyncio.ensure_future(batcher(crops(1, 2)))
        await asyncio.sleep(0)  # the first batch starts alone: no waiting when idle
        rest = [asyncio.ensure_future(batcher(crops(*v))) for v in ((3,), (4, 5), (6,))]
        return await asyncio.gather(first, *rest)

    results = asyncio.run(scenario())
    assert [list(mean) for mean, _ in results] == [[1, 2], [3], [4, 5], [6]]
    assert [list(std) for _, std in results][2] == [0.4, 0.5]
    assert calls == [2, 4]  # the three requests that arrived meanwhile shared one pass


def test_batcher_respects_max_batch_faces_and_passes_errors_on():
    calls: list[int] = []

    def estimate(crops):
        calls.append(len(crops))
        if len(crops) == 3:
            raise RuntimeError("model failed")
        return np.zeros(len(crops)), np.zeros(len(crops))

    async def scenario():
        batcher = AgeBatcher(estimate, max_batch_faces=2)
        jobs = [asyncio.ensure_future(batcher([np.zeros((2, 2, 3), np.uint8)] * n)) for n in (1, 1, 1, 3)]
        return await asyncio.gather(*jobs, return_exceptions=True)

    results = asyncio.run(scenario())
    assert calls == [2, 1, 3]  # two requests fit a batch of 2; one request is never split
    assert isinstance(results[3], RuntimeError) and not isinstance(results[0], Exception)
    assert asyncio.run(AgeBatcher(estimate)([]))[0].shape == (0,)


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image).save(buf, format="PNG")
    return buf.getvalue()


@pytest.mark.parametrize("processes", [0, 1])
def test_locator_pool_decodes_in_memory_like_the_locator(predictor, astronaut, processes):
    async def scenario():
        pool = LocatorPool(predictor.locator, processes)
        try:
            assert not pool.busy
            task = asyncio.create_task(pool.locate(_png(astronaut), with_image=True))
            await asyncio.sleep(0)  # the task has handed the photo on and waits for it
            assert pool.busy
            located, image = await task
            assert not pool.busy
            lean, _ = await pool.locate(_png(astronaut), crops=False)
            with pytest.raises(ImageDecodeError, match="not an image"):
                await pool.locate(b"plain text, not a picture")
            assert not pool.busy
            return located, image, lean
        finally:
            pool.close()

    located, image, lean = asyncio.run(scenario())
    want = predictor.locator.locate(astronaut)
    assert np.array_equal(image, astronaut)
    assert located.boxes == want.boxes and all(np.array_equal(a, b) for a, b in zip(located.crops, want.crops))
    # This model reads the crops: they are cut even when not asked for.
    assert lean.boxes == want.boxes and all(np.array_equal(a, b) for a, b in zip(lean.inputs, want.crops))


def test_pool_detects_on_two_threads_only_while_half_the_cores_are_free(predictor, astronaut, monkeypatch):
    """One photo on two cores: its detection gets both (the same faces); a second photo at the same
    time: each keeps to one core. The flag travels to the worker process."""
    import faceage.predict

    seen = []
    real = faceage.predict.FaceLocator.locate

    def spy(self, image, *, crops=True, parallel=False):
        seen.append(parallel)
        return real(self, image, crops=crops, parallel=parallel)

    monkeypatch.setattr(faceage.predict.FaceLocator, "locate", spy)

    async def scenario(cores):
        pool = LocatorPool(predictor.locator, 0)
        pool.cores = cores
        try:
            one = await pool.locate(_png(astronaut))
            both = await asyncio.gather(pool.locate(_png(astronaut)), pool.locate(_png(astronaut)))
            return one, both
        finally:
            pool.close()

    one, both = asyncio.run(scenario(2))
    # alone: two threads; of two at once, the first was alone when admitted, the second keeps to one core
    assert seen == [True, True, False]
    want = predictor.locator.locate(astronaut)
    assert one[0].boxes == want.boxes == both[0][0].boxes == both[1][0].boxes
    seen.clear()
    asyncio.run(scenario(1))
    assert seen == [False, False, False]  # one core: never


def test_the_checkpoints_retry_pad_reaches_the_cli_and_the_services_detection_processes(files, predictor, astronaut):
    """A face that fills the frame: a checkpoint made with ``retry_pad`` answers for it in the
    predictor and in a detection process (its settings travel); an older checkpoint, whose
    ``crop`` has no ``retry_pad``, keeps finding nothing there, as its preprocess did."""
    face = predictor.locator.detect(astronaut)[0]
    inset = int(0.1 * face.width)
    tight = np.ascontiguousarray(astronaut[face.top + inset:face.bottom - inset, face.left + inset:face.right - inset])
    assert predictor.predict(tight) == []
    retry = AgePredictor(make_checkpoint(files["root"] / "retry.pt", files["detector"], retry_pad=0.35),
                         files["detector"], threads=1)
    assert retry.locator.settings()["retry_pad"] == 0.35
    (found,) = retry.predict(tight)
    assert found.box[2] - found.box[0] >= 0.8 * tight.shape[1]

    async def in_a_process():
        pool = LocatorPool(retry.locator, 1)
        try:
            return (await pool.locate(_png(tight)))[0]
        finally:
            pool.close()

    assert asyncio.run(in_a_process()).boxes == retry.locator.locate(tight).boxes


def test_face_age_is_json_ready():
    face = FaceAge(box=(1, 2, 3, 4), age=30.5, age_std=4.0, score=0.9)
    assert json.loads(json.dumps(face.as_dict())) == {"box": [1, 2, 3, 4], "age": 30.5, "age_std": 4.0, "score": 0.9}
    # float32 noise past AGE_DECIMALS depends on the faces sharing a forward pass: the CLI and the service round it
    noisy = FaceAge(box=(1, 2, 3, 4), age=30.12345678, age_std=4.00000381, score=0.9)
    assert (noisy.as_dict()["age"], noisy.as_dict()["age_std"]) == (30.1235, 4.0)
