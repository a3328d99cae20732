"""Model build/forward, expected age, self-describing checkpoints, pretrained-weights errors."""

import pytest
import torch

from faceage.config import ConfigError
from faceage.model import (
    NUM_AGES, PretrainedWeightsError, build_model, check_input_size, expected_age, load_checkpoint, load_pretrained,
    resolve_imagenet_weights, save_checkpoint,
)
from faceage.training import age_balance_weights, age_loss, lr_factor, make_loss
from faceage.config import TrainParams


def test_resnet18_forward_gives_101_ages():
    torch.manual_seed(0)
    model = build_model("resnet18").eval()
    with torch.no_grad():
        logits = model(torch.randn(2, 3, 64, 64))
    assert logits.shape == (2, NUM_AGES)
    mean, std = expected_age(logits)
    # The softmax expectation and spread, computed here independently of expected_age.
    p = torch.softmax(logits.double(), dim=1)
    ages = torch.arange(NUM_AGES, dtype=torch.float64)
    want_mean = (p * ages).sum(dim=1)
    want_std = ((p * (ages - want_mean[:, None]) ** 2).sum(dim=1)).sqrt()
    assert torch.allclose(mean.double(), want_mean, atol=1e-4) and torch.allclose(std.double(), want_std, atol=1e-4)


def test_expected_age_keeps_a_narrow_spread_exact_in_float32():
    ages = torch.arange(NUM_AGES, dtype=torch.float64)
    logits = torch.stack([-((ages - c) ** 2) / (2 * s**2) for c, s in ((87.3, 0.35), (61.6, 0.5), (45.0, 0.8))])
    mean, std = expected_age(logits.float())
    p = torch.softmax(logits, dim=1)
    want_mean = p @ ages
    want_std = ((p * (ages - want_mean[:, None]) ** 2).sum(dim=1)).sqrt()
    assert torch.allclose(std.double(), want_std, atol=1e-5), (std, want_std)
    assert torch.allclose(mean.double(), want_mean, atol=1e-4)


@pytest.mark.parametrize("backbone", ["mobilenet_v3_small", "efficientnet_b0"])
def test_other_backbones_get_a_101_way_head(backbone):
    model = build_model(backbone).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, NUM_AGES)


@pytest.mark.parametrize("backbone", ["googlenet", "inception_v3"])
def test_backbones_with_auxiliary_heads_train_at_224(backbone):
    """googlenet returned GoogLeNetOutputs in train mode (the loss failed on it), and Inception's auxiliary
    head needed 299 px inputs: neither could train."""
    model = build_model(backbone).train()
    assert model.transform_input  # what their ImageNet weights were trained with (torchvision sets it with weights)
    out = model(torch.randn(2, 3, 224, 224))
    assert isinstance(out, torch.Tensor) and out.shape == (2, NUM_AGES)
    out.logsumexp(dim=1).mean().backward()  # gradients reach the body
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)


def test_a_backbone_without_a_linear_head_is_a_config_error():
    with pytest.raises(ConfigError, match=r"'squeezenet1_1' \(its head is a convolution"):
        build_model("squeezenet1_1")
    with pytest.raises(ConfigError) as listed:
        build_model("resnet7")
    assert "squeezenet" not in str(listed.value)  # not offered as available


@pytest.mark.parametrize("backbone,size", [("vit_b_32", 256), ("maxvit_t", 160), ("alexnet", 32), ("inception_v3", 64)])
def test_an_image_size_a_backbone_cannot_take_names_train_image_size(backbone, size):
    """These failed at the first batch, after the data load, with torch's message (MaxViT: a shape error)."""
    model = build_model(backbone)
    with pytest.raises(ConfigError, match=rf"train.image_size={size} does not fit train.backbone='{backbone}'"):
        check_input_size(model, backbone, size)
    assert model.training  # the probe leaves the mode as it found it


@pytest.mark.parametrize("backbone,size", [("vit_b_32", 224), ("resnet18", 32), ("inception_v3", 96), ("dlib_age", 7)])
def test_sizes_a_backbone_takes_pass_the_check(backbone, size):
    check_input_size(build_model(backbone).eval(), backbone, size)


