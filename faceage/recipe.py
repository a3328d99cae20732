"""Recipe by measurement: train variants side by side on the same faces and report what helps.

Input: the pipeline's outputs in this workspace (``data/faces``, ``data/embeddings.npz``,
``data/raw/appa-real``). Each variant is a real :func:`faceage.training.train_model` +
:func:`faceage.evaluation.evaluate_model` run, tracked in MLflow (tag ``recipe``).
Output: ``reports/recipe.md``, one table per backbone family with validation and test MAE,
the change against the default, and calibration.

Every run starts from the *committed* ``params.yaml`` (a warning names each key the workspace
changed, as ``dvc exp run -S`` leaves them), plus the variant's own keys.

Usage::

    python -m faceage.recipe            # dlib_face variants (~1 min each on 2 cores)
    python -m faceage.recipe --cnn      # also ResNet-18 from scratch, 112 px, 5 epochs (~4 min each)
    python -m faceage.recipe --dlib-age --no-dlib-face   # dlib_age: zero-shot and each fine-tuning variant

With ``--external FOLDER`` (a labelled test folder in the release layout, e.g.
``../shared/datasets/utk-external``; never trained or tuned on) every row also gets that
folder's MAE: its test images go through the pipeline's own preprocess and embed code once,
then each variant's model scores them. Measurement only: the product's cross-dataset
evaluation is ``evaluate.external``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np

from faceage.config import DESCRIPTOR, Params
from faceage.errors import FaceAgeError, error_line
from faceage.evaluation import evaluate_model
from faceage.experiment import committed_base
from faceage.inference import AgeModel
from faceage.logs import setup_logging
from faceage.paths import repo_root
from faceage.training import train_model

log = logging.getLogger(__name__)

DLIB_VARIANTS = {
    "default": {},
    "loss=expectation_l1": {"loss": "expectation_l1"},
    "augment=false (no flip augmentation)": {"augment": False},
    "scheduler=none (constant lr)": {"scheduler": "none"},
    "epochs=60": {"epochs": 60},
    "label_sigma=4": {"label_sigma": 4.0},
}
# The fine-tuning keys off: every variant states which of them it turns on, so its label is the whole
# recipe whatever params.yaml holds (the ensemble heads and the other backbones need them off).
FINETUNE_OFF = {"freeze_blocks": 0, "layer_lr_decay": 1.0, "distill_weight": 0.0, "wise_ft": False}
# dlib_age's head keys at their defaults too: a committed train.head=fused, ensemble_weight=0.5 or face_features=layers
# is refused by every run without that head (the fine-tuning rows, dlib_face, the CNNs: a ConfigError traceback
# after the chips were cut). The fused row's label names the descriptor; its ensemble weight is chosen on validation.
HEAD_DEFAULTS = {"head": "auto", "ensemble_weight": "auto", "face_features": DESCRIPTOR}
# pretrained: dlib's weights (imagenet or dlib): a committed train.pretrained=none (make quick-resnet's from-scratch
# profile made the base) trained the naive, lower-lr and layer-wise rows from random weights under their labels.
AGE_BASE = {"backbone": "dlib_age", **HEAD_DEFAULTS, "head": "pretrained", "pretrained": "imagenet", "epochs": 8,
            "lr": 3e-4, "warmup_epochs": 1, "batch_size": 64, **FINETUNE_OFF}
AGE_VARIANTS = {  # short key (for --variants) -> (row label, train overrides)
    "zero-shot": ("zero-shot (epochs=0)", {"epochs": 0}),
    "naive": ("naive: every layer, lr 1e-4", {"lr": 1e-4}),
    "low-lr": ("every layer, lower lr (2e-5)", {"lr": 2e-5}),
    "layer-wise": ("every layer, layer-wise lr (layer_lr_decay=0.5)", {"layer_lr_decay": 0.5}),
    "frozen": ("frozen stem-block3 (freeze_blocks=4)", {"freeze_blocks": 4}),
    "frozen+wise": ("frozen stem-block3 + WiSE-FT", {"freeze_blocks": 4, "wise_ft": True}),
    "frozen+lwf+wise": ("frozen stem-block3 + LwF (distill_weight=1) + WiSE-FT",
                        {"freeze_blocks": 4, "distill_weight": 1.0, "wise_ft": True}),
    "lwf+wise": ("every layer + LwF + WiSE-FT", {"distill_weight": 1.0, "wise_ft": True}),
    "finetune": ("make quick-finetune: frozen stem-block3, 12 epochs, lr 3e-3 layer-wise (0.316) + LwF + WiSE-FT",
              {"freeze_blocks": 4, "epochs": 12, "lr": 3e-3, "layer_lr_decay": 0.316, "distill_weight": 1.0,
               "wise_ft": True}),
    "ensemble": ("the network frozen, an ensemble of MLP heads (train.head=ensemble), 30 epochs, lr 1e-3",
                 {"head": "ensemble", "epochs": 30, "lr": 1e-3}),
    "fused": ("make quick: both dlib networks frozen, the ensemble also reads the face descriptor (train.head=fused), "
              "30 epochs, lr 1e-3", {"head": "fused", "epochs": 30, "lr": 1e-3}),
}
# `make quick-resnet`: from scratch in 5 epochs, lower-resolution training faces only slow convergence
# (13.94 against 13.13), so that profile and the CPU sweep train CNNs without them (train.low_res=0.0).
CNN_BASE = {"backbone": "resnet18", "pretrained": "none", "epochs": 5, "image_size": 112, "low_res": 0.0,
            **HEAD_DEFAULTS, **FINETUNE_OFF}
DLIB_FACE_BASE = {"backbone": "dlib_face", **HEAD_DEFAULTS, **FINETUNE_OFF}
CNN_VARIANTS = {
    "default": {},
    "loss=expectation_l1": {"loss": "expectation_l1"},
    "augment=false": {"augment": False},
    "image_size=64": {"image_size": 64},
    "scheduler=none (constant lr)": {"scheduler": "none"},
}


class External:
    """A labelled test folder cut by the pipeline's preprocess once; features per backbone on demand."""

    def __init__(self, folder: Path, work: Path, params: Params, detector: Path):
        from faceage.appa_real import SEP_LINE, csv_text, fetch_appa_real
        from faceage.preprocess import preprocess_dataset

        self.name, self.detector, self.work = folder.name, detector, work
        release = work / "release"
        (release).mkdir(parents=True)
        # As the pipeline reads it (a byte-order mark, UTF-16), not in the locale's encoding: a UTF-16 set that
        # evaluate.external reads failed here with UnicodeDecodeError. Written back as UTF-8.
        text = csv_text(folder / "gt_avg_test.csv")
        lines = text.splitlines()
        head = 3 if lines and SEP_LINE.fullmatch(lines[0]) else 2  # (Excel's sep= line,) the header and one row
        for split in ("train", "valid", "test"):
            (release / split).symlink_to(folder.resolve() / "test")
            # The release layout needs three non-empty lists; only the test split is scored.
            (release / f"gt_avg_{split}.csv").write_text(text if split == "test" else "\n".join(lines[:head]) + "\n",
                                                         encoding="utf-8")
        self.faces = work / "faces"
        fetch_appa_real(str(release), work / "data")
        preprocess_dataset(work / "data", detector, self.faces, params.preprocess)
        self.features: dict[str, Path] = {}

    def mae(self, model_path: str | Path) -> float:
        """Test MAE of a checkpoint on this folder (the evaluate path: load_split -> AgeModel), against the
        apparent ages, as ``evaluate.external`` and the report's test MAE beside it (not the real ages)."""
        from faceage.data import load_split
        from faceage.features import compute_features
        from faceage.inputs import reads_pairs

        model = AgeModel(model_path)
        backbone = model.meta["backbone"]
        if backbone not in self.features:
            self.features[backbone] = self.work / f"features-{backbone}.npz"
            compute_features(backbone, self.faces, self.detector, self.features[backbone])
        test = load_split(self.faces, "test", backbone, model.meta["image_size"], self.features[backbone],
                          pairs=reads_pairs(model.meta))
        pred, _ = model.predict_inputs(test.images)
        return float(abs(pred - test.ages.numpy()).mean())


