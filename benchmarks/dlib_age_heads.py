"""Heads over frozen pretrained face networks, side by side (exploration, not a test).

Why: ``train.head=auto`` for ``dlib_age`` trains an ensemble of MLPs over the frozen age network;
this script measures that choice against the alternatives on the same cached inputs, in seconds
per variant: heads over the age network's features, over dlib's face network (its descriptors,
what ``dlib_face`` reads; ``--face-features layers``: its pooled block outputs, as
``train.face_features``), and over both (what ``train.head=fused`` trains in the pipeline, where the
descriptors come from the torch port of dlib's network, :mod:`faceage.face_net`, in the ONNX
graph: ~6 ms per face and view instead of dlib's ~80 ms). Each variant trains like the pipeline (AdamW,
warm-up + cosine, label-distribution loss, one random view (chip or mirror image) per face,
best epoch on validation, test-time flip) and reports validation, test and utk-external MAE, and
``wild dev``: the mean |age - zero-shot age| over the faces of ``../shared/datasets/wild``
(real photos, no labels; ``$FACEAGE_SHARED_DATASETS/wild`` when set): how far a head moves away from the pretrained network on photos
unlike the training crops. The external set is scored, never used for a choice.

Needs the workspace's ``data/faces`` (any ``dvc repro``), ``models/detector`` and the utk-external
crops ``evaluate`` made with the current crop settings (``.cache/external/utk_external-<key>``, the key
of ``data/faces/preprocess.json``'s settings: an entry made with other settings is never used); computes
the chips and descriptors it needs once into ``.cache/bench-heads/<key>`` (about 6 min of descriptors),
the key over ``data/faces``' crop settings and data fingerprint, the utk-external entry and the detector
files: crops made with other settings or data get their own folder, never an old one.

    python benchmarks/dlib_age_heads.py [--seeds 42 1 2] [--variants age face fused] [--distill 0] [--face-features layers]
    python benchmarks/dlib_age_heads.py --variants --checkpoints A.pt B.pt   # wild dev of pipeline checkpoints
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from faceage.dlib_age import FEATURE_DIM, INPUT_MEAN, INPUT_STD, PRETRAINED_AGES, AgeEnsemble, load_dlib_age  # noqa: E402
from faceage.face_encoder import EMBEDDING_DIM  # noqa: E402
from faceage.config import DESCRIPTOR, FACE_FEATURES, LAYERS, TrainParams  # noqa: E402
from faceage.finetune import distill_kl, distill_open_top  # noqa: E402
from faceage.training import age_loss, build_scheduler  # noqa: E402
from faceage.transforms import normalize  # noqa: E402
from _paths import current_external_faces, shared_datasets  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
WILD = shared_datasets() / "wild"
SPLITS = ("train", "valid", "test", "ext", "wild")
AGES = torch.arange(101.0)


def cache_dir(repo: Path = REPO, detector: Path | None = None, wild: Path | None = None) -> Path:
    """``.cache/bench-heads/<key>``: the cached inputs of the workspace's current crops.

    The key is a sha256 over ``data/faces/preprocess.json`` (crop settings, detector sha256, data
    fingerprint), the utk-external entry's name (itself keyed by the set's bytes and those settings),
    the file checksums of the detector folder the descriptors and wild faces are computed with
    (``--detector``; default ``models/detector``) and the wild photos' fingerprint (the wild faces are
    located with the same settings).
    """
    import hashlib
    import json

    from faceage.appa_real import dataset_fingerprint
    from faceage.detector import read_manifest
    from faceage.errors import FaceAgeError, error_line
    from faceage.preprocess import read_crop_settings

    wild = WILD if wild is None else wild
    try:  # no data/faces (no dvc repro yet) or no models/detector: a FileNotFoundError traceback
        state = {"crop": read_crop_settings(repo / "data" / "faces"),
                 "external": current_external_faces("utk_external", repo).name,
                 "detector": read_manifest(detector or repo / "models" / "detector")["files"],
                 "wild": dataset_fingerprint(wild) if wild.is_dir() else None}
    except (FaceAgeError, OSError, ValueError) as e:
        raise SystemExit(f"the benchmark's inputs: {error_line(e)} (run the pipeline first: dvc repro)") from None
    key = hashlib.sha256(json.dumps(state, sort_keys=True).encode()).hexdigest()[:16]
    return repo / ".cache" / "bench-heads" / key


def save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """``np.savez`` into a temporary file beside ``path``, renamed over it once complete: a run stopped while
    saving (Ctrl-C) or two runs saving at once never leave a half-written cache that every later run
    fails to read (the cache is reused whenever the file exists)."""
    import os
    import uuid

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.tmp")  # the umask's mode, as before
    try:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _external_faces() -> Path:
    """utk-external's crops made with the workspace's current crop settings (exits when there are none)."""
    return current_external_faces("utk_external", REPO)


def _split_crops(faces_dir: Path, split: str) -> tuple[list[str], np.ndarray]:
    from faceage.preprocess import read_faces_manifest

    rows = read_faces_manifest(faces_dir, split)
    return [r["crop"] for r in rows], np.array([float(r["real_age"]) for r in rows], np.float32)


def _labelled_sources() -> dict[str, tuple[Path, str]]:
    """Per labelled split: its faces folder and the split's name there (utk-external: its cropped test split)."""
    sources = {s: (REPO / "data" / "faces", s) for s in ("train", "valid", "test")}
    sources["ext"] = (_external_faces(), "test")
    return sources