def test_unknown_backbone_lists_choices():
    with pytest.raises(ConfigError, match="train.backbone must be a torchvision classification model with a linear head, got .resnet7..*resnet18"):
        build_model("resnet7")


def test_expected_age_of_one_hot_logits():
    logits = torch.full((1, NUM_AGES), -1e4)
    logits[0, 30] = 0
    mean, std = expected_age(logits)
    assert mean.item() == pytest.approx(30.0) and std.item() == pytest.approx(0.0, abs=1e-3)


def test_checkpoint_roundtrip_with_weights_only(tmp_path):
    model = build_model("resnet18").eval()
    meta = {"backbone": "resnet18", "min_age": 0, "max_age": 100, "image_size": 64, "mean": [0.5] * 3,
            "std": [0.25] * 3, "crop": {"margin": 0.4, "size": 224, "detector": "hog", "upsample": 1,
                                         "detector_sha256": "ab" * 32}, "val_mae": 5.5}
    save_checkpoint(tmp_path / "m.pt", model, meta)
    raw = torch.load(tmp_path / "m.pt", weights_only=True)  # plain tensors and values only
    assert raw["format"] == "faceage-checkpoint/1"
    loaded, got = load_checkpoint(tmp_path / "m.pt")
    assert got["crop"]["detector_sha256"] == "ab" * 32 and "state_dict" not in got
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model(x), loaded(x))


def test_not_a_checkpoint(tmp_path):
    torch.save({"hello": 1}, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="not a faceage-checkpoint/1"):
        load_checkpoint(tmp_path / "x.pt")


def test_local_weights_file_loads_everything_but_the_head(tmp_path):
    donor = build_model("resnet18")
    torch.save(donor.state_dict(), tmp_path / "w.pth")
    model = build_model("resnet18")
    assert load_pretrained(model, "resnet18", str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)
    assert load_pretrained(build_model("resnet18"), "resnet18", "none").startswith("none")


def test_a_relative_weights_path_is_the_repo_roots_also_in_a_dvc_temp_copy(tmp_path, monkeypatch):
    """It was read from the working folder: `dvc exp run --temp -S train.pretrained=weights/w.pth` failed
    with "no such weights file" inside the temp copy, where check_sources had found the file."""
    donor = build_model("resnet18")
    (tmp_path / "weights").mkdir()
    torch.save(donor.state_dict(), tmp_path / "weights" / "w.pth")
    temp_copy = tmp_path / ".dvc" / "tmp" / "exps" / "run1"
    temp_copy.mkdir(parents=True)
    monkeypatch.chdir(temp_copy)
    model = build_model("resnet18")
    assert load_pretrained(model, "resnet18", "weights/w.pth") == str(tmp_path / "weights" / "w.pth")
    torch.testing.assert_close(model.conv1.weight, donor.conv1.weight)


def test_wrong_weights_file_names_the_param(tmp_path):
    torch.save(build_model("mobilenet_v3_small").state_dict(), tmp_path / "w.pth")
    with pytest.raises(PretrainedWeightsError, match="train.pretrained=.*does not fit backbone 'resnet18'"):
        load_pretrained(build_model("resnet18"), "resnet18", str(tmp_path / "w.pth"))
    with pytest.raises(PretrainedWeightsError, match="train.pretrained='/nope.pth': no such weights file"):
        load_pretrained(build_model("resnet18"), "resnet18", "/nope.pth")


def test_a_weights_file_without_batchnorms_step_counters_loads(tmp_path):
    """Older state dicts (torchvision's own ImageNet files among them) have no num_batches_tracked:
    torch's load_state_dict accepts them, and the 'missing keys' check rejected them."""
    donor = build_model("resnet18")
    torch.save({k: v for k, v in donor.state_dict().items() if not k.endswith("num_batches_tracked")}, tmp_path / "w.pth")
    model = build_model("resnet18")
    assert load_pretrained(model, "resnet18", str(tmp_path / "w.pth")) == str(tmp_path / "w.pth")
    torch.testing.assert_close(model.layer4[1].bn2.weight, donor.layer4[1].bn2.weight)


