"""Where the error sits by true age: signed bias and MAE per age bin, the sample's splits beside
utk-external, for the zero-shot network and the pipeline's fused head (exploration, not a test).

Why: utk-external's MAE is its age bins' MAEs weighted by how many faces each holds. Per bin, the
signed bias (mean prediction minus mean true age) says whether the error is a shift of the whole
bin, which a model could learn to correct where the training split shows it too, or spread. Put
beside the zero-shot network, which is never trained here, it also says whether a shift between
the sample and utk-external is in the collections themselves: if dlib's network already sees
utk-external's children as older than the sample's of the same age, no training on the sample can
see or correct it.

For each ``--distill`` value (``train.ensemble_distill``) and seed, the fused head is trained on the
whole training split and mixed with the zero-shot distribution as ``train`` does
(``benchmarks/band_regret.py``'s full heads); the training split's rows are the faces it was
trained on. The last line prices the collection shift of the young: utk-external's MAE if its
faces under ``--young`` years had the test split's MAE of their bin. utk-external is scored,
never used for a choice.

    python benchmarks/age_bias.py [--seeds 42] [--distill 10 0] [--young 21]

Needs what ``benchmarks/dlib_age_heads.py`` needs (its cache in ``.cache/bench-heads``).
"""

from __future__ import annotations

import argparse
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.band_regret import fused_inputs  # noqa: E402
from benchmarks.dlib_age_heads import REPO, head_distill  # noqa: E402
from benchmarks.shift_groups import mixed_head  # noqa: E402
from faceage.config import TrainParams  # noqa: E402

EDGES = (0, 3, 6, 9, 12, 15, 18, 21, 25, 30, 40, 50, 60, 70, 80)  # the last bin is 80 and older
SPLITS = ("train", "valid", "test", "ext")


@dataclass(frozen=True)
class AgeBin:
    """The faces whose true age is in ``[lo, hi)``: how many, their mean true and predicted age, the MAE."""
    lo: float
    hi: float
    n: int
    truth: float
    pred: float
    mae: float

    @property
    def bias(self) -> float:
        return self.pred - self.truth

    @property
    def name(self) -> str:
        return f"{self.lo:g}+" if math.isinf(self.hi) else f"{self.lo:g}-{self.hi - 1:g}"


def by_age(pred: torch.Tensor, truth: torch.Tensor, edges: tuple[float, ...] = EDGES) -> list[AgeBin]:
    """Per bin of true age (``edges[i]`` to ``edges[i + 1]``, the last one open): the faces' mean true age,
    mean prediction and MAE; a bin without faces has NaN means."""
    out = []
    for lo, hi in zip(edges, (*edges[1:], math.inf)):
        m = (truth >= lo) & (truth < hi)
        p, t = pred[m].double(), truth[m].double()
        out.append(AgeBin(float(lo), float(hi), int(m.sum()), t.mean().item(), p.mean().item(),
                          (p - t).abs().mean().item()))
    return out


def priced_shift(ext: list[AgeBin], reference: list[AgeBin], young: float) -> float:
    """The MAE of the set binned in ``ext`` if each of its bins under ``young`` years had ``reference``'s
    MAE for that bin (the same edges); bins without faces on either side keep their own."""
    total = sum(b.n * (r.mae if b.hi <= young and r.n and b.n else b.mae)
                for b, r in zip(ext, reference) if b.n)
    return total / sum(b.n for b in ext)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42])
    ap.add_argument("--distill", type=float, nargs="+", default=[TrainParams().ensemble_distill, 0.0])
    ap.add_argument("--young", type=float, default=21.0)
    ap.add_argument("--detector", type=Path, default=REPO / "models" / "detector")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    v, y, zsp, x = fused_inputs(args.detector)
    everyone = {s: torch.ones(len(y[s]), dtype=torch.bool) for s in ("train", "valid")}
    preds = {"zero-shot": {s: v[s]["zero_shot"] for s in SPLITS}}
    for seed in args.seeds:
        for lam in args.distill:
            w, ages = mixed_head([x], y, zsp, everyone, seed, distill=head_distill("fused", lam))
            preds[f"distill {lam:g}, seed {seed} (mix {w})"] = ages
    names = list(preds)
    mae = {s: {k: (preds[k][s] - y[s]).abs().mean().item() for k in names} for s in SPLITS}
    bins = {s: {k: by_age(preds[k][s], y[s]) for k in names} for s in SPLITS}
    print("Mean prediction (bias) MAE per bin of true age; the head's training split is the faces it was "
          "trained on.\n")
    for s in SPLITS:
        print(f"**{s}** ({len(y[s])} faces; MAE " + ", ".join(f"{k}: {mae[s][k]:.2f}" for k in names) + ")\n")
        print("| true age | faces | mean true age | " + " | ".join(names) + " |\n|---|---:|---:|" + "---|" * len(names))
        for i, b in enumerate(bins[s][names[0]]):
            if b.n:
                print(f"| {b.name} | {b.n} | {b.truth:.1f} | " + " | ".join(
                    f"{c.pred:.1f} ({c.bias:+.1f}) {c.mae:.2f}" for c in (bins[s][k][i] for k in names)) + " |")
        print(flush=True)
    for k in names:
        print(f"{k}: utk-external {mae['ext'][k]:.2f}; with its faces under {args.young:g} at the test split's MAE "
              f"of their bin: {priced_shift(bins['ext'][k], bins['test'][k], args.young):.2f}")


if __name__ == "__main__":
    main()
