"""Fast dlib_age fine-tuning sweep on cached frozen-stage outputs (exploration, not a test).

Why: a pipeline run of one variant costs minutes; with the first K stages frozen their outputs
are computed once here for the train (and mirror), valid, test and external chips, and a small
loop (the pipeline's loss, flip + label jitter, AdamW, warm-up + cosine, best epoch on
validation, LwF, WiSE-FT alphas) trains the rest in seconds. It reports validation, test and
external MAE for each alpha, a validation-fitted linear map and the median age, so leads can be
ruled in or out before a real run (``python -m faceage.recipe``). The external set is scored
only, never used for a choice. Needs the workspace's ``data/faces`` + ``data/embeddings.npz``
(a dlib_age run), ``models/detector`` and the utk-external chips ``evaluate`` cached with the
current crop settings (``.cache/external/utk_external-<key>/chips.npz``, the key of
``data/faces/preprocess.json``'s settings; an entry made with other settings is never used).
Paths are taken from the repo root, whatever the working directory.

    python benchmarks/dlib_age_sweep.py K '{"lr": 3e-3, "epochs": 20, "decay": 0.316, "lwf": 1.0}' ...

Config keys: lr, epochs, decay (layer-wise lr factor), head_mult (extra head lr factor),
new_lr (lr of a learnable logit shift for ages 81..100), lwf (distillation weight), sigma, bs, seed.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, current_external_faces  # noqa: E402

sys.path.insert(0, str(REPO))


@dataclass
class Cached:
    """The pretrained network and the outputs of its first ``k`` (frozen) stages per split."""

    k: int
    base: object
    sets: dict
    feats: dict
    trflip: object


def load_cached(k: int) -> Cached:
    import torch

    from faceage.data import FaceChips
    from faceage.dlib_age import INPUT_MEAN, INPUT_STD, load_dlib_age

    ext = current_external_faces("utk_external", REPO)
    faces = REPO / "data" / "faces"
    sets = {s: FaceChips(faces, s, REPO / "data" / "embeddings.npz") for s in ("train", "valid", "test")}
    sets["ext"] = FaceChips(ext, "test", ext / "chips.npz")
    mean = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1); std = torch.tensor(INPUT_STD).view(1, 3, 1, 1)
    prep = lambda u8: (u8.float() / 255 - mean) / std  # noqa: E731
    base = load_dlib_age(REPO / "models" / "detector" / "age-v1.onnx", 101).eval()
    with torch.no_grad():
        feats = {s: base.run_stages(prep(d.images), 0, k) for s, d in sets.items()}
        trflip = base.run_stages(prep(torch.flip(sets["train"].images, dims=[-1])), 0, k)
    print("cached", {s: tuple(f.shape) for s, f in feats.items()}, flush=True)
    return Cached(k, base, sets, feats, trflip)


def evaluate(cached: Cached, model, s, real=True):
    import torch

    from faceage.model import expected_age

    with torch.no_grad():
        m, _ = expected_age(model.run_stages(cached.feats[s], cached.k))
    y = cached.sets[s].real_ages if real else cached.sets[s].ages
    return (m - y).abs().mean().item()


def run(cached: Cached, cfg):
    import torch
    import torch.nn.functional as F

    from faceage.model import expected_age
    from faceage.training import age_loss

    base, K, feats, sets, trflip = cached.base, cached.k, cached.feats, cached.sets, cached.trflip
    torch.manual_seed(cfg.get("seed", 42))
    model = copy.deepcopy(base)
    teacher = copy.deepcopy(base).requires_grad_(False)
    pre = {k: v.clone() for k, v in model.state_dict().items()}
    names = ["stem_", "block1.", "block2.", "block3.", "block4.", "block5.", "fc."]
    groups = []
    for d, pfx in enumerate(names):
        ps = [t for n, t in model.named_parameters() if n.startswith(pfx)]
        if d < K:
            for t in ps: t.requires_grad_(False)
            continue
        groups.append({"params": ps, "lr": cfg["lr"] * cfg.get("decay", 1.0) ** (6 - d) * (cfg.get("head_mult", 1) if d == 6 else 1)})
    shift = None
    if cfg.get("new_lr"):
        shift = torch.zeros(20, requires_grad=True)
        groups.append({"params": [shift], "lr": cfg["new_lr"], "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, weight_decay=1e-4)
    ep, bs = cfg["epochs"], cfg.get("bs", 64)
    n = len(feats["train"]); spe = n // bs; total = ep * spe
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: (s + 1) / spe if s < spe else 0.5 * (1 + math.cos(math.pi * (s - spe) / max(total - spe, 1))))
    def fwd(h):
        z = model.run_stages(h, K)
        if shift is not None:
            z = torch.cat([z[:, :81], z[:, 81:] + shift], 1)
        return z
    model.fwd = fwd
    ages, stds = sets["train"].ages, sets["train"].age_stds
    t0 = time.time(); best = (1e9, None)
    for e in range(ep):
        model.train(); perm = torch.randperm(n)
        for i in range(spe):
            idx = perm[i * bs:(i + 1) * bs]
            flip = torch.rand(len(idx)) < 0.5
            h = torch.where(flip.view(-1, 1, 1, 1), trflip[idx], feats["train"][idx])
            tgt = (ages[idx] + stds[idx] * torch.randn(len(idx))).clamp(0, 100)
            logits = fwd(h)
            loss = age_loss(logits, tgt, "label_distribution", cfg.get("sigma", 2.0))
            if cfg.get("lwf"):
                with torch.no_grad(): tp = torch.softmax(teacher.run_stages(h, K), 1)
                loss = loss + cfg["lwf"] * F.kl_div(torch.log_softmax(logits, 1), tp, reduction="batchmean")
            opt.zero_grad(); loss.backward(); opt.step(); sched.step()
        model.eval()
        with torch.no_grad():
            v = (expected_age(fwd(feats["valid"]))[0] - sets["valid"].ages).abs().mean().item()
        if v < best[0]:
            best = (v, {k: x.clone() for k, x in model.state_dict().items()}, None if shift is None else shift.detach().clone())
    model.load_state_dict(best[1])
    if shift is not None: shift.data.copy_(best[2])
    res = {"cfg": cfg, "best_val": round(best[0], 3), "s": round(time.time() - t0)}
    tuned = {k: v.clone() for k, v in model.state_dict().items()}; tshift = None if shift is None else shift.detach().clone()
    for a in (1.0, 0.9, 0.8, 0.7, 0.5):
        model.load_state_dict({k: (1 - a) * pre[k] + a * tuned[k] for k in tuned})
        if shift is not None: shift.data.copy_(a * tshift)
        with torch.no_grad():
            r = {}
            for s in ("valid", "test", "ext"):
                m = expected_age(fwd(feats[s]))[0]
                y = sets[s].ages if s == "valid" else sets[s].real_ages
                r[s] = round((m - y).abs().mean().item(), 3)
        res[f"a{a}"] = r
        if a == 1.0 or a == 0.8:
            with torch.no_grad():
                P = {k: expected_age(fwd(feats[k]))[0] for k in ("valid", "test", "ext")}
                pr = {k: torch.softmax(fwd(feats[k]), 1) for k in ("valid", "test", "ext")}
            med = {k: (pr[k].cumsum(1) < 0.5).sum(1).float() for k in pr}
            X = torch.stack([torch.ones_like(P["valid"]), P["valid"]], 1)
            coef = torch.linalg.lstsq(X, sets["valid"].ages[:, None]).solution[:, 0]
            res[f"lin{a}"] = {"coef": [round(c, 3) for c in coef.tolist()], **{k: round(((coef[0] + coef[1] * P[k]).clamp(0, 100) - (sets[k].ages if k == "valid" else sets[k].real_ages)).abs().mean().item(), 3) for k in P}}
            res[f"median{a}"] = {k: round((med[k] - (sets[k].ages if k == "valid" else sets[k].real_ages)).abs().mean().item(), 3) for k in P}
    print(json.dumps(res), flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("k", nargs="?", type=int, default=4, metavar="K",
                        help="stages of the pretrained network kept frozen (default: %(default)s)")
    parser.add_argument("configs", nargs="*", metavar="CONFIG", help="a JSON object per variant (keys: above)")
    args = parser.parse_args(argv)
    configs = []
    for text in args.configs:
        try:
            cfg = json.loads(text)
        except json.JSONDecodeError as e:
            parser.error(f"CONFIG {text!r} is not JSON: {e}")
        if not isinstance(cfg, dict) or "lr" not in cfg or "epochs" not in cfg:
            parser.error(f"CONFIG {text!r} must be a JSON object with at least lr and epochs")
        # Before the frozen stages run (minutes): epochs 0 ended in load_state_dict(None)'s TypeError, bs 0 in a
        # ZeroDivisionError.
        for key in ("epochs", "bs"):
            value = cfg.get(key, 1)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                parser.error(f"CONFIG {text!r}: {key} must be a whole number >= 1")
        configs.append(cfg)

    import torch

    from faceage.dlib_age import NUM_STAGES

    if not 0 <= args.k < NUM_STAGES:  # K = 7 froze every stage: AdamW's 'optimizer got an empty parameter list'
        parser.error(f"K must be in 0..{NUM_STAGES - 1} (stages kept frozen; at least the head trains), got {args.k}")

    from faceage.errors import FaceAgeError, error_line

    torch.set_num_threads(1)
    try:  # no data/faces, no data/embeddings.npz (the chips of a dlib_age run), no models/detector: a traceback
        cached = load_cached(args.k)
    except (FaceAgeError, OSError, ValueError) as e:
        raise SystemExit(f"dlib_age_sweep's inputs: {error_line(e)} (a dlib_age pipeline run makes them: "
                         "dvc repro)") from None
    zs = {s: round(evaluate(cached, cached.base, s, s != "valid"), 3) for s in ("valid", "test", "ext")}
    print("zero-shot", zs, flush=True)
    for cfg in configs:
        run(cached, cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
