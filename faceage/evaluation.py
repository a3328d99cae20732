"""Evaluation on the test split: metrics, per-age-group errors, plots; logged to the training run.

Input: a checkpoint, the ``preprocess`` folder, the training history and the run file.
Output folder::

    metrics.json          mae_years (apparent age), mae_real_years, rmse_years, cs5, per-group MAE,
                          baseline_mae_years (always predicting the training mean), counts,
                          mae_low_res (MAE with the inputs at ``evaluate.low_res`` of their side)
    predictions.csv       file_name,true_age,real_age,predicted_age,predicted_std,abs_error
    by_age_group.csv      age_group,n,mae_years,bias_years (mean predicted - true: + = predicted too old)
    pred_vs_true.png, error_by_age_group.png, training_curves.png
    external_predictions.csv  set,file_name,true_age,predicted_age,predicted_std,abs_error

Cross-dataset test sets (``evaluate.external``, see :mod:`faceage.external`) are cropped with the
checkpoint's own crop settings, read by the same ``load_split`` and scored by the same
:class:`~faceage.inference.AgeModel` as the test split; each gets ``metrics.json["external"][name]``
(MAE, RMSE, CS@k, MAE by age group, coverage of the predicted std, the training-mean baseline, how many
images had no face)
and ``external_<name>_*`` metrics in MLflow, with the tags ``evaluate.external_sha256`` (the version of each
set's files) and ``evaluate.external_faces_sha256`` (which of its faces were scored), by which packaging compares
MAEs only where both match. A set where no face is found is reported with a warning
(``n_faces`` 0 and its counts alone, in ``metrics.json`` and in MLflow; ``-`` for its metrics in the model card), the
test split and the other sets scored as usual. ``metrics.json`` is strict JSON: a number that is not defined (NaN)
is ``null`` there (:func:`metrics_json`).
"""

from __future__ import annotations

import csv
import json
import math
import os
import logging
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from faceage.config import EvaluateParams
from faceage.chips import DLIB_AGE
from faceage.data import SplitDataError, load_split
from faceage.errors import FaceAgeError
from faceage.external import (EXTERNAL_SHA256_TAG, crop_counts, external_chips, external_embeddings,
                              external_faces, set_version, some_faces)
from faceage.face_encoder import FACE_ENCODER
from faceage.inference import AgeModel
from faceage.inputs import DLIB_FACE_EMBEDDING, input_kind, reads_pairs
from faceage.preprocess import MANIFEST, read_faces_manifest
from faceage.sources import ExternalSet, resolve_external
from faceage.appa_real import DATASET_JSON, read_dataset_info, read_demographics
from faceage.atomic import clear_stale, scratch_dir, write_bytes, write_text
from faceage.model_card import write_model_card
from faceage.paths import repo_root
from faceage.tracking import EVALUATED_IN_TAG, display_uri, read_run_file, setup_mlflow, tracking_uri
from faceage.training import faces_fingerprint, pin_threads, select_device
from faceage.transforms import low_resolution_at, reference_side

log = logging.getLogger(__name__)

# {set name: faces_fingerprint of the file names scored} of a run's latest evaluation. The same files
# (EXTERNAL_SHA256_TAG) are not the same faces scored: a set without release crops is scored on the faces the run's
# own detector found (preprocess.detector, upsample, retry_pad, cnn_retry_side), and MAEs on other subsets do not
# compare (faceage.packaging.rank_candidates).
EXTERNAL_FACES_TAG = "evaluate.external_faces_sha256"

GROUP_EDGES = (0, 10, 20, 30, 40, 50, 60, 70)


def age_group(age: float) -> str:
    """``0-9``, ``10-19``, ..., ``60-69``, ``70+``.

    Raises:
        ValueError: ``age`` is not a finite number >= 0 (NaN and negative ages were binned as ``0-9``, infinity as
            ``70+``). Evaluation checks its labels first (:func:`_labels`), naming the face.
    """
    if not (math.isfinite(age) and age >= 0):
        raise ValueError(f"an age must be a finite number >= 0 years, got {age}")
    lower = max(e for e in GROUP_EDGES if age >= e)
    return f"{lower}+" if lower == GROUP_EDGES[-1] else f"{lower}-{lower + 9}"


