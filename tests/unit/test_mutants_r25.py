"""Behaviours a hand mutation of ``faceage/`` broke without any test failing (review round 25).

Each test names the mutation it kills: checksum digests in capitals (``fetch_data.md5`` keeps the
case Windows prints), a corrupt file already at the destination, a failed staged build leaving its
scratch folder, a declared Content-Length over the cap (the UI path reads a body whole), the
MAE/RMSE/CS@5 and coverage maths at their boundaries, the calibrated std's centre, a failed
checkpoint write, the input normalisation, the 400/422 split, and the predictor scoring each face's
own crop and handing the rows of one batched pass back to their images (test_predict.py's untrained
MobileNet answers ~50.009 years for any input, so its equality checks could not see a wrong or
blank crop, nor a mix-up). All local: a 127.0.0.1 server, Starlette's TestClient, temp folders,
skimage's astronaut; no shared data.
"""

from __future__ import annotations

import hashlib
import os

import numpy as np
import pytest
import torch
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from faceage.download import download
from faceage.http import BodyLimitMiddleware
from tests.unit import test_download
from tests.unit.test_download import BODY, url

server = test_download.server  # the fixture (a local HTTP server serving BODY)

MD5 = hashlib.md5(BODY).hexdigest()
SHA = hashlib.sha256(BODY).hexdigest()


# --- download: checksums ------------------------------------------------------------------------


def test_a_checksum_in_capitals_verifies_a_fresh_download(server, tmp_path):
    """Mutant: ``got != expected`` (not ``expected.lower()``). params.yaml accepts ``fetch_data.md5`` in
    capitals (Get-FileHash, certutil print them so) and hands it to ``download`` as it is."""
    dest = download(url(server), tmp_path / "f.bin", md5=MD5.upper(), sha256=SHA.upper(), progress=False)
    assert dest.read_bytes() == BODY and not (tmp_path / "f.bin.part").exists()


def test_a_checksum_in_capitals_verifies_a_file_already_there(server, tmp_path):
    (tmp_path / "f.bin").write_bytes(BODY)
    download(url(server), tmp_path / "f.bin", md5=MD5.upper(), progress=False)
    assert server.requests == []


def test_a_corrupt_file_at_the_destination_is_fetched_again(server, tmp_path):
    """Mutant: ``if dest.exists():`` (no ``_matches``): a file already there was returned unverified.
    Only a correct file (test_download.py) was tried, which both versions keep."""
    (tmp_path / "f.bin").write_bytes(BODY[:1000] + b"corrupt")
    dest = download(url(server), tmp_path / "f.bin", sha256=SHA, progress=False)
    assert dest.read_bytes() == BODY
    assert server.requests == [None]  # one whole GET


# --- atomic: staged and scratch folders ---------------------------------------------------------


def test_a_failed_staged_build_leaves_the_old_output_and_no_scratch_folder(tmp_path):
    """Mutant: ``except BaseException: raise`` without the rmtree: each failed build left a hidden copy
    (of a whole data set, for fetch_data) beside the output until a later build cleared it."""
    from faceage.atomic import staged_dir

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(RuntimeError, match="boom"):
        with staged_dir(out) as staged:
            (staged / "new.txt").write_text("new")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert sorted(p.name for p in out.iterdir()) == ["old.txt"]


def test_a_scratch_folder_is_removed_after_use_and_after_a_failure(tmp_path):
    """Mutant: ``scratch_dir``'s ``finally`` without the rmtree (an unzipped source left beside the zip)."""
    from faceage.atomic import scratch_dir

    beside = tmp_path / "src.zip"
    with scratch_dir(beside, "unzip") as tmp:
        (tmp / "a").write_text("a")
    with pytest.raises(KeyError):
        with scratch_dir(beside, "unzip") as tmp:
            raise KeyError("x")
    assert list(tmp_path.iterdir()) == []


def test_a_stale_scratch_folder_of_a_dead_process_is_cleared(tmp_path):
    """Mutant: ``clear_stale`` never removing anything: only a folder of *another* PID namespace was tried."""
    import faceage.atomic as atomic

    out = tmp_path / "out"
    dead = atomic.scratch_name(out)
    dead = dead.with_name(dead.name.replace(f"-{os.getpid()}@", "-999999@"))  # no such process
    alive = atomic.scratch_name(out)  # this process: in use
    dead.mkdir()
    alive.mkdir()
    atomic.clear_stale(out)
    assert alive.is_dir() and not dead.exists()


# --- http: the declared Content-Length cap ------------------------------------------------------


def _capped(length_required: tuple[str, ...] = ()):
    seen = []

    async def echo(request: Request):
        body = await request.body()
        seen.append(len(body))
        return JSONResponse({"bytes": len(body)})

    app = Starlette(routes=[Route("/echo", echo, methods=["POST"]), Route("/ui/upload", echo, methods=["POST"])])
    return TestClient(BodyLimitMiddleware(app, max_bytes=1000, length_required=length_required)), seen


