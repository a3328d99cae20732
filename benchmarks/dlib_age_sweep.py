"""Fast dlib_age fine-tuning sweep on cached frozen-stage outputs (exploration, not a test).

Why: a pipeline run of one variant costs minutes; with the first K stages frozen their outputs
are computed once here for the train (and mirror), valid, test and external chips, and a small
loop (the pipeline's loss, flip + label jitter, AdamW, warm-up + cosine, best epoch on
validation, LwF, WiSE-FT alphas) trains the rest in seconds. It reports validation, test and
external MAE for each alpha, a validation-fitted linear map and the median age, so leads can be
ruled in or out before a real run (``python -m faceage.recipe``). The external set is scored
only, never used for a choice. Needs the workspace's ``data/faces`` + ``data/embeddings.npz``
(a dlib_age run) and evaluate.external's cached chips (``.cache/external/*/chips.npz``).

    python benchmarks/dlib_age_sweep.py K '{"lr": 3e-3, "epochs": 20, "decay": 0.316, "lwf": 1.0}' ...

Config keys: lr, epochs, decay (layer-wise lr factor), head_mult (extra head lr factor),
new_lr (lr of a learnable logit shift for ages 81..100), lwf (distillation weight), sigma, bs, seed.
"""
import glob
import sys, json, time, math, copy
import torch, torch.nn.functional as F
torch.set_num_threads(1)
from faceage.data import FaceChips
from faceage.dlib_age import load_dlib_age, INPUT_MEAN, INPUT_STD
from faceage.training import age_loss
from faceage.model import expected_age
EXT = sorted(glob.glob(".cache/external/utk_external-*"))[-1]
sets = {s: FaceChips("data/faces", s, "data/embeddings.npz") for s in ("train", "valid", "test")}
sets["ext"] = FaceChips(EXT, "test", f"{EXT}/chips.npz")
mean = torch.tensor(INPUT_MEAN).view(1, 3, 1, 1); std = torch.tensor(INPUT_STD).view(1, 3, 1, 1)
prep = lambda u8: (u8.float() / 255 - mean) / std
base = load_dlib_age("models/detector/age-v1.onnx", 101).eval()
K = int(sys.argv[1]) if len(sys.argv) > 1 else 4
with torch.no_grad():
    feats = {s: base.run_stages(prep(d.images), 0, K) for s, d in sets.items()}
    trflip = base.run_stages(prep(torch.flip(sets["train"].images, dims=[-1])), 0, K)
print("cached", {s: tuple(f.shape) for s, f in feats.items()}, flush=True)

def evaluate(model, s, real=True):
    with torch.no_grad():
        m, _ = expected_age(model.run_stages(feats[s], K))
    y = sets[s].real_ages if real else sets[s].ages
    return (m - y).abs().mean().item()

def run(cfg):
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

zs = {s: round(evaluate(base, s, s != "valid"), 3) for s in ("valid", "test", "ext")}
print("zero-shot", zs, flush=True)
for line in sys.argv[2:]:
    run(json.loads(line))