def _run(name: str, params: Params, overrides: dict, base: dict, work: Path, faces: Path, embeddings: Path,
         data: Path, external: External | None = None, detector: Path | None = None) -> dict:
    tp = replace(params.train, **{**base, **overrides})
    out = work / "".join(c if c.isalnum() else "_" for c in name)[:40]
    import mlflow

    result = train_model(tp, faces, out / "model.pt", out, out / "run.json", out / "state.pt", embeddings_path=embeddings,
                         detector_dir=detector)
    mlflow.MlflowClient().set_tag(result["run_id"], "recipe", name)
    # The external set is scored below (External); evaluate's own external sets would need the detector.
    metrics = evaluate_model(out / "model.pt", faces, out / "eval", replace(params.evaluate, external=()),
                             run_path=out / "run.json", embeddings_path=embeddings, data_dir=data)
    row = {"variant": name, "val_mae": result["best_val_mae"], "test_mae": metrics["mae_years"],
           "coverage_1std": metrics["coverage_1std"], "coverage_2std": metrics["coverage_2std"],
           "run_id": result["run_id"], "model": str(out / "model.pt"), "train_s": result["train_time_s"],
           "external_mae": external.mae(out / "model.pt") if external else float("nan")}
    if external:
        mlflow.MlflowClient().log_metric(result["run_id"], f"recipe_external_{external.name}_mae", row["external_mae"])
    log.info("recipe %s %s: val %.2f test %.2f external %.2f", tp.backbone, name, row["val_mae"], row["test_mae"],
             row["external_mae"])
    return row


