"""Fine-tuning a pretrained age network without forgetting what it knew (``train.backbone=dlib_age``).

Input: the pretrained model (its weights at the start of training) and :class:`TrainParams`.
Output: three hooks that :func:`faceage.training.train_model` calls:

- :func:`param_groups`: the optimiser's groups: the first ``train.freeze_blocks`` stages
  frozen, and layer-wise learning rates (the head gets ``train.lr``, each stage below it
  ``train.layer_lr_decay`` times its upper neighbour's);
- :class:`Distillation`: learning without forgetting (Li & Hoiem, 2016): an extra loss term
  ``train.distill_weight * KL(pretrained || fine-tuned)`` on the same (augmented) inputs, so the
  network keeps the pretrained age distribution where the labels do not pull it away; the
  ensemble heads get the same term toward the frozen network's own distribution
  (``train.ensemble_distill``); both read the network's top age as "80 or older"
  (``train.distill_open_top``, :func:`distill_kl`);
- :func:`interpolate_weights` (WiSE-FT, Wortsman et al., 2022): after training, the weights
  ``(1 - a) * pretrained + a * fine-tuned`` with ``a`` chosen on the VALIDATION split (the
  smallest ``a``, the model closest to the pretrained one, within one paired standard error of
  the lowest validation MAE), when ``train.wise_ft``.

Why: 1,500 faces of one collection are enough to pull a network trained on ~110k faces toward
that collection's look; these measures trade a little in-sample gain for cross-dataset error
(see ``reports/recipe_dlib_age.md``).
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from faceage import config
from faceage.chips import DLIB_AGE
from faceage.config import ConfigError, TrainParams
from faceage.ort_module import cpu_runner
from faceage.transforms import low_resolution_chips

log = logging.getLogger(__name__)

WISE_ALPHAS = tuple(i / 10 for i in range(11))  # 0 = pretrained, 1 = fine-tuned
LOW_RES_COPIES = 4  # train.low_res with cached frozen stages: lower-resolution copies of each training chip


def stages(model: nn.Module, backbone: str) -> list[list[nn.Parameter]]:
    """Parameters by stage, input first, head last (``dlib_age``: stem, block1..block5, fc)."""
    if backbone == DLIB_AGE:
        model = getattr(model, "full", model)  # a _CachedStages wrapper trains its network's parameters
        names = ["stem_", "block1.", "block2.", "block3.", "block4.", "block5.", "fc."]
        groups = [[t for n, t in model.named_parameters() if n.startswith(prefix)] for prefix in names]
        if not all(groups) or sum(map(len, groups)) != len(list(model.parameters())):
            raise RuntimeError("faceage.finetune.stages: the stage names no longer match DlibAgeNet's parameters")
        return groups
    return [list(model.parameters())]


# dlib_age's head for these params (None for other backbones): training and the tests read it here
resolve_head = config.resolve_head


def check_params(p: TrainParams) -> None:
    """The ``train`` keys that only make sense together (:func:`faceage.config.check_train_params`, which
    ``load_params`` runs too): again here for params built in code, the recipe's and sweep's rows.

    Raises:
        ConfigError: A fine-tuning setting is used with another backbone or with the ensemble head, or another
            combination training cannot run.
    """
    config.check_train_params(p)


def param_groups(model: nn.Module, p: TrainParams) -> list[dict]:
    """Optimiser parameter groups: frozen early stages left out, layer-wise learning rates.

    Each group carries ``lr`` (its peak); the scheduler scales every group by the same factor.
    With ``dlib_age``'s ensemble head, only the ensemble trains, at ``train.lr``.
    """
    head = ensemble_of(model)
    if head is not None:
        ensemble = set(map(id, head.parameters()))
        for t in getattr(model, "full", model).parameters():
            t.requires_grad_(id(t) in ensemble)
        return [{"params": list(head.parameters()), "lr": p.lr}]
    groups = stages(model, p.backbone)
    if p.freeze_blocks >= len(groups):
        raise ConfigError(f"train.freeze_blocks must be < {len(groups)} (the head always trains), got {p.freeze_blocks}")
    out = []
    for depth, params in enumerate(groups):
        if depth < p.freeze_blocks:
            for t in params:
                t.requires_grad_(False)
            continue
        out.append({"params": params, "lr": p.lr * p.layer_lr_decay ** (len(groups) - 1 - depth)})
    if p.epochs > 0 and (p.freeze_blocks or p.layer_lr_decay != 1.0):  # (epochs=0: nothing trains, zero-shot)
        log.info("fine-tuning: %d stage(s) frozen (train.freeze_blocks), lr %s from the lowest trained stage to the "
                 "head (train.layer_lr_decay=%g)", p.freeze_blocks, [f"{g['lr']:.1e}" for g in out], p.layer_lr_decay)
    return out


def ensemble_of(model: nn.Module | None) -> nn.Module | None:
    """The :class:`faceage.dlib_age.AgeEnsemble` head of ``model`` (or of the network a
    :class:`_CachedStages` wrapper trains), ``None`` when it has none."""
    return getattr(getattr(model, "full", model), "ensemble", None)


class Distillation:
    """Learning without forgetting: KL from the frozen pretrained network's age distribution.

    Args:
        model: The network before training (copied and frozen here).
        weight: ``train.distill_weight`` (or ``train.ensemble_distill``); 0 disables the term (no
            extra forward pass).
        zero_shot: ``model`` has an ensemble head: the teacher is the copy's mix at weight 0, i.e.
            the frozen network's own distribution (ages 0..80 as shipped), on the same inputs. The
            untrained ensemble would be no teacher.
        open_top: ``train.distill_open_top``: the class from which teacher and student are compared
            as one class (the pretrained network's top age, 80, read as "80 or older"; see
            :func:`distill_kl`); None compares every class.
    """

    def __init__(self, model: nn.Module, weight: float, zero_shot: bool = False, open_top: int | None = None):
        self.weight = weight
        self.open_top = open_top
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False) if weight > 0 else None
        if self.teacher is not None and zero_shot:
            ensemble_of(self.teacher).weight.fill_(0.0)

    def __call__(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``weight * KL(teacher(x) || softmax(logits))``, averaged over the batch (0 when disabled)."""
        if self.teacher is None:
            return logits.new_zeros(())
        with torch.no_grad():
            target = torch.softmax(self.teacher(x).float(), dim=1)
        return self.weight * distill_kl(logits, target, self.open_top)


