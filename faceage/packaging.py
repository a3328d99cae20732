"""Packaging the champion: pick the best MLflow run, register it, save it as a BentoML model.

Input: the MLflow tracking store (experiment ``face-age``; see :mod:`faceage.tracking`), a
checkpoint file and the detector folder (``train`` and ``fetch_detector`` outputs).
Outputs:

- the run's logged model ``model`` registered as ``face-age`` with the alias ``champion``
  (an existing version of the same logged model is reused, not duplicated);
- the BentoML model ``face_age`` in the BentoML store (``$BENTOML_HOME``)::

      model.pt              the checkpoint (self-describing, see faceage.model): the CLI, evaluate
      model.onnx            the same network exported to ONNX (faceage.export), checked against the
                            checkpoint on real face crops; what the service runs (ONNX Runtime)
      detector/             the dlib detector file the checkpoint was trained with (plus the
                            face-encoder files of a dlib_face checkpoint) + manifest.json
      faceage.json          lineage: MLflow run, registry version, validation, test and external-set
                            MAE, data sha256, git commits, the DVC experiment (a `dvc exp run`
                            champion), the ONNX check (also the BentoML model's metadata)
      model_card.md         the champion's own model card: the one its run's last ``evaluate`` logged
                            (``evaluation/model_card.md``); the workspace's ``reports/model_card.md``
                            describes the workspace's last run, which after ``dvc exp run``s may be another

The winner (:func:`select_winner`, rule in :data:`SELECTION_RULE`): among finished runs with test
metrics trained on the workspace's data, the lowest ``best_val_mae`` among the runs that *generalise*: whose MAE on every
cross-dataset set (``external_<name>_mae``) is within ``max(0.5 years, 5%)`` of the best run's
on that set; ties go to the newest run. MAEs compare only on the same faces: a run validated on other photos
(``train.val_faces_sha256``; ``preprocess.no_face=skip`` drops the faceless ones) than the workspace's is excluded,
with the settings that differ, and so is a run with a NaN or infinite validation or test MAE; such a run can never
win, so it does not judge the others either (the best run on a set, the faces runs are paired on and the versions
compared are those of the runs that can win, the ``contender`` ones); runs scored on different faces of an external set (``evaluate.external_faces_sha256``;
another detector finds others: a preprocess sweep) are compared on the faces they all scored, from each run's
``evaluation/external_predictions.csv`` (:func:`paired_maes`). Its checkpoint is the given file when that file
records the same run id, else a ``model.pt`` artifact of the run; anything else is refused,
so a bento can never carry weights from a run other than the one registered.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from faceage.atomic import write_text
from faceage.detector import MANIFEST, RECOGNITION_FILE, SHAPE5_FILE, read_manifest
from faceage.download import file_digest
from faceage.errors import FaceAgeError
from faceage.evaluation import external_faces_versions
from faceage.external import external_maes, external_versions
from faceage.faces import crop_cnn_retry_side, crop_detector_files, crop_retry_pad
from faceage.model import CheckpointError, read_payload
from faceage.inputs import CHIP_KINDS, DLIB_CHIP_PAIR, input_kind
from faceage.predict import CHECKPOINT_FILE, DETECTOR_DIR, ONNX_FILE, check_detector_file
from faceage.preprocess import MANIFEST as FACES_MANIFEST, SETTINGS as PREPROCESS_SETTINGS, read_crop_settings, read_faces_manifest
from faceage.sources import EXTERNAL_FILE
from faceage.training import VAL_FACES_TAG, VAL_N_FACES_TAG, faces_fingerprint, validation_faces_tags
from faceage.tracking import (DVC_EXPERIMENT_TAG, EVALUATED_IN_TAG, EXPERIMENT, absent_store, check_reachable,
                              display_uri, gc_command, git_commit, mlflow_env, portable_source)

log = logging.getLogger(__name__)

REGISTERED_MODEL = "face-age"
CHAMPION_ALIAS = "champion"
BENTO_MODEL = "face_age"
LINEAGE_FILE = "faceage.json"
VAL_METRIC = "best_val_mae"
TEST_METRIC = "test_mae_years"
LOGGED_MODEL_NAME = "model"
CHECK_FACES = 32  # real crops the ONNX export is checked on
MODEL_CARD_FILE = "model_card.md"  # evaluate's card, as logged to the run (evaluation/) and shipped in the model


class PackagingError(FaceAgeError, RuntimeError):
    """No run qualifies, or the winner's model or checkpoint cannot be found."""


# The external-MAE guard's margin: a run may trail the best run on a cross-dataset set by at most
# max(GUARD_YEARS, GUARD_FRACTION * best). 0.5 years is ~3 standard errors of an MAE on the
# 1,743-face utk-external set (|error| std ~7 years / sqrt(1,742 scored faces) = 0.17), so a vetoed run is
# worse beyond sampling noise; the 5% keeps the margin proportionate when every run is far off
# (from-scratch CNNs at 15+ years, where the noise grows with the error).
GUARD_YEARS = 0.5
GUARD_FRACTION = 0.05
# A paired comparison needs enough common faces to mean something. Below MIN_COMMON_FACES the standard error of one
# run's MAE (|error| std ~7 years / sqrt(100) = 0.7 years) exceeds the guard's 0.5-year margin, so a veto would be
# noise. Below MIN_COMMON_FRACTION of the fewest faces a compared run scored, the common faces are no longer a sample
# of what the runs were scored on but the part every detector setting agrees on (the large, frontal faces): a
# guard meant to catch runs that fail on the set would judge them on its easiest half. Either way the runs' own MAEs
# compare instead, as before the faces were fingerprinted, and the log says so.
MIN_COMMON_FACES = 100
MIN_COMMON_FRACTION = 0.5
# The per-face predictions evaluate logs for the external sets (set, file_name, true_age, predicted_age,
# predicted_std, abs_error): what paired MAEs are computed from (faceage.evaluation.evaluate_model)
PREDICTIONS_ARTIFACT = "evaluation/external_predictions.csv"

SELECTION_RULE = (
    f"lowest {VAL_METRIC} among finished runs with {TEST_METRIC} trained on the workspace's data (data_sha256), "
    "excluding any run with a NaN metric or whose MAE on a "
    f"cross-dataset set (external_<name>_mae) exceeds the best MAE on that set by more than "
    f"max({GUARD_YEARS} years, {GUARD_FRACTION:.0%} of it), the best among the runs that can win (finite "
    f"{VAL_METRIC} and {TEST_METRIC}, validated on the compared photos: a run that cannot neither vetoes nor "
    "sets the versions or faces compared); the sets are those the workspace evaluates "
    "(data/external.json), else every set a run was scored on, and a run not scored on one of them is excluded too; "
    "with no external metrics on those sets, lowest validation MAE alone; ties go to the newest run; MAEs compare only "
    "on the same faces: a run validated on other photos (train.val_faces_sha256: the workspace's, else most runs' with finite MAEs) "
    "is excluded, and runs scored on different faces of an external set (evaluate.external_faces_sha256, e.g. "
    "another detector's finds) are compared by their MAEs on the faces all of them scored (their "
    "evaluation/external_predictions.csv), where those are at least "
    f"{MIN_COMMON_FACES} and {MIN_COMMON_FRACTION:.0%} of the fewest a run scored (else by their own MAEs)")


@dataclass(frozen=True)
class Winner:
    """The selected MLflow run."""

    run_id: str
    run_name: str
    val_mae_years: float
    test_mae_years: float
    start_time_ms: int
    data_sha256: str | None
    git_commit: str | None
    external_mae_years: dict[str, float] = field(default_factory=dict)  # {set name: MAE}
    dvc_experiment: str | None = None  # the ``dvc exp run`` it trained in, if any
    evaluated_in: str | None = None  # the ``dvc exp run`` that last evaluated it, if any

    def restore_hint(self) -> str:
        """How to put this run's pipeline outputs in the workspace."""
        if self.evaluated_in and self.evaluated_in != self.dvc_experiment:
            # Its metrics and tags are that experiment's evaluation (train was cached there): apply that one.
            return (f"it was last evaluated in DVC experiment {self.evaluated_in!r} (trained in "
                    f"{self.dvc_experiment or 'the workspace'}): `dvc exp apply {self.evaluated_in}` puts the "
                    "outputs MLflow describes in the workspace")
        if self.dvc_experiment:
            return (f"it trained in DVC experiment {self.dvc_experiment!r}: `dvc exp apply {self.dvc_experiment}` "
                    "puts its outputs in the workspace")
        return "restore that run's outputs (dvc exp apply <exp>; dvc checkout), or dvc repro"


@dataclass(frozen=True)
class Candidate:
    """One run considered for champion, and why it did or did not win."""

    run_id: str
    run_name: str
    val_mae_years: float
    test_mae_years: float
    start_time_ms: int
    external_mae_years: dict[str, float]
    excluded: str  # "" when the run passes the external guard, else the reason
    # {set: fingerprint of its files} each external MAE was measured on ({} before runs recorded it)
    external_sha256: dict[str, str] = field(default_factory=dict)
    # Excluded by the guard's margin alone: finite metrics, scored on every set judged, on the compared versions
    vetoed: bool = False
    # The photos best_val_mae was measured on (train.val_faces_sha256; "" before runs recorded it) and their count
    val_faces_sha256: str = ""
    val_n_faces: str = ""
    # {set: fingerprint of the faces scored} (evaluate.external_faces_sha256; {} before runs recorded it)
    external_faces_sha256: dict[str, str] = field(default_factory=dict)
    external_n_faces: dict[str, int] = field(default_factory=dict)
    # The run's preprocess.* params (the settings that decide which photos have a face), to say what differs
    preprocess: dict[str, str] = field(default_factory=dict)
    # {set: MAE on the faces every compared run scored}, where the compared runs scored different faces of the set
    # and the guard compared these instead of external_mae_years (paired_maes), and how many faces that was
    paired_mae_years: dict[str, float] = field(default_factory=dict)
    paired_n_faces: dict[str, int] = field(default_factory=dict)
    # Judged by the external guard, and a judge of the others: finite validation and test MAEs, validated on the
    # compared photos. A run that is not can never win, whatever its external MAEs: it neither vetoes nor is vetoed
    contender: bool = True


