"""Fine-tuning a pretrained age network without forgetting what it knew (``train.backbone=dlib_age``).

Input: the pretrained model (its weights at the start of training) and :class:`TrainParams`.
Output: three hooks that :func:`faceage.training.train_model` calls:

- :func:`param_groups`: the optimiser's groups: the first ``train.freeze_blocks`` stages
  frozen, and layer-wise learning rates (the head gets ``train.lr``, each stage below it
  ``train.layer_lr_decay`` times its upper neighbour's);
- :class:`Distillation`: learning without forgetting (Li & Hoiem, 2016): an extra loss term
  ``train.distill_weight * KL(pretrained || fine-tuned)`` on the same (augmented) inputs, so the
  network keeps the pretrained age distribution where the labels do not pull it away;
- :func:`interpolate_weights` (WiSE-FT, Wortsman et al., 2022): after training, the weights
  ``(1 - a) * pretrained + a * fine-tuned`` with ``a`` chosen on the VALIDATION split (ties
  go to the smaller ``a``, the model closer to the pretrained one), when ``train.wise_ft``.

Why: 1,500 faces of one collection are enough to pull a network trained on ~110k faces toward
that collection's look; these measures trade a little in-sample gain for cross-dataset error
(see ``reports/recipe.md``).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from faceage.chips import DLIB_AGE
from faceage.config import ConfigError, TrainParams

log = logging.getLogger(__name__)

WISE_ALPHAS = tuple(i / 10 for i in range(11))  # 0 = pretrained, 1 = fine-tuned


def stages(model: nn.Module, backbone: str) -> list[list[nn.Parameter]]:
    """Parameters by stage, input first, head last (``dlib_age``: stem, block1..block5, fc)."""
    if backbone == DLIB_AGE:
        names = ["stem_", "block1.", "block2.", "block3.", "block4.", "block5.", "fc."]
        return [[t for n, t in model.named_parameters() if n.startswith(prefix)] for prefix in names]
    return [list(model.parameters())]


def uses_finetune_hooks(p: TrainParams) -> bool:
    """Whether any keep-the-pretrained-behaviour setting differs from plain training."""
    return p.freeze_blocks > 0 or p.layer_lr_decay != 1.0 or p.distill_weight > 0 or p.wise_ft


def check_params(p: TrainParams) -> None:
    """These settings act on a pretrained network split into stages: only ``dlib_age`` has both.

    Raises:
        ConfigError: A fine-tuning setting is used with another backbone.
    """
    if uses_finetune_hooks(p) and p.backbone != DLIB_AGE:
        raise ConfigError(f"train.freeze_blocks / layer_lr_decay / distill_weight / wise_ft apply to "
                          f"train.backbone={DLIB_AGE}, got backbone {p.backbone!r}; reset them to 0 / 1.0 / 0.0 / false")


def param_groups(model: nn.Module, p: TrainParams) -> list[dict]:
    """Optimiser parameter groups: frozen early stages left out, layer-wise learning rates.

    Each group carries ``lr`` (its peak); the scheduler scales every group by the same factor.
    """
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
    if p.freeze_blocks or p.layer_lr_decay != 1.0:
        log.info("fine-tuning: %d stage(s) frozen (train.freeze_blocks), lr %s from the lowest trained stage to the "
                 "head (train.layer_lr_decay=%g)", p.freeze_blocks, [f"{g['lr']:.1e}" for g in out], p.layer_lr_decay)
    return out


class Distillation:
    """Learning without forgetting: KL from the frozen pretrained network's age distribution.

    Args:
        model: The network before training (copied and frozen here).
        weight: ``train.distill_weight``; 0 disables the term (no extra forward pass).
    """

    def __init__(self, model: nn.Module, weight: float):
        self.weight = weight
        self.teacher = copy.deepcopy(model).eval().requires_grad_(False) if weight > 0 else None

    def __call__(self, logits: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """``weight * KL(teacher(x) || softmax(logits))``, averaged over the batch (0 when disabled)."""
        if self.teacher is None:
            return logits.new_zeros(())
        with torch.no_grad():
            target = torch.softmax(self.teacher(x).float(), dim=1)
        return self.weight * F.kl_div(torch.log_softmax(logits.float(), dim=1), target, reduction="batchmean")


def interpolate_weights(model: nn.Module, pretrained: dict[str, torch.Tensor], val_mae: Callable[[], float],
                        alphas: tuple[float, ...] = WISE_ALPHAS) -> tuple[float, float, list[dict]]:
    """WiSE-FT: sets ``model`` to the interpolation with the lowest validation MAE.

    Args:
        model: The fine-tuned network (modified in place).
        pretrained: Its ``state_dict`` before training.
        val_mae: Validation MAE of ``model`` as it currently is.
        alphas: Candidate weights of the fine-tuned model.

    Returns:
        ``(alpha, val_mae, [{"alpha", "val_mae"}, ...])``.
    """
    tuned = {k: v.detach().clone() for k, v in model.state_dict().items()}
    scores = []
    for a in alphas:
        mixed = {k: (1 - a) * pretrained[k].to(v.device) + a * v if v.is_floating_point() else v
                 for k, v in tuned.items()}
        model.load_state_dict(mixed)
        scores.append({"alpha": a, "val_mae": val_mae()})
    best = min(scores, key=lambda s: (round(s["val_mae"], 3), s["alpha"]))
    model.load_state_dict({k: (1 - best["alpha"]) * pretrained[k].to(v.device) + best["alpha"] * v
                           if v.is_floating_point() else v for k, v in tuned.items()})
    log.info("WiSE-FT (train.wise_ft): validation MAE by alpha %s -> alpha %.1f (val MAE %.3f)",
             " ".join(f"{s['alpha']:.1f}:{s['val_mae']:.3f}" for s in scores), best["alpha"], best["val_mae"])
    return best["alpha"], best["val_mae"], scores
