"""Age model: a torchvision backbone with a 101-way head over ages 0..100; self-describing checkpoints.

Input: a backbone name and a weights choice. Output: an ``nn.Module`` mapping a normalised
(N, 3, S, S) batch to (N, 101) logits; the predicted age is the expectation of the softmax.

A checkpoint holds the ``state_dict`` and everything needed to rebuild and use the model
without ``params.yaml``: backbone, age range, input size, normalisation, crop settings
(margin, crop size, detector kind, upsample, detector sha256), and GoogLeNet/Inception's
``transform_input``. It contains only tensors and
plain Python values, so it loads with ``torch.load(..., weights_only=True)``.
"""

from __future__ import annotations

import logging
import math
import os
import pickle
import types
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from faceage.atomic import replacing
from faceage.config import DESCRIPTOR, ConfigError, dlib_weights_refusal
from faceage.download import DownloadError, download, file_digest
from faceage.errors import FaceAgeError
from faceage.paths import from_root
from faceage.chips import DLIB_AGE
from faceage.face_encoder import EMBEDDING_DIM, FACE_ENCODER

log = logging.getLogger(__name__)

MIN_AGE, MAX_AGE = 0, 100
NUM_AGES = MAX_AGE - MIN_AGE + 1
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
CHECKPOINT_FORMAT = "faceage-checkpoint/1"


class PretrainedWeightsError(FaceAgeError, RuntimeError):
    """``train.pretrained`` asks for weights that cannot be found or fetched."""


class CheckpointError(FaceAgeError, ValueError):
    """A file given as a checkpoint is unreadable or is not a FaceAge checkpoint."""


def _last_linear(model: nn.Module) -> tuple[nn.Module, str, nn.Linear]:
    """Finds the classification head: the last ``nn.Linear`` in module order."""
    found = None
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            found = (name, module)
    if found is None:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head to replace")
    name, linear = found
    parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
    return parent, name.rsplit(".", 1)[-1], linear