# A run's per-face absolute errors on the external sets, {set: {file name: [errors]}} (its PREDICTIONS_ARTIFACT), or
# None where it has none: what rank_candidates pairs runs scored on different faces with
FaceErrors = Callable[[Candidate], "dict[str, dict[str, list[float]]] | None"]


def paired_maes(name: str, runs: list[Candidate], face_errors: FaceErrors | None) -> dict[str, tuple[float, int]]:
    """``{run id: (MAE on the common faces, how many)}`` on external set ``name``, where ``runs`` (those the guard
    compares on it) were scored on different faces of it (``evaluate.external_faces_sha256``); ``{}`` where they
    were scored on the same faces (nothing read: ``face_errors`` is not called) or too few are common.

    A paired comparison: each run's MAE on the faces every run with readable predictions scored. A run without
    them (evaluated before they were logged, or the artifact is gone), or whose predictions are not the faces its
    tag names (another evaluation's), keeps its own MAE in the comparison, as before faces were fingerprinted;
    both cases and the comparison itself are logged.
    """
    tagged = [c for c in runs if name in c.external_faces_sha256]
    if len({c.external_faces_sha256[name] for c in tagged}) < 2:
        return {}  # one set of faces (or runs logged before the fingerprint): their own MAEs compare as they are
    runs = sorted(runs, key=lambda c: c.start_time_ms)  # the log in the order they ran (a sweep's order)
    scored, own = {}, []
    for c in runs:
        errors = face_errors(c) if face_errors is not None else None
        by_face = errors.get(name, {}) if errors is not None else None
        mae = (sum(sum(e) for e in by_face.values()) / sum(len(e) for e in by_face.values())) if by_face else math.nan
        who = f"{c.run_name or c.run_id[:8]} ({c.run_id[:8]})"
        faces = f"its own MAE on its own {c.external_n_faces.get(name, '?')} faces"
        if by_face is None:
            own.append(f"{who} has no readable {PREDICTIONS_ARTIFACT} (evaluated before it was logged, or it was "
                       f"deleted): {faces}")
        elif (name in c.external_faces_sha256 and faces_fingerprint(by_face) != c.external_faces_sha256[name]) \
                or not abs(mae - c.external_mae_years[name]) < 0.01:  # its errors are rounded to 0.001
            own.append(f"{who}'s {PREDICTIONS_ARTIFACT} holds {len(by_face)} faces of {name} (MAE {mae:.3f}), not "
                       f"the faces its evaluate.external_faces_sha256 names (MAE {c.external_mae_years[name]:.3f}: "
                       f"another evaluation's predictions): {faces}")
        else:
            scored[c.run_id] = by_face
    if own:
        log.info("%s: runs scored on different faces, compared on the faces they have in common, but %s; rerun its "
                 "evaluate to compare it on the common faces", name, "; ".join(own))
    if len(scored) < 2:
        return {}
    names = {c.run_id: c.run_name or c.run_id[:8] for c in runs}
    counts = ", ".join(f"{names[r]} {len(f)}" for r, f in scored.items())
    common = set.intersection(*(set(f) for f in scored.values()))
    fewest = min(len(f) for f in scored.values())
    if len(common) < MIN_COMMON_FACES or len(common) < MIN_COMMON_FRACTION * fewest:
        log.info("%s: the %d runs with predictions have only %d faces in common (of %s faces each; fewer than %d, or "
                 "than %.0f%% of the fewest, %d): too few to compare on; their own MAEs compare, each on its own "
                 "faces; to compare them on the same faces, train them with the same preprocess detector settings",
                 name, len(scored), len(common), counts, MIN_COMMON_FACES, 100 * MIN_COMMON_FRACTION, fewest)
        return {}
    paired = {r: (sum(e for f in common for e in by_face[f]) / sum(len(by_face[f]) for f in common), len(common))
              for r, by_face in scored.items()}
    log.info("%s: the %d compared runs were scored on %d different sets of faces (evaluate.external_faces_sha256; "
             "faces per run: %s): the guard compares their MAEs on the %d faces all %d scored: %s", name, len(runs),
             len({c.external_faces_sha256[name] for c in tagged}), counts,
             len(common), len(scored),
             ", ".join(f"{names[r]} {mae:.3f} (own {next(c for c in runs if c.run_id == r).external_mae_years[name]:.3f})"
                       for r, (mae, _) in paired.items()))
    return paired


def check_artifact_store(client, run_id: str) -> None:
    """Fails fast where a server that ``client`` reaches ``run_id``'s artifacts through does not answer: the tracking
    server (an ``http(s)`` tracking URI; ``mlflow-artifacts:/`` artifacts go through it too), or the one the run's
    artifact location names (``http(s)://``, ``mlflow-artifacts://host``). A sqlite store with artifacts in files
    (the default) has none: nothing is probed.

    Each download from a server that refuses the connection waited out MLflow's retries (about four minutes, in
    silence: ``MLFLOW_HTTP_REQUEST_MAX_RETRIES``, which stay as they are, so a server that answers with a rate limit
    is still retried): after a tracking server stopped or restarted while packaging or the sweep report read the
    runs' predictions, once per run, each then taken for "no predictions logged". One probe per download instead
    (:func:`faceage.tracking.check_reachable`: refused at once, or a connection timeout of seconds).

    Raises:
        faceage.tracking.TrackingError: The tracking server does not answer.
        PackagingError: The server the run's artifact location names does not answer.
    """
    from urllib.parse import urlsplit, urlunsplit

    from faceage.tracking import GATEWAY_DOWN, TrackingError

    uri = client.tracking_uri
    if uri.startswith(("http://", "https://")):
        check_reachable(uri, writable=False)
    from mlflow.exceptions import MlflowException

    try:
        location = client.get_run(run_id).info.artifact_uri or ""
    except MlflowException:  # no such run: the download (or listing) reports it, as before
        return
    parts = urlsplit(location)
    if parts.scheme == "mlflow-artifacts" and parts.netloc:  # the server named in it, as MLflow resolves it
        server = urlunsplit(("https" if uri.startswith("https://") else "http", parts.netloc, "", "", ""))
    elif parts.scheme in ("http", "https"):
        server = location
    else:
        return
    try:
        check_reachable(server, writable=False)
    except TrackingError as e:
        # In its own words: check_reachable's sentence, nested here, called this server "the MLflow tracking server
        # (MLFLOW_TRACKING_URI)" and said to unset that, which may name a sqlite file.
        if e.status is not None:  # a proxy's 502/503/504
            why = f"answers {e.status} {GATEWAY_DOWN[e.status]} (the proxy there reaches no server behind it)"
        else:  # refused, or no answer in time
            why = f"does not answer ({type(e.__cause__).__name__})"
        raise PackagingError(f"the artifact server {display_uri(server)} of MLflow run {run_id} (its artifact "
                             f"location) {why}: start it, or point MLFLOW_TRACKING_URI at a store whose runs' "
                             "artifacts are reachable") from None


def read_face_errors(client, run_id: str, workdir: str | Path) -> dict[str, dict[str, list[float]]] | None:
    """A run's :data:`PREDICTIONS_ARTIFACT` as ``{set: {file name: [absolute errors]}}``, downloaded into ``workdir``
    through ``client`` (a sqlite store's or a tracking server's); None where the run has none or it is unreadable.

    A run whose artifact server does not answer (:func:`check_artifact_store`: found at once, not after minutes of
    MLflow's retries) is one without: a warning names the server, and the other runs are still compared (an old run
    whose artifacts sat on a retired server does not block packaging).

    Raises:
        faceage.tracking.TrackingError: The tracking server does not answer (nothing can be compared).
    """
    import csv

    from mlflow.exceptions import MlflowException

    try:
        check_artifact_store(client, run_id)
    except PackagingError as e:
        log.warning("%s; its predictions are not compared", e)
        return None
    try:
        # A few kB a run, one per run of a sweep: no progress bar each
        with mlflow_env("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false"):
            path = Path(client.download_artifacts(run_id, PREDICTIONS_ARTIFACT, str(Path(workdir) / run_id)))
        errors: dict[str, dict[str, list[float]]] = {}
        with open(path, newline="", encoding="utf-8") as f:
            for row in csv.DictReader(f):
                error = (float(row["abs_error"]) if row.get("abs_error") not in (None, "")
                         else abs(float(row["predicted_age"]) - float(row["true_age"])))
                errors.setdefault(row["set"], {}).setdefault(row["file_name"], []).append(error)
    except (MlflowException, OSError, KeyError, ValueError, TypeError) as e:
        log.debug("run %s: no readable %s (%s)", run_id, PREDICTIONS_ARTIFACT, e)
        return None
    return errors