def age_metrics(pred: np.ndarray, true: np.ndarray, cs_years: float = 5.0) -> dict:
    """MAE, RMSE and cumulative score CS@``cs_years`` (share of errors <= ``cs_years``) of predictions against
    true ages. A NaN prediction makes all three NaN, as a run with a NaN metric is excluded from selection."""
    err = np.abs(pred - true)
    return {
        "mae_years": float(err.mean()),
        "rmse_years": float(np.sqrt(((pred - true) ** 2).mean())),
        f"cs{cs_years:g}": _share(err <= cs_years, err),
    }


def _share(hits: np.ndarray, values: np.ndarray) -> float:
    """The share of ``hits``; NaN where a value is NaN (NaN compares False: the face counted as a plain miss, and a
    model that output NaN showed a share that looked like a real one beside its NaN MAE)."""
    return float(hits.mean()) if not np.isnan(values).any() else math.nan


def metrics_json(metrics: dict) -> str:
    """``metrics.json``'s text: strict JSON (``allow_nan=False``), whatever NaN ``metrics`` holds.

    An external set with no face scored (:func:`~faceage.external.some_faces`) is written with its counts, path and
    versions alone, its metrics left out, as MLflow gets its counts alone and the card shows ``-``; any other
    non-finite number (a model that output NaN, the ratio to a zero baseline) is written as ``null``. Both went in as
    ``NaN``/``Infinity``, which is not JSON: strict readers (``jq``, browsers, JSON libraries of other languages)
    refused the file, and ``dvc metrics show`` showed ``nan`` as the set's MAE. ``metrics`` itself is not changed
    (MLflow and the card read its NaN)."""
    external = {name: {k: v for k, v in m.items() if some_faces(m.get("n_faces")) or not _undefined(v)}
                for name, m in (metrics.get("external") or {}).items()}
    shown = {**metrics, "external": external} if "external" in metrics else metrics
    return json.dumps(_nulled(shown), indent=2, allow_nan=False) + "\n"


def _undefined(value: Any) -> bool:
    return isinstance(value, float) and not math.isfinite(value)


