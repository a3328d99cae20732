"""Backbone sweep: one DVC experiment per backbone, then a report read back from MLflow.

Input: a list of backbones and ``dvc exp run -S`` overrides (a profile). Output:
``reports/sweep_runs.json`` (backbone -> MLflow run id and settings), and, from MLflow,
``reports/backbones.md`` (a table and the answer to "does a bigger backbone reduce the
error or does it saturate?") plus ``reports/backbones.png`` (test MAE against GFLOPs and
parameters).

Usage (also ``make sweep``)::

    python -m faceage.sweep --profile cpu --source /abs/path/appa-real-sample
    python -m faceage.sweep --profile gpu --source /abs/path/appa-real-release.zip   # or no --source: the URL
    python -m faceage.sweep --report-only
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import math
import os
import signal
import subprocess
from pathlib import Path

from faceage.config import check_train_backbone
from faceage.errors import FaceAgeError
from faceage.evaluation import external_faces_versions
from faceage.atomic import write_bytes, write_text
from faceage.experiment import (PARAMS, ProfileError, ProfileInterrupted, dvc_root, end_like_a_shell, file_bytes,
                                override_value, run_profile, signal_name)
from faceage.external import external_maes, external_versions
from faceage.logs import die_of_signal, setup_logging
from faceage.tracking import (EXPERIMENT, NoExperimentError, absent_store, check_reachable, display_uri, lost_run,
                              masked_url, portable_uri, read_run_file, setup_mlflow, sqlite_path, tracking_uri)

log = logging.getLogger(__name__)

BACKBONES = ("dlib_age", "dlib_face", "mobilenet_v3_large", "resnet18", "efficientnet_b0", "resnet34", "resnet50",
             "convnext_tiny")
# The face networks pretrained by dlib (frozen, with heads trained here) run with the params.yaml
# defaults; CNNs from scratch at reduced size so their six runs fit ~30 min on 2 CPU cores.
PRETRAINED_FACE = ("dlib_age", "dlib_face")
PROFILES = {
    # From scratch in 5 epochs, lower-resolution training faces only slow convergence (make quick-resnet:
    # test 13.94 with train.low_res=0.5 against 13.13 without), so the CPU profile trains CNNs without them.
    "cpu": {"cnn": ["train.pretrained=none", "train.image_size=64", "train.epochs=5", "train.low_res=0.0"],
            "face": []},
    "gpu": {"cnn": ["train.pretrained=imagenet", "train.image_size=224", "train.epochs=30"], "face": []},
}
RUNS = "reports/sweep_runs.json"
SOURCE_KEY = "fetch_data.source="  # how sweep_overrides records --source in each run's overrides
# The aligned chips each network reads (px): dlib_age's fused head reads its 64 px age chip and dlib's 150 px face
# chip, its other heads the age chip alone
CHIP_SIDES = {"dlib_face": "150", "dlib_age": "64"}
FUSED_CHIP_SIDES = "64 + 150"


# What to do where MLFLOW_TRACKING_URI (or its default, the repo's mlflow.db) names a sqlite store that is not there
ABSENT_STORE_FIX = "set MLFLOW_TRACKING_URI to the store the sweep logged its runs to"


class SweepError(FaceAgeError):
    """The sweep cannot start or report: its runs file (``--runs``) is missing or unreadable, or (the report) the
    MLflow store is not there, or a run it names is not in the store or did not log its test MAE."""


def read_runs(path: Path, *, required: bool) -> dict:
    """The runs file (backbone -> run id and overrides); ``{}`` where it is absent and not ``required``.

    Raises:
        SweepError: It is absent (``required``: ``--report-only`` reads nothing else), unreadable or not JSON.
    """
    if not required and not path.exists():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SweepError(f"cannot read the sweep's runs file {path} ({e}): run the sweep (make sweep), or pass "
                         "the --runs it wrote") from None


def sweep_overrides(backbone: str, profile: str, source: str | None) -> list[str]:
    """The ``-S`` overrides of one backbone's run in ``profile`` (see :func:`run_sweep`)."""
    overrides = [f"train.backbone={backbone}", *PROFILES[profile]["face" if backbone in PRETRAINED_FACE else "cnn"]]
    if source:
        overrides.append(f"{SOURCE_KEY}{override_value(source)}")  # a path with , [ ] = or ü
    return overrides


def unknown_runs(runs: dict) -> list[str]:
    """The backbones of ``runs`` whose MLflow run this tracking store cannot give (not in it, or deleted:
    ``runs`` recorded elsewhere, as the committed ``reports/sweep_runs.json`` names the runs of the machine
    that wrote it). Other errors of the store (a proxy refusing run reads) are raised, not taken for absence.
    A sqlite store that is not there holds none of them, and is not created by asking (:func:`faceage.tracking.absent_store`)."""
    if absent_store() is not None:
        return list(runs)
    try:
        setup_mlflow(writable=False)  # reads only: a team's read-only store serves the report
    except NoExperimentError:  # nor is it created (a write): the runs, read by id below, are not in such a store
        pass
    return [backbone for backbone, info in runs.items() if lost_run(info["run_id"]) is not None]


def _not_in_store(runs: dict) -> tuple[list[str], str]:
    """:func:`unknown_runs`, and what to add to the message naming them where the store holds no ``face-age``
    experiment at all (a fresh or another project's store)."""
    missing = unknown_runs(runs)
    if not missing:
        return [], ""
    db = absent_store()
    if db is not None:  # a mistyped MLFLOW_TRACKING_URI, or the default mlflow.db of a folder without one
        return missing, f"; there is no MLflow store at {db} ({ABSENT_STORE_FIX})"
    import mlflow

    if mlflow.MlflowClient(tracking_uri()).get_experiment_by_name(EXPERIMENT) is not None:
        return missing, ""
    return missing, f"; the store holds no face-age runs at all (no experiment {EXPERIMENT!r})"