def guard_margin(best: float) -> float:
    """How far (years) a run may trail the best MAE ``best`` on a cross-dataset set."""
    return max(GUARD_YEARS, GUARD_FRACTION * best)


def _most_common(votes: list[tuple[str, int]]) -> str | None:
    """The value most ``(value, start_time_ms)`` votes name, ties to the newest; None without votes."""
    tally: dict[str, tuple[int, int]] = {}
    for value, when in votes:
        count, newest = tally.get(value, (0, 0))
        tally[value] = (count + 1, max(newest, when))
    return max(tally, key=lambda v: tally[v]) if tally else None


def reference_versions(candidates: list[Candidate], current: dict[str, str] | None = None) -> dict[str, str]:
    """Per external set, the version of its files (fingerprint) whose MAEs the guard compares.

    The workspace's (``current``, from ``check_sources``' record) where it names the set; else the
    version the most candidates were scored on, ties to the newest run's. Sets no run recorded a
    version for are left out (runs evaluated before the fingerprint was logged compare as before).
    """
    refs = {n: v for n, v in (current or {}).items()}
    for n in sorted({n for c in candidates for n in c.external_sha256}):
        refs.setdefault(n, _most_common([(c.external_sha256[n], c.start_time_ms)
                                         for c in candidates if n in c.external_sha256]))
    return refs


# The preprocess settings that decide which photos have a face to score (and so which faces an MAE is measured on)
FACE_SETTINGS = ("no_face", "detector", "upsample", "retry_pad", "cnn_retry_side")


def _settings_differ(c: Candidate, ref: Candidate | None) -> list[str]:
    """``["preprocess.no_face=skip (the compared runs': release_crop)", ...]``: where ``c``'s face settings differ
    from ``ref``'s (both as logged: the run's ``preprocess.*`` params)."""
    if ref is None:
        return []
    return [f"preprocess.{k}={c.preprocess.get(k, '?')} (the compared runs': {ref.preprocess.get(k, '?')})"
            for k in FACE_SETTINGS if c.preprocess.get(k) != ref.preprocess.get(k)]


def _rerun_hint(c: Candidate, ref: Candidate | None, what: str) -> str:
    """How to get ``c``'s model measured on the compared faces: train it again with the compared runs' settings;
    where no run was measured on them (``ref`` None: the workspace's preprocess output, which no run trained on),
    train on the workspace's output, or put the runs' output back in the workspace."""
    if ref is None:
        return (f"its {what} does not compare, and no run was validated on the workspace's preprocess output: train "
                "it again on that output (dvc repro), or put the preprocess output the runs were trained on in the "
                "workspace (dvc exp apply <experiment>, or dvc checkout)")
    keys = [k for k in FACE_SETTINGS if ref is not None and c.preprocess.get(k) != ref.preprocess.get(k)]
    sets = " ".join(f"-S preprocess.{k}={ref.preprocess[k]}" for k in keys if ref and k in ref.preprocess)
    return (f"its {what} does not compare with theirs; train it again with the compared runs' preprocess settings"
            + (f" (dvc exp run {sets})" if sets else " (dvc exp run -S preprocess.<key>=<value>)"))


def rank_candidates(candidates: list[Candidate], current: dict[str, str] | None = None,
                    val_faces: str | None = None, face_errors: FaceErrors | None = None) -> list[Candidate]:
    """Applies :data:`SELECTION_RULE`: candidates with their ``excluded`` reason, the winner first.

    The external sets are a guard, not the objective: the champion is still chosen by validation
    MAE, so selection does not tune on the cross-dataset faces beyond vetoing runs that are
    clearly worse there (a run that fits the training collection's quirks, or forgot its
    pretraining, loses to one that generalises). MAEs on a set compare only when measured on the
    same files: a run scored on another version of a set (its images edited, added or removed
    since; :func:`reference_versions`) is excluded until its ``evaluate`` runs again.

    And only on the same faces of those files. A run validated on other photos (``preprocess.no_face=skip`` drops
    the faceless ones from the split: an easier validation set) is excluded, the reference being ``val_faces`` (the
    workspace's), else the faces most runs with finite validation and test MAEs were validated on, ties to the newest
    run's. Runs scored on different
    faces of an external set (a set without release crops is scored on what the run's own detector found: the runs
    of a ``preprocess.detector`` or ``upsample`` sweep each on its own subset) are compared by their MAEs on the
    faces all of them scored (:func:`paired_maes`, from ``face_errors``); excluding all but one of them, as this did
    before, threw the sweep away. Runs logged before these fingerprints existed compare as before, except that a
    run trained with ``preprocess.no_face=skip`` is not compared with runs that were not (nor the reverse): skip is
    what drops photos.

    Only the runs that can win but for the external sets (``contender``: finite validation and test MAEs, validated
    on the compared photos) judge one another there: they set each set's best, the faces runs are paired on and
    (with no ``current``) the version compared. A run that can never win neither vetoes nor is judged on the sets: an
    old run on another preprocess output with a good external MAE vetoed every run that could win, so packaging
    refused, or shipped a worse one.

    Args:
        candidates: The runs.
        current: ``{set: fingerprint}`` of the workspace's ``evaluate.external`` sets, where known: then only
            these sets judge (``{}``: none, the plain validation rule); None: every set a candidate was scored on.
        val_faces: The fingerprint of the workspace's validation faces (``train.val_faces_sha256`` of its
            ``preprocess`` output), where known.
        face_errors: A run's per-face absolute errors ``{set: {file name: [errors]}}`` (its
            :data:`PREDICTIONS_ARTIFACT`), None where it has none; called only for the runs of a set whose compared
            runs scored different faces. None: no run has them (each compares by its own MAE).

    Returns:
        The candidates (same numbers), eligible ones by (validation MAE, newest first), then the excluded ones
        that could win but for the external sets (``contender``), then those that cannot, each in the same order.
    """
    sets = sorted({name for c in candidates for name in c.external_mae_years})
    if current is not None:
        # Only the sets the workspace evaluates judge: one old run scored on a set since dropped from
        # evaluate.external (or all of them, after evaluate.external=[]) excluded every later run as "not scored
        # on" it, so the old run won on a worse validation MAE, and no evaluate in the workspace could fix it.
        sets = [n for n in sets if n in current]

    def finite(c: Candidate) -> bool:  # a NaN/inf validation or test MAE (a diverged run) can never win
        return math.isfinite(c.val_mae_years) and math.isfinite(c.test_mae_years)

    # The validation faces compared: the workspace's, else those most runs that could win were validated on (two
    # diverged runs outvoted the one good run, which was then "validated on other photos")
    val_ref = val_faces or _most_common([(c.val_faces_sha256, c.start_time_ms) for c in candidates
                                         if c.val_faces_sha256 and finite(c)])

    def newest(matching) -> Candidate | None:  # the run whose settings stand for the compared faces
        return max((c for c in candidates if matching(c)), key=lambda c: c.start_time_ms, default=None)

    # Its settings are what a run validated on other photos is told to train again with: a run that can win's where
    # there is one (the newest run, a diverged one with another detector, named that detector)
    val_ref_run = (newest(lambda c: c.val_faces_sha256 == val_ref and finite(c))
                   or newest(lambda c: c.val_faces_sha256 == val_ref)) if val_ref else None

    def other_val_faces(c: Candidate) -> bool:
        if c.val_faces_sha256:
            return bool(val_ref) and c.val_faces_sha256 != val_ref
        # Trained before the tag: compared as before, but for skip against not skip (which drops faceless photos)
        return (val_ref_run is not None and "no_face" in c.preprocess and "no_face" in val_ref_run.preprocess
                and (c.preprocess["no_face"] == "skip") != (val_ref_run.preprocess["no_face"] == "skip"))

    # The runs that can win but for the external sets: only these judge one another there. A run that can never win
    # (validated on other photos, a NaN/inf validation or test MAE) set the guard's best with a good external MAE
    # and vetoed every run that could, shrank the faces the others are paired on, and outvoted them on a set's version.
    contenders = [c for c in candidates if finite(c) and not other_val_faces(c)]
    refs = reference_versions(contenders or candidates, current)

    def other_version(c: Candidate, n: str) -> bool:
        return n in refs and n in c.external_sha256 and c.external_sha256[n] != refs[n]

    def compared(c: Candidate, n: str) -> bool:  # whose MAE on n the guard compares
        return math.isfinite(c.external_mae_years.get(n, math.nan)) and not other_version(c, n)

    # Per set, where the compared runs scored different faces: their MAEs on the faces all of them scored
    paired = {n: paired_maes(n, [c for c in contenders if compared(c, n)], face_errors) for n in sets}

    def guarded(c: Candidate, n: str) -> float:  # the MAE the guard compares: the paired one where there is one
        return paired[n][c.run_id][0] if c.run_id in paired[n] else c.external_mae_years[n]

    # A NaN (a model that output NaN, a run whose choice failed) compares False with everything: it
    # must neither win the sort nor set the guard's best, which would then veto nothing.
    best = {n: min((guarded(c, n) for c in contenders if compared(c, n)), default=math.nan) for n in sets}
    contender_ids = {c.run_id for c in contenders}
    ranked = []
    for c in candidates:
        reasons = [f"{what} MAE is {value}" for what, value in (("validation", c.val_mae_years),
                                                                  ("test", c.test_mae_years)) if not math.isfinite(value)]
        if other_val_faces(c):
            ref_n = val_ref_run.val_n_faces if val_ref_run is not None else ""
            mine = f"{c.val_n_faces} photos, faces {c.val_faces_sha256[:8]}" if c.val_faces_sha256 else "not tagged"
            theirs = (f"{ref_n + ' photos, ' if ref_n else ''}faces {val_ref[:8]}" if val_ref else "")
            whose = "the workspace's" if val_faces and val_ref == val_faces else "the compared runs'"
            differ = _settings_differ(c, val_ref_run)
            reasons.append(f"validated on other photos ({mine}; {whose}: {theirs}"
                           + (f"; {', '.join(differ)}" if differ else "") + "): "
                           + _rerun_hint(c, val_ref_run, VAL_METRIC))
        vetoes = []  # the margin's, apart: where they are a run's only reasons, evaluating it again changes nothing
        # A run that cannot win is not judged on the sets either: "rerun its evaluate" or a veto against runs it was
        # not compared with would send the user to work that changes nothing (its own reasons above say why)
        for n in (sets if c.run_id in contender_ids else []):
            if n not in c.external_mae_years and c.external_n_faces.get(n) == 0 and not other_version(c, n):
                # Evaluated on it, but its preprocess detector settings found none of its faces (evaluate logs no
                # MAE then): evaluating it again changes nothing
                reasons.append(f"no face of {n} scored (external_{n}_n_faces=0: its preprocess detector settings "
                               "found none)")
            elif n not in c.external_mae_years:
                reasons.append(f"not scored on {n}")
            elif other_version(c, n):
                reasons.append(f"scored on another version of {n} (files {c.external_sha256[n][:8]}, the compared "
                               f"runs' {refs[n][:8]}): rerun its evaluate")
            elif not math.isfinite(c.external_mae_years[n]):
                reasons.append(f"{n} MAE is {c.external_mae_years[n]}")
            elif guarded(c, n) > best[n] + guard_margin(best[n]):
                on = f" on the {paired[n][c.run_id][1]} common faces" if c.run_id in paired[n] else ""
                vetoes.append(f"{n} MAE {guarded(c, n):.3f}{on} > best {best[n]:.3f} + {guard_margin(best[n]):.3f}")
        ranked.append(Candidate(**{**asdict(c), "excluded": "; ".join(reasons + vetoes),
                                   "vetoed": bool(vetoes) and not reasons, "contender": c.run_id in contender_ids,
                                   "paired_mae_years": {n: paired[n][c.run_id][0] for n in sets if c.run_id in paired[n]},
                                   "paired_n_faces": {n: paired[n][c.run_id][1] for n in sets if c.run_id in paired[n]}}))
    return sorted(ranked, key=lambda c: (bool(c.excluded), not c.contender,
                                         c.val_mae_years if math.isfinite(c.val_mae_years) else math.inf,
                                         -c.start_time_ms))


