"""Typed configuration: ``params.yaml`` -> one frozen dataclass per pipeline stage.

Input: a YAML file with one section per DVC stage (``fetch_data``, ``fetch_detector``,
``preprocess``, ``embed``, ``train``, ``evaluate``). Output: a frozen :class:`Params`.

Unknown keys, missing keys and values of the wrong type raise :class:`ConfigError` (a ValueError)
naming the offending ``section.key``, so a typo in ``params.yaml`` or in
``dvc exp run -S`` fails before any work is done. So does a combination of ``train`` keys that training
cannot run (:func:`check_train_params`): the always-run ``check_sources`` stage refuses it, not ``train``
after the data work. This module imports neither torch nor dlib: every stage loads its params with it.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import importlib.util
import math
import re
import types
import typing
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal
from urllib.parse import urlsplit

import yaml

from faceage.errors import FaceAgeError

APPA_REAL_URL = "https://data.chalearnlap.cvc.uab.cat/AppaRealAge/appa-real-release.zip"
# The release's first address: public download scripts report it unreachable since 2026, so it is
# the fallback (the same md5 pins the bytes whichever address serves them).
APPA_REAL_MIRRORS = ("http://158.109.8.102/AppaRealAge/appa-real-release.zip",)
APPA_REAL_MD5 = "2701c6ec291b242e6b4f8a0a56087a43"
# train.face_features: what the fused head reads of dlib's face-recognition network (see TrainParams)
FaceFeatures = Literal["descriptor", "layers"]
FACE_FEATURES: tuple[str, ...] = typing.get_args(FaceFeatures)
DESCRIPTOR, LAYERS = FACE_FEATURES
# train.head: dlib_age's head ("auto" chooses one, resolve_head)
TrainHead = Literal["auto", "ensemble", "fused", "pretrained"]
# Copies of the constants of faceage.chips / faceage.face_encoder (the train.backbone values of dlib's two networks)
# and faceage.dlib_age (its heads and its stages, what train.freeze_blocks counts): those modules import dlib and
# torch, which loading params must not (check_sources runs first in every `dvc repro`). tests/unit/test_config_r30.py
# keeps them equal.
DLIB_AGE, FACE_ENCODER = "dlib_age", "dlib_face"
HEAD_ENSEMBLE, HEAD_FUSED, HEAD_PRETRAINED = "ensemble", "fused", "pretrained"
DLIB_AGE_HEADS = (HEAD_PRETRAINED, HEAD_ENSEMBLE, HEAD_FUSED)
ENSEMBLE_HEADS = (HEAD_ENSEMBLE, HEAD_FUSED)  # an MLP ensemble over the frozen network(s)
DLIB_AGE_STAGES = 7  # stem, block1..block5, head


class ConfigError(FaceAgeError, ValueError):
    """A key of ``params.yaml`` is unknown, missing, mistyped or out of range."""


class MissingKeyError(ConfigError):
    """A key or section every stage reads is not in ``params.yaml``.

    Attributes:
        key: ``"train.lr"``, or a section's name (``"embed"``).
        accepts: What the key takes (``"a number"``), or ``""`` for a section.
    """

    def __init__(self, message: str, key: str = "", accepts: str = ""):  # (defaults: unpickled from its message)
        super().__init__(message)
        self.key, self.accepts = key, accepts


class ParamsFileError(ConfigError, yaml.YAMLError):
    """``params.yaml`` is not YAML (a tab, a key twice, a bad indent) or not UTF-8: every stage printed PyYAML's
    traceback; a ConfigError is the one line :func:`faceage.logs.run_stage` prints."""


class ParamsNotFoundError(FaceAgeError, FileNotFoundError):
    """No params file at the path a stage was given: its default ``params.yaml`` is relative, so a stage run
    by hand from another folder than the repo root printed ``FileNotFoundError``'s traceback. Still a
    ``FileNotFoundError``, as :func:`load_params` documented."""


# train.backbone values known valid without importing torch and torchvision (seconds, which every stage
# would pay on loading its params): dlib's two networks, params.yaml's default and faceage.sweep's backbones.
# Any other name is checked against torchvision's list (faceage.model.check_backbone, whose message lists
# them); tests/unit/test_config_backbone.py keeps this set inside that list.
FAST_BACKBONES = frozenset({"dlib_face", "dlib_age", "resnet18", "resnet34", "resnet50", "efficientnet_b0",
                            "mobilenet_v3_large", "mobilenet_v3_small", "convnext_tiny"})
# Those with BatchNorm layers, which cannot train on one face per batch and process (faceage.training.check_batch
# finds them in the model; tests/unit/test_config_r30.py keeps this set equal to what it finds)
BATCHNORM_BACKBONES = frozenset({"resnet18", "resnet34", "resnet50", "efficientnet_b0", "mobilenet_v3_large",
                                 "mobilenet_v3_small"})


@dataclass(frozen=True)
class FetchDataParams:
    source: str = APPA_REAL_URL  # URL of the release zip, or a local folder / .zip in its layout
    md5: str = APPA_REAL_MD5  # expected md5 of a downloaded or local zip; "" skips the check
    # other URLs of the same zip, tried in order when a URL source fails (resuming its partial bytes)
    mirrors: tuple[str, ...] = APPA_REAL_MIRRORS


@dataclass(frozen=True)
class FetchDetectorParams:
    # "face_recognition_models": the files the PyPI package ships (offline);
    # "dlib.net": the official download URLs, checked against the same sha256 sums.
    source: Literal["face_recognition_models", "dlib.net"] = "face_recognition_models"


@dataclass(frozen=True)
class PreprocessParams:
    detector: Literal["hog", "cnn"] = "hog"  # cnn (mmod) is ~25x slower on CPU
    upsample: int = 1  # times the image is upsampled before detection (finds smaller faces)
    # no face found: look again with a border of this fraction of the longer side (faces that fill the frame)
    retry_pad: float = 0.35
    # HOG found nothing in either look: dlib's CNN detector looks at the image scaled down to at most
    # this longer side (px); 0 = off
    cnn_retry_side: int = 400
    margin: float = 0.4  # extra context around the box, as a fraction of its size per side
    size: int = 224  # side of the square crop written to disk, in pixels
    no_face: Literal["release_crop", "whole_image", "skip"] = "release_crop"
    workers: int = 0  # processes; 0 = one per CPU core


@dataclass(frozen=True)
class EmbedParams:
    workers: int = 0  # processes computing dlib face descriptors; 0 = one per CPU core


@dataclass(frozen=True)
class TrainParams:
    backbone: str = "resnet18"  # a torchvision classifier whose head can be replaced, dlib_face or dlib_age
    pretrained: str = "imagenet"  # "imagenet" | "none" | path to a weights file (dlib_age: imagenet or dlib = dlib's)
    epochs: int = 30  # 0 = no training: the pretrained model as it is (dlib_age zero-shot), evaluated and tracked
    image_size: int = 224  # crops are resized to this side before the network
    batch_size: int = 64
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    weight_decay: float = 1e-4
    scheduler: Literal["cosine", "step", "none"] = "cosine"
    warmup_epochs: int = 1
    loss: Literal["expectation_l1", "label_distribution"] = "label_distribution"
    label_sigma: float = 2.0  # std (years) of the Gaussian target for label_distribution
    label_jitter: bool = True  # resample targets from N(apparent_age, apparent_age_std)
    # Loss weight per face: (smoothed share of training faces at its age) ** -age_balance, mean 1.
    # 0 = every face alike; 0.5 = inverse square root (LDS, Yang et al. 2021); 1 = a flat age prior.
    age_balance: float = 0.0
    augment: bool = True  # flip, small rotation/scale/shift, colour jitter
    # Share of training faces shown at a lower resolution (downscaled to a side drawn between
    # low_res_min and 1 of the input's, then scaled back up): small faces in group photos look
    # younger to a model trained on sharp crops only. Image inputs only (not dlib_face's descriptors).
    # A training augmentation: augment=False turns it off too.
    low_res: float = 0.5
    low_res_min: float = 0.45
    seed: int = 42
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    amp: bool = True  # mixed precision; only used on CUDA
    num_workers: int = -1  # data-loader processes; -1 = automatic (0 on 2 cores)
    nproc_per_node: int = 1  # training processes (DistributedDataParallel) that `dvc repro` launches
    # dlib_age only: "auto" = "fused": an MLP ensemble over the frozen age network and dlib's face descriptor
    # (its face-recognition network, frozen); "ensemble": over the age network alone; or dlib's own head
    # ("pretrained"), fine-tuned with the fine-tuning keys at the end (freeze_blocks, layer_lr_decay,
    # distill_weight, wise_ft): auto chooses it when one of those is set or epochs is 0
    head: TrainHead = "auto"
    # The ensemble head's share against the pretrained network's own distribution: "auto" = chosen on
    # validation (the most pretrained weight within one standard error of the best), or a number in
    # [0, 1] (lower keeps the served ages closer to the pretrained network on photos unlike ours)
    ensemble_weight: Literal["auto"] | float = "auto"
    # The ensemble heads' learning without forgetting: weight of KL(pretrained network || ensemble) in
    # their loss, so a head keeps the pretrained distribution where the labels do not pull it away; 0 = off.
    # 10: the smallest weight that trails the pretrained network in no decade of age by more than 2 standard
    # errors, out of fold on the training split, for every seed measured (benchmarks/band_regret.py)
    ensemble_distill: float = 10.0
    # Distillation (ensemble_distill, distill_weight) reads the pretrained network's top age (80) as
    # "80 or older": the student's mass on 80..100 is matched to it as one class, so distillation keeps
    # the old free to get ages over 80; false = match the network's 80 to the student's 80 alone
    distill_open_top: bool = True
    # The fused head's view of dlib's face-recognition network: "descriptor" = its 128-D descriptor;
    # "layers" = the mean-pooled outputs of three of its blocks (640 values): 0.3 years lower test MAE,
    # but a head trained without one gender then trails the pretrained network on it by up to 1.1 years
    # (rounds 15-16 of reports/recipe_dlib_age.md), so the descriptor stays the default
    face_features: FaceFeatures = DESCRIPTOR
    # Fine-tuning without forgetting (dlib_age with head pretrained; see faceage.finetune):
    freeze_blocks: int = 0  # leading stages left frozen (stem, block1, ...)
    layer_lr_decay: float = 1.0  # lr factor per stage below the head (layer-wise learning rates)
    distill_weight: float = 0.0  # weight of KL(pretrained || fine-tuned), learning without forgetting
    wise_ft: bool = False  # interpolate pretrained and fine-tuned weights, mix chosen on validation


def uses_finetune_hooks(p: TrainParams) -> bool:
    """Whether any keep-the-pretrained-behaviour setting differs from plain training."""
    return p.freeze_blocks > 0 or p.layer_lr_decay != 1.0 or p.distill_weight > 0 or p.wise_ft


def resolve_head(p: TrainParams) -> str | None:
    """``dlib_age``'s head for these params (``None`` for other backbones).

    ``train.head=auto`` is the fused head, the MLP ensemble over both frozen dlib networks (the
    measured best, ``reports/recipe_dlib_age.md``, round 7), except that fine-tuning settings
    (``freeze_blocks``, ``layer_lr_decay``, ``distill_weight``, ``wise_ft``) ask for dlib's own head,
    fine-tuned, and ``epochs=0`` is the zero-shot network, dlib's own head untouched.
    """
    if p.backbone != DLIB_AGE:
        return None
    if p.head != "auto":
        return p.head
    return HEAD_PRETRAINED if p.epochs == 0 or uses_finetune_hooks(p) else HEAD_FUSED


def check_train_params(p: TrainParams) -> None:
    """The ``train`` keys that only make sense together: the head and fine-tuning keys act on a pretrained
    network split into stages, which only ``dlib_age`` has; ``dlib_face`` reads no weights file; a BatchNorm
    backbone needs two faces per batch and process.

    Checked by :func:`params_from_dict` (so the ``check_sources`` stage refuses them first) and again by
    training (:func:`faceage.finetune.check_params`), for params built in code (the recipe's and sweep's rows).

    Raises:
        ConfigError: A combination training cannot run; the message names the keys.
    """
    head = resolve_head(p)
    if p.backbone != DLIB_AGE and p.head != "auto":
        raise ConfigError(f"train.head applies to train.backbone={DLIB_AGE}, got backbone {p.backbone!r}; "
                          "reset it to auto")
    if uses_finetune_hooks(p) and p.backbone != DLIB_AGE:
        raise ConfigError(f"train.freeze_blocks / layer_lr_decay / distill_weight / wise_ft apply to "
                          f"train.backbone={DLIB_AGE}, got backbone {p.backbone!r}; reset them to 0 / 1.0 / 0.0 / false")
    if uses_finetune_hooks(p) and p.head in ENSEMBLE_HEADS:
        raise ConfigError("train.freeze_blocks / layer_lr_decay / distill_weight / wise_ft fine-tune dlib's own head: "
                          f"they need train.head=pretrained (or auto), got train.head={p.head}, which trains an MLP "
                          "ensemble over the frozen network")
    if p.ensemble_weight != "auto" and head not in ENSEMBLE_HEADS:
        raise ConfigError(f"train.ensemble_weight={p.ensemble_weight} mixes dlib_age's ensemble head with the "
                          f"pretrained network, but this run has no ensemble head (train.backbone={p.backbone}, "
                          f"head {head or 'none'}); reset it to auto")
    if p.epochs == 0 and p.head in ENSEMBLE_HEADS:
        raise ConfigError("train.epochs=0 is the zero-shot network: it needs train.head=pretrained (or auto), "
                          f"got train.head={p.head}, whose members would be untrained")
    if p.backbone == DLIB_AGE and p.freeze_blocks >= DLIB_AGE_STAGES:  # before the data load and the cache
        raise ConfigError(f"train.freeze_blocks must be < {DLIB_AGE_STAGES} for {DLIB_AGE} (stem, five blocks, "
                          f"head; the head always trains), got {p.freeze_blocks}")
    if p.backbone == DLIB_AGE and p.pretrained == "none" and (
            head != HEAD_PRETRAINED or p.epochs == 0 or p.freeze_blocks > 0 or p.distill_weight > 0 or p.wise_ft):
        raise ConfigError(f"train.pretrained=none gives {DLIB_AGE} random weights, so there is no pretrained "
                          f"network to keep frozen, distil from or mix with (train.head={p.head}, epochs {p.epochs}, "
                          f"freeze_blocks {p.freeze_blocks}, distill_weight {p.distill_weight}, wise_ft {p.wise_ft}): "
                          "use train.pretrained=imagenet (dlib's weights; or dlib), or train from scratch "
                          "with train.head=pretrained, epochs > 0, freeze_blocks 0, distill_weight 0 and wise_ft false")
    if p.face_features != DESCRIPTOR and head != HEAD_FUSED:
        raise ConfigError(f"train.face_features={p.face_features} chooses what the fused head reads of dlib's face "
                          f"network, but this run has no fused head (train.backbone={p.backbone}, head "
                          f"{head or 'none'}); reset it to {DESCRIPTOR}")
    # faceage.training.check_batch's rule (the same message) for the backbones known here: it needs the model, so it
    # ran after train's data load.
    per_process = p.batch_size // p.nproc_per_node
    if p.epochs > 0 and per_process < 2 and p.backbone in BATCHNORM_BACKBONES:
        raise ConfigError(f"train.batch_size={p.batch_size} gives {per_process} face per batch and process "
                          f"({p.nproc_per_node} process(es)); {p.backbone}'s BatchNorm layers need at least 2: raise "
                          "train.batch_size")
    # faceage.model.load_pretrained's rule (the same message): check_sources recorded any value as "dlib" and
    # train refused a weights file (dlib_face) or loaded dlib's network in its place (dlib_age), after preprocess.
    refused = dlib_weights_refusal(p.backbone, p.pretrained)
    if refused:
        raise ConfigError(refused)


# The train.pretrained values that name dlib_age's pretrained network (fetch_detector's age-v1.onnx): it reads no
# weights file, so any other value is refused (a path to the user's weights loaded dlib's network without a word).
DLIB_AGE_WEIGHTS = ("imagenet", "dlib")


def dlib_weights_refusal(backbone: str, pretrained: str) -> str | None:
    """Why ``train.pretrained`` cannot be used with a dlib backbone (its weights come from ``fetch_detector``,
    never from a file), or None. The one rule behind :func:`check_train_params` and
    :func:`faceage.model.load_pretrained`."""
    if backbone == FACE_ENCODER and pretrained not in ("imagenet", "none"):
        return (f"train.pretrained={pretrained!r}: backbone {FACE_ENCODER} always uses dlib's pretrained face encoder; "
                "set train.pretrained=none")
    if backbone == DLIB_AGE and pretrained not in (*DLIB_AGE_WEIGHTS, "none"):
        return (f"train.pretrained={pretrained!r}: backbone {DLIB_AGE} loads dlib's pretrained age network "
                "(age-v1.onnx, from the fetch_detector stage), never a weights file; set train.pretrained=imagenet "
                "(or dlib) for dlib's weights, or none for random initialisation")
    return None


DEFAULT_EXTERNAL = ("../shared/datasets/utk-external",)


@dataclass(frozen=True)
class EvaluateParams:
    batch_size: int = 128
    cs_years: float = 5.0  # cumulative score threshold: CS@5 = share of |error| <= 5 years
    # Labelled folders in the release layout (gt_avg_test.csv + test/) scored as cross-dataset
    # test sets, each cropped exactly as the model's training crops; relative paths are
    # resolved against the repo root. Test only: never train or tune on them.
    external: tuple[str, ...] = DEFAULT_EXTERNAL
    # The test split and external sets scored again at these fractions of the input's side
    # (faceage.transforms.low_resolution): MAE on smaller faces. Image inputs only; [] = none.
    low_res: tuple[float, ...] = (0.75, 0.5)


@dataclass(frozen=True)
class Params:
    fetch_data: FetchDataParams = FetchDataParams()
    fetch_detector: FetchDetectorParams = FetchDetectorParams()
    preprocess: PreprocessParams = PreprocessParams()
    embed: EmbedParams = EmbedParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()

    def flat(self) -> dict[str, Any]:
        """Returns every parameter as ``{"section.key": value}`` (for MLflow ``log_params``)."""
        return {
            f"{section.name}.{f.name}": getattr(getattr(self, section.name), f.name)
            for section in fields(self)
            for f in fields(getattr(self, section.name))
        }


# Names users type for a key that has another one here (difflib finds only near spellings).
KEY_ALIASES = {"learning_rate": "lr", "learningrate": "lr", "lr_rate": "lr", "num_epochs": "epochs",
               "n_epochs": "epochs", "max_epochs": "epochs", "bs": "batch_size", "wd": "weight_decay", "img_size": "image_size",
               "input_size": "image_size", "model": "backbone", "arch": "backbone", "workers": "num_workers",
               "warmup": "warmup_epochs"}


def did_you_mean(name: object, known: typing.Iterable[Any], prefix: str = "") -> str:
    """``" (did you mean train.epochs?)"`` for an unknown key ``name`` close to one of ``known`` (its spelling,
    case, ``-`` for ``_``, or a usual other name: ``learning_rate`` for ``lr``), else ``""``; ``prefix`` is put
    before the key meant (``"train."``). A key of ``known`` that is not a string (YAML's ``1: x``) is never meant:
    ``-S`` cannot name it."""
    known = sorted(k for k in known if isinstance(k, str))  # sorting an int among strings raised TypeError
    text = str(name).strip().lower().replace("-", "_")
    alias = KEY_ALIASES.get(text)
    if text in known and text != name:
        match = text
    elif alias in known:
        match = alias
    else:
        close = difflib.get_close_matches(text, known, n=1, cutoff=0.75)
        match = close[0] if close else None
    return f" (did you mean {prefix}{match}?)" if match else ""


def _shown(value: Any) -> str:
    """``value`` as a message shows it: ``repr``, but YAML's no value (``key:`` left empty, ``~``, ``null``) as
    ``null (no value)``, not Python's ``None``, a word ``params.yaml`` never holds."""
    return "null (no value)" if value is None else repr(value)


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Validates (and lightly coerces) one value against its dataclass annotation."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        problems = []
        for option in typing.get_args(annotation):
            try:
                return _check_type(name, value, option)
            except ConfigError as e:
                problems.append(str(e).removeprefix(f"{name} must be ").split(", got")[0])
        raise ConfigError(f"{name} must be {' or '.join(problems)}, got {_shown(value)}")
    if origin is Literal:
        allowed = typing.get_args(annotation)
        if value not in allowed:
            raise ConfigError(f"{name} must be one of {list(allowed)}, got {_shown(value)}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name} must be true or false, got {_shown(value)}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name} must be an integer, got {_shown(value)}")
        return value
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name} must be a number, got {_shown(value)}")
        try:
            number = float(value)
        except OverflowError:  # an integer literal beyond a float's range (math.isfinite raised it too)
            raise ConfigError(f"{name} must be a finite number, got an integer beyond a float's range") from None
        if not math.isfinite(number):
            raise ConfigError(f"{name} must be a finite number, got {_shown(value)}")
        return number
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name} must be a string, got {_shown(value)}")
        return value
    if origin is tuple and typing.get_args(annotation)[1:] == (Ellipsis,):
        # YAML lists (also `dvc exp run -S 'key=[a, b]'`) become tuples: the dataclasses are frozen.
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name} must be a list, got {_shown(value)}")
        item = typing.get_args(annotation)[0]
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    raise TypeError(f"unsupported annotation for {name}: {annotation!r}")  # programming error