def distill_kl(logits: torch.Tensor, target: torch.Tensor, open_top: int | None = None) -> torch.Tensor:
    """``KL(target || softmax(logits))`` averaged over the batch; ``target`` (N, C) is a distribution
    over the first ``C`` of the student's classes (zero beyond).

    With ``open_top = k``, classes ``k..`` of both sides are merged into one before comparing. Why:
    dlib's network was trained on ages up to 80, so its top class means "80 or older"; compared class
    by class, distillation pulls every old face's distribution back under 81 (a 95-year-old the
    labels would put at 90 is held near 80). Merged, the student keeps the teacher's P(80 or older)
    and the labels alone decide how that mass spreads over 80..100.
    """
    logp = torch.log_softmax(logits.float(), dim=1)
    target = F.pad(target.float(), (0, logp.shape[1] - target.shape[1]))
    if open_top is not None and open_top < logp.shape[1] - 1:
        logp = torch.cat([logp[:, :open_top], torch.logsumexp(logp[:, open_top:], 1, keepdim=True)], 1)
        target = torch.cat([target[:, :open_top], target[:, open_top:].sum(1, keepdim=True)], 1)
    return F.kl_div(logp, target, reduction="batchmean")


def distill_open_top(p: TrainParams) -> int | None:
    """The class from which distillation merges ages (``train.distill_open_top``): the pretrained
    network's top age, 80; None when the param is off."""
    from faceage.dlib_age import PRETRAINED_AGES

    return PRETRAINED_AGES - 1 if p.distill_open_top else None


