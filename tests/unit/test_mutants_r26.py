"""Behaviours a hand mutation of ``faceage/`` broke without any test failing (review round 26).

Round 25's hand mutations (``test_mutants_r25.py``) covered download, http, inference, model,
predict and parts of atomic and evaluation; these cover modules it left: transforms (rounding, no
vertical flip), atomic (tagged scratch folders, another user's build, the swap's failure path, the
lock), evaluation (low-resolution MAE of chip pairs, the external sets' MLflow names), chips (the
age network's manifest constants, the face box the landmark fit reads, the crop map's margin),
dlib_age (the ensemble's inputs), finetune (layer-wise learning rates, which settings ask for dlib's
own head, the cached low-resolution copies) and sweep (the verdict's numbers). Each test names the
mutation it kills. All local and fast: temp folders and synthetic tensors; the manifest test reads
the session's ``detector_dir`` (the offline face-recognition-models package and the age network's
cached wheel).
"""

from __future__ import annotations

import os
import threading

import numpy as np
import pytest
import torch

# --- transforms -----------------------------------------------------------------------------------


def test_low_resolution_rounds_to_the_nearest_level_instead_of_darkening():
    """Mutant: ``low_resolution`` without ``.round()`` (the uint8 cast truncates): every degraded face
    came out half a level darker on average, in training's low_res copies and evaluate's mae_low_res."""
    from faceage.transforms import low_resolution

    x = torch.randint(0, 256, (4, 3, 64, 64), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    y = low_resolution(x, 24)
    assert abs((y.float() - x.float()).mean().item()) < 0.1  # truncated: -0.5



def test_training_augmentation_never_turns_a_face_upside_down():
    """Mutant: a ``RandomVerticalFlip`` in ``train_augment``: the tests checked only that augmentation
    changes images and where the low-resolution step sits, so half the training faces upside down passed."""
    from faceage.transforms import train_augment

    face = torch.zeros(3, 64, 64, dtype=torch.uint8)
    face[:, :32] = 200  # bright above, dark below
    augment = train_augment(augment=True)
    torch.manual_seed(0)
    for _ in range(40):
        out = augment(face).float()
        assert out[:, 8:24].mean() > out[:, 40:56].mean() + 50

# --- atomic ---------------------------------------------------------------------------------------


def _dead(path):
    """``path`` (a :func:`faceage.atomic.scratch_name`) as a process that no longer runs would have named it."""
    return path.with_name(path.name.replace(f"-{os.getpid()}@", "-999999@"))


def test_a_tagged_scratch_folder_of_a_dead_process_is_cleared(tmp_path):
    """Mutant: ``clear_stale``'s pattern without its ``(-tag)?``: the folders ``staged_dir`` moves the previous
    output into (``-old``, a whole data set) and ``scratch_dir``'s (``-unzip``) stayed for ever after a kill.
    Round 25's test tried an untagged folder only."""
    import faceage.atomic as atomic

    out = tmp_path / "out"
    old, unzip = _dead(atomic.scratch_name(out, "old")), _dead(atomic.scratch_name(out, "unzip"))
    old.mkdir()
    unzip.mkdir()
    (tmp_path / "other").mkdir()  # not a scratch folder of out: kept
    atomic.clear_stale(out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other"]


def test_a_scratch_folder_of_another_users_process_is_kept(tmp_path, monkeypatch):
    """Mutant: ``_running`` answering False on PermissionError: a build another user runs beside the same
    output (its PID signalable only by its owner) had its folder removed under it."""
    import faceage.atomic as atomic

    out = tmp_path / "out"
    theirs = _dead(atomic.scratch_name(out))
    theirs.mkdir()

    def kill(pid, sig):
        raise PermissionError(1, "Operation not permitted")

    monkeypatch.setattr(atomic.os, "kill", kill)
    atomic.clear_stale(out)
    assert theirs.is_dir()


def test_staged_and_scratch_folders_clear_what_killed_builds_left(tmp_path):
    """Mutant: ``scratch_dir`` without its ``clear_stale`` call (a killed fetch's unzipped copy of the release
    stayed beside the zip for ever; only ``clear_stale`` itself and ``staged_dir``, through fetch, were tested).
    ``staged_dir``'s call is checked on the way."""
    from faceage.atomic import scratch_dir, scratch_name, staged_dir

    out = tmp_path / "out"
    left = _dead(scratch_name(out))
    left.mkdir()
    with staged_dir(out) as staged:
        (staged / "a").write_text("a")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    left = _dead(scratch_name(tmp_path / "src.zip", "unzip"))
    left.mkdir()
    with scratch_dir(tmp_path / "src.zip", "unzip"):
        pass
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_a_swap_that_fails_puts_the_previous_output_back(tmp_path, monkeypatch):
    """Mutant: the ``except`` branch not moving the previous output back: when the second rename failed
    (the output folder held open on Windows, a full disk's metadata), the previous output was left only
    in a hidden ``-old`` folder and the output itself was gone."""
    import faceage.atomic as atomic

    out = tmp_path / "out"
    out.mkdir()
    (out / "v.txt").write_text("old")
    real = os.replace

    def replace(src, dst):
        if os.fspath(dst) == os.fspath(out) and not os.fspath(src).endswith("-old"):  # staged -> out
            raise OSError(16, "Device or resource busy")
        return real(src, dst)

    monkeypatch.setattr(atomic.os, "replace", replace)
    with pytest.raises(OSError, match="busy"):
        with atomic.staged_dir(out) as staged:
            (staged / "v.txt").write_text("new")
    assert (out / "v.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_the_build_lock_is_exclusive(tmp_path):
    """Mutants: ``flock`` with ``LOCK_SH``, first try or the blocking wait: processes built the shared output
    side by side (every one at once, or all those that had waited, together). test_atomic.py only tried a
    holder that was killed. (``flock`` locks belong to the open file, so threads that each open it conflict
    as processes do.)"""
    import time

    from faceage.atomic import locked

    target = tmp_path / "entry"
    inside, most, guard = [0], [0], threading.Lock()
    held, release = threading.Event(), threading.Event()

    def build(first: bool):
        with locked(target):
            with guard:
                inside[0] += 1
                most[0] = max(most[0], inside[0])
            if first:
                held.set()
                release.wait(30)
            else:
                time.sleep(0.3)
            with guard:
                inside[0] -= 1

    first = threading.Thread(target=build, args=(True,))
    first.start()
    assert held.wait(30)
    waiters = [threading.Thread(target=build, args=(False,)) for _ in range(2)]
    for t in waiters:
        t.start()
    time.sleep(0.5)  # both wait on the held lock
    release.set()
    for t in (first, *waiters):
        t.join(30)
    assert most[0] == 1


# --- evaluation -----------------------------------------------------------------------------------


def test_low_res_mae_of_chip_pairs_takes_the_share_of_the_age_chips_side():
    """Mutant: ``low_res_mae`` taking the side of the whole input (``images.shape[-1]``) instead of
    ``reference_side``: for the fused head's (3, 214, 150) pairs that is 150, so evaluate.low_res=0.25
    asked for a 38 px age chip (of 64: nearly the chip itself) and a 88 px face chip, and mae_low_res
    reported a fused model as hardly hurt by small faces."""
    from types import SimpleNamespace

    from faceage.chips import CHIP_SIZE, PAIR_SHAPE, split_pair
    from faceage.evaluation import low_res_mae
    from faceage.inputs import DLIB_CHIP_PAIR
    from faceage.transforms import low_resolution

    seen = []

    def predict_inputs(images, batch_size):
        seen.append(images.clone())
        return np.full(len(images), 30.0), np.ones(len(images))

    model = SimpleNamespace(meta={"input": DLIB_CHIP_PAIR}, predict_inputs=predict_inputs)
    pairs = torch.randint(0, 256, (2, *PAIR_SHAPE), generator=torch.Generator().manual_seed(0), dtype=torch.uint8)
    assert low_res_mae(model, pairs, np.array([30.0, 40.0]), (0.25,), 8) == {"0.25": 5.0}
    age, _ = split_pair(seen[0])
    want = low_resolution(split_pair(pairs)[0].contiguous(), round(0.25 * CHIP_SIZE))  # a 16 px age chip
    assert torch.equal(age, want)


# --- chips ----------------------------------------------------------------------------------------


def test_the_chip_constants_are_the_age_networks_manifest(detector_dir):
    """Mutants: ``CHIP_MEAN`` in BGR order, ``CHIP_PADDING`` 0.25 (the face chip's): the torch/ONNX parity
    test feeds both sides through the same constants and passed with either. The manifest shipped with
    ``age-v1.onnx`` (fetched beside it as ``age_manifest.json``) is what they must equal."""
    import json

    from faceage.chips import CHIP_MEAN, CHIP_PADDING, CHIP_SCALE, CHIP_SIZE
    from faceage.detector import AGE_MANIFEST_FILE

    manifest = json.loads((detector_dir / AGE_MANIFEST_FILE).read_text())
    age = manifest["models"]["age"]["input"]
    assert age["color_order"] == "RGB" and age["shape"][1:] == [3, CHIP_SIZE, CHIP_SIZE]
    assert list(CHIP_MEAN) == pytest.approx(age["normalization"]["means"], abs=1e-9)
    assert CHIP_SCALE == pytest.approx(age["normalization"]["scale"])
    assert CHIP_PADDING == pytest.approx(manifest["preprocessing"]["face_chip_padding"])


@pytest.mark.parametrize("margin", [0.2, 0.4, 0.5])
def test_the_landmark_fit_reads_the_detected_box_inside_its_region(margin):
    """Mutant: ``face_rect`` without the ``- 1`` (dlib's rectangles include their right and bottom pixel):
    the shape predictor was handed a box one pixel wider and taller than the detected face."""
    import dlib

    from faceage.chips import face_rect
    from faceage.faces import FaceBox, crop_box

    box = FaceBox(230, 110, 330, 210, 1.0)  # 100 px
    x0, y0, x1, y1 = crop_box(box, margin)
    assert face_rect(x1 - x0, margin) == dlib.rectangle(box.left - x0, box.top - y0, box.right - 1 - x0,
                                                        box.bottom - 1 - y0)


# --- dlib_age: the ensemble head's inputs -----------------------------------------------------------


def test_the_ensemble_members_read_standardised_inputs():
    """Mutants: ``AgeEnsemble.forward`` without the division by ``in_std``, and ``fit_input_stats`` without
    its floor: every test fitted the statistics and compared the model with itself (torch against its own
    ONNX export), so the members reading unstandardised inputs passed, and an input constant over the
    training split (std 0) made every prediction NaN."""
    from faceage.dlib_age import AgeEnsemble

    torch.manual_seed(0)
    head = AgeEnsemble(num_ages=5, members=2, hidden=8, in_features=4).eval()
    x = torch.randn(32, 4) * torch.tensor([1.0, 10.0, 100.0, 0.0]) + torch.tensor([0.0, 5.0, -50.0, 3.0])
    head.fit_input_stats(x)
    assert head.in_std[3] > 0 and torch.isfinite(head(x)).all()
    z = (x - x.mean(0)) / x.std(0).clamp_min(1e-6)
    want = torch.log(torch.stack([torch.softmax(m(z), dim=1) for m in head.members]).mean(0))
    assert torch.allclose(head(x), want, atol=1e-5)


def test_the_members_read_the_pretrained_heads_log_probabilities():
    """Mutant: ``AgeEnsemble.inputs`` passing ``fc``'s raw logits (no ``log_softmax``): the docstring's
    "log-probabilities of the 81 ages" and the ONNX export agreed with the mutant, as both read the same code."""
    from faceage.dlib_age import FEATURE_DIM, PRETRAINED_AGES, AgeEnsemble

    features, logits = torch.randn(3, FEATURE_DIM), torch.randn(3, 101) * 5 + 40
    x = AgeEnsemble.inputs(features, logits)
    assert x.shape == (3, FEATURE_DIM + PRETRAINED_AGES) and torch.equal(x[:, :FEATURE_DIM], features)
    assert torch.allclose(x[:, FEATURE_DIM:].exp().sum(1), torch.ones(3), atol=1e-5)  # a distribution over 0..80
    assert torch.allclose(x[:, FEATURE_DIM:], torch.log_softmax(logits[:, :PRETRAINED_AGES], dim=1))


# --- finetune: layer-wise learning rates ----------------------------------------------------------


def test_layer_wise_learning_rates_fall_from_the_head_down_and_frozen_stages_stay_out():
    """Mutants: the exponent ``depth`` for ``len(groups) - 1 - depth`` (the head got the smallest rate and
    the lowest trained stage ``train.lr``: the opposite of the README's recipe), and ``<=`` for ``<`` in the
    freeze (one stage more frozen than ``train.freeze_blocks`` says). Only the log line was tested."""
    from dataclasses import replace

    from faceage.config import TrainParams
    from faceage.dlib_age import DlibAgeNet
    from faceage.finetune import param_groups, stages

    model = DlibAgeNet(101)
    p = replace(TrainParams(), backbone="dlib_age", head="pretrained", lr=1e-3, freeze_blocks=2, layer_lr_decay=0.5)
    groups = param_groups(model, p)
    by_stage = stages(model, "dlib_age")
    assert [g["params"] for g in groups] == by_stage[2:]  # stem and block1 frozen, block2..fc trained
    assert [g["lr"] for g in groups] == pytest.approx([1e-3 * 0.5 ** k for k in (4, 3, 2, 1, 0)])  # fc: train.lr
    assert not any(t.requires_grad for stage in by_stage[:2] for t in stage)
    assert all(t.requires_grad for stage in by_stage[2:] for t in stage)



@pytest.mark.parametrize("setting", [{"layer_lr_decay": 0.5}, {"distill_weight": 1.0}])
def test_each_fine_tuning_setting_alone_asks_for_dlibs_own_head(setting):
    """Mutant: ``uses_finetune_hooks`` forgetting ``layer_lr_decay``: ``train.layer_lr_decay=0.5`` alone then
    trained the fused ensemble (where it does nothing) under ``head=auto``, and was accepted with a CNN.
    test_dlib_age.py tried ``freeze_blocks`` with ``wise_ft`` only."""
    from dataclasses import replace

    from faceage.config import ConfigError, TrainParams
    from faceage.finetune import check_params, resolve_head

    assert resolve_head(replace(TrainParams(), backbone="dlib_age", **setting)) == "pretrained"
    with pytest.raises(ConfigError, match="apply to train.backbone=dlib_age"):
        check_params(replace(TrainParams(), backbone="resnet18", **setting))

# --- evaluation: the external sets' MLflow metrics ---------------------------------------------------


def test_external_metrics_keep_cs_years_the_group_names_and_the_low_res_maes():
    """Mutants in ``external_mlflow_metrics``: the CS key fixed at ``cs5`` (evaluate.cs_years=10 logged the
    CS@10 as ``_cs5``), the ``+`` of ``70+`` kept (MLflow refuses the name: evaluate failed after scoring),
    the low-resolution MAEs dropped."""
    from faceage.evaluation import external_mlflow_metrics

    m = {"mae_years": 7.0, "rmse_years": 9.0, "cs10": 0.8, "baseline_mae_years": 12.0, "n_faces": 9, "n_images": 10,
         "no_face": 1, "unreadable": 0, "mae_by_age_group": {"20-29": 5.0, "70+": 11.0}, "mae_low_res": {"0.5": 8.5}}
    flat = external_mlflow_metrics({"utk": m}, 10.0)
    assert flat["external_utk_cs10"] == 0.8 and "external_utk_cs5" not in flat
    assert flat["external_utk_mae_70plus"] == 11.0 and flat["external_utk_mae_20-29"] == 5.0
    assert flat["external_utk_mae_low_res_0.5"] == 8.5
    assert all("+" not in k for k in flat)


# --- sweep: the verdict's numbers -------------------------------------------------------------------


def test_the_sweep_conclusion_quotes_the_rank_correlation_the_largest_network_and_the_face_encoders_gain():
    """Mutants: the CNNs ordered by parameters instead of FLOPs ("the largest by FLOPs" named another
    network), the face encoder's lead over the best CNN with its sign flipped, and the verdict's rule
    without ``best is largest``. test_reports.py's rows grow in FLOPs and parameters together, and it
    checked none of these numbers."""
    from faceage.sweep import _conclusion

    def row(backbone, gflops, params_m, test_mae):
        return {"backbone": backbone, "gflops": gflops, "params_m": params_m, "test_mae": test_mae, "epochs": 5,
                "baseline_mae": 21.7}

    rows = [row("resnet50", 0.1, 20.0, 12.0), row("mobilenet_v3_large", 0.5, 5.0, 10.0),
            row("convnext_tiny", 1.0, 10.0, 8.0), row("dlib_face", 0.0002, 0.1, 5.0)]
    text = _conclusion(rows, "gpu")
    assert "the largest by FLOPs, `convnext_tiny`, reaches 8.00" in text
    assert "Rank correlation of FLOPs with test MAE: -1.00" in text
    assert "reaches 5.00 years, 3.00 better than the best CNN" in text
    # The largest network the best, its smaller ones out of order (rank correlation -0.20): still "bigger is
    # better" by the rule's first half, which a mutant without ``best is largest`` lost.
    mixed = [row("resnet18", 0.1, 11.0, 9.0), row("resnet34", 0.2, 21.0, 11.0), row("resnet50", 0.5, 23.0, 12.0),
             row("convnext_tiny", 1.0, 28.0, 8.0)]
    text = _conclusion(mixed, "gpu")
    assert "Rank correlation of FLOPs with test MAE: -0.20" in text and "**bigger backbones reduce the error**" in text



def test_the_pretrained_face_networks_sweep_with_the_params_defaults():
    """Mutant: ``sweep_overrides`` giving ``dlib_age`` and ``dlib_face`` the CNN profile: the CPU sweep then
    ran dlib's age network with ``train.pretrained=none`` (random weights; refused by check_params) and 64 px."""
    from faceage.sweep import sweep_overrides

    assert sweep_overrides("dlib_face", "cpu", None) == ["train.backbone=dlib_face"]
    assert sweep_overrides("dlib_age", "gpu", None) == ["train.backbone=dlib_age"]
    assert "train.pretrained=none" in sweep_overrides("resnet18", "cpu", None)


class _Recorder:
    """A stand-in for ChipExtractor / FaceEncoder in :func:`faceage.chips.map_crop_files`."""

    made: list = []

    def __init__(self, model_dir, margin):
        _Recorder.made.append((model_dir, margin))

    def mean(self, region):
        return np.array([region.mean()])


def test_the_crop_map_builds_its_extractor_at_the_runs_margin(tmp_path):
    """Mutant: ``map_crop_files`` building the extractor at the default margin 0.4 instead of the one it is
    given: with ``preprocess.margin=0.2`` every chip's landmark fit looked for the face in the wrong box
    (``face_rect``). Every test that went through it used margin 0.4."""
    from PIL import Image

    from faceage.chips import map_crop_files

    for i, level in enumerate((10, 200)):
        Image.fromarray(np.full((8, 8, 3), level, np.uint8)).save(tmp_path / f"{i}.png")
    _Recorder.made = []
    out = map_crop_files(_Recorder, "mean", tmp_path, ["1.png", "0.png"], tmp_path / "detector", 0.2, workers=1)
    assert _Recorder.made == [(str(tmp_path / "detector"), 0.2)]
    assert [float(o[0]) for o in out] == [200.0, 10.0]  # in the order given


def test_the_cached_mirror_view_is_the_left_right_mirror_and_low_res_copies_use_low_res_min(monkeypatch):
    """Mutant: ``FrozenPrefixCache`` drawing its lower-resolution copies with ``train.low_res`` (the
    probability) as their smallest side share instead of ``train.low_res_min``. Also the mirror view of the
    fine-tuning path (``freeze_blocks``): an upside-down flip there is caught only for the ensemble heads,
    by test_dlib_age.py's served-views test."""
    from dataclasses import replace

    import faceage.finetune as finetune
    from faceage.config import TrainParams
    from faceage.dlib_age import INPUT_MEAN, INPUT_STD, DlibAgeNet
    from faceage.transforms import normalize

    torch.manual_seed(0)
    model = DlibAgeNet(101).eval()
    chips = torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8)

    class Split:
        images, ages, age_stds = chips, torch.tensor([20.0, 30.0, 40.0]), torch.zeros(3)

        def __len__(self):
            return 3

    shares = []

    def low_resolution_chips(images, min_fraction, generator):
        shares.append(min_fraction)
        return images

    monkeypatch.setattr(finetune, "low_resolution_chips", low_resolution_chips)
    p = replace(TrainParams(), backbone="dlib_age", head="pretrained", epochs=1, freeze_blocks=2, augment=True,
                low_res=0.9, low_res_min=0.3)
    prepare = lambda x: normalize(x, INPUT_MEAN, INPUT_STD)  # noqa: E731
    cache = finetune.prefix_cache(model, Split(), Split(), prepare, p, torch.device("cpu"))
    assert shares == [0.3] * finetune.LOW_RES_COPIES
    with torch.no_grad():
        mirror = model.run_stages(prepare(torch.flip(chips, dims=[-1])), 0, 2)
    assert torch.allclose(cache.train_views.views[:, 1], mirror, atol=1e-3)


def test_the_ensembles_input_statistics_are_those_of_the_served_features():
    """Mutant: ``prefix_cache`` pooling the cached feature maps with ``amax`` instead of the mean that
    ``DlibAgeNet.encode`` serves: the ensemble was standardised with statistics of other features. The
    training tests compared the network with itself after the fit, which agreed either way."""
    from dataclasses import replace

    from faceage.config import TrainParams
    from faceage.dlib_age import INPUT_MEAN, INPUT_STD, DlibAgeNet
    from faceage.finetune import prefix_cache
    from faceage.transforms import normalize

    torch.manual_seed(0)
    model = DlibAgeNet(101, "ensemble").eval()
    chips = torch.randint(0, 256, (4, 3, 64, 64), dtype=torch.uint8)

    class Split:
        images, ages, age_stds = chips, torch.tensor([20.0, 30.0, 40.0, 50.0]), torch.zeros(4)

        def __len__(self):
            return 4

    prepare = lambda x: normalize(x, INPUT_MEAN, INPUT_STD)  # noqa: E731
    p = replace(TrainParams(), backbone="dlib_age", head="ensemble", epochs=1, augment=False)
    prefix_cache(model, Split(), Split(), prepare, p, torch.device("cpu"))
    with torch.no_grad():
        both = torch.cat([prepare(chips), prepare(torch.flip(chips, dims=[-1]))])
        x = model.member_inputs(model.encode(both))[0]
    assert torch.allclose(model.ensemble.in_mean, x.mean(0), atol=1e-3)
    assert torch.allclose(model.ensemble.in_std, x.std(0).clamp_min(1e-6), rtol=1e-3, atol=1e-3)


def test_group_errors_leave_out_the_empty_age_groups():
    """Mutant: ``errors_by`` without ``if len(d)``: every age group without a test face became a row of
    n=0 and NaN MAE (in by_age_group.csv, the model card, and NaN ``test_mae_<group>`` metrics)."""
    from faceage.evaluation import errors_by_group

    rows = errors_by_group(np.array([25.0, 33.0, 80.0]), np.array([22.0, 35.0, 75.0]))
    assert [(r["group"], r["n"]) for r in rows] == [("20-29", 1), ("30-39", 1), ("70+", 1)]
    assert all(np.isfinite(r["mae_years"]) for r in rows)


def two_face_external_set(monkeypatch, tmp_path, rows: list[dict]):
    """``evaluate_external``'s steps before the model stubbed for a set of two faces labelled by ``rows``, and a
    model predicting 25 +- 1 and 30 +- 2: ``(model, ext)``."""
    from types import SimpleNamespace

    import faceage.evaluation as evaluation

    monkeypatch.setattr(evaluation, "external_faces", lambda ext, crop, detector_dir, cache_dir: tmp_path)
    monkeypatch.setattr(evaluation, "crop_counts", lambda faces: {"n_images": 2, "n_faces": 2, "no_face": 0,
                                                                   "unreadable": 0})
    monkeypatch.setattr(evaluation, "set_version", lambda faces, path: "v1")
    monkeypatch.setattr(evaluation, "load_split", lambda *a, **k: SimpleNamespace(images=torch.zeros(2, 3, 8, 8),
                                                                                 rows=rows))
    model = SimpleNamespace(meta={"crop": {"detector": "hog"}, "backbone": "resnet18", "image_size": 8},
                            predict_inputs=lambda images, batch_size: (np.array([25.0, 30.0]), np.array([1.0, 2.0])))
    return model, SimpleNamespace(name="utk", path=tmp_path)


def test_an_external_sets_baseline_is_the_training_mean_not_its_own(tmp_path, monkeypatch):
    """Mutant: ``evaluate_external``'s baseline taken about the set's own mean age instead of ``train_mean``:
    the always-the-training-mean baseline that packaging's cross-dataset guard compares with came out
    lower (a set's own mean is the best constant). Its only unit test stops at a set without faces."""
    import faceage.evaluation as evaluation
    from faceage.config import EvaluateParams

    rows = [{"file_name": "a.jpg", "apparent_age": "20"}, {"file_name": "b.jpg", "apparent_age": "40"}]
    model, ext = two_face_external_set(monkeypatch, tmp_path, rows)
    results, groups, out = evaluation.evaluate_external(model, [ext], EvaluateParams(low_res=()), tmp_path, 50.0)
    m = results["utk"]
    assert m["baseline_mae_years"] == pytest.approx(20.0)  # |50 - 20| and |50 - 40|; about the set's mean: 10
    assert m["mae_years"] == pytest.approx(7.5) and m["mae_by_age_group"] == {"20-29": 5.0, "40-49": 10.0}
    assert out == [["utk", "a.jpg", 20.0, 25.0, 1.0, 5.0], ["utk", "b.jpg", 40.0, 30.0, 2.0, 10.0]]


def test_a_cnn_detector_takes_no_second_cnn_look():
    """Mutant: ``cnn_look_side`` returning the side for any kind: ``preprocess.detector=cnn`` with the
    default ``cnn_retry_side`` looked twice with the CNN at every faceless photo (the costliest step), and
    the second look, at 400 px, could find a face the configured CNN did not."""
    from faceage.faces import cnn_look_side

    assert cnn_look_side("cnn", 400) == 0 and cnn_look_side("hog", 400) == 400 and cnn_look_side("hog", 0) == 0


# --- data ------------------------------------------------------------------------------------------


def test_datasets_apply_their_augmentation_and_chip_models_load_pairs(tmp_path):
    """Mutants in ``faceage.data``: ``FaceCrops.__getitem__`` skipping ``transform`` and ``FaceChips`` not
    keeping it (training augmentation silently off: flips, jitter, train.low_res), ``load_split``
    not passing ``pairs`` (the fused head got lone chips), and ``FaceChips`` without its missing-chip
    check (a KeyError traceback instead of "rerun the embed stage"). test_data_r25.py loaded each
    backbone's split without a transform, pairs or a stale chips.npz."""
    from faceage.chips import PAIR_SHAPE, save_chips
    from faceage.data import SplitDataError, load_split
    from tests.unit.test_data_r25 import faces_dir

    root = faces_dir(tmp_path, {"train": 2})
    blank = lambda image: torch.zeros_like(image)  # noqa: E731
    crops = load_split(root, "train", "resnet18", 32, transform=blank)
    assert crops.images.float().std() > 0 and crops[0][0].max() == 0
    chips = [np.full((3, 64, 64), 9, np.uint8)] * 2
    save_chips(root / "chips.npz", ["train/000000.png", "train/000001.png"], chips, 0.4, "s" * 64,
               face_chips=[np.full((3, 150, 150), 7, np.uint8)] * 2)
    aligned = load_split(root, "train", "dlib_age", 32, root / "chips.npz", transform=blank)
    assert aligned.images.shape == (2, 3, 64, 64) and aligned[1][0].max() == 0
    pairs = load_split(root, "train", "dlib_age", 32, root / "chips.npz", pairs=True)
    assert pairs.images.shape == (2, *PAIR_SHAPE) and pairs[0][0][:, 64:].min() == 7
    save_chips(root / "stale.npz", ["train/000000.png"], chips[:1], 0.4, "s" * 64)
    with pytest.raises(SplitDataError, match="1 crops have no chip .* rerun the embed stage"):
        load_split(root, "train", "dlib_age", 32, root / "stale.npz")



def test_descriptor_training_draws_the_mirror_view_only_with_augmentation(tmp_path):
    """Mutant: ``FaceEmbeddings`` ignoring ``augment`` (``load_split`` not passing it, or view 0 always):
    ``dlib_face`` trained without its flip augmentation, and no test drew an item of it."""
    from faceage.data import load_split
    from tests.unit.test_data_r25 import faces_dir

    root = faces_dir(tmp_path, {"train": 2})
    views = np.stack([np.zeros((2, 128), np.float32), np.ones((2, 128), np.float32)], axis=1)  # view 1: the mirror
    np.savez(root / "embeddings.npz", crops=np.array(["train/000000.png", "train/000001.png"]), embeddings=views,
             encoder_sha256=np.array("e"), shape_predictor_sha256=np.array("s"), margin=np.array(0.4))
    torch.manual_seed(0)
    plain = load_split(root, "train", "dlib_face", 32, root / "embeddings.npz")
    augmented = load_split(root, "train", "dlib_face", 32, root / "embeddings.npz", augment=True)
    assert all(float(plain[i % 2][0].sum()) == 0 for i in range(20))
    drawn = [float(augmented[i % 2][0].sum()) for i in range(40)]
    assert 0 < drawn.count(128.0) < 40

def test_the_model_card_names_each_mix_training_recorded():
    """Mutant: ``describe_mix`` dropping the WiSE-FT alpha (the training log and the model card read it)."""
    from faceage.finetune import describe_mix

    assert describe_mix({"wise_alpha": 0.6, "ensemble_weight": 0.8}) == "WiSE-FT alpha 0.60, ensemble weight 0.80"
    assert describe_mix({}) == ""


def test_the_sweep_does_not_call_the_face_encoder_better_when_a_cnn_beats_it():
    """The sentence was fixed text: a CNN ahead of dlib_face (ImageNet weights on a GPU) printed "-1.50 better than
    the best CNN: pretraining on faces matters more than depth"."""
    from faceage.sweep import _conclusion

    def row(backbone, gflops, params_m, mae):
        return {"backbone": backbone, "gflops": gflops, "params_m": params_m, "test_mae": mae, "epochs": 30,
                "baseline_mae": 21.7}

    text = _conclusion([row("resnet18", 1.8, 11.2, 6.1), row("resnet50", 4.1, 23.5, 5.4),
                        row("convnext_tiny", 4.5, 27.8, 5.0), row("dlib_face", 0.0002, 0.1, 6.5)], "gpu")
    face = next(line for line in text.splitlines() if "`dlib_face`" in line)
    assert "1.50 behind the best CNN (`convnext_tiny`)" in face
    assert "better" not in face and "-1.50" not in face