# Why a key is missing, most often: the code has a key the file predates (a params.yaml kept from an older checkout,
# a branch made before the key, `git checkout OLD -- params.yaml`).
_OLDER = " (a params.yaml older than this code)"


def _accepts(annotation: Any) -> str:
    """What a value of ``annotation`` is, as :func:`_check_type` accepts it: ``"one of ['hog', 'cnn']"``,
    ``"auto or a number"``, ``"a list of strings"``."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        return " or ".join(_accepts(option) for option in typing.get_args(annotation))
    if origin is Literal:
        allowed = typing.get_args(annotation)
        return str(allowed[0]) if len(allowed) == 1 else f"one of {list(allowed)}"
    if origin is tuple:
        return "a list of " + {float: "numbers", int: "integers", str: "strings"}.get(typing.get_args(annotation)[0],
                                                                                     "values")
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(annotation,
                                                                                             str(annotation))


def _yaml_value(value: Any) -> str:
    """``value`` as one line of YAML in flow style (``0.001``, ``[0.75, 0.5]``, ``{workers: 0}``), for a message's
    line to paste into ``params.yaml``."""
    plain = to_dict(value) if dataclasses.is_dataclass(value) else value
    plain = {k: list(v) if isinstance(v, tuple) else v for k, v in plain.items()} if isinstance(plain, dict) else (
        list(plain) if isinstance(plain, tuple) else plain)
    return yaml.safe_dump(plain, default_flow_style=True, width=math.inf, sort_keys=False).strip().removesuffix(
        "\n...").strip()


def _build_section(cls: type, name: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise ConfigError(f"params section {name!r} must be a mapping, got {_shown(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(raw) - known, key=str)  # a YAML key may be a number (`1: x`)
    if unknown:
        raise ConfigError(f"Unknown config key: {name}.{unknown[0]}{did_you_mean(unknown[0], known, name + '.')} "
                          f"(known keys of {name}: {sorted(known)})")
    missing = sorted(known - set(raw))
    if missing:
        key, accepts = missing[0], _accepts(hints[missing[0]])
        raise MissingKeyError(f"Missing config key: {name}.{key}, {accepts}: add `{key}: "
                              f"{_yaml_value(getattr(cls(), key))}` (its default) to params.yaml's {name} "
                              f"section{_OLDER}", f"{name}.{key}", accepts)
    values = {key: _check_type(f"{name}.{key}", raw[key], hints[key]) for key in raw}
    obj = cls(**values)
    _validate_ranges(name, obj)
    return obj


def check_train_backbone(backbone: str) -> None:
    """``train.backbone`` names a model :func:`faceage.model.build_model` can build (raises ConfigError if not),
    checked here so that a typo fails in the first stage rather than at train, after the data work (and by
    the sweep for each ``--backbones`` name before its first run)."""
    if backbone in FAST_BACKBONES:
        return
    if importlib.util.find_spec("torchvision") is None:
        return  # the service's runtime (ONNX Runtime, no torch) builds no model; build_model checks where one is
    # By name, as faceage.predict loads its torch runtime: the service's code reaches this module and must never
    # import torch (tests/unit/test_bentofile.py). Lazily: faceage.model imports this module.
    importlib.import_module("faceage.model").check_backbone(backbone)


def _http_scheme(url: str) -> bool:
    """Whether ``url``'s scheme is http or https, in any case (as requests and faceage.appa_real.is_url read it)."""
    return re.match(r"https?:", url, re.IGNORECASE) is not None  # (urlsplit raises on some: `http://[::1`)