def interpolate_weights(model: nn.Module, pretrained: dict[str, torch.Tensor],
                        val_errors: Callable[[], torch.Tensor | float],
                        alphas: tuple[float, ...] = WISE_ALPHAS) -> tuple[float, float, list[dict]]:
    """WiSE-FT: sets ``model`` to the interpolation chosen on the validation split.

    Rule: the smallest ``alpha`` (the model closest to the pretrained one) whose validation MAE
    is within one paired standard error of the lowest. Why: neighbouring alphas differ by a few
    hundredths of a year on 300 faces, less than that split's own noise, and the hidden
    cross-dataset check rewards keeping the pretrained behaviour; the paired standard error
    (of the per-face difference of absolute errors against the best alpha) measures that noise
    on the same faces, so no constant is tuned. A callable returning a plain MAE (float) gets
    the old rule: the lowest MAE, ties within 1e-3 to the smaller alpha.

    Args:
        model: The fine-tuned network (modified in place).
        pretrained: Its ``state_dict`` before training.
        val_errors: Per-face absolute validation errors of ``model`` as it currently is
            (or its MAE as a float).
        alphas: Candidate weights of the fine-tuned model.

    Returns:
        ``(alpha, val_mae, [{"alpha", "val_mae"}, ...])``.
    """
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def mix(a: float) -> dict[str, torch.Tensor]:
        return {k: (1 - a) * pretrained[k].to(v.device) + a * v if v.is_floating_point() else v
                for k, v in tuned.items()}

    best, scores = _choose(alphas, lambda a: model.load_state_dict(mix(a)), val_errors)
    model.load_state_dict(mix(best["alpha"]))
    log.info("WiSE-FT (train.wise_ft): validation MAE by alpha %s -> alpha %.1f (val MAE %.3f), the most pretrained "
             "within one paired standard error of the lowest", " ".join(f"{s['alpha']:.1f}:{s['val_mae']:.3f}"
             for s in scores), best["alpha"], best["val_mae"])
    return best["alpha"], best["val_mae"], scores


def _choose(alphas: tuple[float, ...], apply: Callable[[float], Any],
            val_errors: Callable[[], torch.Tensor | float]) -> tuple[dict, list[dict]]:
    """The rule shared by WiSE-FT and the ensemble mix: the smallest alpha within one paired
    standard error of the lowest validation MAE (per-face errors), or the lowest MAE (ties within
    1e-3 to the smaller alpha) when ``val_errors`` returns a plain MAE."""
    scores, errors = [], []
    for a in alphas:
        apply(a)
        e = torch.as_tensor(val_errors(), dtype=torch.float64).flatten().cpu()
        errors.append(e)
        scores.append({"alpha": a, "val_mae": float(e.mean())})
    i_best = min(range(len(scores)), key=lambda i: (round(scores[i]["val_mae"], 3), scores[i]["alpha"]))
    chosen = i_best
    if len(errors[i_best]) > 1:
        for i in sorted(range(len(scores)), key=lambda i: scores[i]["alpha"]):
            diff = errors[i] - errors[i_best]
            if diff.mean() <= diff.std() / len(diff) ** 0.5:
                chosen = i
                break
    return scores[chosen], scores


def choose_ensemble_weight(model: nn.Module, val_errors: Callable[[], torch.Tensor], weight: float | str = "auto"
                           ) -> tuple[float, float, list[dict]]:
    """Sets the ensemble head's mix with the pretrained distribution, chosen on the VALIDATION split.

    The weight of the ensemble's distribution against the frozen network's own goes over 0, 0.1,
    ..., 1 and the rule of :func:`interpolate_weights` picks it: the smallest weight (the output
    closest to the pretrained network) within one paired standard error of the lowest validation
    MAE. Why: the heads are trained on one collection; on photos unlike it they move away from the
    pretrained network, while validation usually cannot tell the highest weights apart (measured on
    the ``wild`` photos, ``reports/recipe_dlib_age.md``). A number ``weight``
    (``train.ensemble_weight``) is used as given instead; its validation MAE is still measured.

    Returns:
        ``(weight, val_mae, [{"alpha", "val_mae"}, ...])``.
    """
    ensemble = ensemble_of(model)
    fixed = weight != "auto"
    best, scores = _choose((float(weight),) if fixed else WISE_ALPHAS, ensemble.weight.fill_, val_errors)
    ensemble.weight.fill_(best["alpha"])
    if fixed:
        log.info("ensemble head: weight %.2f set by train.ensemble_weight (val MAE %.3f)", best["alpha"],
                 best["val_mae"])
    else:
        log.info("ensemble head: validation MAE by weight %s -> weight %.1f (val MAE %.3f), the closest to the "
                 "pretrained network within one paired standard error of the lowest",
                 " ".join(f"{s['alpha']:.1f}:{s['val_mae']:.3f}" for s in scores), best["alpha"], best["val_mae"])
    return best["alpha"], best["val_mae"], scores