class EmbeddingAgeHead(nn.Module):
    """Expected-age head over frozen face descriptors: 128-D embedding -> ``num_ages`` logits."""

    def __init__(self, in_features: int = EMBEDDING_DIM, num_ages: int = NUM_AGES, hidden: int = 256,
                 dropout: float = 0.2, input_scale: float = 10.0):
        super().__init__()
        # dlib descriptors have per-coordinate std ~0.1; scaled to ~1, the head trains well at the
        # CNN learning rate (validation MAE 5.85 -> 5.15 years on the shared sample, 30 epochs).
        self.register_buffer("input_scale", torch.tensor(float(input_scale)))
        self.net = nn.Sequential(
            nn.Linear(in_features, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.GELU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_ages),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, 128) descriptors -> logits; (N, views, 128) -> log-probabilities averaged over the views."""
        if x.ndim == 3:
            return torch.log_softmax(self.net(x * self.input_scale), dim=-1).mean(dim=1)
        return self.net(x * self.input_scale)


# torchvision classifiers whose head is not an nn.Linear (SqueezeNet ends in a 1x1 convolution).
NO_LINEAR_HEAD = frozenset({"squeezenet1_0", "squeezenet1_1"})
# Built without their auxiliary classifiers: with them, train mode returns a tuple of outputs, and
# Inception's needs 299 px inputs. (Their ImageNet files hold the auxiliary weights too; they go unused.)
AUX_HEADS = frozenset({"googlenet", "inception_v3"})
# The state_dict prefixes of those auxiliary classifiers: a weights file may hold them (torchvision's do).
AUX_PREFIXES = {"googlenet": ("aux1.", "aux2."), "inception_v3": ("AuxLogits.",)}


def _load_unversioned(self: nn.Module, state_dict, prefix, local_metadata, *args) -> None:
    """MNASNet's ``_load_from_state_dict``, taking a state dict without module versions as this build's own.

    torch keeps each module's version in ``state_dict._metadata``, which a copy such as
    ``{k: v.cpu() for k, v in model.state_dict().items()}`` drops (the checkpoints, the best epoch's
    weights, the weights-file body). MNASNet alone refuses that ("version should be set to 1 or 2
    instead of None"): every ``mnasnet*`` run failed after its last epoch, and no MNASNet
    checkpoint or weights file loaded.
    """
    if local_metadata.get("version") is None:
        local_metadata = {**local_metadata, "version": type(self)._version}
    type(self)._load_from_state_dict(self, state_dict, prefix, local_metadata, *args)


def torchvision_backbones() -> list[str]:
    """The torchvision classifiers ``train.backbone`` may name."""
    return sorted(set(torchvision.models.list_models(module=torchvision.models)) - NO_LINEAR_HEAD)


def check_backbone(backbone: str) -> None:
    """Checks a ``train.backbone`` value: ``dlib_face``, ``dlib_age`` or one of :func:`torchvision_backbones`.

    The one check behind both :func:`build_model` and :func:`faceage.config.params_from_dict` (which
    calls it for names outside :data:`faceage.config.FAST_BACKBONES`), so a typo fails in the first stage.

    Raises:
        ConfigError: Unknown backbone (the message lists the available ones).
    """
    if backbone in (FACE_ENCODER, DLIB_AGE):
        return
    available = torchvision_backbones()
    if backbone not in available:
        why = " (its head is a convolution, not a linear layer)" if backbone in NO_LINEAR_HEAD else ""
        raise ConfigError(f"train.backbone must be a torchvision classification model with a linear head, got "
                          f"{backbone!r}{why}; available: {FACE_ENCODER}, {DLIB_AGE}, {', '.join(available)}")


def build_model(backbone: str, num_ages: int = NUM_AGES, head: str | None = None,
                face_features: str = DESCRIPTOR) -> nn.Module:
    """A randomly initialised age model with ``num_ages`` outputs.

    Args:
        backbone: A torchvision classification model name (``resnet18``, ``efficientnet_b0``, ...)
            whose head is replaced, or ``dlib_face``: a head over dlib face descriptors
            (the frozen encoder itself lives in :mod:`faceage.face_encoder`), or ``dlib_age``:
            dlib's age network over aligned 64x64 chips (:mod:`faceage.dlib_age`).
        num_ages: Number of age classes.
        head: ``dlib_age``'s head (:func:`faceage.finetune.resolve_head`); ``None`` = dlib's own.
        face_features: What the fused head reads of dlib's face network (``train.face_features``).

    Raises:
        ConfigError: Unknown backbone (the message lists the available ones).
    """
    if backbone == FACE_ENCODER:
        return EmbeddingAgeHead(EMBEDDING_DIM, num_ages)
    if backbone == DLIB_AGE:
        from faceage.dlib_age import HEAD_PRETRAINED, DlibAgeNet

        return DlibAgeNet(num_ages, head or HEAD_PRETRAINED, face_features)
    check_backbone(backbone)
    # transform_input: their ImageNet weights expect inputs in [-1, 1], the step torchvision adds when it
    # builds them with weights (a fixed affine map of the normalised input: harmless from scratch).
    extra = {"aux_logits": False, "init_weights": True, "transform_input": True} if backbone in AUX_HEADS else {}
    model = torchvision.models.get_model(backbone, weights=None, **extra)
    parent, attr, linear = _last_linear(model)
    setattr(parent, attr, nn.Linear(linear.in_features, num_ages))
    if isinstance(model, torchvision.models.MNASNet):
        # A bound method of the instance (copy.deepcopy rebinds it to the copy): the class stays torchvision's.
        model._load_from_state_dict = types.MethodType(_load_unversioned, model)
    return model


def check_input_size(model: nn.Module, backbone: str, image_size: int) -> None:
    """Runs one blank ``image_size`` x ``image_size`` image through ``model`` (eval mode, no gradients).

    Some torchvision classifiers take one size only (ViTs and MaxViT: 224 px) or need a minimum
    (Inception v3: 75 px, AlexNet: 63 px); without this check they failed at the first batch, after the
    data had loaded, with torch's own message (MaxViT's reads ``shape '[2, 64, 9, 7, 9, 7]' is invalid``).

    Raises:
        ConfigError: The model cannot take that size (the message names ``train.image_size``).
    """
    if backbone in (FACE_ENCODER, DLIB_AGE):  # fixed inputs: descriptors, 64 px chips
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, 3, image_size, image_size))
    except (RuntimeError, AssertionError, ValueError, IndexError) as e:
        raise ConfigError(f"train.image_size={image_size} does not fit train.backbone={backbone!r} "
                          f"({_first_sentence(e)}); torchvision's classifiers are built for 224") from e
    finally:
        model.train(was_training)


def input_stats(backbone: str) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The mean/std :func:`faceage.transforms.normalize` applies to a backbone's uint8 input."""
    if backbone == DLIB_AGE:
        from faceage.dlib_age import INPUT_MEAN, INPUT_STD

        return INPUT_MEAN, INPUT_STD
    return IMAGENET_MEAN, IMAGENET_STD


