"""Packaging the champion: pick the best MLflow run, register it, save it as a BentoML model.

Input: the MLflow tracking store (experiment ``face-age``; see :mod:`faceage.tracking`), a
checkpoint file and the detector folder (``train`` and ``fetch_detector`` outputs).
Outputs:

- the run's logged model ``model`` registered as ``face-age`` with the alias ``champion``
  (an existing version of the same logged model is reused, not duplicated);
- the BentoML model ``face_age`` in the BentoML store (``$BENTOML_HOME``)::

      model.pt              the checkpoint (self-describing, see faceage.model)
      detector/             the dlib detector file the checkpoint was trained with (plus the
                            face-encoder files of a dlib_face checkpoint) + manifest.json
      faceage.json          lineage: MLflow run, registry version, validation and test MAE,
                            data sha256, git commits (also the BentoML model's metadata)

The winner is the finished run with test metrics (``test_mae_years``) and the lowest
``best_val_mae``; ties go to the newest run. Its checkpoint is the given file when that file
records the same run id, else a ``model.pt`` artifact of the run; anything else is refused,
so a bento can never carry weights from a run other than the one registered.
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from faceage.detector import MANIFEST, RECOGNITION_FILE, SHAPE5_FILE, read_manifest
from faceage.download import file_digest
from faceage.errors import FaceAgeError
from faceage.chips import DLIB_AGE
from faceage.face_encoder import FACE_ENCODER
from faceage.predict import CHECKPOINT_FILE, DETECTOR_DIR, check_detector_file
from faceage.tracking import EXPERIMENT, git_commit

log = logging.getLogger(__name__)

REGISTERED_MODEL = "face-age"
CHAMPION_ALIAS = "champion"
BENTO_MODEL = "face_age"
LINEAGE_FILE = "faceage.json"
VAL_METRIC = "best_val_mae"
TEST_METRIC = "test_mae_years"
LOGGED_MODEL_NAME = "model"
ENCODER_FILES = (SHAPE5_FILE, RECOGNITION_FILE)  # what faceage.face_encoder loads


class PackagingError(FaceAgeError, RuntimeError):
    """No run qualifies, or the winner's model or checkpoint cannot be found."""


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