def test_a_declared_length_over_the_cap_is_refused_before_the_body_is_read():
    """Mutant: the Content-Length check off (``> max_bytes + 1024``): test_service_http's 1,001-byte body
    still got a 413, from the streamed count, so the declared-length check was untested."""
    client, seen = _capped()
    r = client.post("/echo", content=b"x" * 1001)
    assert r.status_code == 413 and r.json()["error"].startswith("request body of 1001 bytes is over the limit of 1000")
    assert seen == []


def test_a_ui_upload_over_the_cap_never_reaches_the_app():
    """The UI path reads a declared body whole into memory before the app sees it: without the
    declared-length check it read (and handed on) any size."""
    client, seen = _capped(length_required=("/ui",))
    assert client.post("/ui/upload", content=b"x" * 1000).status_code == 200  # at the cap: accepted
    r = client.post("/ui/upload", content=b"x" * 1001)
    assert r.status_code == 413 and "of 1001 bytes" in r.json()["error"]
    assert seen == [1000]


# --- evaluation maths -----------------------------------------------------------------------------


def test_mae_rmse_and_cs5_by_hand():
    """Mutants: ``err < cs_years`` (an error of exactly 5 years left out of CS@5) and the RMSE without its
    square root (the MSE): only integration runs on real data computed them, and checked neither."""
    from faceage.evaluation import age_metrics

    pred, true = np.array([25.0, 30.0, 40.0, 20.5]), np.array([20.0, 30.0, 30.0, 20.0])  # errors 5, 0, 10, 0.5
    m = age_metrics(pred, true)
    assert m["mae_years"] == pytest.approx(3.875)
    assert m["rmse_years"] == pytest.approx(np.sqrt((25 + 0 + 100 + 0.25) / 4))
    assert m["cs5"] == pytest.approx(0.75)
    assert age_metrics(pred, true, cs_years=10.0)["cs10"] == pytest.approx(1.0)


def test_coverage_counts_an_error_of_exactly_k_std_as_covered():
    """Mutant: ``<`` for ``<=`` in :func:`faceage.evaluation.coverage`."""
    from faceage.evaluation import coverage

    pred, std, true = np.array([10.0, 10.0, 10.0]), np.array([2.0, 2.0, 2.0]), np.array([12.0, 13.0, 15.0])
    assert coverage(pred, std, true, 1.0) == pytest.approx(1 / 3)
    assert coverage(pred, std, true, 2.0) == pytest.approx(2 / 3)


# --- inference ------------------------------------------------------------------------------------


def test_normalize_subtracts_the_mean_and_divides_by_the_std_per_channel():
    """Mutant: mean and std swapped. Training, evaluate, torch and ONNX all share ``normalize``, so every
    comparison between them agreed with the mutant; a pretrained backbone's inputs were wrong."""
    from faceage.transforms import normalize

    batch = torch.zeros(1, 3, 1, 2, dtype=torch.uint8)
    batch[..., 0] = 255
    out = normalize(batch, (0.5, 0.25, 0.0), (0.25, 0.5, 1.0))
    assert out.dtype == torch.float32
    assert out[0, :, 0, 0].tolist() == pytest.approx([2.0, 1.5, 1.0])  # white: (1 - mean) / std
    assert out[0, :, 0, 1].tolist() == pytest.approx([-2.0, -0.5, 0.0])  # black: -mean / std


def test_batched_rows_go_back_to_their_own_images():
    """Mutant: ``split_results`` without ``start += len(loc.boxes)``: every image got the first image's ages."""
    from faceage.faces import FaceBox
    from faceage.predict import LocatedFaces, split_results

    def located(n):
        return LocatedFaces(width=100, height=100, boxes=[FaceBox(i, i, i + 10, i + 10, 1.0) for i in range(n)],
                            crops=None)

    out = split_results([located(2), located(0), located(1)], np.array([20.0, 30.0, 40.0]), np.array([1.0, 2.0, 3.0]))
    assert [[(f.age, f.age_std) for f in faces] for faces in out] == [[(20.0, 1.0), (30.0, 2.0)], [], [(40.0, 3.0)]]
    assert out[2][0].box == (0, 0, 10, 10)


def test_an_unprocessable_image_is_422_and_an_undecodable_one_400():
    """Mutant: the two swapped in :func:`faceage.http.input_status` (only the served bento's tests saw it)."""
    from faceage.http import BadRequest, input_status
    from faceage.images import ImageDecodeError
    from faceage.serving import ImageProcessingError

    assert input_status(ImageProcessingError("the worker died on it")) == 422
    assert input_status(ImageDecodeError("not an image")) == 400
    assert input_status(BadRequest(415, "not multipart")) == 415


# --- model ----------------------------------------------------------------------------------------