def _try_run(name: str, *args, **kwargs) -> dict:
    """:func:`_run`, or for a variant that fails (diverges, a setting it cannot run, out of memory) a row saying so:
    one failing row ended the recipe with a traceback and no report, losing hours of rows. A bug still stops it."""
    import torch

    try:
        return _run(name, *args, **kwargs)
    except (FaceAgeError, MemoryError, torch.cuda.OutOfMemoryError) as e:
        log.error("recipe %s failed (the other rows go on; its row says so): %s", name, error_line(e))
        nan = float("nan")
        return {"variant": f"{name} (failed: {error_line(e)})", "failed": True, "val_mae": nan, "test_mae": nan,
                "coverage_1std": nan, "coverage_2std": nan, "run_id": "-", "model": None, "train_s": nan,
                "external_mae": nan}


def _descriptors(embeddings: Path, faces: Path, detector: Path, out: Path) -> Path:
    """``embeddings`` when it holds ``dlib_face`` descriptors of every crop; else they are computed into ``out``.

    The ``embed`` stage writes only what the last ``train.backbone`` reads: after ``make quick``
    (``dlib_age``) ``data/embeddings.npz`` holds chips, not descriptors.
    """
    from faceage.features import compute_features
    from faceage.preprocess import read_faces_manifest

    if embeddings.is_file():
        with np.load(embeddings) as z:
            crops = set(z["crops"].tolist()) if "embeddings" in z.files else set()
        if crops and crops >= {r["crop"] for r in read_faces_manifest(faces)}:
            return embeddings
    log.info("%s holds no dlib_face descriptors of %s (the embed stage keeps what the last train.backbone read): "
             "computing them for the dlib_face rows (~4 min on 2 cores)", embeddings, faces)
    compute_features("dlib_face", faces, detector, out)
    return out


def _tta_rows(model_path: str, faces: Path, embeddings: Path, test_mae: float) -> list[dict]:
    """The default dlib_face model scored on the crop's view alone: the value of test-time flip."""
    from faceage.data import FaceEmbeddings

    test = FaceEmbeddings(faces, "test", embeddings)
    model = AgeModel(model_path)
    pred, _ = model.predict_inputs(test.images[:, :1])
    single = float(abs(pred - test.ages.numpy()).mean())
    return [{"variant": "default, no test-time flip (crop's view only)", "val_mae": float("nan"),
             "test_mae": single, "coverage_1std": float("nan"), "coverage_2std": float("nan"), "run_id": "-"},
            {"variant": "default, test-time flip (both views averaged)", "val_mae": float("nan"),
             "test_mae": test_mae, "coverage_1std": float("nan"), "coverage_2std": float("nan"), "run_id": "-"}]


def _prepare(what: str, fn, *args):
    """``fn(*args)``, the inputs every row shares (the external set's crops, the chips, the descriptors); a missing
    or unreadable input (no data/faces, no chips.npz, no detector) ends the recipe in one line, not a traceback."""
    try:
        return fn(*args)
    except (FaceAgeError, OSError, ValueError) as e:
        raise SystemExit(f"recipe: {what}: {error_line(e)}") from None


def _num(x: float, digits: int = 2, sign: bool = False) -> str:
    return "-" if x != x else f"{x:{'+' if sign else ''}.{digits}f}"  # NaN: not measured (or failed) for this row