def _nulled(value: Any) -> Any:
    """``value`` with each non-finite float (at any depth of dicts and lists) replaced by None."""
    if isinstance(value, dict):
        return {k: _nulled(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_nulled(v) for v in value]
    return None if _undefined(value) else value


def vs_baseline(mae_years: float, baseline_mae_years: float) -> float:
    """MAE as a share of the always-the-training-mean baseline's; NaN where that is 0 (every test face at the
    training mean, e.g. one face), which raised ZeroDivisionError."""
    return mae_years / baseline_mae_years if baseline_mae_years > 0 else math.nan


AGE_GROUPS = [f"{e}-{e + 9}" for e in GROUP_EDGES[:-1]] + [f"{GROUP_EDGES[-1]}+"]


def errors_by(pred: np.ndarray, true: np.ndarray, labels: list[str], order: list[str] | None = None) -> list[dict]:
    """MAE and mean signed error per group label (``{"group", "n", "mae_years", "bias_years"}`` rows; bias =
    mean predicted - true age, + = predicted too old), in ``order`` or sorted; empty groups omitted."""
    labels_arr = np.array(labels)
    diffs = ((g, (pred - true)[labels_arr == g]) for g in (order or sorted(set(labels))))
    return [{"group": g, "n": len(d), "mae_years": float(np.abs(d).mean()), "bias_years": float(d.mean())}
            for g, d in diffs if len(d)]


def errors_by_group(pred: np.ndarray, true: np.ndarray) -> list[dict]:
    """MAE and bias per age group of the true age, groups in age order, empty groups omitted."""
    return errors_by(pred, true, [age_group(a) for a in true], AGE_GROUPS)


def _plots(out: Path, pred: np.ndarray, true: np.ndarray, groups: list[dict], history_csv: Path | None) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    # 0..100 (the model's range), wider where a label is above it (UTKFace goes to 116): a fixed 0..100
    # hid those faces, often the worst ones, while the title's MAE counted them
    highest = float(max(true.max(), pred.max())) if len(true) else 0.0
    top = 100.0 if highest <= 100 else float(np.ceil(highest)) + 5
    fig, ax = plt.subplots(figsize=(5, 5))
    ax.scatter(true, pred, s=6, alpha=0.5)
    ax.plot([0, top], [0, top], "k--", lw=1)
    ax.set(xlabel="true age (years)", ylabel="predicted age (years)", xlim=(0, top), ylim=(0, top),
           title=f"test: MAE {np.abs(pred - true).mean():.2f} years")
    paths.append(out / "pred_vs_true.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar([g["group"] for g in groups], [g["mae_years"] for g in groups])
    for i, g in enumerate(groups):
        ax.text(i, g["mae_years"], f"n={g['n']}", ha="center", va="bottom", fontsize=7)
    ax.set(xlabel="true age group (years)", ylabel="MAE (years)", title="test error by age group")
    paths.append(out / "error_by_age_group.png")
    fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
    plt.close(fig)

    if history_csv is not None and history_csv.exists():
        with open(history_csv) as f:
            rows = list(csv.DictReader(f))
        epochs = [int(r["epoch"]) for r in rows]
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if rows:
            ax.plot(epochs, [float(r["train_mae"]) for r in rows], marker="o", label="train MAE")
            ax.plot(epochs, [float(r["val_mae"]) for r in rows], marker="o", label="validation MAE")
            ax.legend()
        else:  # train.epochs=0: the history is its header alone (the plot is a DVC output, so it is still written)
            ax.text(0.5, 0.5, "no training epochs (train.epochs=0):\nthe pretrained network as it is",
                    ha="center", va="center", transform=ax.transAxes)
            ax.set(xticks=[], yticks=[])
        ax.set(xlabel="epoch", ylabel="MAE (years)", title="training curves")
        paths.append(out / "training_curves.png")
        fig.savefig(paths[-1], dpi=100, bbox_inches="tight")
        plt.close(fig)
    return paths


def coverage(pred: np.ndarray, std: np.ndarray, true: np.ndarray, k: float) -> float:
    """Share of faces whose true age lies within ``k`` predicted standard deviations (NaN for a NaN prediction)."""
    err = np.abs(pred - true)
    return _share(err <= k * std, err + std)


# How honest the predicted std is, for the test split and each external set (the card shows them side by side)
CALIBRATION = ("coverage_1std", "coverage_2std", "mean_predicted_std")


def calibration(pred: np.ndarray, std: np.ndarray, true: np.ndarray) -> dict[str, float]:
    """The :data:`CALIBRATION` numbers: shares of true ages within 1 and 2 predicted std, and the mean std."""
    return {"coverage_1std": coverage(pred, std, true, 1.0), "coverage_2std": coverage(pred, std, true, 2.0),
            "mean_predicted_std": float(std.mean())}


def low_res_mae(age_model: AgeModel, images: torch.Tensor, true: np.ndarray, fractions: tuple[float, ...],
                batch_size: int) -> dict[str, float]:
    """MAE with the inputs at lower resolution: ``{"0.75": mae, ...}`` for each fraction of the input's side.

    The faces as if photographed smaller (:func:`faceage.transforms.low_resolution_at`); ``{}`` for
    ``dlib_face`` models, whose inputs are descriptors.
    """
    if input_kind(age_model.meta).name == DLIB_FACE_EMBEDDING or len(true) == 0:  # older checkpoints lack "input"
        return {}
    size = reference_side(images)
    return {f"{f:g}": float(np.abs(age_model.predict_inputs(
        low_resolution_at(images, torch.full((len(images),), round(f * size))), batch_size)[0] - true).mean())
            for f in fractions}


def evaluate_external(age_model: AgeModel, sets: list[ExternalSet], p: EvaluateParams, detector_dir: str | Path,
                      train_mean: float, cache_dir: str | Path | None = None
                      ) -> tuple[dict[str, dict], dict[str, list[dict]], list[list]]:
    """Scores ``age_model`` on every ``evaluate.external`` set.

    Args:
        age_model: The loaded checkpoint.
        sets: The resolved ``evaluate.external`` sets (:func:`faceage.sources.resolve_external`).
        p: The ``evaluate`` section (``batch_size``, ``cs_years``).
        detector_dir: The ``fetch_detector`` folder (detector, and the face encoder of ``dlib_face`` models).
        train_mean: Mean training age, for the always-the-training-mean baseline.
        cache_dir: Where cropped sets are kept; default ``<repo root>/.cache/external``.

    Returns:
        ``{name: metrics}``, ``{name: age-group rows}`` and prediction rows
        ``[set, file_name, true_age, predicted_age, predicted_std, abs_error]``.

    A set where no face is found (every image faceless or unreadable) is reported, with a warning: its counts,
    ``n_faces`` 0, NaN metrics (left out of ``metrics.json`` by :func:`metrics_json`) and no age-group rows; the
    other sets are scored as usual.

    Raises:
        faceage.sources.ExternalSetError: The detector is not the checkpoint's.
    """
    cache_dir = Path(cache_dir) if cache_dir is not None else repo_root() / ".cache" / "external"
    meta = age_model.meta
    results, groups, rows = {}, {}, []
    for ext in sets:
        faces = external_faces(ext, meta["crop"], detector_dir, cache_dir)
        counts = crop_counts(faces)
        if not some_faces(counts["n_faces"]):  # unreadable files are not the detector's misses: both are counted
            # Reported, not raised: one such set stopped the whole evaluation, the test split's and the other sets'
            # scores unwritten. Its metrics are NaN here, left out of metrics.json (metrics_json: NaN is not JSON) and
            # of MLflow, where a NaN external MAE excluded every run evaluated with the set from the champion's choice;
            # the model card shows its counts and "-".
            log.warning("evaluate.external: %r (set %r): none of its %d images has a face to score: %d without a "
                        "detected face (detector=%s, no_face=%s), %d unreadable (not an image Pillow can decode; "
                        "the warnings above name them); it is reported with n_faces=0 and no MAE", ext.given,
                        ext.name, counts["n_images"], counts.get("no_face", 0), meta["crop"]["detector"],
                        meta["crop"].get("no_face"), counts.get("unreadable", 0))
            groups[ext.name] = []
            results[ext.name] = {"mae_years": math.nan, "rmse_years": math.nan, f"cs{p.cs_years:g}": math.nan,
                                 "baseline_mae_years": math.nan, "mae_by_age_group": {}, "mae_low_res": {},
                                 **dict.fromkeys(CALIBRATION, math.nan), **counts,
                                 "path": str(ext.path), "sha256": set_version(faces, ext.path),
                                 "faces_sha256": faces_fingerprint([])}
            continue
        embeddings = (external_embeddings(faces, detector_dir) if meta["backbone"] == FACE_ENCODER else
                      external_chips(faces) if meta["backbone"] == DLIB_AGE else None)
        data = load_split(faces, "test", meta["backbone"], meta["image_size"], embeddings,
                          pairs=reads_pairs(meta))
        pred, std = age_model.predict_inputs(data.images, p.batch_size)
        true = _labels(data.rows, "apparent_age", f"external set {ext.name!r} ({ext.path}): ")
        groups[ext.name] = errors_by_group(pred, true)
        results[ext.name] = {
            **age_metrics(pred, true, p.cs_years),
            "baseline_mae_years": float(np.abs(train_mean - true).mean()),
            "mae_by_age_group": {g["group"]: g["mae_years"] for g in groups[ext.name]},
            **calibration(pred, std, true),
            "mae_low_res": low_res_mae(age_model, data.images, true, p.low_res, p.batch_size),
            **counts,
            "path": str(ext.path),
            "sha256": set_version(faces, ext.path),  # which version of the set: MAEs compare only within one
            "faces_sha256": faces_fingerprint(r["file_name"] for r in data.rows),  # and which of its faces
        }
        rows += [[ext.name, r["file_name"], t, round(pa, 3), round(ps, 3), round(abs(pa - t), 3)]
                 for r, t, pa, ps in zip(data.rows, true, pred, std)]
        log.info("external %s: MAE %.2f years, CS@%g %.3f on %d faces (of %d images: %d skipped with no face "
                 "with no_face=%s, %d unreadable; training-mean baseline %.2f)", ext.name,
                 results[ext.name]["mae_years"], p.cs_years, results[ext.name][f"cs{p.cs_years:g}"],
                 counts["n_faces"], counts["n_images"], counts.get("no_face", 0), meta["crop"].get("no_face"),
                 counts.get("unreadable", 0), results[ext.name]["baseline_mae_years"])
    return results, groups, rows


def log_evaluation(run_id: str, metrics: dict[str, float], tags: dict[str, Any], artifacts: list[Path]) -> None:
    """Adds an evaluation's metrics, tags and files (under ``evaluation/``) to train's finished MLflow run,
    leaving its status alone: reopened with ``mlflow.start_run``, a Ctrl-C or an error while logging ended
    it FAILED, and the champion's selection (finished runs only) no longer saw the trained model.

    A metric whose latest value in the run is already ``metrics``' is not logged again: MLflow cannot replace a
    metric, only add a point to its history, and each re-evaluation (``dvc repro -f``, an evaluate-only ``dvc exp
    run``) added an identical copy of every one. A value that changed is logged, and is the run's latest."""
    from mlflow.entities import Metric, RunTag

    client = setup_mlflow().MlflowClient(tracking_uri())
    logged = client.get_run(run_id).data.metrics
    now = int(time.time() * 1000)
    client.log_batch(run_id, metrics=[Metric(k, float(v), now, 0) for k, v in metrics.items()
                                      if not _same_value(logged.get(k), float(v))],
                     tags=[RunTag(k, str(v)) for k, v in tags.items()])
    for path in artifacts:
        client.log_artifact(run_id, str(path), artifact_path="evaluation")


def _same_value(logged: float | None, value: float) -> bool:
    """Whether a run's latest metric ``logged`` (None: not logged) already is ``value`` (NaN is NaN).

    +-inf is +-``sys.float_info.max`` logged: MLflow's SQL stores save an infinite metric as the largest float (its
    sqlite column holds no infinity), so read back it never equalled the infinity about to be logged again, and each
    re-evaluation added another point to its history."""
    if logged is None:
        return False
    if math.isinf(value) and abs(logged) == sys.float_info.max:
        logged = math.copysign(math.inf, logged)
    return logged == value or (math.isnan(logged) and math.isnan(value))


def _labels(rows: list[dict], column: str, where: str = "") -> np.ndarray:
    """A manifest column as float64, as written (the datasets' float32 tensors turn 24.6 into 24.600000381469727).

    Raises:
        SplitDataError: A label is not a finite number >= 0, naming the face (``where`` says which manifest). The
            source's labels are checked when read (:mod:`faceage.appa_real`); one that reaches evaluation
            otherwise entered every metric (NaN) or was scored and binned as ``0-9`` (a negative age).
    """
    ages = []
    for r in rows:
        try:
            age = float(r[column])
        except ValueError:
            age = math.nan
        if not (math.isfinite(age) and age >= 0):
            face = r.get("file_name", r.get("crop"))
            raise SplitDataError(f"{where}face {face!r} has {column}={r[column]!r}: an age must be a finite number "
                                 ">= 0 years; fix its label and rerun preprocess")
        ages.append(age)
    return np.array(ages, np.float64)


def scored_faces(external: dict[str, dict]) -> dict[str, str]:
    """``{set name: fingerprint of the faces scored}`` (the :data:`EXTERNAL_FACES_TAG` of an evaluation's
    ``metrics.json["external"]``)."""
    return {n: m["faces_sha256"] for n, m in external.items() if "faces_sha256" in m}


def external_faces_versions(tags: dict[str, str] | None) -> dict[str, str]:
    """A run's :data:`EXTERNAL_FACES_TAG` as ``{set name: fingerprint}``; ``{}`` for a run evaluated before the tag
    existed (or a tag that is not a JSON object)."""
    try:
        versions = json.loads((tags or {}).get(EXTERNAL_FACES_TAG, "{}"))
    except json.JSONDecodeError:
        return {}
    return {str(k): str(v) for k, v in versions.items()} if isinstance(versions, dict) else {}


def external_mlflow_metrics(external: dict[str, dict], cs_years: float) -> dict[str, float]:
    """``external_<name>_mae``, ``_rmse``, ``_cs5``, ``_baseline_mae``, ``_n_faces``, ``_n_images``,
    ``_no_face`` (images skipped: no face and no fallback), ``_unreadable``, ``_coverage_1std``, ``_coverage_2std``,
    ``_mean_predicted_std``, ``_mae_<group>``; a set with no face scored gets its counts alone."""
    cs = f"cs{cs_years:g}"
    flat = {}
    for name, m in external.items():
        flat.update({f"external_{name}_n_faces": m["n_faces"], f"external_{name}_n_images": m["n_images"],
                     f"external_{name}_no_face": m["no_face"], f"external_{name}_unreadable": m["unreadable"]})
        if not some_faces(m["n_faces"]):  # no NaN MAE, which excluded the run from the champion's choice
            continue
        flat.update({f"external_{name}_mae": m["mae_years"], f"external_{name}_rmse": m["rmse_years"],
                     f"external_{name}_{cs}": m[cs], f"external_{name}_baseline_mae": m["baseline_mae_years"]})
        flat.update({f"external_{name}_{k}": m[k] for k in CALIBRATION if k in m})
        flat.update({f"external_{name}_mae_{g.replace('+', 'plus')}": v for g, v in m["mae_by_age_group"].items()})
        flat.update({f"external_{name}_mae_low_res_{f}": v for f, v in m.get("mae_low_res", {}).items()})
    return flat


class EvaluateInputMissingError(FaceAgeError, FileNotFoundError):
    """An input that only the model card reads (``--data``'s ``dataset.json``, ``--preprocess-metrics``) is missing:
    one line naming it and the stage that writes it. Also a ``FileNotFoundError``, as its read raised before."""


def check_card_inputs(data_dir: str | Path, preprocess_metrics: str | Path | None) -> None:
    """Checks the files :func:`evaluate_model` writes the model card from, before the evaluation.

    They are read last, once the test split and every external set are scored: a missing one failed the stage
    (``python stages/evaluate.py`` run by hand, ``--data`` naming another folder) after minutes of work, with a
    ``FileNotFoundError`` traceback.

    Raises:
        EvaluateInputMissingError: ``data_dir/dataset.json`` or ``preprocess_metrics`` is not a file.
    """
    problems = []
    info = Path(data_dir) / DATASET_JSON
    if not Path(data_dir).is_dir():
        problems.append(f"no fetch_data output at {Path(data_dir).absolute()} ({DATASET_JSON} missing): run "
                        "`dvc repro fetch_data` first, or pass the folder it wrote (--data)")
    elif not info.is_file():
        problems.append(f"{info.absolute()} not found: {data_dir} is not a fetch_data output, or one cut short; run "
                        "`dvc repro -f fetch_data`, or pass the folder it wrote (--data)")
    if preprocess_metrics is not None and not Path(preprocess_metrics).is_file():
        problems.append(f"no preprocess counts at {Path(preprocess_metrics).absolute()}: run `dvc repro preprocess` "
                        "first, or pass the file it wrote (--preprocess-metrics)")
    if problems:
        raise EvaluateInputMissingError(f"the model card's inputs are missing: {'; '.join(problems)}")


def evaluate_model(checkpoint: str | Path, faces_dir: str | Path, out_dir: str | Path, p: EvaluateParams,
                   run_path: str | Path | None = None, history_csv: str | Path | None = None,
                   embeddings_path: str | Path | None = None, data_dir: str | Path | None = None,
                   preprocess_metrics: str | Path | None = None, model_card: str | Path | None = None,
                   detector_dir: str | Path | None = None, external_cache: str | Path | None = None) -> dict:
    """Scores the checkpoint on the test split and logs the results to its MLflow run.

    The outputs are written in full beside themselves, logged to MLflow, and then put in place (the card first,
    ``metrics.json`` last): an evaluation that fails or is stopped leaves the previous ``metrics.json`` (and, unless
    it fails or is stopped while they are put in place, after MLflow has the new ones, the previous outputs), never a
    new one without its predictions, card and MLflow metrics.

    Args:
        checkpoint: ``train`` output.
        faces_dir: ``preprocess`` output.
        out_dir: Where metrics, predictions and plots go (see module docstring).
        p: The ``evaluate`` section of ``params.yaml``.
        run_path: ``run.json`` from ``train``; when given, the run is continued in MLflow.
        history_csv: ``train``'s per-epoch history, for the training-curve plot.
        embeddings_path: The ``embed`` stage's descriptors (for a ``dlib_face`` model).
        data_dir: The fetched release (dataset fingerprint, gender/race labels when present).
        preprocess_metrics: ``preprocess``'s counts JSON, quoted in the model card.
        model_card: Where to write the model card (needs ``data_dir``).
        detector_dir: The ``fetch_detector`` folder; needed when ``p.external`` lists sets.
        external_cache: Where cropped external sets are kept (default ``<repo root>/.cache/external``).

    Returns:
        The metrics written to ``metrics.json`` (:func:`metrics_json`: where this holds NaN, the file holds ``null``,
        or, for an external set with no face scored, nothing).

    Raises:
        ValueError: ``p.external`` lists sets but no ``detector_dir`` is given.
        faceage.sources.ExternalSetError: An external set is missing or malformed (named).
        EvaluateInputMissingError: (a ``FileNotFoundError``) The model card's inputs are missing: ``data_dir``'s
            ``dataset.json`` or ``preprocess_metrics``.
    """
    # The staging folders of evaluations killed outright (kill -9, the OOM killer: a copy of every output each)
    # go first: scratch_dir below removes them too, but only once this evaluation reaches it, and a rerun stopped
    # before (a wrong evaluate.external path, a missing input) left them there. A live run's is left alone.
    try:
        clear_stale(Path(out_dir) / "metrics.json")
    except OSError:  # a folder this user may write but not list: housekeeping, not the evaluation
        pass
    if p.external and detector_dir is None:
        raise ValueError(f"evaluate.external={list(p.external)} needs the detector folder (detector_dir)")
    sets = resolve_external(p.external, repo_root())  # before any work: a wrong path fails at once
    if model_card is not None and data_dir is not None:
        check_card_inputs(data_dir, preprocess_metrics)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    pin_threads()
    device = select_device("auto")
    age_model = AgeModel(checkpoint, device=device)
    meta = age_model.meta
    test = load_split(faces_dir, "test", meta["backbone"], meta["image_size"], embeddings_path,
                      pairs=reads_pairs(meta))
    age_model.accelerate(test.images)
    pred, std = age_model.predict_inputs(test.images, p.batch_size)
    where = f"{Path(faces_dir) / MANIFEST}: "
    true, real = _labels(test.rows, "apparent_age", where), _labels(test.rows, "real_age", where)
    train_mean = float(_labels(read_faces_manifest(faces_dir, "train"), "apparent_age", where).mean())
    groups = errors_by_group(pred, true)
    demographics = read_demographics(data_dir, "test") if data_dir is not None else {}
    by_attribute = {
        attribute: errors_by(pred, true, [demographics.get(r["file_name"], {}).get(attribute, "unknown")
                                          for r in test.rows])
        for attribute in ("gender", "race")
        if any(attribute in d for d in demographics.values())
    }
    metrics = {
        **age_metrics(pred, true, p.cs_years),
        "mae_real_years": float(np.abs(pred - real).mean()),
        "baseline_mae_years": float(np.abs(train_mean - true).mean()),
        "n_test_faces": int(len(true)),
        "mae_by_age_group": {g["group"]: g["mae_years"] for g in groups},
        **{f"mae_by_{a}": {g["group"]: g["mae_years"] for g in rows} for a, rows in by_attribute.items()},
        **calibration(pred, std, true),
        "temperature": float(meta.get("temperature", 1.0)),
        "val_mae_years": float(meta["val_mae"]),
        "mae_low_res": low_res_mae(age_model, test.images, true, p.low_res, p.batch_size),
    }
    metrics["mae_vs_baseline"] = vs_baseline(metrics["mae_years"], metrics["baseline_mae_years"])
    external, external_groups, external_rows = (
        evaluate_external(age_model, sets, p, detector_dir, train_mean, external_cache) if sets else ({}, {}, []))
    metrics["external"] = external
    log.info("test MAE %.2f years (real age %.2f), RMSE %.2f, CS@%g %.3f on %d faces; "
             "always predicting the training mean gives %.2f",
             metrics["mae_years"], metrics["mae_real_years"], metrics["rmse_years"], p.cs_years,
             metrics[f"cs{p.cs_years:g}"], len(true), metrics["baseline_mae_years"])
    card = Path(model_card) if model_card is not None and data_dir is not None else None
    # Every output is written into a hidden folder first (removed on any exception, or by the next run after a
    # kill), logged to MLflow from there, and only then put in place, metrics.json last. metrics.json was
    # written first: an evaluate that failed or was stopped (stages/evaluate.py turns SIGTERM into Ctrl-C) after
    # it left a new metrics.json beside the previous predictions and card, nothing in MLflow, and `dvc metrics
    # show` showed it as a finished evaluation. Each file is replaced on its own, not ``out`` swapped whole
    # (atomic.staged_dir): ``out`` holds files not evaluate's (DVC's .gitignore of the cached outputs there, or a
    # user's), which a swap would take away.
    with scratch_dir(out / "metrics.json", "new") as staged:
        with open(staged / "predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["file_name", "true_age", "real_age", "predicted_age", "predicted_std", "abs_error"])
            for r, t, ra, pa, ps in zip(test.rows, true, real, pred, std):
                w.writerow([r["file_name"], t, ra, round(pa, 3), round(ps, 3), round(abs(pa - t), 3)])
        with open(staged / "external_predictions.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["set", "file_name", "true_age", "predicted_age", "predicted_std", "abs_error"])
            w.writerows(external_rows)
        with open(staged / "by_age_group.csv", "w", newline="") as f:
            columns = ("n", "mae_years", "bias_years")
            w = csv.DictWriter(f, fieldnames=["age_group", *columns])
            w.writeheader()
            w.writerows({"age_group": g["group"], **{k: g[k] for k in columns}} for g in groups)
        plots = _plots(staged, pred, true, groups, Path(history_csv) if history_csv else None)
        cards = []
        if card is not None:
            counts = json.loads(Path(preprocess_metrics).read_text()) if preprocess_metrics else None
            (staged / "card").mkdir()  # a folder of its own: the card's name may be any, metrics.json too
            cards.append(write_model_card(staged / "card" / card.name, metrics, {"age_group": groups, **by_attribute},
                                          meta, read_dataset_info(data_dir), counts,
                                          display_uri() if run_path else None, external_groups=external_groups))
        text = metrics_json(metrics)
        (staged / "metrics.json").write_text(text)
        # MLflow before metrics.json, not after: metrics.json in the workspace is what says "this evaluation is
        # done" (`dvc metrics show`, `dvc exp show`). Logging failing (the store unreachable, the run deleted) or
        # stopped now leaves the previous evaluation whole in the workspace, and the rerun logs it again (values
        # already logged are skipped). After it, the same failure left a new metrics.json that MLflow did not have,
        # and packaging (which ranks runs by their MLflow metrics) never saw it. Only a stop in the few copies below
        # mixes the two, and then metrics.json is still the previous one.
        if run_path is not None:
            flat = {f"test_{k}": v for k, v in metrics.items() if isinstance(v, (int, float))}
            flat.update({f"test_mae_{g['group'].replace('+', 'plus')}": g["mae_years"] for g in groups})
            flat.update({f"test_mae_low_res_{f}": v for f, v in metrics["mae_low_res"].items()})
            flat.update(external_mlflow_metrics(external, p.cs_years))
            # Tags, not params: a later `dvc exp run -S evaluate.external=[...]` re-evaluates the same
            # trained run, and MLflow refuses to change a logged param. The tags hold the latest evaluation's settings.
            tags = {f"evaluate.{k}": json.dumps(list(v)) if isinstance(v, tuple) else v for k, v in asdict(p).items()}
            tags[EXTERNAL_SHA256_TAG] = json.dumps({n: m["sha256"] for n, m in external.items()})
            tags[EXTERNAL_FACES_TAG] = json.dumps(scored_faces(external))
            tags[EVALUATED_IN_TAG] = os.environ.get("DVC_EXP_NAME", "")  # `dvc exp run` names it; "" under dvc repro
            # The staged files: the names (evaluation/metrics.json, ...) and contents of those put in place below.
            log_evaluation(read_run_file(run_path)["run_id"], flat, tags,
                           [staged / "metrics.json", staged / "by_age_group.csv", staged / "predictions.csv",
                            staged / "external_predictions.csv", *plots, *cards])
        # Copied in, each whole or not at all (atomic.write_bytes), not renamed: the card may be on another disk.
        # The card first: outside ``out``, where a write is likeliest to fail (a folder or another disk there), it
        # then leaves ``out`` whole (the card last, its failure left the new predictions beside the old metrics).
        if card is not None:
            card.parent.mkdir(parents=True, exist_ok=True)  # as write_model_card made it (a card outside reports/)
            write_bytes(card, cards[0].read_bytes())
        for name in ("predictions.csv", "external_predictions.csv", "by_age_group.csv", *(plot.name for plot in plots)):
            write_bytes(out / name, (staged / name).read_bytes())
        write_text(out / "metrics.json", text)
    return metrics