def head_prefix(model: nn.Module) -> str:
    """The ``state_dict`` key prefix of the head (``fc.``, ``classifier.1.``, ...)."""
    for name, module in reversed(list(model.named_modules())):
        if isinstance(module, nn.Linear):
            return name + "."
    raise ValueError("model has no linear head")


def resolve_imagenet_weights(backbone: str, cache_dir: str | Path | None = None) -> Path:
    """Finds torchvision's default ImageNet weights for ``backbone`` in the torch hub cache,
    or downloads them there (resumable; the file name carries its sha256 prefix, which is checked).

    Raises:
        PretrainedWeightsError: No weights exist for the backbone, or they cannot be fetched.
    """
    try:
        weights = torchvision.models.get_model_weights(backbone).DEFAULT
    except (ValueError, KeyError) as e:
        raise PretrainedWeightsError(f"train.pretrained=imagenet: torchvision has no ImageNet weights for {backbone!r}") from e
    filename = os.path.basename(weights.url)
    hub_dir = Path(cache_dir) if cache_dir else Path(torch.hub.get_dir()) / "checkpoints"
    path = hub_dir / filename
    # torchvision names files "<name>-<first hex digits of sha256>.pth" (torch.hub's check_hash reads it so).
    prefix = filename.rsplit("-", 1)[-1].split(".")[0]
    if path.exists():
        # A cut-short or damaged copy failed in torch.load with advice to torch.save a state dict, or (still
        # readable) loaded wrong weights. ~0.1 s for resnet18's 45 MB; the user's file, so named, not removed.
        try:
            ok = file_digest(path).startswith(prefix)
        except OSError as e:
            raise PretrainedWeightsError(f"train.pretrained=imagenet: cannot read the cached {path}: "
                                         f"{e.strerror or e}; make it readable, or delete it to fetch it again") from e
        if not ok:
            raise PretrainedWeightsError(
                f"train.pretrained=imagenet: the cached {path} failed its sha256 check (its name says it starts "
                f"with {prefix}): a damaged or cut-short copy; delete it and run again to fetch it again (or copy "
                "a good one there)")
        return path
    try:
        download(weights.url, path, timeout_s=15, retries=1)
    except (DownloadError, OSError) as e:
        raise PretrainedWeightsError(
            f"train.pretrained=imagenet: {filename} is not in {hub_dir} and could not be downloaded "
            f"from {weights.url} ({e}). Copy the file there, set train.pretrained to the path of a "
            "weights file, or set train.pretrained=none to train from scratch."
        ) from e
    if not file_digest(path).startswith(prefix):
        path.unlink()
        raise PretrainedWeightsError(
            f"train.pretrained=imagenet: {filename} from {weights.url} failed its sha256 check (its name says it "
            f"starts with {prefix}; the download was damaged, not kept): run again to fetch it again, copy a good "
            f"copy into {hub_dir}, or set train.pretrained=none to train from scratch")
    return path