def _baseline(variant: str) -> str:
    """The name of a row in a column header: its label before the first ``" ("`` or ``":"`` (``zero-shot``, ``make
    quick-finetune``, ``default`` also for a failed row). The label's first word named no row with ``--variants``
    ("test vs make", "test vs the", "test vs every")."""
    return re.split(r" \(|:", variant, maxsplit=1)[0]


def _table(rows: list[dict], external: str | None = None) -> str:
    base = rows[0]
    ext = f" {external} MAE | train time (s) |" if external else ""
    lines = [f"| variant | val MAE | test MAE | test vs {_baseline(base['variant'])} |{ext} coverage 1 std | "
             "coverage 2 std | MLflow run |",
             "|---|---:|---:|---:|" + ("---:|---:|" if external else "") + "---:|---:|---|"]
    for r in rows:
        cells = f" {_num(r.get('external_mae', float('nan')))} | {_num(r.get('train_s', float('nan')), 0)} |" if external else ""
        lines.append(f"| {r['variant']} | {_num(r['val_mae'])} | {_num(r['test_mae'])} | "
                     f"{_num(r['test_mae'] - base['test_mae'], sign=True)} |{cells} {_num(r['coverage_1std'], 3)} | "
                     f"{_num(r['coverage_2std'], 3)} | `{r['run_id'][:8]}` |")
    return "\n".join(lines)