@pytest.mark.parametrize("content", [torch.zeros(3), [torch.zeros(3)]])
def test_a_weights_file_that_is_not_a_state_dict_names_the_param(tmp_path, content):
    """A tensor or a list failed with AttributeError: 'Tensor' object has no attribute 'items'."""
    torch.save(content, tmp_path / "w.pth")
    with pytest.raises(PretrainedWeightsError, match=r"train.pretrained=.*w.pth holds a (Tensor|list), not a state dict"):
        load_pretrained(build_model("resnet18"), "resnet18", str(tmp_path / "w.pth"))


def test_unreachable_imagenet_weights_name_the_param(tmp_path, monkeypatch):
    # Point torchvision's weight URL at a closed local port: the machine is offline either way.
    import torchvision

    weights = torchvision.models.ResNet18_Weights.DEFAULT
    monkeypatch.setattr(type(weights), "url", property(lambda self: "http://127.0.0.1:9/resnet18-f37072fd.pth"))
    with pytest.raises(PretrainedWeightsError, match="train.pretrained=imagenet: resnet18-f37072fd.pth is not in .*train.pretrained=none"):
        resolve_imagenet_weights("resnet18", cache_dir=tmp_path)


def test_losses_prefer_the_right_age():
    target = torch.tensor([30.0])
    good = torch.full((1, NUM_AGES), -10.0)
    good[0, 30] = 10
    bad = torch.full((1, NUM_AGES), -10.0)
    bad[0, 60] = 10
    for kind in ("expectation_l1", "label_distribution"):
        assert age_loss(good, target, kind, 2.0) < age_loss(bad, target, kind, 2.0)


def test_age_balance_weighs_rare_ages_up_with_mean_one():
    ages = torch.tensor([2.0] * 60 + [30.0] * 30 + [85.0] * 10)
    assert torch.equal(age_balance_weights(ages, 0.0), torch.ones(NUM_AGES))
    for power in (0.5, 1.0):
        w = age_balance_weights(ages, power)
        assert w[ages.long()].mean().item() == pytest.approx(1.0, rel=1e-5)
        assert w[2] < w[30] < w[85]
    # power 1: every age group carries the same total weight (a flat prior over the ages present)
    w = age_balance_weights(ages, 1.0)
    totals = [w[int(a)].item() * n for a, n in ((2, 60), (30, 30), (85, 10))]
    assert max(totals) == pytest.approx(min(totals), rel=1e-3)


def test_age_balance_weights_the_loss_per_face():
    torch.manual_seed(0)
    logits, target = torch.randn(4, NUM_AGES), torch.tensor([3.0, 3.0, 3.0, 70.0])
    per_face = torch.stack([age_loss(logits[i:i + 1], target[i:i + 1], "label_distribution", 2.0) for i in range(4)])
    weight = torch.tensor([0.5, 0.5, 0.5, 2.5])
    assert age_loss(logits, target, "label_distribution", 2.0, weight).item() == pytest.approx(
        (per_face * weight).mean().item(), rel=1e-5)
    plain = make_loss(TrainParams(age_balance=0.0), None, target)
    balanced = make_loss(TrainParams(age_balance=1.0), None, target)
    table = age_balance_weights(target, 1.0)
    assert plain(logits, target, None).item() == pytest.approx(per_face.mean().item(), rel=1e-5)
    assert balanced(logits, target, None).item() == pytest.approx(
        (per_face * table[target.long()]).mean().item(), rel=1e-5)


def test_lr_schedule_warms_up_then_decays():
    p = TrainParams(epochs=4, warmup_epochs=1, scheduler="cosine")
    factors = [lr_factor(s, 10, p) for s in range(40)]
    assert factors[0] == pytest.approx(0.1) and factors[9] == pytest.approx(1.0)
    assert factors[-1] < 0.01 and all(a >= b for a, b in zip(factors[10:], factors[11:]))