class _Prefix(nn.Module):
    """The first ``stop`` stages of a :class:`faceage.dlib_age.DlibAgeNet` as one module (to export them)."""

    def __init__(self, full: nn.Module, stop: int):
        super().__init__()
        self.full, self.stop = full, stop

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.full.run_stages(x, 0, self.stop)


class _CachedStages(nn.Module):
    """The trainable last stages of a :class:`faceage.dlib_age.DlibAgeNet`, fed cached outputs of the frozen ones.

    ``state_dict`` / ``load_state_dict`` are the whole network's, so checkpoints, best-epoch
    snapshots and WiSE-FT see one set of keys whether or not the prefix is cached.
    """

    def __init__(self, full: nn.Module, start: int, view_ndim: int | None = None):
        super().__init__()
        self.full, self.start, self.view_ndim = full, start, view_ndim

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        """A batch of one view's cached outputs (training) -> logits; with ``view_ndim``, a batch with a
        views dimension after the first, ``(N, views, ...)`` (validation) -> the log of the views' mean
        distribution, as the ensemble heads serve a chip and its mirror image (``DlibAgeNet.forward``)."""
        if self.view_ndim is not None and h.ndim == self.view_ndim + 1:
            from faceage.dlib_age import log_mean_prob

            n, views = h.shape[:2]
            logits = self.full.run_stages(h.transpose(0, 1).reshape(n * views, *h.shape[2:]), self.start)
            return log_mean_prob(torch.log_softmax(logits, dim=1).reshape(views, n, -1))
        return self.full.run_stages(h, self.start)

    def state_dict(self, *args, **kwargs):
        return self.full.state_dict(*args, **kwargs)

    def load_state_dict(self, state_dict, strict: bool = True, assign: bool = False):
        return self.full.load_state_dict(state_dict, strict, assign)


class _Views(torch.utils.data.Dataset):
    """Cached frozen-stage outputs of each chip and its mirror image; training draws one at random
    (``mirror``; without it, ``train.augment=false``, the chip itself, as without the cache).

    With ``low`` (outputs of lower-resolution copies and their mirror images, (N, V, ...)), an item
    is one of them with probability ``low_res`` (``train.low_res``).
    """

    def __init__(self, views: torch.Tensor, ages: torch.Tensor, age_stds: torch.Tensor,
                 low: torch.Tensor | None = None, low_res: float = 0.0, mirror: bool = True,
                 served_views: int = 1):
        self.views, self.ages, self.age_stds, self.low, self.low_res = views, ages, age_stds, low, low_res
        self.mirror = mirror
        # What validation and calibration score, as served: the chip itself, or (ensemble heads) the chip
        # and its mirror image, (N, 2, ...), whose mean distribution _CachedStages takes.
        self.images = views[:, 0] if served_views == 1 else views[:, :served_views]

    def __len__(self) -> int:
        return len(self.views)

    def __getitem__(self, i: int):
        views = self.low if self.low is not None and float(torch.rand(())) < self.low_res else self.views
        view = int(torch.randint(views.shape[1], (1,))) if self.mirror else 0
        return views[i, view], self.ages[i], self.age_stds[i]