def selection_table(ranked: list[Candidate]) -> str:
    """The candidates as a text table (what packaging prints), the winner first."""
    sets = sorted({name for c in ranked for name in c.external_mae_years})
    paired = [n for n in sets if any(n in c.paired_mae_years for c in ranked)]  # where the guard compared these
    head = (f"{'run':<10} {'name':<24} {'val MAE':>8} {'test MAE':>8} " + "".join(f"{n + ' MAE':>18} " for n in sets)
            + "".join(f"{n + ' common':>18} " for n in paired))
    lines = [head + "verdict"]
    for i, c in enumerate(ranked):
        verdict = "WINNER" if i == 0 and not c.excluded else (f"excluded: {c.excluded}" if c.excluded else "eligible")
        ext = "".join(f"{c.external_mae_years[n]:>18.2f} " if n in c.external_mae_years else f"{'-':>18} " for n in sets)
        ext += "".join(f"{f'{c.paired_mae_years[n]:.2f} on {c.paired_n_faces[n]}':>18} " if n in c.paired_mae_years
                       else f"{'-':>18} " for n in paired)
        lines.append(f"{c.run_id[:8]:<10} {c.run_name[:24]:<24} {c.val_mae_years:>8.2f} {c.test_mae_years:>8.2f} "
                     f"{ext}{verdict}")
    return "\n".join(lines)


def select_winner(client, experiment: str = EXPERIMENT, data_sha256: str | None = None,
                  external_sha256: dict[str, str] | None = None, *, require_one_data: bool = False,
                  val_faces: str | None = None) -> Winner:
    """The champion by :data:`SELECTION_RULE` (validation MAE, guarded by cross-dataset MAE).

    Logs the rule and every candidate's validation, test and external MAE with its verdict.

    Args:
        client: An ``mlflow.MlflowClient``.
        experiment: Experiment name.
        data_sha256: Only runs trained on these data (their ``data_sha256`` tag) compete: validation
            MAEs of runs on other data are measured on other faces and do not compare (a run on the
            2,100-face sample would beat one on APPA-REAL). None: every run.
        external_sha256: ``{set: fingerprint}`` of the workspace's external sets (``data/external.json``):
            the versions whose MAEs the guard compares (:func:`rank_candidates`).
        require_one_data: With ``data_sha256`` None, refuse runs trained on more than one data (what packaging
            asks where the workspace's data are unknown) instead of comparing them all.
        val_faces: The fingerprint of the workspace's validation faces (:func:`workspace_val_faces`): only runs
            validated on them compete (:func:`rank_candidates`). None: the faces most runs were validated on.

    Raises:
        PackagingError: The experiment does not exist or is deleted, no finished run (on ``data_sha256``) has
            both metrics, or none of them passes the external-MAE guard.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PackagingError(f"MLflow experiment {experiment!r} not found in {display_uri(client.tracking_uri)}: "
                             "run the pipeline (dvc repro) first")
    if exp.lifecycle_stage == "deleted":  # its runs are deleted with it, and training cannot log into it
        raise PackagingError(f"MLflow experiment {experiment!r} (id {exp.experiment_id}) is deleted in "
                             f"{display_uri(client.tracking_uri)}: restore it (mlflow experiments restore "
                             f"--experiment-id {exp.experiment_id}), or delete it for good "
                             f"({gc_command(client.tracking_uri, exp.experiment_id)}) and run the pipeline again")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    found = {r.info.run_id: r for r in runs if VAL_METRIC in r.data.metrics and TEST_METRIC in r.data.metrics}
    log.info("%d finished runs in experiment %r, %d with %s and %s", len(runs), experiment, len(found),
             VAL_METRIC, TEST_METRIC)
    if data_sha256:
        other = {r.data.tags.get("data_sha256") for r in found.values()} - {data_sha256}
        mine = {k: r for k, r in found.items() if r.data.tags.get("data_sha256") == data_sha256}
        if len(mine) < len(found):
            log.info("%d of them trained on other data (data sha256 %s), set aside: the candidates are the %d "
                     "trained on the workspace's data (%s)", len(found) - len(mine),
                     ", ".join(sorted(str(o)[:12] for o in other)), len(mine), data_sha256[:12])
        if found and not mine:
            raise PackagingError(f"no finished run of experiment {experiment!r} trained on the workspace's data "
                                 f"(data sha256 {data_sha256[:12]}, from the preprocess output); {len(found)} "
                                 "trained on other data: run the pipeline on these data, or put the outputs of "
                                 "the data to package in the workspace (dvc exp apply / dvc checkout)")
        found = mine
    elif require_one_data:
        _refuse_mixed_data(found, experiment)
    if not found:
        raise PackagingError(f"no finished run of experiment {experiment!r} has both {VAL_METRIC} and "
                             f"{TEST_METRIC}{_unfinished(client, exp.experiment_id)}: run the train and evaluate "
                             "stages first")
    with tempfile.TemporaryDirectory(prefix="faceage-predictions-") as workdir:
        loaded: dict[str, dict[str, dict[str, list[float]]] | None] = {}

        def face_errors(c: Candidate) -> dict[str, dict[str, list[float]]] | None:  # each run's downloaded once
            if c.run_id not in loaded:
                loaded[c.run_id] = read_face_errors(client, c.run_id, workdir)
            return loaded[c.run_id]

        ranked = rank_candidates([candidate(r) for r in found.values()], external_sha256, val_faces, face_errors)
    untagged = sum(VAL_FACES_TAG not in r.data.tags for r in found.values())
    if untagged:
        log.info("%d of the runs trained before train.val_faces_sha256 was logged: their validation MAEs are compared "
                 "as before (unless one was trained with preprocess.no_face=skip and the compared runs were not, or "
                 "the reverse); train them again to compare them on the same faces for sure", untagged)
    log.info("champion rule: %s\n%s", SELECTION_RULE, selection_table(ranked))
    top = ranked[0]
    # The runs that could win but for the external sets (finite MAEs, validated on the compared photos): what the
    # refusal is about. A run that can never win led the message (the lowest validation MAE), and kept the runs
    # that each trail another from being said so, or sent the user to evaluate a run that no evaluate makes eligible.
    comparable = [c for c in ranked if c.contender]
    if top.excluded and comparable and all(c.vetoed for c in comparable):
        # Each comparable run trails another by more than the margin on some set (one is best on a set, another on
        # the other): no evaluate changes that, and "evaluate the runs on the same sets" sent the user to redo it.
        others = len(ranked) - len(comparable)
        raise PackagingError(
            "no run passes the external-MAE guard: every run "
            + (f"that can win ({others} other{'s' if others > 1 else ''} cannot: validated on other photos, or a "
               "NaN/inf validation or test MAE; see the table) " if others else "")
            + "was scored on every set, and each trails the best run "
            f"on some set by more than max({GUARD_YEARS} years, {GUARD_FRACTION:.0%}) ("
            + "; ".join(f"{c.run_name or c.run_id[:8]}: {c.excluded}" for c in ranked if c.vetoed)
            + "): none generalises on every set; train a run that does, or drop a set from evaluate.external "
            "(then dvc repro) to judge by the others")
    evaluate_again = any("not scored on" in c.excluded or "another version of" in c.excluded for c in comparable)
    if top.excluded and evaluate_again:
        # e.g. runs scored on different external sets: none covers them all
        raise PackagingError(f"no run passes the external-MAE guard (best candidate {top.run_id}: {top.excluded}); "
                             "evaluate the runs on the same evaluate.external sets")
    if top.excluded:  # e.g. no run validated on the workspace's faces, or none of a set's found: each reason says
        raise PackagingError(f"no run qualifies by the champion rule (best candidate {top.run_id}: {top.excluded})")
    tags = found[top.run_id].data.tags
    return Winner(run_id=top.run_id, run_name=top.run_name, val_mae_years=top.val_mae_years,
                  test_mae_years=top.test_mae_years, start_time_ms=top.start_time_ms,
                  data_sha256=tags.get("data_sha256"), git_commit=tags.get("git_commit"),
                  external_mae_years=top.external_mae_years, dvc_experiment=tags.get(DVC_EXPERIMENT_TAG),
                  evaluated_in=tags.get(EVALUATED_IN_TAG) or None)


def candidate(run) -> Candidate:
    """An MLflow run (with ``best_val_mae`` and ``test_mae_years``) as a :class:`Candidate`, its verdict to come."""
    metrics, tags = run.data.metrics, run.data.tags
    maes = external_maes(metrics, tags)
    return Candidate(
        run.info.run_id, run.info.run_name or "", float(metrics[VAL_METRIC]), float(metrics[TEST_METRIC]),
        int(run.info.start_time), maes, "", external_versions(tags),
        val_faces_sha256=tags.get(VAL_FACES_TAG, ""), val_n_faces=tags.get(VAL_N_FACES_TAG, ""),
        external_faces_sha256={n: v for n, v in external_faces_versions(tags).items() if n in maes},
        # Sets without an MAE too: n_faces 0 is a set evaluated where the run's detector found no face
        external_n_faces={k[len("external_"):-len("_n_faces")]: int(v) for k, v in metrics.items()
                          if k.startswith("external_") and k.endswith("_n_faces") and math.isfinite(v)},
        preprocess={k[len("preprocess."):]: v for k, v in run.data.params.items() if k.startswith("preprocess.")})


def _refuse_mixed_data(found: dict, experiment: str) -> None:
    """Where the workspace's data are unknown (no preprocess output: a fresh clone, outputs left in DVC's cache),
    runs on different data cannot be ranked: every run competed, and a run on the 2,100-face sample (validation
    MAE on its own, easier faces) was named the winner, with the DVC experiment to apply.

    Raises:
        PackagingError: ``found`` (run id -> run) holds runs trained on more than one ``data_sha256``.
    """
    by_data: dict[str, list] = {}
    for run in found.values():
        by_data.setdefault(run.data.tags.get("data_sha256") or "unknown", []).append(run)
    if len(by_data) < 2:
        return

    def best(runs) -> str:
        run = min(runs, key=lambda r: (not math.isfinite(r.data.metrics[VAL_METRIC]), r.data.metrics[VAL_METRIC]))
        where = run.data.tags.get(DVC_EXPERIMENT_TAG)
        return (f"best {run.info.run_id[:8]} ({VAL_METRIC} {run.data.metrics[VAL_METRIC]:.3f}"
                + (f", DVC experiment {where!r}" if where else "") + ")")

    groups = "; ".join(f"data sha256 {sha[:12]}: {len(runs)} run{'s' if len(runs) > 1 else ''}, {best(runs)}"
                       for sha, runs in sorted(by_data.items()))
    raise PackagingError(f"the workspace's data are unknown (no preprocess output with {PREPROCESS_SETTINGS}), and the "
                         f"finished runs of experiment {experiment!r} trained on {len(by_data)} different data "
                         f"({groups}): validation MAEs on different faces do not compare; put the outputs of the "
                         "data to package in the workspace (dvc exp apply <exp>, dvc checkout or dvc repro), then "
                         "package again")


def _unfinished(client, experiment_id: str) -> str:
    """``" (2 other runs: 1 FAILED, 1 KILLED; ... not a candidate)"``, the experiment's runs that did not
    finish, or ``""``: a store holding only runs that failed or were stopped said "run the train and
    evaluate stages first", no more, to someone who just had."""
    counts: dict[str, int] = {}
    for run in client.search_runs([experiment_id], filter_string="attributes.status != 'FINISHED'",
                                  max_results=1000):
        counts[run.info.status] = counts.get(run.info.status, 0) + 1
    if not counts:
        return ""
    total = sum(counts.values())
    statuses = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return (f" ({total} other run{'s' if total > 1 else ''}: {statuses}; a run that failed, was stopped or is "
            "still running is not a candidate)")