@pytest.mark.parametrize("kind", ["photo", "truncated", "empty", "python object"])
def test_a_file_that_is_no_checkpoint_is_one_clear_error(tmp_path, kind):
    from faceage.errors import FaceAgeError

    path = tmp_path / "model.pt"
    if kind == "photo":
        path.write_bytes(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + bytes(200))  # a JPEG given as --model
    elif kind == "truncated":
        save_checkpoint(path, build_model("resnet18"), {"backbone": "resnet18", "min_age": 0, "max_age": 100})
        path.write_bytes(path.read_bytes()[:100_000])  # an interrupted copy
    elif kind == "empty":
        path.write_bytes(b"")
    else:
        torch.save({"format": "faceage-checkpoint/1", "loss": torch.nn.MSELoss()}, path)
    with pytest.raises(FaceAgeError, match=r"model\.pt is not a FaceAge checkpoint: ") as e:
        load_checkpoint(path)
    assert isinstance(e.value, ValueError)  # callers that caught ValueError still do
    assert "weights_only" not in str(e.value)  # torch's advice to unpickle arbitrary code is not passed on


def test_a_checkpoint_whose_weights_do_not_fit_is_one_clear_error(tmp_path):
    from faceage.errors import FaceAgeError

    save_checkpoint(tmp_path / "m.pt", build_model("mobilenet_v3_small"),
                    {"backbone": "resnet18", "min_age": 0, "max_age": 100})
    with pytest.raises(FaceAgeError, match="m.pt is a damaged FaceAge checkpoint: its weights do not fit backbone "
                                           "'resnet18'"):
        load_checkpoint(tmp_path / "m.pt")


@pytest.mark.parametrize(("target", "sigma"), [(116.0, 1.0), (130.0, 2.0), (30.5, 0.01)])
def test_label_distribution_stays_a_number_far_from_every_age_the_model_has(target, sigma):
    """A target ~14 sigma from every age 0..100 (a 116-year-old at sigma 1, a fractional age at sigma
    0.01) underflowed to 0 / 0: NaN, and training went on in NaN and shipped NaN weights."""
    logits = torch.randn(2, NUM_AGES, requires_grad=True)
    loss = age_loss(logits, torch.tensor([target, 40.0]), "label_distribution", sigma)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    # 116 is trained as the model's top age: the same loss as a target of 100
    if target > 100:
        assert torch.isclose(loss, age_loss(logits, torch.tensor([100.0, 40.0]), "label_distribution", sigma))


def test_the_step_schedule_never_decays_at_the_first_epoch_and_warmup_takes_at_most_half_the_run():
    from dataclasses import replace

    from faceage.config import TrainParams

    step = replace(TrainParams(), scheduler="step", warmup_epochs=0)
    # 1 epoch trained at a hundredth of train.lr, 2 epochs skipped the x0.1 stage
    assert [lr_factor(e, 1, replace(step, epochs=1)) for e in range(1)] == [1.0]
    assert [round(lr_factor(e, 1, replace(step, epochs=2)), 6) for e in range(2)] == [1.0, 0.1]
    assert [round(lr_factor(e, 1, replace(step, epochs=4)), 6) for e in range(4)] == [1.0, 1.0, 0.1, 0.01]
    long_warmup = replace(TrainParams(), scheduler="cosine", warmup_epochs=5, epochs=2)
    factors = [lr_factor(s, 10, long_warmup) for s in range(20)]
    assert max(factors) == 1.0 and factors[-1] < 0.05  # it reaches train.lr, then decays


def test_automatic_loader_workers_count_the_cores_this_process_may_use(monkeypatch):
    """num_workers=-1 counted the machine's cores: a job pinned to 2 of 16 got 8 loader processes."""
    import os
    from dataclasses import replace

    from faceage.config import TrainParams
    from faceage.training import _loader_workers

    import faceage.cores

    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(faceage.cores, "cpu_quota", lambda: None)  # whatever this machine's cgroup says
    auto = replace(TrainParams(), num_workers=-1)
    assert _loader_workers(auto, torch.device("cpu")) == 0
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(12)), raising=False)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two torchrun processes share them
    assert _loader_workers(auto, torch.device("cuda")) == 5