def _host(url: str) -> str | None:
    """``url``'s host, or None (none given, or a URL that cannot be parsed: ``http://[::1``)."""
    try:
        return urlsplit(url).hostname
    except ValueError:
        return None


def _validate_ranges(name: str, obj: Any) -> None:
    """Range checks that the type alone cannot express."""
    checks: list[tuple[bool, str]] = []
    if isinstance(obj, FetchDataParams):
        # The scheme as faceage.appa_real.is_url and requests read it: in any case (HTTPS:// is a URL source, and
        # was refused as a mirror); one without a host (`https:/host/...`, a slash short) failed only in fetch_data.
        hostless = [u for u in (obj.source, *obj.mirrors) if _http_scheme(u) and not _host(u)]
        # An empty source is the repo root itself: check_sources hashed the whole repo (.venv included) and
        # fetch_data blamed its layout. `-S fetch_data.source=$(realpath PATH)` gives it when PATH is missing.
        checks = [(obj.source.strip() != "",
                   "fetch_data.source is empty: give the release's URL, or a local folder or .zip in its layout "
                   "(a `$(realpath PATH)` of a missing PATH expands to nothing)"),
                  (all(_http_scheme(m) for m in obj.mirrors),
                   f"fetch_data.mirrors must be http(s) URLs, got {list(obj.mirrors)}"),
                  (not hostless, f"fetch_data.{'source' if obj.source in hostless else 'mirrors'}: "
                                 f"{hostless[0] if hostless else ''!r} has no host (scheme://host/path)"),
                  (obj.md5 == "" or re.fullmatch(r"[0-9a-fA-F]{32}", obj.md5) is not None,
                   f"fetch_data.md5 must be 32 hex digits (either case) or \"\" to skip the check, got {obj.md5!r}")]
    elif isinstance(obj, PreprocessParams):
        checks = [
            (0.0 <= obj.margin < 2.0, f"preprocess.margin must be in [0, 2), got {obj.margin}"),
            (obj.size >= 16, f"preprocess.size must be >= 16 px, got {obj.size}"),
            (obj.upsample >= 0, f"preprocess.upsample must be >= 0, got {obj.upsample}"),
            (0.0 <= obj.retry_pad <= 1.0, f"preprocess.retry_pad must be in [0, 1], got {obj.retry_pad}"),
            (obj.cnn_retry_side == 0 or obj.cnn_retry_side >= 80,
             f"preprocess.cnn_retry_side must be 0 (off) or >= 80 px, got {obj.cnn_retry_side}"),
            (obj.workers >= 0, f"preprocess.workers must be >= 0, got {obj.workers}"),
        ]
    elif isinstance(obj, EmbedParams):
        checks = [(obj.workers >= 0, f"embed.workers must be >= 0, got {obj.workers}")]
    elif isinstance(obj, TrainParams):
        check_train_backbone(obj.backbone)
        checks = [
            (obj.epochs >= 0, f"train.epochs must be >= 0 (0: evaluate the initial weights), got {obj.epochs}"),
            (obj.freeze_blocks >= 0, f"train.freeze_blocks must be >= 0, got {obj.freeze_blocks}"),
            (0 < obj.layer_lr_decay <= 1, f"train.layer_lr_decay must be in (0, 1], got {obj.layer_lr_decay}"),
            (obj.distill_weight >= 0, f"train.distill_weight must be >= 0, got {obj.distill_weight}"),
            (obj.ensemble_distill >= 0, f"train.ensemble_distill must be >= 0, got {obj.ensemble_distill}"),
            (obj.image_size >= 32, f"train.image_size must be >= 32 px, got {obj.image_size}"),
            (obj.batch_size >= 1, f"train.batch_size must be >= 1, got {obj.batch_size}"),
            (obj.lr > 0, f"train.lr must be > 0, got {obj.lr}"),
            (obj.weight_decay >= 0, f"train.weight_decay must be >= 0, got {obj.weight_decay}"),
            (obj.label_sigma > 0, f"train.label_sigma must be > 0, got {obj.label_sigma}"),
            (0 <= obj.age_balance <= 1, f"train.age_balance must be in [0, 1], got {obj.age_balance}"),
            (0 <= obj.low_res <= 1, f"train.low_res must be in [0, 1] (a share of faces), got {obj.low_res}"),
            (0 < obj.low_res_min <= 1, f"train.low_res_min must be in (0, 1] (a share of the side), "
                                       f"got {obj.low_res_min}"),
            (obj.warmup_epochs >= 0, f"train.warmup_epochs must be >= 0, got {obj.warmup_epochs}"),
            # NumPy's SeedSequence (every epoch's reseeding) takes no negative seed: -1 ("random" elsewhere)
            # failed with "expected non-negative integer" after the data load; torch's seeds are 64-bit, and
            # seed + epoch stays within a signed one (the sampler seeded with it until round 25)
            (0 <= obj.seed and obj.seed + obj.epochs < 2**63,
             f"train.seed must be in [0, 2**63 - train.epochs), got {obj.seed}"),
            (obj.num_workers >= -1, f"train.num_workers must be >= -1, got {obj.num_workers}"),
            (obj.nproc_per_node >= 1, f"train.nproc_per_node must be >= 1, got {obj.nproc_per_node}"),
            (obj.ensemble_weight == "auto" or 0 <= obj.ensemble_weight <= 1,
             f"train.ensemble_weight must be auto or in [0, 1], got {obj.ensemble_weight}"),
            # nproc_per_node 0 is refused above: the checks are all computed before the first is raised, and
            # `batch_size % 0` was a ZeroDivisionError's traceback in place of that message
            (obj.nproc_per_node < 1 or obj.batch_size % obj.nproc_per_node == 0,
             f"train.batch_size={obj.batch_size} (the global batch) must be divisible by "
             f"train.nproc_per_node={obj.nproc_per_node}"),
        ]
    elif isinstance(obj, EvaluateParams):
        # Its metric is named cs{cs_years:g} (cs5, cs2.5): outside [0.01, 100] that name takes an exponent (cs1e-05),
        # which the model card, written after metrics.json, did not find; and a threshold of a century scores nothing.
        checks = [(0.01 <= obj.cs_years <= 100, f"evaluate.cs_years must be in [0.01, 100] years, got {obj.cs_years}"),
                  (obj.batch_size >= 1, f"evaluate.batch_size must be >= 1, got {obj.batch_size}"),
                  (all(e.strip() for e in obj.external), f"evaluate.external has an empty path: {list(obj.external)}"),
                  (all(0 < f < 1 for f in obj.low_res),
                   f"evaluate.low_res: each must be in (0, 1) (a share of the side), got {list(obj.low_res)}")]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    if isinstance(obj, TrainParams):  # each key in range first: the combinations' messages assume it
        check_train_params(obj)