def check_workspace(winner: Winner, detector_dir: str | Path, faces_dir: str | Path) -> None:
    """Packaging reads the pipeline's detector files and real crops from the workspace; after
    ``dvc exp run --queue`` / ``--temp`` those stay in DVC's cache until the experiment is applied.

    Raises:
        PackagingError: ``detector_dir`` or ``faces_dir`` holds no pipeline output; names the fix.
    """
    for folder, manifest, stage in ((Path(detector_dir), MANIFEST, "fetch_detector"),
                                    (Path(faces_dir), FACES_MANIFEST, "preprocess")):
        if not (folder / manifest).is_file():
            raise PackagingError(f"{folder} holds no {stage} output ({manifest}), which packaging reads; "
                                 f"the winner is run {winner.run_id} ({winner.run_name}): {winner.restore_hint()}")


def register_champion(client, winner: Winner, name: str = REGISTERED_MODEL):
    """Registers the winner's logged model ``model`` under ``name`` in ``client``'s registry (the alias moves
    later: :func:`point_alias`, once the BentoML model is saved).

    A registry version that already holds this logged model is reused. Either way the version's tags
    (:func:`version_tags`) are set to the winner's numbers as MLflow holds them now: a run evaluated again
    since its first registration showed the old ones beside a bento lineage with the new ones.

    Why ``client`` and not ``mlflow.register_model``: that one registers through MLflow's process-wide
    tracking/registry URI, so with a client on another store (the one the winner was selected in) the
    version went elsewhere, or failed there for want of the logged model.

    Returns:
        The ``ModelVersion``.

    Raises:
        PackagingError: The run has no logged model named ``model``.
    """
    from mlflow.exceptions import MlflowException

    run = client.get_run(winner.run_id)
    found = client.search_logged_models(
        [run.info.experiment_id],
        filter_string=f"source_run_id = '{winner.run_id}' AND name = '{LOGGED_MODEL_NAME}'",
    )
    if not found:
        raise PackagingError(f"run {winner.run_id} has no logged model named {LOGGED_MODEL_NAME!r} "
                             "(train logs it with mlflow.pytorch.log_model(name='model'))")
    logged = max(found, key=lambda m: m.creation_timestamp)
    source = f"models:/{logged.model_id}"
    tags = version_tags(winner)
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        log.info("%s version %s already holds %s (run %s)", name, version.version, source, winner.run_id)
        stale = {k: v for k, v in tags.items() if version.tags.get(k) != v}
        for key, value in stale.items():
            client.set_model_version_tag(name, str(version.version), key, value)
        if stale:
            log.info("%s version %s: tags %s updated to the run's numbers now", name, version.version,
                     ", ".join(sorted(stale)))
            version = client.get_model_version(name, str(version.version))
    else:
        try:
            client.create_registered_model(name)
        except MlflowException as e:
            if e.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
                raise
        # MLflow's SQL registry resolves a ``models:/<id>`` source through the process-wide tracking URI, not the
        # client's (a TODO in its sqlalchemy_store): pointed at the client's store for the call, then put back.
        with mlflow_env("MLFLOW_TRACKING_URI", client.tracking_uri):
            version = client.create_model_version(name, source, run_id=winner.run_id, tags=tags,
                                                  model_id=logged.model_id)
        log.info("registered %s as %s version %s", source, name, version.version)
    return version


def version_tags(winner: Winner) -> dict[str, str]:
    """The numbers a registry version shows for its run (``val_mae_years``, ``test_mae_years``): the run's metrics
    when it was last packaged, the same the bento lineage (``faceage.json``) records."""
    return {"val_mae_years": str(winner.val_mae_years), "test_mae_years": str(winner.test_mae_years)}


def point_alias(client, version, name: str = REGISTERED_MODEL, alias: str = CHAMPION_ALIAS) -> None:
    """Points ``name@alias`` at ``version``: the last step of packaging, so that a failed or interrupted
    package (the ONNX check, a detector mismatch, Ctrl-C) leaves the alias on the model the store serves."""
    client.set_registered_model_alias(name, alias, str(version.version))
    log.info("alias %s@%s -> version %s", name, alias, version.version)