def test_the_calibrated_std_is_the_spread_about_the_calibrated_centre():
    """Mutant: the spread taken about the temperature-1 mean. The two centres differ for a skewed
    distribution (every test used one where they coincide, or temperature 1)."""
    from faceage.model import expected_age

    logits = torch.full((1, 101), -30.0, dtype=torch.float64)
    logits[0, 20], logits[0, 21], logits[0, 40] = 4.0, 3.0, 1.0  # skewed: a long tail towards 40
    ages = torch.arange(101, dtype=torch.float64)
    mean, std = expected_age(logits, temperature=3.0)
    p1 = torch.softmax(logits, dim=1)[0]
    p3 = torch.softmax(logits / 3.0, dim=1)[0]
    centre = (p3 * ages).sum()
    assert mean.item() == pytest.approx((p1 * ages).sum().item(), abs=1e-4)  # the mean stays at temperature 1
    assert std.item() == pytest.approx(((p3 * (ages - centre) ** 2).sum()).sqrt().item(), abs=1e-3)


def test_a_checkpoint_write_that_fails_leaves_the_previous_checkpoint_whole(tmp_path, monkeypatch):
    """Mutant: ``save_checkpoint`` writing the file in place (no temporary + ``os.replace``): a write
    cut short (disk full, a kill) destroyed the model the last run shipped. Nothing else tried a failed write."""
    import faceage.model as model_module
    from faceage.model import build_model, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    net = build_model("mobilenet_v3_small")
    meta = {"backbone": "mobilenet_v3_small", "min_age": 0, "max_age": 100, "val_mae": 9.5}
    path = tmp_path / "model.pt"
    save_checkpoint(path, net, meta)

    def torn_save(obj, f, *a, **kw):
        with open(f, "wb") as out:
            out.write(b"PK\x03\x04 half a checkpoint")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(model_module.torch, "save", torn_save)
    with pytest.raises(OSError, match="No space"):
        save_checkpoint(path, net, {**meta, "val_mae": 8.0})
    monkeypatch.undo()
    _, loaded = load_checkpoint(path)
    assert loaded["val_mae"] == 9.5
    assert [p.name for p in tmp_path.iterdir()] == ["model.pt"]  # and no half-written model.pt.tmp beside it


# --- predictor: a model whose age depends on the face ---------------------------------------------


@pytest.fixture(scope="module")
def sensitive_predictor(tmp_path_factory):
    """An AgePredictor whose untrained ResNet-18 answers differently for different faces (test_predict.py's
    MobileNet answers 50.009 years for a face, a black square and noise alike, so its equality checks
    could not tell the face's crop from any other input). BatchNorm statistics from two random batches
    and a head scaled x30 spread its ages over tens of years."""
    from faceage.detector import HOG_FILE
    from faceage.download import file_digest
    from faceage.model import _last_linear, build_model, save_checkpoint
    from faceage.predict import AgePredictor
    from tests.unit.test_predict import make_detector_dir

    root = tmp_path_factory.mktemp("sensitive")
    detector = make_detector_dir(root / "detector")
    torch.manual_seed(0)
    net = build_model("resnet18").train()
    with torch.no_grad():
        for _ in range(2):
            net(torch.randn(16, 3, 32, 32))
        _last_linear(net)[2].weight.mul_(30)
    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 32,
            "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225], "val_mae": 9.5, "mlflow_run_id": "r1",
            "git_commit": "abc", "data_sha256": "d" * 64,
            "crop": {"margin": 0.4, "size": 96, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": file_digest(detector / HOG_FILE)}}
    save_checkpoint(root / "model.pt", net.eval(), meta)
    return AgePredictor(root / "model.pt", detector, threads=1)


def test_the_predictor_scores_each_face_s_own_crop(sensitive_predictor):
    """Mutant: ``AgePredictor.estimate`` handing the model blank crops (or any crops but the faces'):
    test_predict.py, test_serving_r24.py and test_cli_inputs.py all passed with it."""
    from skimage import data as skimage_data

    from faceage.faces import FaceBox, crop_face

    astronaut = skimage_data.astronaut()
    mirrored = np.ascontiguousarray(astronaut[:, ::-1])
    faces = sensitive_predictor.predict(astronaut)
    assert faces
    crops = [crop_face(astronaut, FaceBox(*f.box, f.score), 0.4, 96) for f in faces]
    age, std = sensitive_predictor.estimate(crops)
    [blank_age], _ = sensitive_predictor.estimate([np.zeros_like(crops[0])])
    assert abs(age[0] - blank_age) > 1.0  # the check below has teeth: another crop, another age
    assert [(f.age, f.age_std) for f in faces] == [pytest.approx((a, s), abs=1e-3) for a, s in zip(age, std)]
    together = sensitive_predictor.predict_many([astronaut, np.zeros((64, 64, 3), np.uint8), mirrored])
    alone = [faces, [], sensitive_predictor.predict(mirrored)]
    assert abs(alone[0][0].age - alone[2][0].age) > 0.1  # the mirrored face is another input
    assert [[f.box for f in r] for r in together] == [[f.box for f in r] for r in alone]
    for batched, single in zip(together, alone):
        assert [f.age for f in batched] == pytest.approx([f.age for f in single], abs=1e-3)
