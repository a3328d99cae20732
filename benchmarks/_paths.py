"""Where the benchmarks find their inputs, whatever the working directory: the repo root, the shared
datasets (``$FACEAGE_SHARED_DATASETS``, else ``../shared/datasets`` beside the repo, as the tests
resolve them), and the cached crops of an ``evaluate.external`` set made with the current crop settings."""

from __future__ import annotations

import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def shared_datasets() -> Path:
    """``$FACEAGE_SHARED_DATASETS``, else ``../shared/datasets`` beside the repo."""
    return Path(os.environ.get("FACEAGE_SHARED_DATASETS") or REPO.parent / "shared" / "datasets")


def external_set(name: str = "utk_external", repo: Path = REPO) -> Path:
    """The folder of ``evaluate.external`` set ``name`` (:func:`faceage.sources.resolve_external`: relative
    entries from the repo root), the one ``evaluate`` crops.

    Raises:
        SystemExit: The set is not in ``evaluate.external``, or an entry there is missing or not in the release
            layout (:class:`faceage.sources.ExternalSetError`'s message).
    """
    from faceage.config import load_params
    from faceage.sources import ExternalSetError, resolve_external

    try:  # (a missing folder, no ../shared, was an ExternalSetMissingError traceback)
        resolved = resolve_external(load_params(repo / "params.yaml").evaluate.external, repo)
    except ExternalSetError as e:
        raise SystemExit(str(e)) from None
    sets = {ext.name: ext for ext in resolved}
    if name not in sets:
        raise SystemExit(f"{name} is not in params.yaml's evaluate.external ({', '.join(sets) or 'empty'})")
    return sets[name].path


def current_external_faces(name: str = "utk_external", repo: Path = REPO) -> Path:
    """The cached crops of ``evaluate.external`` set ``name`` made with the workspace's current crop settings.

    The entry ``evaluate`` reads for a checkpoint trained on ``data/faces``: ``<repo>/.cache/external/
    <name>-<key>``, the key from :func:`faceage.external.cache_key` over the set's bytes, the crop
    settings of ``data/faces/preprocess.json`` and the shape predictor of ``models/detector``. Other
    entries (older settings, another detector) are never picked.

    Args:
        name: The set's name (:func:`faceage.sources.external_name` of its ``evaluate.external`` entry).
        repo: The workspace (``params.yaml``, ``data/faces``, ``models/detector``, ``.cache/external``).

    Raises:
        SystemExit: The set is not in ``evaluate.external``, or no entry matches the current settings.
    """
    from faceage.detector import SHAPE5_FILE, read_manifest
    from faceage.external import cache_key
    from faceage.preprocess import SETTINGS, read_crop_settings

    folder = external_set(name, repo)
    crop = read_crop_settings(repo / "data" / "faces")
    shape_sha256 = read_manifest(repo / "models" / "detector")["files"][SHAPE5_FILE]
    cache = repo / ".cache" / "external"
    entry = cache / f"{name}-{cache_key(folder, crop, shape_sha256)}"
    if not (entry / SETTINGS).is_file():
        others = sorted(p.name for p in cache.glob(f"{name}-*")) if cache.is_dir() else []
        raise SystemExit(f"no {name} crops made with the current crop settings (data/faces/{SETTINGS}): "
                         f"expected {entry}; other entries there: {', '.join(others) or 'none'} (made with other "
                         "settings or data). Run the pipeline's evaluate first (dvc repro)")
    return entry