def publish_champion(client, version, save: Callable[[], Any], *, registered_model: str = REGISTERED_MODEL,
                     bento_model: str = BENTO_MODEL):
    """Saves the BentoML model (``save()``, which makes it ``<bento_model>:latest``), then points
    ``registered_model@champion`` at ``version`` (:func:`point_alias`); returns the saved model.

    ``bentoml serve`` and ``bentoml build`` (``make bento``) resolve ``latest``; MLflow names the champion by its
    alias. Where the alias cannot be moved (the registry locked by another writer, unreachable or read-only;
    Ctrl-C), ``latest`` is put back on the model it named before (none: removed), so the store never serves a model
    the registry does not call champion. The new model stays in the store: packaging again reuses it.

    Raises:
        PackagingError: The alias could not be moved; names the model ``latest`` is back on.
    """
    previous = latest_version(bento_model)
    model = save()
    try:
        point_alias(client, version, registered_model)
    except BaseException as e:
        back, restored = restore_latest(bento_model, previous, model.tag)
        if not isinstance(e, Exception):  # Ctrl-C: latest put back, the interrupt goes on
            raise
        # MLflow's first line only: the rest is its SQL statement and parameters, or the server's whole reply
        first = next((line for line in str(e).splitlines() if line.strip()), type(e).__name__).strip()
        served = (f"so `bentoml serve` and `make bento` serve no model the registry does not call {CHAMPION_ALIAS}"
                  if restored else f"so `bentoml serve` and `make bento` would serve a model the registry does not "
                  f"call {CHAMPION_ALIAS}")
        raise PackagingError(
            f"the BentoML model {model.tag} is saved, but {registered_model}@{CHAMPION_ALIAS} could not be pointed at "
            f"version {version.version} ({type(e).__name__}: {first}); {back}, {served}. Package again once the "
            "registry can be written (the saved model is reused)") from e
    return model


def latest_version(name: str) -> str | None:
    """The version the store's ``<name>:latest`` names (its ``latest`` file), or None where there is none."""
    import bentoml

    latest = model_store_root() / bentoml.Tag(name).latest_path()
    return (latest.read_text().strip() or None) if latest.is_file() else None


