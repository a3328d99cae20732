"""A named profile run as a DVC experiment on top of the committed ``params.yaml``.

``dvc exp run -S key=value`` writes its overrides into the workspace's ``params.yaml`` and leaves
them there, so the next ``dvc exp run -S ...`` starts from them: ``make quick-finetune`` (12
epochs, lr 0.003, ...) followed by ``make quick`` ran the fine-tuning recipe again, and the sweep
trained every backbone after the first CNN with the CNN profile's ``pretrained=none, image_size=64``.
A profile is meant as *the committed params plus its overrides*: :func:`run_profile` adds a
``-S`` putting back the committed value of every key the workspace changed and the profile does
not set, names each in the log, and runs ``dvc exp run``.

Usage (the Makefile's profiles and :mod:`faceage.sweep`)::

    python -m faceage.experiment -S train.backbone=dlib_age -S fetch_data.source=/abs/sample [-n NAME]
"""

from __future__ import annotations

import argparse
import json
import logging
import subprocess
from pathlib import Path
from typing import Any

from faceage.config import parse_params
from faceage.logs import setup_logging

log = logging.getLogger("faceage.experiment")  # also when run as __main__ (python -m)

PARAMS = "params.yaml"


def flatten(params: dict[str, Any]) -> dict[str, Any]:
    """``{"train": {"lr": 1e-3}}`` -> ``{"train.lr": 1e-3}`` (the keys ``-S`` names)."""
    return {f"{section}.{key}": value for section, keys in params.items() if isinstance(keys, dict)
            for key, value in keys.items()}


def override_value(value: Any) -> str:
    """``value`` written for ``-S key=...`` (DVC parses it with Hydra's override grammar): strings
    quoted, so a URL or a path is never read as anything else."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(override_value(v) for v in value) + "]"
    return json.dumps(str(value))  # "..." with \" and \\ escaped, as Hydra reads quoted strings


def committed_params(root: str | Path = ".") -> dict[str, Any] | None:
    """``params.yaml`` as the last commit holds it; None outside git or before the first commit."""
    done = subprocess.run(["git", "show", f"HEAD:./{PARAMS}"], cwd=root, capture_output=True, text=True)
    return parse_params(done.stdout) if done.returncode == 0 else None


def leftover_resets(overrides: list[str], workspace: dict[str, Any], committed: dict[str, Any]) -> list[str]:
    """The ``key=value`` overrides that put back the committed value of each key the workspace
    changed (an earlier ``dvc exp run -S``, or an edit) and ``overrides`` does not set."""
    chosen = {o.split("=", 1)[0] for o in overrides}
    now, base = flatten(workspace), flatten(committed)
    return [f"{key}={override_value(value)}" for key, value in base.items()
            if key not in chosen and key in now and now[key] != value]


def run_profile(overrides: list[str], *, name: str | None = None, root: str | Path = ".") -> None:
    """Runs ``dvc exp run`` with ``overrides`` on top of the committed ``params.yaml``.

    Args:
        overrides: ``key=value`` strings, as given to ``dvc exp run -S``.
        name: The experiment's name (``-n``), or None for DVC's.
        root: The repo root (where ``params.yaml`` is).

    Raises:
        subprocess.CalledProcessError: ``dvc exp run`` failed (its output is shown).
    """
    workspace = parse_params((Path(root) / PARAMS).read_text(encoding="utf-8")) or {}
    committed = committed_params(root)
    resets = leftover_resets(overrides, workspace, committed) if committed is not None else []
    if committed is None:
        log.warning("%s has no committed version: the profile runs on top of the workspace's", PARAMS)
    now = flatten(workspace)
    for reset in resets:
        key, value = reset.split("=", 1)
        log.warning("%s: %s is %r in the workspace (left by an earlier `dvc exp run -S`, or edited); this "
                    "profile runs with the committed %s (commit params.yaml to make a value the base)",
                    PARAMS, key, now[key], value)
    cmd = ["dvc", "exp", "run", *(["-n", name] if name else []),
           *[arg for o in [*overrides, *resets] for arg in ("-S", o)]]
    log.info("%s", " ".join(cmd))
    subprocess.run(cmd, cwd=root, check=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="a param override, as for dvc exp run -S (repeatable)")
    parser.add_argument("-n", "--name", help="the experiment's name")
    args = parser.parse_args(argv)
    setup_logging()
    try:
        run_profile(args.overrides, name=args.name)
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