# Where a full checkpoint keeps the network's weights: FaceAge's and Lightning's "state_dict", torchvision
# references' and FaceAge's own training state's "model", the PyTorch tutorials' "model_state_dict".
CHECKPOINT_WEIGHTS_KEYS = ("state_dict", "model", "model_state_dict")
# Key prefixes a wrapper adds to every name: DistributedDataParallel/DataParallel ("module."),
# torch.compile ("_orig_mod."), a Lightning module holding the network as ``self.model`` ("model.").
WRAPPER_PREFIXES = ("module.", "_orig_mod.", "model.")


def _unwrap_weights(state: Any, own_keys) -> Any:
    """The state dict inside a weights file, without the key prefixes wrappers add.

    Unwraps a full checkpoint (:data:`CHECKPOINT_WEIGHTS_KEYS`) and takes :data:`WRAPPER_PREFIXES` off
    while no key is one of ``own_keys`` and every key has the prefix: a file that already names the
    model's own weights is left as it is, and one of another network still fails the fit check.
    """
    own = set(own_keys)
    while isinstance(state, Mapping) and not own.intersection(state):
        inner = next((state[k] for k in CHECKPOINT_WEIGHTS_KEYS if isinstance(state.get(k), Mapping)), None)
        if inner is not None:
            state = inner
            continue
        prefix = next((p for p in WRAPPER_PREFIXES if state and all(isinstance(k, str) and k.startswith(p)
                                                                    for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _renamed_legacy_keys(model: nn.Module, state: Mapping) -> Mapping:
    """``state`` with the names an older torchvision gave ``model``'s layers put as this one names them.

    torchvision 0.12's ViT MLP blocks named their layers ``linear_1`` and ``linear_2``, later ones ``0`` and
    ``3``; torchvision's own ``MLPBlock._load_from_state_dict`` renames them, but only inside
    ``load_state_dict``, after the fit check here, which refused them. Its ImageNet ViT files have the old names.
    """
    from torchvision.models.vision_transformer import MLPBlock

    renames = {f"{name}.linear_{i + 1}.{kind}": f"{name}.{3 * i}.{kind}"
               for name, module in model.named_modules() if isinstance(module, MLPBlock)
               for i in range(2) for kind in ("weight", "bias")}
    if not renames or renames.keys().isdisjoint(state):
        return state
    return {renames.get(k, k): v for k, v in state.items()}


def load_pretrained(model: nn.Module, backbone: str, pretrained: str, model_dir: str | Path | None = None) -> str:
    """Loads ``train.pretrained`` weights into every layer but the head.

    Args:
        model: From :func:`build_model`.
        backbone: Its name (to find ImageNet weights).
        pretrained: ``"imagenet"``, ``"none"`` or a path to a ``state_dict`` file (also inside a full
            checkpoint, or with a DDP ``module.`` / torch.compile ``_orig_mod.`` key prefix). For
            ``dlib_age``, ``"imagenet"`` (or ``"dlib"``) loads dlib's pretrained age network, head included
            (widened to 0..100, see :func:`faceage.dlib_age.widen_head`); a weights file is refused.
        model_dir: The ``fetch_detector`` folder (holds ``age-v1.onnx`` for ``dlib_age``).

    Returns:
        A short description of what was loaded (for logs and MLflow).

    Raises:
        PretrainedWeightsError: The weights are unreachable or do not fit the backbone.
    """
    refused = dlib_weights_refusal(backbone, pretrained)
    if refused:
        raise PretrainedWeightsError(refused)
    if backbone == FACE_ENCODER:
        return "dlib face-recognition ResNet (frozen); head randomly initialised"
    if backbone == DLIB_AGE:
        if pretrained == "none":
            return "none (random initialisation)"
        from faceage.detector import AGE_MODEL_FILE, RECOGNITION_FILE
        from faceage.dlib_age import load_pretrained_into

        needed = [AGE_MODEL_FILE] + ([RECOGNITION_FILE] if getattr(model, "face", None) is not None else [])
        # The user's choices here are train.pretrained and the detector folder, not train.backbone; a missing
        # folder printed "(looked in None)".
        fixes = ("run `dvc repro fetch_detector` (or pass its output folder as --detector), or set "
                 "train.pretrained=none for a randomly initialised network")
        for name in needed:
            if model_dir is None:
                raise PretrainedWeightsError(f"train.pretrained={pretrained!r} with backbone {DLIB_AGE} loads {name} "
                                             f"from the fetch_detector stage, but no detector folder was given "
                                             f"(--detector): {fixes}")
            if not (Path(model_dir) / name).is_file():
                raise PretrainedWeightsError(f"train.pretrained={pretrained!r} with backbone {DLIB_AGE} loads {name} "
                                             f"from the fetch_detector stage: no {name} in {model_dir}; {fixes}")
        path = Path(model_dir) / AGE_MODEL_FILE
        load_pretrained_into(model, path, Path(model_dir) / RECOGNITION_FILE)
        loaded = f"{path} (dlib age network, sha256 {file_digest(path)[:12]})"
        if len(needed) > 1:
            face = Path(model_dir) / RECOGNITION_FILE
            loaded += f" + {face} (dlib face-recognition network, sha256 {file_digest(face)[:12]})"
        return loaded
    if pretrained == "none":
        return "none (random initialisation)"
    # A relative path is the repo root's, also in a `dvc exp run --temp` copy (as check_sources reads it).
    path = resolve_imagenet_weights(backbone) if pretrained == "imagenet" else from_root(pretrained)
    if not path.is_file():
        raise PretrainedWeightsError(
            f"train.pretrained={pretrained!r}: no such weights file; use 'imagenet', 'none' or a path to a .pth file"
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises several unrelated types for a bad file
        raise PretrainedWeightsError(f"train.pretrained={pretrained!r}: cannot read {path} as a state dict of "
                                     f"tensors ({_first_sentence(e)}); save one with "
                                     "torch.save(model.state_dict(), path)") from e
    state = _unwrap_weights(state, model.state_dict().keys())
    if not isinstance(state, Mapping):
        raise PretrainedWeightsError(f"train.pretrained={pretrained!r}: {path} holds a {type(state).__name__}, not a "
                                     "state dict; save one with torch.save(model.state_dict(), path)")
    odd = next((k for k in state if not isinstance(k, str)), None)
    if odd is not None:  # a dict keyed by numbers failed below in k.startswith, an AttributeError traceback
        raise PretrainedWeightsError(f"train.pretrained={pretrained!r}: {path} is not a state dict: its keys are not "
                                     f"layer names (e.g. {odd!r:.40}); save one with torch.save(model.state_dict(), path)")
    state = _renamed_legacy_keys(model, state)
    head = head_prefix(model)
    own = model.state_dict()
    body = {k: v for k, v in state.items() if not k.startswith(head)}
    mismatched = [k for k, v in body.items()
                  if k in own and (not isinstance(v, torch.Tensor) or own[k].shape != v.shape)]
    # BatchNorm's step counters are absent from older state dicts (torchvision's own ImageNet files
    # among them); load_state_dict fills them in, so they are not missing weights.
    missing = [k for k in own if not k.startswith(head) and k not in body and not k.endswith(".num_batches_tracked")]
    # Weights the model has no place for: a deeper network of the same family (resnet34's file for resnet18,
    # efficientnet_b1's for efficientnet_b0) holds every key the smaller one has, at the same shapes, and loading
    # with strict=False took that part of it without a word. Only the auxiliary heads' weights may be left over.
    unexpected = [k for k in body if k not in own and not k.startswith(AUX_PREFIXES.get(backbone, ()))]
    if mismatched or missing or unexpected:
        # Each example says how it does not fit: the bare names read the same for a tensor of another shape (another
        # architecture) and one the file lacks (a partial or older file).
        def shape(v: Any) -> str:
            return str(list(v.shape)) if isinstance(v, torch.Tensor) else f"a {type(v).__name__}"

        bad = ([f"{k} ({shape(body[k])} in the file, {list(own[k].shape)} in {backbone})" for k in mismatched[:3]]
               or [f"{k} (not in the file)" for k in missing[:3]] or [f"{k} (not in {backbone})" for k in unexpected[:3]])
        raise PretrainedWeightsError(f"train.pretrained={pretrained!r}: {path} does not fit backbone {backbone!r} "
                                     f"(e.g. {', '.join(bad)})")
    model.load_state_dict(body, strict=False)
    return str(path)


def expected_age(logits: torch.Tensor, temperature: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (years) of the softmax age distribution, per row.

    The mean is always taken at temperature 1 (what the model was trained to predict); the
    standard deviation comes from ``softmax(logits / temperature)``, the calibrated spread.
    """
    ages = torch.arange(MIN_AGE, MIN_AGE + logits.shape[1], device=logits.device, dtype=torch.float32)
    probs = torch.softmax(logits.float(), dim=1)
    mean = probs @ ages
    if temperature != 1.0:
        probs = torch.softmax(logits.float() / temperature, dim=1)
    centre = probs @ ages
    # The spread about the centre, not E[age^2] - centre^2, which cancels in float32 for a narrow
    # distribution: on a real zero-shot face with std 0.43 it was 2.2e-3 years off float64 (torch and
    # ONNX Runtime 4.6e-3 apart); the spread about the centre is 1e-7 off (8e-6 apart).
    var = (probs * (ages[None, :] - centre[:, None]) ** 2).sum(dim=1)
    return mean, var.sqrt()


CALIBRATION_LEVELS = tuple(0.25 * i for i in range(1, 13))  # interval half-widths, in predicted stds


def calibration_error(mean: torch.Tensor, std: torch.Tensor, true_ages: torch.Tensor) -> float:
    """Squared gap between observed and Gaussian coverage of ``mean +- k * std``, summed over k = 0.25..3."""
    err = (true_ages - mean).abs()
    return sum(((err <= k * std).float().mean().item() - math.erf(k / math.sqrt(2))) ** 2
               for k in CALIBRATION_LEVELS)


def fit_temperature(logits: torch.Tensor, true_ages: torch.Tensor) -> float:
    """The temperature that makes ``age +- k * age_std`` cover the true age as often as a Gaussian would.

    A regression calibration curve fit (Kuleshov et al., 2018) over k = 0.25..3 std, by grid search.
    Age errors are heavy-tailed, so fitting the Gaussian likelihood instead widens every interval
    to pay for the few large errors: measured on the shared sample's validation split, it
    covers 76-78% of faces within 1 std instead of 68%.

    Args:
        logits: Validation logits (N, num_ages).
        true_ages: Validation ages (N,).

    Returns:
        The temperature in [0.05, 20].
    """
    grid = torch.logspace(math.log10(0.05), math.log10(20.0), 300).tolist()
    return min(grid, key=lambda t: calibration_error(*expected_age(logits, t), true_ages))


def save_checkpoint(path: str | Path, model: nn.Module, meta: dict[str, Any]) -> None:
    """Writes a self-describing checkpoint atomically and durably (see module docstring for ``meta`` keys): a kill, a
    full disk or a power loss leaves the previous checkpoint or this one, never part of one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    payload = {"format": CHECKPOINT_FORMAT, "state_dict": state, **meta}
    if isinstance(getattr(model, "transform_input", None), bool):
        # GoogLeNet/Inception's input rescaling is a build option, not a weight: without it recorded, a
        # checkpoint trained without it (as built before round 22's review) loaded with it, other ages.
        payload.setdefault("transform_input", model.transform_input)
    # faceage.atomic.replacing, as the training state and history.csv are written: a staging file of this call's own
    # (a fixed model.pt.tmp made two writers of one path rename each other's half-written file in, or fail),
    # removed when the write fails (a full disk, Ctrl-C: the previous checkpoint stands), fsynced before its rename.
    # Unsynced, a power loss after training deleted its state file could leave model.pt empty and no run to resume.
    # torch writes by name (its own file writer); the fsync of the staged file reaches what it wrote.
    with replacing(path) as staged:
        torch.save(payload, staged.name)


def _first_sentence(error: BaseException) -> str:
    """The start of an exception's text: torch's messages run to many lines of advice."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return text.split(". ")[0][:200] or f"{type(error).__name__} (empty or truncated file)"


def read_payload(path: str | Path) -> Any:
    """What a checkpoint file holds, read with torch's weights-only loader (never the file's code).

    Raises:
        CheckpointError: The file cannot be read, or is not a torch file of plain tensors and values
            (a photo, a truncated download, a pickle with code).
    """
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise CheckpointError(f"cannot read checkpoint {path}: {e.strerror or e}") from e
    except pickle.UnpicklingError as e:
        # torch's own text advises weights_only=False, i.e. running the file's code: never do that
        # for a file that should hold only tensors and plain values.
        raise CheckpointError(f"{path} is not a FaceAge checkpoint: not a torch file of plain tensors and "
                              "values (the weights-only loader refused it)") from e
    except KeyError as e:  # a text file read by the legacy pickle loader: "is not a FaceAge checkpoint: 105"
        raise CheckpointError(f"{path} is not a FaceAge checkpoint: not a torch file (its bytes are no pickle: "
                              f"KeyError {e})") from e
    except Exception as e:  # torch raises several unrelated types (RuntimeError, EOFError, ...) for a bad file
        raise CheckpointError(f"{path} is not a FaceAge checkpoint: {_first_sentence(e)}") from e


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """Rebuilds the model from a checkpoint alone, in eval mode.

    Returns:
        ``(model, meta)`` where ``meta`` is the checkpoint without ``state_dict``.

    Raises:
        CheckpointError: The file cannot be read, is not a FaceAge checkpoint (a photo, another
            torch file, a truncated download), names a backbone or head this version cannot build,
            or its weights do not fit its backbone.
    """
    payload = read_payload(path)
    if not isinstance(payload, dict) or payload.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(f"{path} is not a {CHECKPOINT_FORMAT} checkpoint")
    missing = [k for k in ("backbone", "min_age", "max_age", "state_dict") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a complete FaceAge checkpoint: it has no {', '.join(missing)}")
    # Values of the wrong type reached build_model and torch (a state_dict list, a max_age string, a negative age
    # range): TypeError or RuntimeError tracebacks in the CLI and the service instead of this one line.
    ages = [payload[k] for k in ("min_age", "max_age")]
    bad = ("backbone" if not isinstance(payload["backbone"], str)
           else "state_dict" if not isinstance(payload["state_dict"], Mapping)
           else next((k for k, v in zip(("min_age", "max_age"), ages) if type(v) is not int), None)
           or ("max_age" if ages[1] < ages[0] else None))
    if bad:
        raise CheckpointError(f"{path} is a damaged FaceAge checkpoint: its {bad} is {payload[bad]!r:.80} "
                              "(expected a backbone name, a state dict of tensors and integer ages min_age <= max_age)")
    try:  # fused heads saved before train.face_features existed read dlib's descriptor
        model = build_model(payload["backbone"], payload["max_age"] - payload["min_age"] + 1, payload.get("head"),
                            payload.get("face_features", DESCRIPTOR))
    except ValueError as e:  # ConfigError too: a backbone or head this version lacks (a newer version's checkpoint)
        raise CheckpointError(f"{path} names a model this FaceAge version cannot build ({e}): made by another "
                              "version? Use that version, or retrain") from e
    if isinstance(payload.get("transform_input"), bool) and hasattr(model, "transform_input"):
        model.transform_input = payload["transform_input"]
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as e:
        raise CheckpointError(f"{path} is a damaged FaceAge checkpoint: its weights do not fit backbone "
                              f"{payload['backbone']!r} ({' '.join(str(e).split())[:200]})") from e
    model.to(device).eval()
    meta = {k: v for k, v in payload.items() if k != "state_dict"}
    return model, meta