def run_sweep(backbones: list[str], profile: str, source: str | None, runs_path: Path) -> dict:
    """Runs ``dvc exp run`` once per backbone in this workspace; records each MLflow run id.

    Args:
        backbones: The backbones, one experiment each.
        profile: A key of :data:`PROFILES`.
        source: ``fetch_data.source`` for every run (any profile; quoted for ``-S``), or None for
            the committed one.
        runs_path: The JSON file of backbone -> run id and overrides (updated after each run).

    Raises:
        faceage.experiment.ProfileError: No DVC repo, or its ``params.yaml`` is unreadable.
        subprocess.CalledProcessError: A ``dvc exp run`` failed (its output is shown).
        faceage.experiment.ProfileInterrupted: Ctrl-C or SIGTERM; its ``remaining`` lists the backbones not swept.
    """
    runs = json.loads(runs_path.read_text()) if runs_path.exists() else {}
    for i, backbone in enumerate(backbones):
        overrides = sweep_overrides(backbone, profile, source)
        log.info("sweep: %s", " ".join(overrides))
        try:
            run_profile(overrides)  # on the committed params.yaml, not on the last backbone's overrides
        except ProfileInterrupted as e:
            e.remaining = backbones[i:]
            raise
        runs[backbone] = {"run_id": read_run_file("models/run.json")["run_id"], "overrides": overrides}
        runs_path.parent.mkdir(parents=True, exist_ok=True)
        # Whole or not at all: a Ctrl-C while it was written left a cut JSON, and the next sweep refused it.
        write_text(runs_path, json.dumps(runs, indent=2) + "\n")
    return runs


def runs_profile(runs: dict, default: str) -> str:
    """The profile the runs' CNNs trained with, from the overrides each run records (``--profile`` can
    differ: ``--report-only`` after a GPU sweep); ``default`` when no CNN ran.

    Raises:
        ValueError: The runs' CNNs trained with different profiles (or none of them): one report cannot
            describe them.
    """
    found = {}
    for backbone, info in runs.items():
        if backbone in PRETRAINED_FACE:
            continue
        given = set(info.get("overrides", []))
        matches = [name for name, profile in PROFILES.items() if set(profile["cnn"]) <= given]
        found[backbone] = matches[0] if len(matches) == 1 else None
    profiles = set(found.values())
    if not profiles:
        return default
    if len(profiles) > 1 or None in profiles:
        raise ValueError("the runs' CNNs trained with different profiles (" + ", ".join(
            f"{b}: {p or 'none of ' + '/'.join(PROFILES)}" for b, p in sorted(found.items())) +
            "): one report cannot describe them; sweep them again with one --profile, or pass another --runs")
    return profiles.pop()


def runs_source(runs: dict) -> str | None:
    """The ``fetch_data.source`` override the runs share (as recorded, quoted for ``-S``), or None when
    they ran without ``--source`` (the committed one).

    Each source has its own test split: rows scored on different ones cannot be ranked in one table
    or give one verdict, so a partial re-sweep with another ``--source`` is refused before its first run.

    Raises:
        ValueError: The runs were swept with different sources (or some without ``--source``).
    """
    found = {backbone: next((o.removeprefix(SOURCE_KEY) for o in info.get("overrides", []) if o.startswith(SOURCE_KEY)),
                            None) for backbone, info in runs.items()}
    sources = set(found.values())
    if len(sources) > 1:
        raise ValueError("the runs trained on different data (" + ", ".join(
            f"{b}: {s or 'the committed fetch_data.source'}" for b, s in sorted(found.items())) +
            "): one report cannot compare them; sweep them again with one --source, or pass another --runs")
    return sources.pop() if sources else None


def runs_data(rows: list[dict]) -> None:
    """Checks that the rows (:func:`collect`) trained and were tested on the same data (their ``data_sha256`` tag;
    a run logged before the tag is not checked).

    :func:`runs_source` compares the ``--source`` each run was given; the data behind one source can still differ
    (a partial re-sweep after a new committed ``fetch_data.source``, a ``--source`` folder whose files changed), and
    the report then ranked test MAEs of different test splits under one verdict.

    Raises:
        ValueError: The rows' runs trained on different data.
    """
    found = {r["backbone"]: r["data_sha256"] for r in rows if r.get("data_sha256")}
    if len(set(found.values())) > 1:
        raise ValueError("the runs trained on different data (" + ", ".join(
            f"{b}: data sha256 {sha[:12]}" for b, sha in sorted(found.items())) +
            "): their test MAEs are on different test splits and one report cannot compare them; sweep them "
            "again on one data (--backbones), or pass another --runs")


def external_references(rows: list[dict]) -> dict[str, str]:
    """Per external set, the version of its files (fingerprint) the report's column compares: the newest run's,
    the files as they were last scored (a backbone swept again is scored on the files as they are, so the advice
    to sweep the others again converges; the version most rows had would send the user to re-sweep the one row
    already on the current files). Sets no row recorded a version for are left out."""
    newest: dict[str, tuple[int, str]] = {}
    for r in rows:
        for name, version in r.get("external_sha256", {}).items():
            if name in r.get("external", {}):
                newest[name] = max(newest.get(name, (-1, "")), (r.get("start_time_ms", 0), version))
    return {name: version for name, (_, version) in newest.items()}


def _other_version(r: dict, name: str, refs: dict[str, str]) -> bool:
    """Whether row ``r`` was scored on another version of set ``name``'s files than ``refs``
    (:func:`external_references`)."""
    version = r.get("external_sha256", {}).get(name)
    return name in refs and version is not None and version != refs[name]


def external_face_references(rows: list[dict]) -> dict[str, dict]:
    """Per external set, the row whose faces (``evaluate.external_faces_sha256``) the report's column compares: the
    newest run's among those on the compared version of the files (:func:`external_references`), as for the version,
    that can win (``contender``, :func:`common_face_maes`: packaging's champion rule), where one was scored on the set;
    else the newest run's. A run that cannot win (a diverged one, one validated on other photos) was the reference
    when swept last: every run that can was marked † and sent to be swept again onto that run's faces.
    Sets no such row recorded faces for are left out (runs evaluated before the tag: nothing to compare)."""
    # (can win, start time): a row that can win beats any that cannot, then the newest; of equals, the last row
    # (max keeps the first of equals, hence reversed)
    return {name: max(reversed(candidates), key=lambda r: (_can_win(r, name), r.get("start_time_ms", 0)))
            for name, candidates in _face_reference_candidates(rows).items()}