def restore_latest(name: str, previous: str | None, saved) -> tuple[str, bool]:
    """Points ``<name>:latest`` back at ``previous`` (None: removes it) after it moved to ``saved`` (a tag).

    Returns:
        Where ``latest`` is now, for the error message, and whether it was put back.
    """
    import bentoml

    latest = model_store_root() / bentoml.Tag(name).latest_path()
    try:
        if previous is None:
            latest.unlink(missing_ok=True)
            return f"{name}:latest is removed again (no model of that name was packaged before)", True
        make_latest(bentoml.Tag(name, previous))
        return f"{name}:latest is back on {name}:{previous}, the model it named before", True
    except (OSError, bentoml.exceptions.BentoMLException, PackagingError) as e:
        return (f"{name}:latest still names the new {saved} (putting it back on {previous} failed: {e}; "
                f"`echo {previous} > {latest}` puts it back)", False)


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's settings and lineage, without its weights (``{}`` if it is not a dict).

    Raises:
        PackagingError: The file cannot be read as a torch file of plain values (a photo, a truncated
            copy, a pickle with code): torch's own error advises loading it with ``weights_only=False``,
            i.e. running the file's code, which packaging never does.
    """
    try:
        payload = read_payload(path)
    except CheckpointError as e:
        raise PackagingError(str(e)) from e
    return {k: v for k, v in payload.items() if k != "state_dict"} if isinstance(payload, dict) else {}


def resolve_checkpoint(client, winner: Winner, checkpoint: str | Path, workdir: str | Path) -> Path:
    """The winner's checkpoint: ``checkpoint`` if it records the winner's run, else the run's artifact.

    Args:
        client: An ``mlflow.MlflowClient``.
        winner: From :func:`select_winner`.
        checkpoint: The local checkpoint (``models/model.pt``).
        workdir: Where a downloaded artifact may be put.

    Raises:
        PackagingError: Neither holds the winner's weights.
    """
    checkpoint = Path(checkpoint)
    local_run, unreadable = None, None
    if checkpoint.is_file():
        try:
            local_run = checkpoint_meta(checkpoint).get("mlflow_run_id")
        except PackagingError as e:  # not the winner's then: its artifact may still be there
            unreadable = str(e)
    if local_run == winner.run_id:
        return checkpoint
    artifact = _find_artifact(client, winner.run_id, CHECKPOINT_FILE)
    if artifact is not None:
        path = Path(client.download_artifacts(winner.run_id, artifact, str(workdir)))
        if checkpoint_meta(path).get("mlflow_run_id") == winner.run_id:
            if unreadable:
                log.warning("%s; packaging the winner's own checkpoint instead", unreadable)
            log.info("using checkpoint artifact %s of run %s", artifact, winner.run_id)
            return path
    where = (unreadable if unreadable else f"{checkpoint} does not exist" if not checkpoint.is_file()
             else f"{checkpoint} belongs to run {local_run}" if local_run
             else f"{checkpoint} records no MLflow run (trained outside the pipeline, or before runs were recorded)")
    raise PackagingError(
        f"the best run {winner.run_id} ({winner.run_name}, {VAL_METRIC}={winner.val_mae_years:.3f}) has no "
        f"checkpoint here: {where}, and the run logged no {CHECKPOINT_FILE} artifact; {winner.restore_hint()}, "
        "or pass its checkpoint"
    )


def champion_card(client, winner: Winner, workdir: str | Path) -> Path | None:
    """The winner's own model card: the ``model_card.md`` its run's last ``evaluate`` logged (``evaluation/``),
    downloaded into ``workdir``, or None (logged none, another run's, or not readable: said in a warning).

    Why: the workspace's ``reports/model_card.md`` describes the workspace's last run; after several
    ``dvc exp run``s the champion may be another one, and a bento without its card sent a user to the wrong one.
    """
    from mlflow.exceptions import MlflowException

    from faceage.model_card import card_run_id

    try:
        artifact = _find_artifact(client, winner.run_id, MODEL_CARD_FILE)
        if artifact is None:
            log.warning("run %s logged no %s (evaluated before evaluate logged its card?): the BentoML model carries "
                        "no model card; rerun its evaluate (%s) to have one", winner.run_id, MODEL_CARD_FILE,
                        winner.restore_hint())
            return None
        path = Path(client.download_artifacts(winner.run_id, artifact, str(workdir)))
        described = card_run_id(path.read_text(encoding="utf-8", errors="replace"))
    except (MlflowException, OSError) as e:
        log.warning("the model card of run %s could not be read (%s): the BentoML model carries none", winner.run_id,
                    e)
        return None
    if described != winner.run_id:
        log.warning("the %s artifact of run %s %s: not shipped with the BentoML model", artifact, winner.run_id,
                    f"describes run {described}" if described else "names no MLflow run (its Lineage section)")
        return None
    return path


def workspace_card_note(card: str | Path | None, winner: Winner, shipped: bool) -> str | None:
    """A warning where the workspace's card (``reports/model_card.md``) describes a run other than the packaged
    one, else None."""
    from faceage.model_card import card_run_id

    if card is None or not Path(card).is_file():
        return None
    try:
        described = card_run_id(Path(card).read_text(encoding="utf-8", errors="replace"))
    except OSError:
        return None
    if described == winner.run_id:
        return None
    where = (f"read {MODEL_CARD_FILE} in the BentoML model (its path below), the packaged run's own"
             if shipped else winner.restore_hint())
    return (f"{card} describes run {described or 'unknown'}, not the packaged run {winner.run_id} ({winner.run_name}): "
            f"{where}")


def _find_artifact(client, run_id: str, filename: str, path: str | None = None, depth: int = 0) -> str | None:
    """The path of ``run_id``'s artifact ``filename`` (in a folder up to two deep), or None.

    Raises:
        faceage.tracking.TrackingError, PackagingError: A server the artifacts are read through does not answer
            (:func:`check_artifact_store`; probed once, before the listing).
    """
    if depth == 0:
        check_artifact_store(client, run_id)
    for info in client.list_artifacts(run_id, path):
        if info.is_dir and depth < 2:
            found = _find_artifact(client, run_id, filename, info.path, depth + 1)
            if found:
                return found
        elif Path(info.path).name == filename:
            return info.path
    return None


def model_metadata(winner: Winner, meta: dict[str, Any], version) -> dict[str, Any]:
    """The lineage stored with the BentoML model (flat, JSON-ready).

    ``resumed_at_commit`` (the commit a run stopped and resumed elsewhere finished at, as its checkpoint
    records it) is there only for such a run, ``dvc_experiment`` (and ``dvc_evaluated_in`` where another one
    evaluated it last) only for a run trained in a ``dvc exp run``: the other runs' lineage, and the reuse of
    their stored copies (:func:`_same_model`), stay as they were.
    """
    crop = meta["crop"]
    resumed = {"resumed_at_commit": meta["resumed_at_commit"]} if meta.get("resumed_at_commit") else {}
    # A `dvc exp run` champion: its -S values live in the experiment, not in git_commit's params.yaml; its numbers
    # come from the experiment that last evaluated it. Only where set: a `dvc repro` run's lineage stays as it was.
    experiment = {"dvc_experiment": winner.dvc_experiment} if winner.dvc_experiment else {}
    if winner.evaluated_in and winner.evaluated_in != winner.dvc_experiment:
        experiment["dvc_evaluated_in"] = winner.evaluated_in
    return {
        "mlflow_experiment": EXPERIMENT,
        "mlflow_run_id": winner.run_id,
        "mlflow_run_name": winner.run_name,
        "registered_model": str(version.name),
        "registered_version": str(version.version),
        "registered_alias": CHAMPION_ALIAS,
        "val_mae_years": winner.val_mae_years,
        "test_mae_years": winner.test_mae_years,
        "external_mae_years": dict(winner.external_mae_years),
        "data_sha256": meta.get("data_sha256") or winner.data_sha256,
        # faceage.json ships in the bento, and every answer's "model" carries it: no URL secrets, and no folders of
        # the packager's machine (tracking.portable_source, as the model card shows it)
        "data_source": portable_source(crop["data_source"]) if crop.get("data_source") else None,
        "git_commit": meta.get("git_commit") or winner.git_commit,
        **resumed,
        **experiment,
        "package_git_commit": git_commit(),
        "backbone": meta["backbone"],
        "image_size": int(meta.get("image_size") or 0),
        "temperature": float(meta.get("temperature", 1.0)),
        "best_epoch": int(meta.get("best_epoch", 0)),
        "detector": crop["detector"],
        "detector_upsample": int(crop["upsample"]),
        "detector_retry_pad": crop_retry_pad(crop),
        "detector_cnn_retry_side": crop_cnn_retry_side(crop),
        "detector_sha256": crop["detector_sha256"],
        "crop_margin": float(crop["margin"]),
        "crop_size_px": int(crop["size"]),
    }


def load_check_crops(faces_dir: str | Path, size: int, limit: int = CHECK_FACES, chips: bool = False,
                     pairs: bool = False) -> list[np.ndarray]:
    """Up to ``limit`` real faces of the ``preprocess`` output (test split first): crops at ``size``
    px, or (``chips``) their ``dlib_age`` chips from ``chips.npz`` (``pairs``: their chip pairs).

    Raises:
        PackagingError: The folder holds no crops (or no chips for them).
    """
    faces_dir = Path(faces_dir)
    if not (faces_dir / FACES_MANIFEST).is_file():
        raise PackagingError(f"{faces_dir} has no preprocess output ({FACES_MANIFEST}): the ONNX export is checked "
                             "on real face crops; run the preprocess stage or pass --faces")
    rows = sorted(read_faces_manifest(faces_dir), key=lambda r: r["split"] != "test")[:limit]
    if not rows:
        raise PackagingError(f"{faces_dir}/{FACES_MANIFEST} lists no face crops to check the ONNX export on")
    if chips:
        from faceage.chips import CHIPS_FILE, load_chips

        if not (faces_dir / CHIPS_FILE).is_file():
            raise PackagingError(f"{faces_dir} has no {CHIPS_FILE}: rerun the preprocess stage")
        try:  # these faces' chips alone: every crop's pair (96 KB each, ~730 MB for APPA-REAL) was built for 32
            table = load_chips(faces_dir / CHIPS_FILE, pairs=pairs, crops=[row["crop"] for row in rows])[0]
        except ValueError as e:  # chips cut before the checkpoint's kind needed them (its message says what to rerun)
            raise PackagingError(f"the ONNX export is checked on the workspace's chips: {e}") from e
        return [table[row["crop"]] for row in rows if row["crop"] in table]
    crops = []
    for row in rows:
        with Image.open(faces_dir / row["crop"]) as im:
            crops.append(np.asarray(im.convert("RGB").resize((size, size), Image.Resampling.BILINEAR)))
    return crops


def save_bento_model(checkpoint: str | Path, detector_dir: str | Path, metadata: dict[str, Any],
                     name: str = BENTO_MODEL, *, faces_dir: str | Path, card: str | Path | None = None):
    """Exports the checkpoint to ONNX (checked on real crops) and writes both, the detector files,
    the model card ``card`` (as ``model_card.md``, named in the lineage's ``model_card``) and the lineage
    (with the check) into a new BentoML model.

    Returns:
        The ``bentoml.Model``: a new one, or the stored copy of the same model (:func:`stored_copy`), reused
        and made ``latest``.

    Raises:
        faceage.predict.PredictorError: The detector file differs from the checkpoint's.
        faceage.export.ExportError: The exported graph disagrees with the checkpoint.
        PackagingError: No real crops in ``faces_dir``.
    """
    from faceage.export import export_onnx

    meta = checkpoint_meta(checkpoint)
    crop = meta["crop"]
    detector_files = crop_detector_files(crop)  # the detector, and the CNN where its last look ran
    for filename, sha256 in detector_files.items():
        check_detector_file(detector_dir, filename, sha256)
    manifest = read_manifest(detector_dir)
    # Only the files inference needs travel: the detector files, plus what the checkpoint's input kind
    # reads (dlib_face: the face encoder's landmark and recognition models, ~30 MB the others never read;
    # dlib_age: the landmark model its chips are aligned with).
    needed = [*detector_files, *input_kind(meta).files]
    encoder = meta.get("encoder", {})  # what a dlib_face / dlib_age checkpoint was trained with
    trained = {RECOGNITION_FILE: encoder.get("encoder_sha256"), SHAPE5_FILE: encoder.get("shape_predictor_sha256")}
    for filename in input_kind(meta).files:
        got = file_digest(Path(detector_dir) / filename)
        want = trained.get(filename) or manifest["files"].get(filename)
        if got != want:
            raise PackagingError(f"{Path(detector_dir) / filename} has sha256 {got}, but the checkpoint was "
                                 f"trained with {want}")
    kind = input_kind(meta).name
    crops = load_check_crops(faces_dir, int(crop["size"]), chips=kind in CHIP_KINDS, pairs=kind == DLIB_CHIP_PAIR)
    with tempfile.TemporaryDirectory(prefix="faceage-export-") as tmp:
        staged = Path(tmp)
        metadata = {**metadata, "onnx_file": ONNX_FILE,
                    **export_onnx(checkpoint, detector_dir, crops, staged / ONNX_FILE)}
        if card is not None:
            shutil.copyfile(card, staged / MODEL_CARD_FILE)
            metadata["model_card"] = MODEL_CARD_FILE
        labels = {"alias": CHAMPION_ALIAS, "backbone": str(metadata["backbone"]), "runtime": "onnx",
                  "registered_version": str(metadata["registered_version"])}
        shutil.copyfile(checkpoint, staged / CHECKPOINT_FILE)
        _copy_detector(staged, detector_dir, needed, manifest, metadata)
        same = stored_copy(name, staged, labels)
        if same is not None:  # `make bento` again with the same champion: no second copy of the same bytes
            log.info("BentoML model %s already holds these exact files (run %s, the same lineage): reused",
                     same.tag, metadata["mlflow_run_id"])
            make_latest(same.tag)
            return same
        model = save_new_model(name, staged, labels, metadata)
    log.info("saved BentoML model %s (run %s, val MAE %.3f, test MAE %.3f, ONNX max |diff| %.1e)", model.tag,
             metadata["mlflow_run_id"], metadata["val_mae_years"], metadata["test_mae_years"],
             metadata["onnx_max_abs_diff_probs"])
    return model


def save_new_model(name: str, staged: Path, labels: dict[str, str], metadata: dict[str, Any]):
    """Saves ``staged``'s files as a new BentoML model ``name`` (made ``latest``), and returns the store's copy.

    Why not ``bentoml.models.create`` alone: BentoML removes the store's half-copied folder when the copy
    raises an ``Exception``, not on ``KeyboardInterrupt`` (Ctrl-C; SIGTERM in ``stages/package.py``), so an
    interrupted package left ``<name>/<version>`` half-written in the store: truncated weights, and, before
    BentoML's ``model.yaml`` was copied, a folder that made every later ``bentoml.models.list`` fail.
    """
    import bentoml

    model = None
    try:
        with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
            shutil.copytree(staged, model.path, dirs_exist_ok=True)
    except BaseException:
        if model is not None:
            root = model_store_root()
            latest = root / model.tag.latest_path()
            # BentoML writes latest only once the copy is whole: a version it names is saved, and stays
            if not (latest.is_file() and latest.read_text().strip() == model.tag.version):
                shutil.rmtree(root / model.tag.path(), ignore_errors=True)
        raise
    # The store's copy: the one create() yields keeps the path of its temporary folder, gone once it is saved
    return bentoml.models.get(model.tag)


def model_store_root() -> Path:
    """The folder of BentoML's local model store (``$BENTOML_HOME/models``), from its own configuration: BentoML has
    no public call for it, and :func:`make_latest`, :func:`save_new_model` and :func:`stored_copy` work on its files."""
    from bentoml._internal.configuration.containers import BentoMLContainer

    return Path(BentoMLContainer.model_store.get()._path)


def make_latest(tag) -> None:
    """Points the store's ``<name>:latest`` at ``tag``.

    Why: ``bentoml build`` (``make bento``) and ``bentoml serve`` resolve ``face_age:latest``. BentoML moves
    it only when it creates a model, so a champion packaged again (its stored copy reused) after another
    one had been packaged would leave ``latest`` on the other one, and the bento would serve it. BentoML has
    no public call for this: the store keeps the version in a ``<name>/latest`` file, and the check below
    fails loudly if a BentoML release changes that.
    """
    import bentoml

    latest = model_store_root() / tag.latest_path()
    # Through a staging file of this call's own (atomic.write_text): two packages at once (two terminals, CI jobs)
    # shared ``.latest.tmp``, and the second rename found it gone (FileNotFoundError) after the first had moved it.
    write_text(latest, str(tag.version))
    got = bentoml.models.get(f"{tag.name}:latest").tag
    if str(got) != str(tag):
        raise PackagingError(f"could not point {tag.name}:latest at {tag}: it resolves to {got} (has BentoML's "
                             f"model store layout changed?)")


def _digests(folder: Path) -> dict[str, str]:
    """sha256 of every file under ``folder`` by relative path, BentoML's own ``model.yaml`` aside
    (it holds the version and creation time)."""
    return {p.relative_to(folder).as_posix(): file_digest(p) for p in sorted(folder.rglob("*"))
            if p.is_file() and p.relative_to(folder).as_posix() != "model.yaml"}


# The export check's measurements (its faces come from the workspace's crops, which an experiment with
# other preprocess settings changes): they describe the check, not the model, and do not decide reuse.
CHECK_MEASUREMENTS = ("onnx_check_faces", "onnx_max_abs_diff_probs", "onnx_max_abs_diff_age",
                      "onnx_max_abs_diff_age_std")
# Lineage that describes the packaging, not the model: the commit `make bento` ran at (any commit since the
# last package made another 84 MB copy of the same files). A reused copy keeps the commit it was packaged at.
PACKAGING_ONLY = ("package_git_commit",)


def _same_model(folder: Path, staged: Path) -> bool:
    """Whether ``folder`` holds ``staged``'s files (the checkpoint, its ONNX export, the detector files)
    and lineage, the export check's measurements (:data:`CHECK_MEASUREMENTS`) and the packaging commit
    (:data:`PACKAGING_ONLY`) aside."""
    def lineage(where: Path) -> dict[str, Any]:
        try:
            data = json.loads((where / LINEAGE_FILE).read_text())
        except (OSError, ValueError):
            return {"unreadable": str(where)}
        return ({k: v for k, v in data.items() if k not in CHECK_MEASUREMENTS + PACKAGING_ONLY}
                if isinstance(data, dict) else {})

    files = {k: v for k, v in _digests(staged).items() if k != LINEAGE_FILE}
    return ({k: v for k, v in _digests(folder).items() if k != LINEAGE_FILE} == files
            and lineage(folder) == lineage(staged))


def stored_copy(name: str, staged: Path, labels: dict[str, str]):
    """A model ``name`` in the BentoML store that holds ``staged``'s model (:func:`_same_model`) with the
    same labels, or None."""
    import bentoml

    folder = model_store_root() / name
    if not folder.is_dir():  # the first model of that name
        return None
    stored = []
    # Version by version, not bentoml.models.list(name): one folder it cannot read (a save interrupted before
    # the fix in save_new_model, or killed outright) made it raise, and every later package failed here
    for version in sorted(p.name for p in folder.iterdir() if p.is_dir()):
        try:
            stored.append(bentoml.models.get(f"{name}:{version}"))
        except bentoml.exceptions.BentoMLException as e:
            log.warning("BentoML model folder %s is not a whole model (%s): a save that was interrupted; delete it",
                        folder / version, e)
    for model in stored:
        if dict(model.info.labels) == labels and _same_model(Path(model.path), staged):
            return model
    return None


def _copy_detector(dest: Path, detector_dir: str | Path, needed: list[str], manifest: dict,
                   metadata: dict[str, Any]) -> None:
    """Copies the needed detector files with their manifest, and writes the lineage file."""
    (dest / DETECTOR_DIR).mkdir()
    for filename in needed:
        shutil.copyfile(Path(detector_dir) / filename, dest / DETECTOR_DIR / filename)
    kept = {**manifest, "files": {filename: manifest["files"][filename] for filename in needed}}
    (dest / DETECTOR_DIR / MANIFEST).write_text(json.dumps(kept, indent=2) + "\n")
    (dest / LINEAGE_FILE).write_text(json.dumps(metadata, indent=2) + "\n")


def workspace_val_faces(faces_dir: str | Path) -> str | None:
    """The fingerprint of the validation faces in the workspace's ``preprocess`` output (what ``train`` tags as
    ``train.val_faces_sha256`` when it trains on it), or None where there is no such output."""
    if not (Path(faces_dir) / FACES_MANIFEST).is_file():
        return None
    try:
        return validation_faces_tags(read_faces_manifest(faces_dir, "valid"))[VAL_FACES_TAG]
    except (OSError, KeyError, ValueError) as e:
        log.warning("could not read the workspace's validation faces (%s): the champion rule compares the runs "
                    "validated on the faces most runs were", e)
        return None


def workspace_data(faces_dir: str | Path) -> tuple[str | None, str | None]:
    """``(data_sha256, validation faces fingerprint)`` of the workspace's ``preprocess`` output: the data it was made
    from (its crop settings) and :func:`workspace_val_faces`, which the champion rule compares runs with; ``(None,
    None)`` where it has no crop settings, and no fingerprint where they name no data.

    Raises:
        OSError, ValueError, AttributeError: The crop settings cannot be read (AttributeError: JSON that is not an
            object).
    """
    if not (Path(faces_dir) / PREPROCESS_SETTINGS).is_file():  # packaging: check_workspace names the fix
        return None, None
    data_sha256 = read_crop_settings(faces_dir).get("data_sha256")
    return data_sha256, workspace_val_faces(faces_dir) if data_sha256 else None


def workspace_external_versions(record: str | Path | None) -> dict[str, str] | None:
    """``{set: fingerprint}`` from ``check_sources``' record of ``evaluate.external`` (``data/external.json``),
    or None where there is none (packaging outside the pipeline's workspace)."""
    if record is None or not Path(record).is_file():
        return None
    try:
        sets = json.loads(Path(record).read_text()).get("sets", [])
        return {str(s["name"]): str(s["sha256"]) for s in sets}
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        log.warning("ignored %s (%s): the external guard compares the versions most runs were scored on", record, e)
        return None


def package_champion(checkpoint: str | Path, detector_dir: str | Path, faces_dir: str | Path, *,
                     registered_model: str = REGISTERED_MODEL, bento_model: str = BENTO_MODEL,
                     external_record: str | Path | None = None,
                     workspace_card: str | Path | None = None) -> dict[str, Any]:
    """Selects the winner, registers it as ``registered_model@champion``, saves the BentoML model.

    The tracking store is :func:`faceage.tracking.tracking_uri` (``$MLFLOW_TRACKING_URI``);
    ``faces_dir`` (the ``preprocess`` output) provides the real crops the ONNX export is checked on;
    ``external_record`` (default: ``check_sources``' record beside ``faces_dir``, ``data/external.json``),
    where it exists, names the versions of the external sets whose MAEs the guard compares.

    The winner's own model card (:func:`champion_card`) ships in the BentoML model; where ``workspace_card``
    (``reports/model_card.md``) describes another run, a warning says so.

    Returns:
        The lineage metadata (a reused stored copy's own: :func:`save_bento_model`) plus ``bento_model``
        (the packaged model's tag), ``model_card_path`` (the card in the BentoML store, or None where none ships:
        :func:`champion_card` warns why) and ``winner`` (:class:`Winner` as a dict).
    """
    import mlflow

    from faceage.tracking import tracking_uri

    uri = tracking_uri()
    db = absent_store(uri)
    # Before check_reachable's write check: a store that is not there (a typo'd path, a share not mounted) was
    # reported as its first existing folder being read-only
    if db is not None:  # MLflow would create it: a typo'd path said "experiment not found"
        raise PackagingError(f"no MLflow store at {db} ({display_uri(uri)}): run the pipeline first (dvc repro), "
                             "or point MLFLOW_TRACKING_URI at the store its runs are in")
    # A server that does not answer: one line now, not MLflow's ~4 minutes of retries and then a traceback
    # that shows the URI, password and all.
    check_reachable(uri)
    mlflow.set_tracking_uri(uri)
    client = mlflow.MlflowClient()
    data_sha256, val_faces = workspace_data(faces_dir)
    # Logs the rule and every candidate's numbers; data unknown here: runs on different data are refused, not ranked.
    winner = select_winner(client, data_sha256=data_sha256, require_one_data=data_sha256 is None, val_faces=val_faces,
                           external_sha256=workspace_external_versions(
                               Path(faces_dir).parent / Path(EXTERNAL_FILE).name if external_record is None
                               else external_record))
    check_workspace(winner, detector_dir, faces_dir)
    log.info("winner: run %s (%s) %s=%.3f %s=%.3f", winner.run_id, winner.run_name, VAL_METRIC,
             winner.val_mae_years, TEST_METRIC, winner.test_mae_years)
    with tempfile.TemporaryDirectory(prefix="faceage-package-") as tmp:
        path = resolve_checkpoint(client, winner, checkpoint, tmp)
        version = register_champion(client, winner, registered_model)
        card = champion_card(client, winner, Path(tmp) / "card")
        metadata = model_metadata(winner, checkpoint_meta(path), version)
        model = publish_champion(client, version, lambda: save_bento_model(
            path, detector_dir, metadata, bento_model, faces_dir=faces_dir, card=card),
            registered_model=registered_model, bento_model=bento_model)
        metadata = dict(model.info.metadata)
    card_path = (str(Path(model.path) / metadata["model_card"]) if metadata.get("model_card") else None)
    note = workspace_card_note(workspace_card, winner, card_path is not None)
    if note:
        log.warning("%s", note)
    if card_path:
        log.info("model card of the packaged model (run %s): %s", winner.run_id, card_path)
    return {**metadata, "bento_model": str(model.tag), "model_card_path": card_path, "winner": asdict(winner)}