def _split_chips(faces_dir: Path, pairs: bool = False) -> dict[str, np.ndarray]:
    """The chips (or chip pairs) ``preprocess`` cut into ``faces_dir``; exits in one line when its ``chips.npz``
    is missing or unreadable (``np.load``'s traceback)."""
    import faceage.chips
    from faceage.errors import error_line

    try:
        return faceage.chips.load_chips(faces_dir / faceage.chips.CHIPS_FILE, pairs=pairs)[0]
    except (OSError, ValueError) as e:
        raise SystemExit(f"the aligned chips preprocess cuts: {error_line(e)} (rerun the pipeline: dvc repro)") from None


def _wild_files() -> list[str]:
    """The ``wild`` photos ``labels.csv`` marks as faces, in its order.

    Raises:
        SystemExit: No ``wild/labels.csv`` (no ``../shared``), or it marks no face: checked before the
            descriptors of the labelled splits are computed (minutes), which a traceback used to end.
    """
    labels = WILD / "labels.csv"
    if not labels.is_file():
        raise SystemExit(f"no {labels}: the wild photos are ../shared/datasets/wild beside the repo "
                         "(or $FACEAGE_SHARED_DATASETS/wild)")
    with open(labels) as f:
        files = [r["file"] for r in csv.DictReader(f) if r["kind"] == "face"]
    if not files:
        raise SystemExit(f"{labels} marks no photo as kind=face: no wild face to measure")
    return files