def _face_reference_candidates(rows: list[dict]) -> dict[str, list[dict]]:
    """Per external set, the rows :func:`external_face_references` chooses its reference from, in the rows' order:
    those that recorded the faces they scored on the set (``external_faces_sha256``), with an MAE on it, on the
    compared version of its files (:func:`external_references`). Sets without such a row are left out."""
    refs = external_references(rows)
    candidates: dict[str, list[dict]] = {}
    for r in rows:
        for name in r.get("external_faces_sha256", {}):
            if name in r.get("external", {}) and not _other_version(r, name, refs):
                candidates.setdefault(name, []).append(r)
    return candidates


def _can_win(r: dict, name: str) -> bool:
    """Whether row ``r`` is a run packaging's champion rule compares on set ``name``: ``contender`` (where
    :func:`common_face_maes` ranked the rows; else every row is) with a finite MAE on the set."""
    return r.get("contender", True) and math.isfinite(r.get("external", {}).get(name, math.nan))


def _reference_words(rows: list[dict], ref: dict, name: str) -> str:
    """How the faces note names set ``name``'s reference row ``ref``: "the newest run's" where it is (of the rows
    :func:`external_face_references` chose from), else "the newest champion-eligible run's" (a newer one cannot win)."""
    newest = max((r.get("start_time_ms", 0) for r in _face_reference_candidates(rows).get(name, [])), default=0)
    return "the newest run's" if ref.get("start_time_ms", 0) >= newest else "the newest champion-eligible run's"


def _other_faces(r: dict, name: str, face_refs: dict[str, dict]) -> bool:
    """Whether row ``r`` (on the compared version of set ``name``) was scored on other faces of it than the newest
    run's (:func:`external_face_references`)."""
    faces = r.get("external_faces_sha256", {}).get(name)
    return (name in face_refs and name in r.get("external", {}) and faces is not None
            and faces != face_refs[name]["external_faces_sha256"][name])


def common_face_maes(client, rows: list[dict], runs: dict) -> None:
    """Adds ``external_common`` ``{set: (MAE, faces)}`` to the rows scored on different faces of a set: each run's MAE
    on the faces all of them scored, from their ``evaluation/external_predictions.csv``, by packaging's champion rule
    (:func:`faceage.packaging.rank_candidates`, which pairs with :func:`faceage.packaging.paired_maes`: its runs, its
    thresholds, its fallbacks, its log lines).

    The runs paired are those packaging pairs: the ones that can win (finite validation and test MAEs, validated on
    the photos of the workspace's preprocess output where it holds the runs' data, :func:`_workspace_val_faces`, else
    those most of them were validated on; each row's ``contender``), on the version of the set's files the column
    compares (:func:`external_references`). A row that cannot win gets ``not_compared`` ``{set: why}`` instead: paired with
    the others, a run with a NaN test MAE, or one validated on other photos, shrank their common faces, and the
    column's MAEs differed from the champion table's for the same runs.

    Where the rows of a set were all scored on the same faces (a backbone sweep: preprocess does not change), nothing
    is read or downloaded, and packaging (which imports torch) is not imported.

    Args:
        client: The MLflow client the rows were read with.
        rows: :func:`collect`'s rows (updated in place).
        runs: ``{backbone: MLflow run}`` of the rows.
    """
    refs = external_references(rows)
    names = []  # the sets whose compared rows scored different faces: only then can packaging pair any
    for name in sorted({n for r in rows for n in r.get("external", {})}):
        compared = [r for r in rows if math.isfinite(r["external"].get(name, math.nan))
                    and not _other_version(r, name, refs)]
        if len({r["external_faces_sha256"][name] for r in compared if name in r["external_faces_sha256"]}) >= 2:
            names.append(name)
    if not names:
        return
    import dataclasses
    import tempfile

    from faceage.packaging import candidate, rank_candidates, read_face_errors

    # current: the column's versions (the newest run's), so packaging pairs the rows the column shows unmarked; a set
    # no row recorded a version of is on "" (no run has another)
    current = {name: refs.get(name, "") for name in names}
    with tempfile.TemporaryDirectory(prefix="faceage-sweep-predictions-") as workdir:
        ranked = rank_candidates([dataclasses.replace(candidate(runs[r["backbone"]]), run_name=r["backbone"])
                                  for r in rows], current, val_faces=_workspace_val_faces(rows),
                                 face_errors=lambda c: read_face_errors(client, c.run_id, workdir))
    by_id = {c.run_id: c for c in ranked}
    for r in rows:
        c = by_id[r["run_id"]]
        r["contender"] = c.contender  # the faces note's reference is one (external_face_references)
        for name in names:
            if name in c.paired_mae_years:
                r.setdefault("external_common", {})[name] = (c.paired_mae_years[name], c.paired_n_faces[name])
            elif not c.contender and math.isfinite(r["external"].get(name, math.nan)) \
                    and not _other_version(r, name, refs):
                # Its own reasons alone: a run that cannot win is not judged on the sets
                r.setdefault("not_compared", {})[name] = c.excluded


# The workspace's preprocess output (stages/package.py's --faces default): the validation photos packaging compares
WORKSPACE_FACES = "data/faces"


def _workspace_val_faces(rows: list[dict]) -> str | None:
    """The fingerprint of the validation photos of the workspace's preprocess output (:data:`WORKSPACE_FACES`), which
    packaging's champion rule compares runs with (:func:`faceage.packaging.workspace_val_faces`), where that output
    holds the rows' data (their ``data_sha256``); else None (the photos most runs were validated on), as packaging
    with no preprocess output of the runs' data. Without it the report judged the runs by the majority's photos, and
    called the run validated on the workspace's the one that cannot win."""
    from faceage.packaging import workspace_data
    from faceage.preprocess import SETTINGS

    data = {r["data_sha256"] for r in rows if r.get("data_sha256")}
    if len(data) != 1:
        return None
    try:
        data_sha256, val_faces = workspace_data(WORKSPACE_FACES)
    except (OSError, ValueError, AttributeError) as e:  # AttributeError: JSON that is not an object
        log.warning("could not read %s (%s): the runs' validation photos are compared with those most were "
                    "validated on", Path(WORKSPACE_FACES) / SETTINGS, e)
        return None
    return val_faces if data_sha256 in data else None