def select_winner(client, experiment: str = EXPERIMENT) -> Winner:
    """The finished run with test metrics and the lowest validation MAE (ties: the newest).

    Args:
        client: An ``mlflow.MlflowClient``.
        experiment: Experiment name.

    Raises:
        PackagingError: The experiment does not exist, or no finished run has both metrics.
    """
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise PackagingError(f"MLflow experiment {experiment!r} not found in {client.tracking_uri}: "
                             "run the pipeline (dvc repro) first")
    runs, token = [], None
    while True:
        page = client.search_runs([exp.experiment_id], filter_string="attributes.status = 'FINISHED'",
                                  max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            break
    candidates = [r for r in runs if VAL_METRIC in r.data.metrics and TEST_METRIC in r.data.metrics]
    log.info("%d finished runs in experiment %r, %d with %s and %s", len(runs), experiment, len(candidates),
             VAL_METRIC, TEST_METRIC)
    if not candidates:
        raise PackagingError(f"no finished run of experiment {experiment!r} has both {VAL_METRIC} and "
                             f"{TEST_METRIC}: run the train and evaluate stages first")
    best = min(candidates, key=lambda r: (r.data.metrics[VAL_METRIC], -r.info.start_time))
    tags = best.data.tags
    return Winner(run_id=best.info.run_id, run_name=best.info.run_name or "",
                  val_mae_years=float(best.data.metrics[VAL_METRIC]),
                  test_mae_years=float(best.data.metrics[TEST_METRIC]), start_time_ms=int(best.info.start_time),
                  data_sha256=tags.get("data_sha256"), git_commit=tags.get("git_commit"))


def register_champion(client, winner: Winner, name: str = REGISTERED_MODEL, alias: str = CHAMPION_ALIAS):
    """Registers the winner's logged model ``model`` under ``name`` and points ``alias`` at it.

    A registry version that already holds this logged model is reused.

    Returns:
        The ``ModelVersion``.

    Raises:
        PackagingError: The run has no logged model named ``model``.
    """
    import mlflow

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
    existing = [v for v in client.search_model_versions(f"name = '{name}'") if v.source == source]
    if existing:
        version = max(existing, key=lambda v: int(v.version))
        log.info("%s version %s already holds %s (run %s)", name, version.version, source, winner.run_id)
    else:
        version = mlflow.register_model(source, name, tags={"val_mae_years": str(winner.val_mae_years),
                                                            "test_mae_years": str(winner.test_mae_years)})
        log.info("registered %s as %s version %s", source, name, version.version)
    client.set_registered_model_alias(name, alias, str(version.version))
    log.info("alias %s@%s -> version %s", name, alias, version.version)
    return version


def checkpoint_meta(path: str | Path) -> dict[str, Any]:
    """A checkpoint's settings and lineage, without its weights (``{}`` if it is not a dict)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
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
    local_run = checkpoint_meta(checkpoint).get("mlflow_run_id") if checkpoint.is_file() else None
    if local_run == winner.run_id:
        return checkpoint
    artifact = _find_artifact(client, winner.run_id, CHECKPOINT_FILE)
    if artifact is not None:
        path = Path(client.download_artifacts(winner.run_id, artifact, str(workdir)))
        if checkpoint_meta(path).get("mlflow_run_id") == winner.run_id:
            log.info("using checkpoint artifact %s of run %s", artifact, winner.run_id)
            return path
    where = f"{checkpoint} belongs to run {local_run}" if checkpoint.is_file() else f"{checkpoint} does not exist"
    raise PackagingError(
        f"the best run {winner.run_id} ({winner.run_name}, {VAL_METRIC}={winner.val_mae_years:.3f}) has no "
        f"checkpoint here: {where}, and the run logged no {CHECKPOINT_FILE} artifact. Restore that "
        f"experiment's outputs (dvc exp apply <exp>; dvc checkout) or pass its checkpoint"
    )


def _find_artifact(client, run_id: str, filename: str, path: str | None = None, depth: int = 0) -> str | None:
    for info in client.list_artifacts(run_id, path):
        if info.is_dir and depth < 2:
            found = _find_artifact(client, run_id, filename, info.path, depth + 1)
            if found:
                return found
        elif Path(info.path).name == filename:
            return info.path
    return None


def model_metadata(winner: Winner, meta: dict[str, Any], version) -> dict[str, Any]:
    """The lineage stored with the BentoML model (flat, JSON-ready)."""
    crop = meta["crop"]
    return {
        "mlflow_experiment": EXPERIMENT,
        "mlflow_run_id": winner.run_id,
        "mlflow_run_name": winner.run_name,
        "registered_model": str(version.name),
        "registered_version": str(version.version),
        "registered_alias": CHAMPION_ALIAS,
        "val_mae_years": winner.val_mae_years,
        "test_mae_years": winner.test_mae_years,
        "data_sha256": meta.get("data_sha256") or winner.data_sha256,
        "data_source": crop.get("data_source"),
        "git_commit": meta.get("git_commit") or winner.git_commit,
        "package_git_commit": git_commit(),
        "backbone": meta["backbone"],
        "image_size": int(meta.get("image_size") or 0),
        "temperature": float(meta.get("temperature", 1.0)),
        "best_epoch": int(meta.get("best_epoch", 0)),
        "detector": crop["detector"],
        "detector_upsample": int(crop["upsample"]),
        "detector_sha256": crop["detector_sha256"],
        "crop_margin": float(crop["margin"]),
        "crop_size_px": int(crop["size"]),
    }


def save_bento_model(checkpoint: str | Path, detector_dir: str | Path, metadata: dict[str, Any],
                     name: str = BENTO_MODEL):
    """Writes the checkpoint, its detector file and the lineage into a new BentoML model.

    Returns:
        The new ``bentoml.Model``.

    Raises:
        faceage.predict.PredictorError: The detector file differs from the checkpoint's.
    """
    import bentoml

    meta = checkpoint_meta(checkpoint)
    crop = meta["crop"]
    check_detector_file(detector_dir, crop["detector_file"], crop["detector_sha256"])
    manifest = read_manifest(detector_dir)
    # Only the files inference needs travel: the detector, plus the face encoder's landmark and
    # recognition models for a dlib_face checkpoint (~30 MB the others never read), or the landmark
    # model alone for a dlib_age checkpoint (its chips are aligned with it).
    extra = {FACE_ENCODER: ENCODER_FILES, DLIB_AGE: (SHAPE5_FILE,)}.get(meta["backbone"], ())
    needed = [crop["detector_file"], *extra]
    encoder = meta.get("encoder", {})  # what a dlib_face / dlib_age checkpoint was trained with
    trained = {RECOGNITION_FILE: encoder.get("encoder_sha256"), SHAPE5_FILE: encoder.get("shape_predictor_sha256")}
    for filename in needed[1:]:
        got = file_digest(Path(detector_dir) / filename)
        want = trained[filename] or manifest["files"].get(filename)
        if got != want:
            raise PackagingError(f"{Path(detector_dir) / filename} has sha256 {got}, but the checkpoint was "
                                 f"trained with {want}")
    labels = {"alias": CHAMPION_ALIAS, "backbone": str(metadata["backbone"]),
              "registered_version": str(metadata["registered_version"])}
    with bentoml.models.create(name, labels=labels, metadata=metadata) as model:
        dest = Path(model.path)
        shutil.copyfile(checkpoint, dest / CHECKPOINT_FILE)
        (dest / DETECTOR_DIR).mkdir()
        for filename in needed:
            shutil.copyfile(Path(detector_dir) / filename, dest / DETECTOR_DIR / filename)
        kept = {**manifest, "files": {filename: manifest["files"][filename] for filename in needed}}
        (dest / DETECTOR_DIR / MANIFEST).write_text(json.dumps(kept, indent=2) + "\n")
        (dest / LINEAGE_FILE).write_text(json.dumps(metadata, indent=2) + "\n")
    log.info("saved BentoML model %s (run %s, val MAE %.3f, test MAE %.3f)", model.tag, metadata["mlflow_run_id"],
             metadata["val_mae_years"], metadata["test_mae_years"])
    return model


def package_champion(checkpoint: str | Path, detector_dir: str | Path, *, registered_model: str = REGISTERED_MODEL,
                     bento_model: str = BENTO_MODEL) -> dict[str, Any]:
    """Selects the winner, registers it as ``registered_model@champion``, saves the BentoML model.

    The tracking store is :func:`faceage.tracking.tracking_uri` (``$MLFLOW_TRACKING_URI``).

    Returns:
        The lineage metadata plus ``bento_model`` (the new model's tag).
    """
    import mlflow

    from faceage.tracking import tracking_uri

    mlflow.set_tracking_uri(tracking_uri())
    client = mlflow.MlflowClient()
    winner = select_winner(client)
    log.info("winner: run %s (%s) %s=%.3f %s=%.3f", winner.run_id, winner.run_name, VAL_METRIC,
             winner.val_mae_years, TEST_METRIC, winner.test_mae_years)
    with tempfile.TemporaryDirectory(prefix="faceage-package-") as tmp:
        path = resolve_checkpoint(client, winner, checkpoint, tmp)
        version = register_champion(client, winner, registered_model)
        metadata = model_metadata(winner, checkpoint_meta(path), version)
        model = save_bento_model(path, detector_dir, metadata, bento_model)
    return {**metadata, "bento_model": str(model.tag), "winner": asdict(winner)}