def _wild_faces(detector: Path) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The crops, chips and chip pairs of every face the service finds in the ``wild`` photos, in order."""
    from faceage.chips import split_pair
    from faceage.images import load_image
    from faceage.predict import FaceLocator

    from faceage.preprocess import read_crop_settings
    from faceage.faces import crop_cnn_retry_side, crop_retry_pad

    crop = read_crop_settings(REPO / "data" / "faces")  # the service's locator for a checkpoint of these crops
    locator = FaceLocator(detector, kind=crop["detector"], upsample=int(crop["upsample"]), margin=crop["margin"],
                          crop_size=crop["size"], retry_pad=crop_retry_pad(crop),
                          cnn_retry_side=crop_cnn_retry_side(crop), chip_dir=detector, pairs=True)
    located = [locator.locate(load_image(WILD / name)) for name in _wild_files()]
    pairs = [c for loc in located for c in loc.chips]
    return [c for loc in located for c in loc.crops], [np.ascontiguousarray(split_pair(p)[0]) for p in pairs], pairs


def load_inputs(detector: Path) -> dict[str, dict[str, np.ndarray]]:
    """Per split: ``chips`` (N, 3, 64, 64) uint8, ``desc`` (N, 2, 128) (crop, mirror), ``age``; cached."""
    from faceage.face_encoder import DlibFaceEncoder
    from faceage.images import load_image

    cache = cache_dir(detector=detector)
    cache.mkdir(parents=True, exist_ok=True)
    path = cache / "inputs-region-chips.npz"  # chips cut from the margin regions
    if path.is_file():
        with np.load(path) as z:
            return {s: {k: z[f"{s}_{k}"] for k in ("chips", "desc", "age")} for s in SPLITS}
    _wild_files()  # the last split read: a missing one stopped the run after minutes of descriptors
    sources = _labelled_sources()
    encoder = None  # built after the first split's chips load: a missing chips.npz is named first
    out = {}
    for split in SPLITS:
        if split == "wild":
            crops, chips, _ = _wild_faces(detector)
            ages = np.full(len(crops), np.nan, np.float32)
        else:
            faces_dir, name = sources[split]
            files, ages = _split_crops(faces_dir, name)
            table = _split_chips(faces_dir)  # cut by preprocess from the margin regions (named before the crops load)
            crops = [load_image(faces_dir / f) for f in files]
            chips = [table[f] for f in files]
        print(f"{split}: {len(crops)} faces: descriptors", flush=True)
        encoder = encoder or DlibFaceEncoder(detector, 0.4)
        out[split] = {"chips": np.stack(chips), "desc": encoder.embed_many(crops), "age": ages}
    save_npz(path, {f"{s}_{k}": v for s, d in out.items() for k, v in d.items()})
    return out


def face_layers(detector: Path) -> dict[str, np.ndarray]:
    """Per split: (N, 2, 640) ``train.face_features=layers`` of the face chip and its mirror image, computed
    as the pipeline computes them (the torch port of dlib's face network on the chip pairs ``preprocess``
    cut; wild: the service's pairs), in :func:`load_inputs`' order; cached."""
    from faceage.chips import split_pair
    from faceage.detector import RECOGNITION_FILE
    from faceage.face_net import load_face_net

    cache = cache_dir(detector=detector)
    path = cache / "face-layers.npz"
    if path.is_file():
        with np.load(path) as z:
            return {s: z[s] for s in SPLITS}
    _wild_files()  # (as in load_inputs: before the labelled splits' work)
    sources = _labelled_sources()
    net = load_face_net(detector / RECOGNITION_FILE)
    out = {}
    for split in SPLITS:
        if split == "wild":
            pairs = np.stack(_wild_faces(detector)[2])
        else:
            faces_dir, name = sources[split]
            table = _split_chips(faces_dir, pairs=True)
            pairs = np.stack([table[f] for f in _split_crops(faces_dir, name)[0]])
        print(f"{split}: {len(pairs)} faces: face-network layers", flush=True)
        chips = torch.from_numpy(np.ascontiguousarray(split_pair(pairs)[1]))
        with torch.no_grad():
            out[split] = torch.stack([torch.cat([net.pooled_layers(normalize(v, INPUT_MEAN, INPUT_STD)) for v in
                                                 torch.split(c, 64)]) for c in (chips, torch.flip(chips, dims=[-1]))],
                                     1).numpy()
    save_npz(path, out)
    return out


def views(inputs: dict, detector: Path, face_features: str = TrainParams().face_features
          ) -> dict[str, dict[str, torch.Tensor]]:
    """Per split: ``age`` (N, 2, 337) age-network inputs of the chip and its mirror image, ``face``
    (N, 2, F) face features (``face_features``: ``layers``, :func:`face_layers`, 640 values, or
    ``descriptor``, dlib's own 128-D descriptors), ``zero_shot`` (N,) flip-averaged zero-shot age, ``y`` (N,)."""
    faces = face_layers(detector) if face_features == LAYERS else {s: d["desc"] for s, d in inputs.items()}
    net = load_dlib_age(detector / "age-v1.onnx", 101).eval()
    out = {}
    with torch.no_grad():
        for s, d in inputs.items():
            x = normalize(torch.from_numpy(d["chips"]), INPUT_MEAN, INPUT_STD)
            pooled = [net.run_stages(v, 0, 6).mean(dim=(2, 3)) for v in (x, torch.flip(x, dims=[-1]))]
            age = torch.stack([AgeEnsemble.inputs(f, net.fc(f)) for f in pooled], 1)
            zero_shot = torch.softmax(age[..., FEATURE_DIM:], -1).mean(1) @ AGES[:PRETRAINED_AGES]
            out[s] = {"age": age, "face": torch.from_numpy(faces[s]).float(), "zero_shot": zero_shot,
                      "y": torch.from_numpy(d["age"]).float()}
    return out


def face_features_option(ap: argparse.ArgumentParser) -> None:
    """``--face-features``, as ``train.face_features`` (default: the pipeline's), for the benchmarks that read
    dlib's face network."""
    ap.add_argument("--face-features", default=TrainParams().face_features, choices=FACE_FEATURES,
                    help="train.face_features: what the heads read of dlib's face network")


def fit_head(x: dict[str, torch.Tensor], y: dict[str, torch.Tensor], seed: int, epochs: int = 30,
             drop: tuple[int, float] = (0, 0.0), distill: float = 0.0,
             open_top: bool = TrainParams().distill_open_top) -> AgeEnsemble:
    """One ensemble head trained as the pipeline trains ``train.head=ensemble`` (its defaults: AdamW, lr,
    weight decay, batch, loss, warm-up + cosine schedule from ``faceage.training``) on ``x["train"]``
    (N, 2 views, F), best epoch on ``x["valid"]``'s first view; returned in eval mode.
    ``drop=(start, p)``: in training, each face's inputs from ``start`` on are replaced by their
    training mean with probability ``p`` (the descriptor's dropout). ``distill``: the weight of
    KL(pretrained || head) in the loss, as ``train.ensemble_distill`` (the pretrained log-probabilities
    are the inputs after the age features: :func:`head_inputs` of ``age`` or ``fused``), with ages 80..100
    compared as one class when ``open_top`` (``train.distill_open_top``)."""
    p = TrainParams(backbone="dlib_age", epochs=epochs, seed=seed, distill_open_top=open_top)
    torch.manual_seed(seed)
    head = AgeEnsemble(101, in_features=x["train"].shape[-1])
    head.fit_input_stats(x["train"].flatten(0, 1))
    opt = torch.optim.AdamW(head.parameters(), lr=p.lr, weight_decay=p.weight_decay)  # as the pipeline's adamw
    n, batch = len(x["train"]), p.batch_size
    steps = n // batch
    sched = build_scheduler(opt, steps, p)
    best = (math.inf, None)
    for _ in range(epochs):
        head.train()
        perm = torch.randperm(n)
        for i in range(steps):
            idx = perm[i * batch:(i + 1) * batch]
            view = torch.randint(2, (len(idx),))
            xb = x["train"][idx, view]
            if drop[1] > 0:
                gone = torch.rand(len(idx)) < drop[1]
                xb = xb.clone()
                xb[gone, drop[0]:] = head.in_mean[drop[0]:]
            logp = head(xb)
            loss = age_loss(logp, y["train"][idx], p.loss, p.label_sigma)
            if distill > 0:
                pretrained = torch.softmax(xb[:, FEATURE_DIM:FEATURE_DIM + PRETRAINED_AGES], -1)
                loss = loss + distill * distill_kl(logp, pretrained, distill_open_top(p))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        val = (head_ages(head, x["valid"], both=False) - y["valid"]).abs().mean().item()
        if val < best[0]:
            best = (val, {k: t.clone() for k, t in head.state_dict().items()})
    head.load_state_dict(best[1])
    return head.eval()


def head_probs(head: AgeEnsemble, x: torch.Tensor, both: bool = True) -> torch.Tensor:
    """(N, 101) age distribution of ``x`` (N, 2 views, F): both views averaged, or the first only."""
    head.eval()
    with torch.no_grad():
        return torch.stack([head(x[:, i]).exp() for i in ((0, 1) if both else (0,))]).mean(0)


def head_ages(head: AgeEnsemble, x: torch.Tensor, both: bool = True) -> torch.Tensor:
    return head_probs(head, x, both) @ AGES


INPUTS = {"age": ["age"], "face": ["face"], "fused": ["age", "face"]}


def head_inputs(v: dict, variant: str) -> dict[str, torch.Tensor]:
    """Per split: the (N, 2, F) inputs of a head ``variant`` (``age``, ``face`` or ``fused``)."""
    return {s: torch.cat([d[k] for k in INPUTS[variant]], -1) for s, d in v.items()}


def head_distill(variant: str, distill: float) -> float:
    """``distill`` for a head ``variant`` that reads the pretrained distribution (``age``, ``fused``); 0 for
    one that does not (``face``): there is nothing to distil toward."""
    return distill if "age" in INPUTS[variant] else 0.0


def train_head(v: dict, variant: str, seed: int, epochs: int = 30, distill: float = 0.0) -> dict:
    """:func:`fit_head` on the train split; MAE per split and the wild dev."""
    x = head_inputs(v, variant)
    head = fit_head(x, {s: d["y"] for s, d in v.items()}, seed, epochs, distill=head_distill(variant, distill))
    res = {s: (head_ages(head, x[s]) - v[s]["y"]).abs().mean().item() for s in ("valid", "test", "ext")}
    res["wild_dev"] = (head_ages(head, x["wild"]) - v["wild"]["zero_shot"]).abs().mean().item()
    return res


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[42, 1, 2])
    ap.add_argument("--variants", nargs="*", default=["age", "face", "fused"], choices=["age", "face", "fused"])
    ap.add_argument("--distill", type=float, default=TrainParams().ensemble_distill,
                    help="train.ensemble_distill for the age and fused heads (default: the pipeline's)")
    ap.add_argument("--checkpoints", nargs="*", type=Path, default=[],
                    help="pipeline checkpoints whose wild dev to report (through the predictor, as served)")
    face_features_option(ap)
    ap.add_argument("--detector", type=Path, default=REPO / "models" / "detector")
    args = ap.parse_args(argv)
    missing = [str(path) for path in args.checkpoints if not path.is_file()]
    if missing:  # before the heads train (minutes): AgePredictor's traceback after them
        ap.error(f"--checkpoints: no such file: {', '.join(missing)}")
    torch.set_num_threads(1)
    v = views(load_inputs(args.detector), args.detector, args.face_features)
    zs = {s: (v[s]["zero_shot"] - v[s]["y"]).abs().mean().item() for s in ("valid", "test", "ext")}
    print("| head | inputs | seeds | val MAE | test MAE | utk-external MAE | wild dev |\n|---|---|---|---:|---:|---:|---:|")
    print(f"| zero-shot | - | - | {zs['valid']:.2f} | {zs['test']:.2f} | {zs['ext']:.2f} | 0.00 |")
    face = f"{EMBEDDING_DIM}-d descriptor" if args.face_features == DESCRIPTOR else "face-network layers"
    dims = {"age": f"{FEATURE_DIM} features + {PRETRAINED_AGES} log-probs", "face": face,
            "fused": "both"}
    for variant in args.variants:
        runs = [train_head(v, variant, seed, distill=args.distill) for seed in args.seeds]
        cell = {k: " / ".join(f"{r[k]:.2f}" for r in runs) for k in runs[0]}
        print(f"| ensemble | {variant}: {dims[variant]} | {len(runs)} | {cell['valid']} | {cell['test']} | "
              f"{cell['ext']} | {cell['wild_dev']} |", flush=True)
    if args.checkpoints:
        from faceage.predict import AgePredictor

        from faceage.inputs import DLIB_CHIP_PAIR, input_kind

        crops, chips, pairs = _wild_faces(args.detector)  # the same faces, in the same order, as the cached inputs
        for path in args.checkpoints:
            predictor = AgePredictor(path, args.detector, threads=1)
            faces = (crops if predictor.locator.chipper is None else
                     pairs if input_kind(predictor.meta).name == DLIB_CHIP_PAIR else chips)
            ages, _ = predictor.estimate(faces)
            dev = (torch.as_tensor(ages).float() - v["wild"]["zero_shot"]).abs().mean().item()
            print(f"| checkpoint `{path}` | as served | - | - | - | - | {dev:.2f} |", flush=True)


if __name__ == "__main__":
    main()