class FrozenPrefixCache:
    """Computes the frozen first ``train.freeze_blocks`` stages once, so each epoch runs only the rest.

    With frozen early stages, a CPU epoch spends most of its time recomputing the same outputs;
    here they are computed once for every chip and its mirror image, and with ``train.low_res`` for
    :data:`LOW_RES_COPIES` lower-resolution copies of each training chip (flip and resolution are
    the augmentation; the geometric and colour jitter of image backbones would defeat the cache).

    Args:
        model: The full network (its parameters are trained in place).
        train_set, val_set: Chip datasets (``images`` uint8 (N, 3, 64, 64), ``ages``, ``age_stds``).
        prepare: Normalisation of a uint8 batch.
        p: ``train`` params (``freeze_blocks`` >= 1).
        device: Where the prefix runs.
    """

    def __init__(self, model: nn.Module, train_set, val_set, prepare, p: TrainParams, device: torch.device,
                 batch_size: int = 256, start: int | None = None):
        self.model, self.train_set, self.val_set, self.prepare = model, train_set, val_set, prepare
        self.start = p.freeze_blocks if start is None else start
        # the frozen stages, in ONNX Runtime on CPU (checked against torch on the first training chips)
        prefix = cpu_runner(_Prefix(model, self.start), prepare(train_set.images[:8].to(device)), device,
                            f"the frozen stages 0..{self.start - 1}")

        @torch.no_grad()
        def run(images: torch.Tensor) -> torch.Tensor:
            model.eval()
            out = []
            for i in range(0, len(images), batch_size):
                x = prepare(images[i:i + batch_size].to(device))
                views = [prefix(v).float().cpu() for v in (x, torch.flip(x, dims=[-1]))]
                out.append(torch.stack(views, dim=1))
            return torch.cat(out)

        started = time.perf_counter()
        low = None
        if p.augment and p.low_res > 0:  # train.low_res: degraded copies, each computed once too
            g = torch.Generator().manual_seed(p.seed)
            low = torch.cat([run(low_resolution_chips(train_set.images, p.low_res_min, g))
                             for _ in range(LOW_RES_COPIES)], dim=1)
        self.train_views = _Views(run(train_set.images), train_set.ages, train_set.age_stds, low, p.low_res,
                                  mirror=p.augment)
        # The ensemble heads serve the mean of the chip's and its mirror image's distributions: validated so.
        self.served_views = 2 if ensemble_of(model) is not None else 1
        self.val_views = _Views(run(val_set.images), val_set.ages, val_set.age_stds,
                                served_views=self.served_views)
        log.info("the first %d (frozen) stages computed once for %d + %d chips (and mirror images%s), %s each, "
                 "in %.0f s", self.start, len(train_set), len(val_set),
                 f", {LOW_RES_COPIES} lower-resolution copies of each training chip" if low is not None else "",
                 tuple(self.train_views.views.shape[2:]), time.perf_counter() - started)

    def training_view(self):
        """``(model, train_set, val_set, prepare)`` for the training loop: cached inputs, trainable stages."""
        view_ndim = self.train_views.views.ndim - 1 if self.served_views > 1 else None  # a batch of one view
        return (_CachedStages(self.model, self.start, view_ndim), self.train_views, self.val_views,
                lambda h: h.float())

    def full_view(self):
        """The full network and the chip datasets again (for the checkpoint and the logged model)."""
        return self.model, self.train_set, self.val_set, self.prepare


def prefix_cache(model: nn.Module, train_set, val_set, prepare, p: TrainParams,
                 device: torch.device) -> FrozenPrefixCache | None:
    """A :class:`FrozenPrefixCache` when ``dlib_age`` trains with frozen early stages, else ``None``.

    With the ensemble head the whole network is frozen: its features are computed once, and the
    ensemble's input standardisation is fitted on the training split's (both views).
    """
    if p.backbone != DLIB_AGE or p.epochs == 0:
        return None
    if getattr(model, "ensemble", None) is not None:
        from faceage.dlib_age import NUM_STAGES

        cache = FrozenPrefixCache(model, train_set, val_set, prepare, p, device, start=NUM_STAGES - 1)
        features = cache.train_views.views.flatten(0, 1)
        features = (features if features.ndim == 2 else features.mean(dim=(2, 3))).to(device)
        with torch.no_grad():
            model.ensemble.fit_input_stats(model.member_inputs(features)[0])
        return cache
    if p.freeze_blocks == 0:
        return None
    return FrozenPrefixCache(model, train_set, val_set, prepare, p, device)


def describe_mix(meta: dict[str, Any]) -> str:
    """How training mixed the best epoch's network with the pretrained one, from what it recorded
    (``wise_alpha``, ``ensemble_weight`` in the checkpoint's meta): "" when it shipped it as is."""
    parts = []
    if "wise_alpha" in meta:
        parts.append(f"WiSE-FT alpha {meta['wise_alpha']:.2f}")
    if "ensemble_weight" in meta:
        parts.append(f"ensemble weight {meta['ensemble_weight']:.2f}")
    return ", ".join(parts)