def collect(runs: dict) -> list[dict]:
    """One row per backbone from MLflow: params, GFLOPs, train time, validation and test MAE, external MAEs with the
    version of the files and the faces each was measured on, and where runs scored different faces of a set, their
    MAEs on the faces all of them scored (:func:`common_face_maes`).

    Raises:
        SweepError: The store is a sqlite file that is not there (:func:`faceage.tracking.absent_store`): it is not created;
            or a run is not in it, or lacks what a row reads (:func:`_reportable_run`).
        faceage.tracking.TrackingError: The store does not answer, or holds no ``face-age`` experiment.
    """
    db = absent_store()
    if db is not None:  # the runs' params and metrics are only in the store; reading must not create one
        raise SweepError(f"no MLflow store at {db} ({display_uri()}): {ABSENT_STORE_FIX}")
    mlflow = setup_mlflow(writable=False)
    client = mlflow.MlflowClient()
    rows, fetched = [], {}
    for backbone, info in runs.items():
        r = fetched[backbone] = _reportable_run(client, backbone, info["run_id"])
        m, p = r.data.metrics, r.data.params
        external = external_maes(m, r.data.tags)
        rows.append({
            "backbone": backbone, "run_id": info["run_id"], "overrides": info["overrides"],
            "params_m": int(p["train.num_parameters"]) / 1e6, "gflops": m.get("model_gflops", float("nan")),
            "image_size": int(p["train.image_size"]), "epochs": int(p["train.epochs"]),
            "train_time_s": m.get("elapsed_s", float("nan")), "val_mae": m["best_val_mae"],
            "test_mae": m["test_mae_years"], "cs5": m.get("test_cs5", float("nan")),
            "coverage_1std": m.get("test_coverage_1std", float("nan")),
            "baseline_mae": m.get("test_baseline_mae_years", float("nan")),
            "external": external,
            # which files each external MAE was measured on, and which data the run trained and was tested on:
            # rows compare only where these agree (runs_data, external_references)
            "external_sha256": external_versions(r.data.tags), "data_sha256": r.data.tags.get("data_sha256"),
            # and which of the set's faces (a set without release crops: those the run's own detector found)
            "external_faces_sha256": {n: v for n, v in external_faces_versions(r.data.tags).items() if n in external},
            "external_n_faces": {n: int(m[f"external_{n}_n_faces"]) for n in external
                                 if math.isfinite(m.get(f"external_{n}_n_faces", math.nan))},
            "start_time_ms": int(r.info.start_time or 0),
            "data_source": r.data.tags.get("data_source", "?"), "device": r.data.tags.get("device", "?"),
            "threads": p.get("train.torch_threads", "?"),
            **({"head": _run_head(client, r), "face_features": p.get("train.face_features", "descriptor")}
               if backbone == "dlib_age" else {}),
        })
    common_face_maes(client, rows, fetched)
    return rows


# What a row cannot be written without: train logs the params and best_val_mae, evaluate the test MAE
REQUIRED_PARAMS = ("train.num_parameters", "train.image_size", "train.epochs")
REQUIRED_METRICS = ("best_val_mae", "test_mae_years")


def _reportable_run(client, backbone: str, run_id: str):
    """``backbone``'s MLflow run, checked to hold what :func:`collect` reads.

    Raises:
        SweepError: The store does not hold the run (or it is deleted), or the run lacks a param or metric of a
            row: a run still going or one that failed before evaluate logged its test MAE.
    """
    reason = lost_run(run_id)
    if reason is not None:
        # After a sweep: DVC restored the train stage from its run cache, whose run.json names the run of an
        # earlier sweep (logged to another store, or since deleted); no stage ran, so nothing logged it here.
        raise SweepError(f"`{backbone}`'s MLflow run {run_id} {reason}: set MLFLOW_TRACKING_URI to the store it was "
                         "logged to; a sweep against this store does not log it again where DVC restores its train "
                         "stage from the run cache (.dvc/cache/runs)")
    run = client.get_run(run_id)
    missing = ([k for k in REQUIRED_PARAMS if k not in run.data.params]
               + [k for k in REQUIRED_METRICS if k not in run.data.metrics])
    if missing:
        raise SweepError(f"`{backbone}`'s MLflow run {run_id} ({run.info.status}) has no {', '.join(missing)}: it "
                         f"did not finish train and evaluate; sweep it again (--backbones {backbone}), or pass "
                         "another --runs")
    return run


def _run_head(client, run) -> str:
    """The head a ``dlib_age`` MLflow run trained: its ``train.head_resolved`` param (what ``train.head=auto`` chose,
    logged by training since Dec 7); for older runs, read as follows.

    ``train.head=auto`` meant dlib's own head fine-tuned before the key existed (Nov 29), the ensemble over the age
    network until Dec 3, the fused head since: its params alone (:func:`_dlib_age_head`) read every old run as the
    fused head. Where the params are ambiguous (``auto`` or no ``train.head``, and no ``train.face_features``,
    logged since Dec 5), the checkpoint the run logged (``checkpoint/model.pt``) says: its ``head``, or none (dlib's
    own head) in checkpoints of before the key. Without a readable checkpoint, the params' reading.
    """
    from faceage.config import DLIB_AGE_HEADS, HEAD_PRETRAINED

    params = run.data.params
    if params.get("train.head_resolved") in DLIB_AGE_HEADS:  # the run's own record: no rule re-applied, no download
        return params["train.head_resolved"]
    head = _dlib_age_head(params)
    if params.get("train.head", "auto") != "auto" or "train.face_features" in params or head == HEAD_PRETRAINED:
        return head
    import tempfile

    from faceage.model import read_payload
    from faceage.packaging import check_artifact_store

    try:
        # A server that does not answer: its one line below at once, not MLflow's minutes of retries first
        check_artifact_store(client, run.info.run_id)
        with tempfile.TemporaryDirectory(prefix="faceage-sweep-") as tmp:
            path = client.download_artifacts(run.info.run_id, "checkpoint/model.pt", tmp)
            payload = read_payload(path)
    except Exception as e:  # CheckpointError, OSError, MLflow's own types for a missing artifact: the params' reading
        log.info("dlib_age run %s: its checkpoint artifact was not read (%s); its head is read from its params (%s)",
                 run.info.run_id, str(e).splitlines()[0] if str(e) else type(e).__name__, head)
        return head
    if not isinstance(payload, dict):
        return head
    recorded = payload.get("head", HEAD_PRETRAINED)  # checkpoints of before train.head: dlib's own head
    return recorded if recorded in DLIB_AGE_HEADS else head


