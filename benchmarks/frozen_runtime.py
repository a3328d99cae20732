"""Frozen networks in torch and in ONNX Runtime, side by side on real chips (a benchmark, not a test).

Why: ``train`` computes the frozen networks' features once per chip and view, and ``evaluate``
scores every test and external face at three resolutions; on CPU both now run the exported graph
in ONNX Runtime (:mod:`faceage.ort_module`). This measures that choice on the workspace's own
model and chips: the same batches through torch and through ONNX Runtime, alternating, with the
ratio of the medians and the largest difference.

Needs a trained ``models/model.pt`` and its ``data/faces`` (any ``dvc repro``):

    python benchmarks/frozen_runtime.py [--faces 256] [--threads 2] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _order import alternating  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from faceage.chips import DLIB_AGE  # noqa: E402
from faceage.data import load_split  # noqa: E402
from faceage.dlib_age import NUM_STAGES  # noqa: E402
from faceage.finetune import _Prefix  # noqa: E402
from faceage.inference import AgeModel  # noqa: E402
from faceage.inputs import reads_pairs  # noqa: E402
from faceage.ort_module import OrtModule  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def _time(fn, x: torch.Tensor, batch: int) -> float:
    started = time.perf_counter()
    with torch.no_grad():
        for i in range(0, len(x), batch):
            fn(x[i:i + batch])
    return time.perf_counter() - started


def timed_rounds(first, second, x: torch.Tensor, batch: int, rounds: int) -> tuple[list[float], list[float]]:
    """Seconds of a pass of ``first`` and of ``second`` over ``x`` in batches of ``batch``, per round.

    One untimed pass of each first: the first pass at this batch size allocates (torch's cached
    buffers, ONNX Runtime's arena), and with few rounds that one slow pass moved the median. Then
    the rounds, which one goes first alternating (:func:`_order.alternating`).
    """
    for fn in (first, second):
        _time(fn, x, batch)
    return alternating(lambda: _time(first, x, batch), lambda: _time(second, x, batch), rounds)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(REPO / "models" / "model.pt"))
    ap.add_argument("--faces-dir", default=str(REPO / "data" / "faces"))
    ap.add_argument("--embeddings", default=str(REPO / "data" / "embeddings.npz"))
    ap.add_argument("--faces", type=int, default=256, help="training faces to run (default 256)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--batch", type=int, default=128)
    args = ap.parse_args(argv)
    # One message each, before the model loads (--rounds 0 ended in StatisticsError 'no median for empty data',
    # --faces 0 in torch's 'max(): Expected reduction dim', --threads 0 in set_num_threads' RuntimeError, a
    # missing file in a traceback).
    for name in ("faces", "threads", "rounds", "batch"):
        if getattr(args, name) < 1:
            ap.error(f"--{name} must be >= 1, got {getattr(args, name)}")
    for flag, path in (("--model", Path(args.model)), ("--faces-dir", Path(args.faces_dir) / "manifest.csv")):
        if not path.is_file():
            ap.error(f"{flag}: no {path} (it needs a trained workspace: dvc repro)")
    torch.set_num_threads(args.threads)

    age_model = AgeModel(args.model, device="cpu")
    meta = age_model.meta
    split = load_split(args.faces_dir, "train", meta["backbone"], meta["image_size"], args.embeddings,
                       pairs=reads_pairs(meta))
    stored = split.images[:args.faces]
    cases = [("age graph (evaluate)", age_model.graph, stored)]
    if meta["backbone"] == DLIB_AGE and getattr(age_model.model, "ensemble", None) is not None:
        prefix = _Prefix(age_model.model, NUM_STAGES - 1).eval()  # what prefix_cache computes once
        cases.insert(0, ("frozen features (train)", prefix, age_model.graph.prepare(stored)))
    print(f"{meta['backbone']} ({meta.get('head', '-')}), {len(stored)} faces of shape {tuple(stored.shape[1:])}, "
          f"{args.threads} threads, batches of {args.batch}, {args.rounds} rounds")
    for name, module, x in cases:
        module.eval()
        runner = OrtModule(module, x[:8], threads=args.threads)
        torch_s, ort_s = timed_rounds(module, runner, x, args.batch, args.rounds)  # interleaved: drift hits both
        t, o = statistics.median(torch_s), statistics.median(ort_s)
        print(f"{name:26s} torch {t / len(x) * 1e3:7.2f} ms/face  ONNX Runtime {o / len(x) * 1e3:7.2f} ms/face  "
              f"ratio {o / t:.2f}x  largest difference {runner.max_abs_diff:.1e}")


if __name__ == "__main__":
    main()