# The inputs and the report when not given: the project root's (faceage.paths.repo_root), not the working folder's
PROJECT_DEFAULTS = {"detector": "models/detector", "faces": "data/faces", "embeddings": "data/embeddings.npz",
                    "data": "data/raw/appa-real", "out": "reports/recipe.md"}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cnn", action="store_true", help="also run the ResNet-18 variants (slow on CPU)")
    parser.add_argument("--dlib-age", action="store_true", help="run the dlib_age zero-shot and fine-tuning variants")
    parser.add_argument("--no-dlib-face", action="store_true", help="skip the dlib_face variants")
    parser.add_argument("--variants", help="comma-separated dlib_age variant keys (default: all)")
    parser.add_argument("--external", type=Path, help="labelled test-only folder scored for every row (never tuned on)")
    parser.add_argument("--detector", help=f"default: the project's {PROJECT_DEFAULTS['detector']}")
    parser.add_argument("--faces", help=f"default: the project's {PROJECT_DEFAULTS['faces']}")
    parser.add_argument("--embeddings", help=f"default: the project's {PROJECT_DEFAULTS['embeddings']}")
    parser.add_argument("--data", help=f"default: the project's {PROJECT_DEFAULTS['data']}")
    parser.add_argument("--out", help=f"the report (default: the project's {PROJECT_DEFAULTS['out']}, a committed "
                                      "report: an existing file needs --force)")
    parser.add_argument("--force", action="store_true", help="overwrite --out when it exists")
    args = parser.parse_args(argv)
    # The project's files wherever it runs from: from a subfolder (cd reports) every default named a file there,
    # and params.yaml "not found". A path given on the command line is the shell's, from the working folder.
    root = repo_root()
    for key, default in PROJECT_DEFAULTS.items():
        if getattr(args, key) is None:
            setattr(args, key, os.path.relpath(root / default))
    # Before any work (the external set's crops, the chips, the first run): a typo fails at once.
    # Nothing to run writes the report's header alone: `--no-dlib-face --force` (without --dlib-age or --cnn)
    # replaced the committed reports/recipe.md with it, exit 0.
    if args.no_dlib_face and not (args.dlib_age or args.cnn) and Path(args.out).exists():
        parser.error(f"nothing to run: --no-dlib-face leaves no variants, and the report would replace --out "
                     f"{args.out} with no table; add --dlib-age or --cnn")
    if args.variants:
        if not args.dlib_age:
            parser.error("--variants picks dlib_age variants: add --dlib-age")
        unknown = [k for k in args.variants.split(",") if k not in AGE_VARIANTS]
        if unknown:
            parser.error(f"--variants: unknown {unknown}; choose from {list(AGE_VARIANTS)}")
    # The report was written over an existing --out (the committed reports/recipe.md) after hours of runs, unasked.
    if Path(args.out).exists() and not args.force:
        parser.error(f"--out {args.out} exists (reports/recipe.md is committed): pass --force to overwrite it, "
                     "or name another --out")
    if args.external and not ((args.external / "gt_avg_test.csv").is_file() and (args.external / "test").is_dir()):
        parser.error(f"--external {args.external}: no gt_avg_test.csv and test/ folder there (the release layout; "
                     "utk-external is ../shared/datasets/utk-external beside the repo)")
    setup_logging()
    try:
        # Not what the last `dvc exp run -S` left in the workspace; the project's, also from a subfolder
        params = committed_base(os.path.relpath(root), user="the recipe")
    except FaceAgeError as e:  # params.yaml missing, unreadable or invalid: one line, not a traceback
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    from faceage.tracking import setup_mlflow

    try:
        setup_mlflow()
    except FaceAgeError as e:  # a deleted face-age experiment, a server that does not answer: one line
        raise SystemExit(f"{type(e).__name__}: {e}") from None
    faces, embeddings, data = Path(args.faces), Path(args.embeddings), Path(args.data)
    sections = []
    detector = Path(args.detector)
    ext_name = args.external.name if args.external else None
    with tempfile.TemporaryDirectory(prefix="faceage-recipe-") as tmp:
        work = Path(tmp)
        external = (_prepare("the external set", External, args.external, work / "external", params, detector)
                    if args.external else None)
        if args.dlib_age:
            from faceage.features import compute_features

            chips = work / "chips.npz"
            _prepare("the dlib_age chips", compute_features, "dlib_age", faces, detector, chips)
            keys = args.variants.split(",") if args.variants else list(AGE_VARIANTS)
            age_rows = [_try_run(AGE_VARIANTS[k][0], params, AGE_VARIANTS[k][1], AGE_BASE, work / "age", faces, chips, data,
                             external, detector) for k in keys]
            sections.append((f"`dlib_age` (dlib's pretrained age network), fine-tuned {AGE_BASE['epochs']} epochs "
                             f"at lr {AGE_BASE['lr']:g} unless the variant says otherwise", age_rows))
        if not args.no_dlib_face:
            embeddings = _prepare("the dlib_face descriptors", _descriptors, embeddings, faces, detector,
                                  work / "descriptors.npz")
            dlib_rows = [_try_run(n, params, o, DLIB_FACE_BASE, work / "dlib", faces, embeddings, data, external)
                         for n, o in DLIB_VARIANTS.items()]
            if not dlib_rows[0].get("failed"):
                dlib_rows += _tta_rows(dlib_rows[0]["model"], faces, embeddings, dlib_rows[0]["test_mae"])
            sections.append(("`dlib_face` (frozen face encoder + head), the committed `params.yaml`", dlib_rows))
        if args.cnn:
            cnn_rows = [_try_run(n, params, o, CNN_BASE, work / "cnn", faces, embeddings, data, external)
                        for n, o in CNN_VARIANTS.items()]
            sections.append(("ResNet-18 from scratch, 112 px, 5 epochs, no lower-resolution faces (make quick-resnet)",
                             cnn_rows))
    body = "\n\n".join(f"## {title}\n\n{_table(rows, ext_name)}" for title, rows in sections)
    flags = "".join(f" {f}" for f, on in (("--dlib-age", args.dlib_age), ("--no-dlib-face", args.no_dlib_face),
                                            ("--cnn", args.cnn)) if on)
    if args.variants:
        flags += f" --variants {args.variants}"
    if args.external:
        flags += f" --external {args.external}"
    # After hours of runs the table is written whatever: a missing dataset.json or --out folder failed here.
    dataset_file = data / "dataset.json"
    try:
        dataset = json.loads(dataset_file.read_text())
        lineage = f"data sha256 `{dataset['sha256'][:16]}...`, source `{dataset['source']}`"
    except (OSError, ValueError, KeyError, TypeError) as e:
        log.warning("%s unreadable (%s): the report names no data fingerprint", dataset_file, e)
        lineage = f"data fingerprint unknown: {dataset_file} unreadable"
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    from faceage import atomic

    atomic.write_text(args.out, f"""# Recipe by measurement

Generated by `python -m faceage.recipe{flags}`: every row is a real train + evaluate run on
the same faces ({lineage}), tracked in MLflow
with the tag `recipe`. One seed per variant: differences under ~0.2 years are within run-to-run noise
(seeds 42 and 1 of the default `dlib_face` recipe gave 5.16 and 5.16 test MAE).

{body}
""")
    log.info("wrote %s", args.out)
    failed = [r["variant"] for _, rows in sections for r in rows if r.get("failed")]
    if failed:
        raise SystemExit(f"{len(failed)} recipe row(s) failed, marked in {args.out}: " + "; ".join(failed))


if __name__ == "__main__":
    main()