def _dlib_age_head(params: dict[str, str]) -> str:
    """The head a ``dlib_age`` run trained (``fused``, ``ensemble`` or ``pretrained``), from its MLflow params
    (``train.head=auto`` resolved as training did, :func:`faceage.config.resolve_head`). A run logged before a key
    existed is read with that key's default."""
    from faceage.config import DLIB_AGE, TrainParams, resolve_head

    def value(key: str, cast, default):
        try:
            return cast(params[f"train.{key}"])
        except (KeyError, ValueError):
            return default

    return resolve_head(TrainParams(
        backbone=DLIB_AGE, head=params.get("train.head", "auto"), epochs=value("epochs", int, 1),
        freeze_blocks=value("freeze_blocks", int, 0), layer_lr_decay=value("layer_lr_decay", float, 1.0),
        distill_weight=value("distill_weight", float, 0.0), wise_ft=params.get("train.wise_ft") == "True"))


def _dlib_age_words(row: dict) -> tuple[str, str, str]:
    """What a ``dlib_age`` row's head reads and is: its input column, its description in the conclusion, and what
    its parameters and GFLOPs count (a row without ``head``: the default fused head)."""
    from faceage.config import HEAD_ENSEMBLE, HEAD_FUSED, LAYERS

    head = row.get("head", HEAD_FUSED)
    if head == HEAD_FUSED:
        face = ("three blocks of dlib's face-recognition network" if row.get("face_features") == LAYERS
                else "dlib's face descriptor")
        return (FUSED_CHIP_SIDES, f"frozen, with {face}, an ensemble of heads trained here",
                "dlib's age ResNet-10 and face-recognition ResNet, frozen, plus the ensemble of heads")
    if head == HEAD_ENSEMBLE:
        return (CHIP_SIDES["dlib_age"], "frozen, with an ensemble of heads trained here over it",
                "dlib's age ResNet-10, frozen, plus the ensemble of heads")
    if row.get("epochs") == 0:
        return CHIP_SIDES["dlib_age"], "zero-shot: dlib's own head, as published", \
            "dlib's age ResNet-10 with its own head, as published"
    return (CHIP_SIDES["dlib_age"], "dlib's own head, fine-tuned here",
            "dlib's age ResNet-10 with its own head, fine-tuned")


def _ranks(values: list[float]) -> list[float]:
    """Each value's rank (from 0), tied values sharing their average rank."""
    order = sorted(values)
    return [order.index(v) + (order.count(v) - 1) / 2 for v in values]