def params_from_dict(raw: dict[str, Any]) -> Params:
    """Builds :class:`Params` from a parsed ``params.yaml``.

    Args:
        raw: Mapping with exactly one entry per stage section.

    Returns:
        The frozen, validated parameters.

    Raises:
        ConfigError: On an unknown, missing or mistyped key or an out-of-range value;
            the message names the key as ``section.key``.
    """
    if not isinstance(raw, dict):
        raise ConfigError(f"params must be a mapping of sections, got {type(raw).__name__}")
    sections = {f.name: f.type for f in fields(Params)}
    hints = typing.get_type_hints(Params)
    unknown = sorted(set(raw) - set(sections), key=str)
    if unknown:
        raise ConfigError(f"Unknown config key: {unknown[0]}{did_you_mean(unknown[0], sections)} "
                          f"(known sections: {sorted(sections)})")
    missing = sorted(set(sections) - set(raw))
    if missing:
        raise MissingKeyError(f"Missing config key: {missing[0]}: add `{missing[0]}: "
                              f"{_yaml_value(to_dict(getattr(Params(), missing[0])))}` (its defaults) to "
                              f"params.yaml{_OLDER}", missing[0])
    return Params(**{name: _build_section(hints[name], name, raw[name]) for name in sections})


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's core scalars, as DVC (ruamel.yaml) reads and writes
    ``params.yaml``: ``dvc exp run -S train.lr=1e-5`` writes ``lr: 1e-05``, a number to DVC and
    YAML 1.2 but a string to YAML 1.1 (which wants a dot), so every stage failed on it; ``yes`` /
    ``on`` are strings, not booleans, to both. Integers too: ``seed: 010`` is 10 to DVC (8, octal, to
    YAML 1.1), ``0o10`` is 8 and ``1:30`` a string (90 to YAML 1.1). The number patterns are
    ruamel.yaml's for YAML 1.2, so DVC's params (``dvc exp show``, ``params diff``) and the stages agree."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        """A key twice in one mapping is an error, as in ruamel.yaml: DVC refuses such a ``params.yaml``
        ("found duplicate key"), where PyYAML kept the last value silently (merge keys ``<<`` may repeat one)."""
        if isinstance(node, yaml.MappingNode):
            first: dict[Any, yaml.Node] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge" or not isinstance(key_node, yaml.ScalarNode):
                    continue
                key = self.construct_object(key_node)
                if key in first:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}, first at line {first[key].start_mark.line + 1}",
                        key_node.start_mark)
                first[key] = key_node
        return super().construct_mapping(node, deep=deep)

    def construct_yaml_int(self, node: yaml.ScalarNode) -> int:
        """``_`` ignored, ``0b`` / ``0o`` / ``0x`` prefixes, anything else decimal (leading zeros too)."""
        text = str(self.construct_scalar(node)).replace("_", "")
        sign = -1 if text[0] == "-" else 1
        text = text.lstrip("+-")
        base = {"0b": 2, "0o": 8, "0x": 16}.get(text[:2], 10)
        return sign * int(text[2:] if base != 10 else text, base)


_NUMBER_TAGS = ("tag:yaml.org,2002:bool", "tag:yaml.org,2002:float", "tag:yaml.org,2002:int")
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag not in _NUMBER_TAGS]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))
_Yaml12Loader.add_implicit_resolver(  # ruamel.yaml's YAML 1.2 float (underscores allowed, as there)
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |[-+]?\.[0-9_]+(?:[eE][-+][0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))
_Yaml12Loader.add_implicit_resolver(  # ruamel.yaml's YAML 1.2 int
    "tag:yaml.org,2002:int",
    re.compile(r"""^(?:[-+]?0b[0-1_]+
                    |[-+]?0o?[0-7_]+
                    |[-+]?[0-9][0-9_]*
                    |[-+]?0x[0-9a-fA-F_]+)$""", re.X),
    list("-+0123456789"))
_Yaml12Loader.add_constructor("tag:yaml.org,2002:int", _Yaml12Loader.construct_yaml_int)


def parse_params(text: str) -> Any:
    """Parses ``params.yaml`` text as DVC does (YAML 1.2 numbers and booleans, see :class:`_Yaml12Loader`)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass


def load_params(path: str | Path = "params.yaml") -> Params:
    """Reads and validates ``params.yaml``.

    Args:
        path: The YAML file.

    Returns:
        The frozen, validated parameters.

    Raises:
        ConfigError: See :func:`params_from_dict`; :class:`ParamsFileError` (also a ``yaml.YAMLError``) where
            the file is not YAML (a tab, a key twice) or not UTF-8: one line naming the file and the line; or where
            it cannot be read (a folder, no permission).
        ParamsNotFoundError: (a ``FileNotFoundError``) If the file does not exist: one line naming its absolute
            path (a relative one is read from the current folder).
    """
    try:
        raw = parse_params(Path(path).read_text(encoding="utf-8")) or {}
    except (FileNotFoundError, NotADirectoryError):  # NotADirectoryError: a file where a folder of the path is
        raise ParamsNotFoundError(f"no params file at {Path(path).absolute()}: run from the repo root, or pass "
                                  "--params PATH (the project's params.yaml)") from None
    except IsADirectoryError:  # `--params .`: IsADirectoryError's traceback
        raise ParamsFileError(f"cannot read {path}: it is a folder, not a params file: pass --params PATH to the "
                              "project's params.yaml") from None
    except OSError as e:  # mode 600 from another account, an I/O error, a symlink loop: a traceback too
        # chmod is the fix for a permission alone: a symlink loop (ELOOP) or an I/O error it does not mend
        fix = ("make it readable (chmod a+r)" if isinstance(e, PermissionError) else
               "fix it, or pass --params PATH to the project's params.yaml")
        raise ParamsFileError(f"cannot read {path}: {e.strerror or e}: {fix}") from None
    except UnicodeDecodeError as e:
        raise ParamsFileError(f"{path} is not valid UTF-8 (byte {e.object[e.start:e.start + 1].hex()} at offset "
                              f"{e.start}): fix it, or restore it (git checkout params.yaml)") from None
    except yaml.YAMLError as e:
        raise ParamsFileError(f"{path} is not valid YAML{yaml_where(e)}: fix it, or restore it "
                              "(git checkout params.yaml)") from None
    return params_from_dict(raw)


def yaml_where(error: yaml.YAMLError) -> str:
    """``" at line 32 (found character '\\t' that cannot start any token)"``: where and why PyYAML refused a file,
    on one line (its own message spans five, quoting ``"<unicode string>"`` for the file)."""
    where = f" at line {error.problem_mark.line + 1}" if getattr(error, "problem_mark", None) else ""
    return where + (f" ({' '.join(str(error.problem).split())})" if getattr(error, "problem", None) else "")


def section_keys(section: str) -> list[str]:
    """Returns ``["section.key", ...]`` for one section: what its DVC stage must list."""
    cls = typing.get_type_hints(Params)[section]
    return [f"{section}.{f.name}" for f in fields(cls)]


def to_dict(obj: Any) -> dict[str, Any]:
    """Plain-dict view of a params dataclass (for checkpoints and JSON)."""
    return dataclasses.asdict(obj)