def _spearman(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation: the Pearson correlation of the average ranks. Two runs with the same test MAE
    took the last of their ranks (one -0.25 for -0.87), which flipped the verdict; 0 where all values of a side
    are equal (no order to correlate)."""
    rx, ry = _ranks(xs), _ranks(ys)
    mx, my = sum(rx) / len(rx), sum(ry) / len(ry)
    sxy = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    sxx, syy = sum((a - mx) ** 2 for a in rx), sum((b - my) ** 2 for b in ry)
    return sxy / math.sqrt(sxx * syy) if sxx and syy else 0.0


def _from_scratch(profile: str) -> bool:
    return "train.pretrained=none" in PROFILES[profile]["cnn"]


def _conclusion(rows: list[dict], profile: str = "cpu") -> str:
    """The answer to "bigger backbone or saturation?", derived from the numbers in ``rows`` and the
    profile they ran with (from scratch or ImageNet weights). A run without a finite test MAE is named and left out:
    NaN compares False with everything, and it set the best run, the range and the rank correlation."""
    unscored = [r for r in rows if not math.isfinite(r["test_mae"])]
    rows = [r for r in rows if math.isfinite(r["test_mae"])]
    cnns = sorted((r for r in rows if r["backbone"] not in PRETRAINED_FACE), key=lambda r: r["gflops"])
    lines = []
    if len(cnns) >= 3:
        best = min(cnns, key=lambda r: r["test_mae"])
        rho = _spearman([r["gflops"] for r in cnns], [r["test_mae"] for r in cnns])
        largest = cnns[-1]
        lines.append(
            f"- CNNs trained here: test MAE {min(r['test_mae'] for r in cnns):.2f}-{max(r['test_mae'] for r in cnns):.2f} "
            f"years; the best is `{best['backbone']}` ({best['test_mae']:.2f} at {best['gflops']:.2f} GFLOPs); the "
            f"largest by FLOPs, `{largest['backbone']}`, reaches {largest['test_mae']:.2f}. Rank correlation of "
            f"FLOPs with test MAE: {rho:+.2f} (negative would mean bigger is better).")
        resnets = [r for r in cnns if r["backbone"] in ("resnet18", "resnet34", "resnet50")]
        if len(resnets) >= 2:
            lines.append("- Within one family, " + " -> ".join(f"`{r['backbone']}` {r['test_mae']:.2f}" for r in resnets)
                         + ": depth alone " + ("lowers" if resnets[-1]["test_mae"] < resnets[0]["test_mae"] else
                                               "does not lower") + " the error.")
        if best is largest or rho <= -0.5:
            lines.append("- Verdict: **bigger backbones reduce the error** at this data size and budget.")
        else:
            how = (f"in {cnns[0]['epochs']} epochs from scratch" if _from_scratch(profile) else
                   f"in {cnns[0]['epochs']} epochs from ImageNet weights")
            lines.append("- Verdict: **no gain from size: saturated** (under-trained) at this data size and budget: "
                         f"the extra capacity is not used {how}.")
        weak = [r["backbone"] for r in cnns if r["test_mae"] > 0.85 * r.get("baseline_mae", float("inf"))]
        if weak:
            lines.append(f"- {', '.join(f'`{w}`' for w in weak)} stayed near the always-the-training-mean baseline "
                         f"({cnns[0]['baseline_mae']:.2f}): too few steps to train"
                         + (" from scratch." if _from_scratch(profile) else "."))
    face = next((r for r in rows if r["backbone"] == "dlib_face"), None)
    if face and cnns:
        best = min(cnns, key=lambda r: r["test_mae"])
        gap = best["test_mae"] - face["test_mae"]
        if gap > 0:
            lines.append(f"- The frozen face encoder (`dlib_face`) reaches {face['test_mae']:.2f} years, {gap:.2f} "
                         "better than the best CNN: pretraining on faces matters more than depth, as published "
                         "APPA-REAL results also find.")
        else:  # the CNNs caught up (ImageNet weights, a GPU budget): said so, not a negative gain
            lines.append(f"- The frozen face encoder (`dlib_face`) reaches {face['test_mae']:.2f} years, {-gap:.2f} "
                         f"behind the best CNN (`{best['backbone']}`): at this budget the CNNs trained here catch up "
                         "with a network pretrained on faces.")
    age = next((r for r in rows if r["backbone"] == "dlib_age"), None)
    if age:
        ext = "".join(f", `{n}` {v:.2f}" for n, v in age.get("external", {}).items())
        default = (age.get("head", "fused"), age.get("face_features", "descriptor")) == ("fused", "descriptor")
        recipe = ("the `make quick` recipe ([recipe_dlib_age.md](recipe_dlib_age.md))" if default
                  else "[recipe_dlib_age.md](recipe_dlib_age.md) compares its heads")
        lines.append(f"- dlib's pretrained age network (`dlib_age`, {_dlib_age_words(age)[1]}) reaches "
                     f"{age['test_mae']:.2f} years{ext}: {recipe}.")
    lines += [f"- `{r['backbone']}` has no test MAE ({r['test_mae']}): left out of the comparison above"
              + (f" (its MLflow run `{r['run_id'][:8]}` says why)." if "run_id" in r else ".") for r in unscored]
    return "\n".join(lines)


def _external_note(sets: list[str]) -> str:
    if not sets:
        return ""
    names = ", ".join(f"`{n}`" for n in sets)
    return (f"{names} MAE: the same model on a cross-dataset test set (`evaluate.external`: faces of another "
            "collection, never trained or tuned on), cropped with the model's own crop settings.\n")


def _n_faces(r: dict, name: str) -> str:
    """``"150 faces"``: how many faces of set ``name`` row ``r`` was scored on (``external_<name>_n_faces``)."""
    n = r.get("external_n_faces", {}).get(name)
    return f"{n} faces" if n is not None else "faces uncounted"


def _runs_note(rows: list[dict]) -> str:
    """Where the runs trained and on what data, from their MLflow tags (not assumed): a source URL's password or
    presigned signature stays out of the report, which is committed (:func:`faceage.tracking.masked_url`)."""
    sources = sorted({masked_url(r.get("data_source", "?")) for r in rows})
    machines = sorted({f"{r.get('device', '?')}" + (f" ({r['threads']} torch threads)" if r.get("device") == "cpu"
                                                      else "") for r in rows})
    return (f"The runs trained on {', '.join(machines)}; data (`fetch_data.source`): "
            f"{', '.join(f'`{s}`' for s in sources)}. Train time is wall-clock on a machine other jobs may "
            "have shared: compare it loosely.")


def _profile_section(profile: str) -> str:
    cnn_settings = ", ".join(PROFILES[profile]["cnn"])
    if _from_scratch(profile):
        return f"""## What was cut to fit a CPU

Profile `{profile}`: CNNs ran with `{cnn_settings}` (from scratch: no ImageNet weights can be
downloaded here); `dlib_age` and `dlib_face` ran with the `params.yaml` defaults. Small inputs and few
epochs favour small networks, so this run cannot show how far large backbones go with pretraining.

## The full sweep on a GPU with APPA-REAL

```bash
# ImageNet weights, 224 px, 30 epochs per CNN; leave out --source for the committed URL
python -m faceage.sweep --profile gpu --source /abs/path/appa-real-release.zip
```
"""
    return f"""## Settings

Profile `{profile}`: CNNs ran with `{cnn_settings}`; `dlib_age` and `dlib_face` ran with the `params.yaml`
defaults. To rerun it:

```bash
# leave out --source for the committed URL
python -m faceage.sweep --profile gpu --source /abs/path/appa-real-release.zip
```
"""


def _browse_hint() -> str:
    """How to open the store the report's runs are in (:func:`faceage.tracking.tracking_uri`): a tracking server's
    URL (masked as :func:`faceage.tracking.display_uri`), else ``mlflow ui`` on the sqlite file, as
    :func:`faceage.tracking.portable_uri` names it. The report said ``sqlite:///mlflow.db`` whatever the store, which
    with a server (or another file) holds none of these runs."""
    uri = tracking_uri()
    if uri.startswith(("http://", "https://")):
        return f"open {display_uri(uri)} in a browser"
    store = portable_uri(uri)
    if not store.startswith("sqlite:///") and sqlite_path(uri) is not None:  # outside the repo: its file name alone
        store = f"sqlite:///<path to {store}>"
    return f"open `mlflow ui --backend-store-uri {store}`"


def write_report(rows: list[dict], md_path: Path, png_path: Path, profile: str) -> None:
    """Writes the Markdown report and the MAE-vs-cost plot."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, label in ((axes[0], "gflops", "GFLOPs per image (forward)"), (axes[1], "params_m", "parameters (M)")):
        for r in rows:
            if math.isfinite(r[key]) and math.isfinite(r["test_mae"]):  # no point for a NaN (matplotlib warns)
                ax.scatter(r[key], r["test_mae"])
                ax.annotate(r["backbone"], (r[key], r["test_mae"]), fontsize=8, xytext=(3, 3), textcoords="offset points")
        ax.set(xscale="log", xlabel=label, ylabel="test MAE (years)")
    fig.suptitle("Backbone sweep: test MAE against cost")
    png_path.parent.mkdir(parents=True, exist_ok=True)
    png = io.BytesIO()
    fig.savefig(png, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes(png_path, png.getvalue())  # whole or not at all, as the Markdown below

    # One column per cross-dataset set (evaluate.external) any run was scored on; "-" where a run was not; "*" where
    # it was scored on another version of the set's files than the column's others (not comparable with them); "†"
    # where on the same files, but on other faces of them than the newest run's (a set without release crops is
    # scored on the faces the run's own detector found), and then, where their predictions allow it, a column of
    # each run's MAE on the faces all of them scored (common_face_maes).
    sets = sorted({name for r in rows for name in r.get("external", {})})
    refs = external_references(rows)
    face_refs = external_face_references(rows)
    common = {name: max(r["external_common"][name][1] for r in paired)
              for name in sets if (paired := [r for r in rows if name in r.get("external_common", {})])}

    def other_version(r: dict, name: str) -> bool:
        return _other_version(r, name, refs)

    def other_faces(r: dict, name: str) -> bool:  # * says more: another version holds other faces anyway
        return not other_version(r, name) and _other_faces(r, name, face_refs)

    def cell(r: dict, name: str) -> str:
        ext = r.get("external", {})
        if name not in ext:
            return "- | " + ("- | " if name in common else "")
        mark = "*" if other_version(r, name) else "†" if other_faces(r, name) else ""
        paired = r.get("external_common", {}).get(name)
        return f"{ext[name]:.2f}{mark} | " + ((f"{paired[0]:.2f} | " if paired else "- | ") if name in common else "")

    version_note = ""
    for name in sets:
        stale = [r for r in rows if name in r.get("external", {}) and other_version(r, name)]
        if not stale:
            continue
        versions = ", ".join(sorted({r["external_sha256"][name][:8] for r in stale}))
        backbones = [r["backbone"] for r in stale]
        version_note += (f"`{name}` MAE marked * was measured on another version of the set's files ({versions}, the "
                         f"newest run's {refs[name][:8]}): not comparable with the column's other values; sweep "
                         + ", ".join(f"`{b}`" for b in backbones) + f" again (`--backbones {' '.join(backbones)}`) "
                         "to score them on the set's files as they are now.\n")
    faces_note = ""
    for name in sets:
        others = [r for r in rows if other_faces(r, name)]
        if not others:
            continue
        ref = face_refs[name]
        paired = [r for r in rows if name in r.get("external_common", {})]
        unpaired = [r for r in rows if name in r.get("external", {}) and not other_version(r, name)
                    and r not in paired]
        # The rows packaging's champion rule does not compare (they cannot win), with their reasons, apart from those
        # it compares but could not pair (no readable predictions)
        cannot_win = [r for r in unpaired if name in r.get("not_compared", {})]
        unread = [r for r in unpaired if r not in cannot_win]
        excluded = "".join(f"`{r['backbone']}` not: it cannot be champion ({r['not_compared'][name]}), so packaging "
                           "compares it with no run; " for r in cannot_win)
        if paired:
            compared = (f"the `{name}` MAE, {common[name]} common faces column compares "
                        + ", ".join(f"`{r['backbone']}`" for r in paired)
                        + f" on the {common[name]} faces all of them scored (their "
                        "`evaluation/external_predictions.csv`)"
                        + ("; " + ", ".join(f"`{r['backbone']}`" for r in unread) + " not: no readable "
                           "predictions (the log says why)" if unread else "") + "; " + excluded)
        elif len({r["external_faces_sha256"].get(name) for r in unread}) < 2:
            # The runs packaging compares share their faces: nothing to pair, whatever the others scored
            compared = excluded
        else:
            compared = ("they are not compared on the faces they have in common (no readable "
                        "`evaluation/external_predictions.csv`, or too few faces in common: the log says which); "
                        + excluded)
        backbones = [r["backbone"] for r in others]
        whose = _reference_words(rows, ref, name)
        faces_note += (f"`{name}` MAE marked † was measured on other faces of the set than {whose} "
                       f"(`{ref['backbone']}`, {_n_faces(ref, name)}): "
                       + ", ".join(f"`{r['backbone']}` {_n_faces(r, name)}" for r in others)
                       + " (a set without release crops is scored on the faces each run's own detector found: "
                       "their `preprocess` settings differ); " + compared
                       + "sweep " + ", ".join(f"`{b}`" for b in backbones)
                       + f" again (`--backbones {' '.join(backbones)}`) to score them on {whose} faces.\n")
    table = ["| backbone | params (M) | GFLOPs | input | epochs | train time (s) | val MAE | test MAE | CS@5 | "
             + "".join(f"`{name}` MAE | " + (f"`{name}` MAE, {common[name]} common faces | " if name in common else "")
                       for name in sets) + "MLflow run |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|" + "---:|" * (len(sets) + len(common)) + "---|"]
    # Best first; a NaN test MAE last (compared with it, every row is "not smaller": it left the table unsorted)
    for r in sorted(rows, key=lambda r: (0, r["test_mae"]) if math.isfinite(r["test_mae"]) else (1, 0.0)):
        sides = _dlib_age_words(r)[0] if r["backbone"] == "dlib_age" else CHIP_SIDES.get(r["backbone"])
        size = f"{sides} (aligned chips)" if sides else f"{r['image_size']} px"
        table.append(f"| `{r['backbone']}` | {r['params_m']:.2f} | {r['gflops']:.3f} | {size} | {r['epochs']} | "
                     f"{r['train_time_s']:.0f} | {r['val_mae']:.2f} | {r['test_mae']:.2f} | {r['cs5']:.3f} | "
                     + "".join(cell(r, n) for n in sets) + f"`{r['run_id'][:8]}` |")
    age = next((r for r in rows if r["backbone"] == "dlib_age"), None)
    age_note = f"For `dlib_age`, they are the whole model's ({_dlib_age_words(age)[2]}).\n" if age else ""
    md = f"""# Backbones: bigger, or saturated?

Generated by `python -m faceage.sweep --profile {profile}` from the MLflow runs in `{portable_uri()}`
(experiment `face-age`; {_browse_hint()} to compare them side by side).

{_conclusion(rows, profile)}

![test MAE against GFLOPs and parameters](backbones.png)

{chr(10).join(table)}

{_external_note(sets)}{version_note}{faces_note}{_runs_note(rows)}
For `dlib_face`, parameters and GFLOPs are the trainable head's; the frozen dlib encoder
(a 29-layer ResNet, ~5.6 M parameters, 22 MB) runs on top at ~0.09 s per face on one CPU core.
{age_note}
{_profile_section(profile)}"""
    # UTF-8 and whole (atomic.write_text): in the locale's encoding, an ASCII locale's UnicodeEncodeError (a † mark, a
    # --source folder named Müller) left the committed report empty after all the MLflow reads; a Ctrl-C, cut.
    write_text(md_path, md)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="cpu")
    parser.add_argument("--source", help="fetch_data.source for every run (absolute path or URL)")
    parser.add_argument("--backbones", nargs="+", default=list(BACKBONES))
    parser.add_argument("--runs", help=f"backbone -> MLflow run id (default: {RUNS} at the repo root)")
    parser.add_argument("--report-only", action="store_true", help="only rewrite the report from --runs")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        root = dvc_root()
    except ProfileError:
        root = Path.cwd()  # --report-only works anywhere; a sweep stops at its first run, with the message
    runs_path = Path(args.runs).resolve() if args.runs else root / RUNS
    here = os.getcwd()
    # As `dvc exp run` (faceage.experiment) from any folder of the repo: models/run.json, reports/ and the
    # MLflow store are the repo root's (from a subdirectory the sweep crashed reading models/run.json).
    os.chdir(root)
    try:
        return _main(args, runs_path)
    except FaceAgeError as e:  # the store (a deleted face-age experiment, a server that does not answer): one line
        log.error("%s", e)
        return 1
    except KeyboardInterrupt:  # before the first run (the checks, MLflow) or in the report: no traceback
        log.error("sweep interrupted (Ctrl-C)")
        return 130
    finally:
        os.chdir(here)


def _resume_command(args: argparse.Namespace, remaining: list[str]) -> str:
    """The command that sweeps ``remaining`` with the same settings (the runs file keeps the others)."""
    import shlex

    words = ["python", "-m", "faceage.sweep", "--profile", args.profile]
    words += ["--source", args.source] if args.source else []
    words += ["--runs", args.runs] if args.runs else []
    return shlex.join([*words, "--backbones", *remaining])


def _sweep(args: argparse.Namespace, runs_path: Path) -> dict:
    """:func:`run_sweep`, then ``params.yaml`` as it was before the sweep, also after a failure or an interruption:
    each ``dvc exp run -S`` leaves its overrides there, so a ``dvc repro`` after the sweep trained the last
    backbone's profile (``convnext_tiny`` from scratch at 64 px), and an uncommitted edit was lost."""
    params = Path(PARAMS)
    before = file_bytes(params)
    try:
        return run_sweep(args.backbones, args.profile, args.source, runs_path)
    finally:
        if before is not None and file_bytes(params) != before:
            params.write_bytes(before)
            log.info("%s put back as it was before the sweep (its runs' -S values are in %s)", PARAMS, runs_path)


def _main(args: argparse.Namespace, runs_path: Path) -> int:
    if args.report_only:
        runs = read_runs(runs_path, required=True)
        missing, empty = _not_in_store(runs)
        if missing:  # a fresh clone: the committed file names the runs of the machine that swept
            log.error("%s names runs that are not in %s (%s)%s: run the sweep here (make sweep), or pass the --runs "
                      "of a sweep logged to this store", runs_path, display_uri(), ", ".join(missing), empty)
            return 1
    else:
        for backbone in args.backbones:  # a typo stopped the sweep at its turn, after the runs before it (hours on a GPU)
            check_train_backbone(backbone)
        # A store train cannot log to (a server that does not answer, a read-only mlflow.db): now, not in the first
        # run's train stage after its data stages
        check_reachable()
        recorded = read_runs(runs_path, required=False)
        kept = {b: info for b, info in recorded.items() if b not in args.backbones}
        planned = {**kept, **{b: {"overrides": sweep_overrides(b, args.profile, args.source)} for b in args.backbones}}
        try:  # before the first run (hours on a GPU), not in the report after the last
            runs_profile(planned, args.profile)
            runs_source(planned)
            missing, empty = _not_in_store(kept) if kept else ([], "")
        except ValueError as e:
            log.error("%s", e)
            return 1
        if missing:
            log.error("%s names runs that are not in %s (%s), which the report would read%s: sweep those backbones "
                      "too (--backbones), or pass another --runs", runs_path, display_uri(), ", ".join(missing), empty)
            return 1
        try:
            runs = _sweep(args, runs_path)
        except ProfileInterrupted as e:
            remaining = getattr(e, "remaining", args.backbones)
            line = (f"sweep {e.how} at {remaining[0]}: the runs before it are in {runs_path}; to finish the sweep: "
                    f"{_resume_command(args, remaining)}")
            if e.signum == signal.SIGTERM:
                die_of_signal(signal.SIGTERM, line)
            log.error("%s", line)
            return 130
        except ProfileError as e:
            log.error("%s", e)
            return 1
        except subprocess.CalledProcessError as e:
            if e.returncode < 0:  # killed by a signal (the OOM killer's -9): "exit -9, its output is above", exit 247
                log.error("sweep stopped: `dvc exp run` was killed by signal %d (%s); the runs before it are in %s",
                          -e.returncode, signal_name(-e.returncode), runs_path)
                return 128 - e.returncode  # as a shell does, and the profile runner (faceage.experiment.main)
            log.error("sweep stopped: `dvc exp run` failed (exit %s), its output is above; the runs before it are "
                      "in %s", e.returncode, runs_path)
            return e.returncode or 1
    try:
        profile = runs_profile(runs, args.profile)
        runs_source(runs)
    except ValueError as e:
        log.error("%s", e)
        return 1
    rows = collect(runs)
    try:
        runs_data(rows)
    except ValueError as e:
        log.error("%s", e)
        return 1
    write_report(rows, Path("reports/backbones.md"), Path("reports/backbones.png"), profile)
    log.info("wrote reports/backbones.md and reports/backbones.png (%d runs)", len(runs))
    return 0


if __name__ == "__main__":
    end_like_a_shell(main())  # Ctrl-C (main's 130) ends it by SIGINT: a shell's script stops, as after a stage
