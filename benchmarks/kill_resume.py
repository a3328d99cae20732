"""Kill -9 the ``train`` stage at random points, rerun ``dvc repro``, compare with an uninterrupted run.

Builds a throw-away git + DVC project (this checkout's ``faceage/``, ``stages/``, ``dvc.yaml``,
``params.yaml``) on a subset of the shared sample, runs ``dvc repro`` once uninterrupted (the
reference), then for each kill: ``dvc repro -f -s train`` (train from scratch), SIGKILL to the
``stages/train.py`` process after a random delay drawn uniformly over the reference's train
lifetime (so it lands in any epoch, while the state or checkpoint is written, or while MLflow
logs), then ``dvc repro -f -s train`` (a plain one checks the reference's outputs out of DVC's cache: the same
params were run), which must exit 0, resume from the killed run's state and reproduce the reference exactly:

- ``reports/eval/metrics.json``, ``reports/train/history.csv`` and ``models/model.pt``'s weights
  byte for byte; ``reports/train/metrics.json`` except ``train_time_s`` (wall clock; the per-epoch
  timing lives in MLflow, not in ``history.csv``, for this reason);
- the MLflow run the resumed train reports: FINISHED, each epoch's ``val_mae`` logged once.

A kill that lands after the train process has already exited is reported as missed.
Prints one line per kill and a JSON summary; exits 1 on any mismatch. A reference run that fails, or in which
no train process is seen, ends in one line (after dvc's output) and exit 1. Each ``dvc repro`` runs in its own
process group, stopped whole (dvc and the stage it runs) when the script stops early: Ctrl-C, SIGTERM,
an error or the time limit; the temporary project is removed then too.

    python benchmarks/kill_resume.py                      # CI size: 64/16/16 faces, batch 16
    python benchmarks/kill_resume.py --train 1500 --valid 300 --test 300 --batch-size 64   # the full sample
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _paths import REPO, shared_datasets  # noqa: E402
from _server import exit_on_sigterm  # noqa: E402

from faceage.atomic import write_text  # noqa: E402
from faceage.experiment import tool_env  # noqa: E402

TRAIN_CMD = "stages/train.py"
STATE = "models/train_state.pt"
# Files the resumed run must reproduce byte for byte (DVC outputs of train and evaluate).
EXACT = ("reports/eval/metrics.json", "reports/train/history.csv")


class BenchError(Exception):
    """The benchmark cannot go on; ``main`` prints it as one line and exits 1."""


@dataclass
class Repro:
    rc: int
    output: str
    train_s: float | None  # lifetime of the train process, None if it never started
    killed_at: float | None  # seconds after the train process started; None if not killed
    state_at: float | None = None  # seconds after it started when the state file first appeared
    state_last: float | None = None  # ... when it was last seen (it is deleted once the run is FINISHED)


def copy_pipeline(root: Path) -> None:
    """This checkout's pipeline (library, stage scripts, dvc.yaml, params.yaml) into ``root``."""
    for item in ("faceage", "stages", "dvc.yaml", "params.yaml"):
        src = REPO / item
        if src.is_dir():
            shutil.copytree(src, root / item, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copyfile(src, root / item)


def make_project(root: Path, source: Path, *, epochs: int, image_size: int, batch_size: int, seed: int) -> dict:
    """A git + DVC repo with this checkout's pipeline reading ``source``; returns the env to run it with."""
    copy_pipeline(root)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["fetch_data"].update(source=str(source), md5="")
    params["preprocess"].update(size=image_size, workers=1)
    params["evaluate"]["external"] = []  # cross-dataset sets do not bear on resuming; the temp repo has no ../shared
    params["train"].update(pretrained="none", epochs=epochs, image_size=image_size, batch_size=batch_size,
                           seed=seed, device="cpu", nproc_per_node=1)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    (root / ".gitignore").write_text("/models/train_state.pt*\n/mlflow.db\n/mlruns\n")
    env = tool_env({k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})
    env["DVC_NO_ANALYTICS"] = "1"
    for cmd in (["git", "init", "-q"], ["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q",
                                         "--allow-empty", "-m", "init"], ["dvc", "init", "-q"]):
        subprocess.run(cmd, cwd=root, env=env, check=True, capture_output=True)
    return env


def _train_pid(root: Path) -> int | None:
    """The pid of a python process running ``stages/train.py`` in ``root`` (not its shell)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            if len(argv) > 1 and Path(argv[0].decode()).name.startswith("python") \
                    and argv[1].decode().endswith(TRAIN_CMD) and Path(os.readlink(entry / "cwd")) == root:
                return int(entry.name)
        except (OSError, ValueError, IndexError):
            continue  # exited meanwhile, or not ours to read
    return None


def repro(root: Path, env: dict, args: list[str], kill_after: float | None = None, timeout: float = 3600,
          after_state: bool = False) -> Repro:
    """Runs ``dvc repro ARGS``; with ``kill_after``, SIGKILLs the train process that many seconds after it starts
    (``after_state``: that many seconds after its state file first appears, so the kill leaves a run to resume
    whatever this run's speed). Also notes when the state file first and last exists."""
    with tempfile.TemporaryFile("w+") as out:
        # Its own session: the group (dvc, the stage's shell and python) is stopped whole below; killing dvc
        # alone left the stage running in a project about to be deleted.
        proc = subprocess.Popen(["dvc", "repro", *args], cwd=root, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            pid, started, ended, killed_at, state_at, state_last = None, None, None, None, None, None
            deadline = time.time() + timeout
            while proc.poll() is None and time.time() < deadline:
                now = time.time()
                if pid is None:
                    pid = _train_pid(root)
                    started = now if pid is not None else None
                elif ended is None and not Path(f"/proc/{pid}").exists():
                    ended = now
                elif ended is None:
                    if (root / STATE).exists():
                        state_at = now - started if state_at is None else state_at
                        state_last = now - started
                    due = None
                    if kill_after is not None and killed_at is None and (state_at is not None or not after_state):
                        due = kill_after + (state_at if after_state else 0.0)
                    if due is not None and now - started >= due:
                        os.kill(pid, signal.SIGKILL)
                        killed_at = now - started
                time.sleep(0.02)
        finally:
            if proc.poll() is None:  # the time limit, or an exception (Ctrl-C, SIGTERM's SystemExit)
                _stop_group(proc)
        rc = proc.wait()
        if pid is not None and ended is None:
            ended = time.time()
        out.seek(0)
        return Repro(rc, out.read(), ended - started if started else None, killed_at, state_at, state_last)


def _stop_group(proc: subprocess.Popen, timeout_s: float = 10) -> None:
    """SIGTERM to ``proc``'s process group (dvc and the stage it runs), SIGKILL after ``timeout_s``."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            continue
        try:  # dvc exited: what it started may not have
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return


def state_run(root: Path) -> tuple[str, int] | None:
    """The MLflow run id and epoch the train state file left behind holds, or None without one."""
    import torch

    path = root / STATE
    if not path.exists():
        return None
    state = torch.load(path, map_location="cpu", weights_only=True)
    return state.get("run_id", ""), int(state.get("epoch", 0))


def snapshot(root: Path) -> dict:
    """What an uninterrupted and a resumed run must share."""
    import torch

    snap = {name: (root / name).read_bytes() for name in EXACT}
    state = torch.load(root / "models" / "model.pt", map_location="cpu", weights_only=True)["state_dict"]
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    snap["models/model.pt weights"] = h.hexdigest()
    train_metrics = json.loads((root / "reports" / "train" / "metrics.json").read_text())
    train_metrics.pop("train_time_s")
    snap["reports/train/metrics.json (all but train_time_s)"] = train_metrics
    return snap


def mlflow_check(root: Path) -> list[str]:
    """Problems with the run the last train reported: not FINISHED, or an epoch logged twice or missing."""
    from mlflow import MlflowClient

    run_id = json.loads((root / "models" / "run.json").read_text())["run_id"]
    client = MlflowClient(tracking_uri=f"sqlite:///{root / 'mlflow.db'}")
    problems = []
    status = client.get_run(run_id).info.status
    if status != "FINISHED":
        problems.append(f"run {run_id} is {status}")
    with open(root / "reports" / "train" / "history.csv") as f:
        epochs = [int(r["epoch"]) for r in csv.DictReader(f)]
    steps = sorted(m.step for m in client.get_metric_history(run_id, "val_mae"))
    if steps != epochs:
        problems.append(f"val_mae logged at steps {steps}, expected {epochs}")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sample", type=Path,
                        default=shared_datasets() / "appa-real-sample")
    parser.add_argument("--train", type=int, default=64, help="training faces taken from the sample")
    parser.add_argument("--valid", type=int, default=16)
    parser.add_argument("--test", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--kills", type=int, default=3)
    parser.add_argument("--seed", type=int, default=None, help="for the kill times (default: random)")
    parser.add_argument("--workdir", type=Path, default=None,
                        help="where the project is built, kept afterwards; it must be absent or empty (a folder "
                             "from an earlier run is refused, not cleared: remove it or name another) "
                             "(default: a temp dir, removed)")
    parser.add_argument("--json", type=Path, default=None, help="also write the summary here")
    args = parser.parse_args(argv)
    if args.workdir is not None and args.workdir.exists() and (
            not args.workdir.is_dir() or any(args.workdir.iterdir())):
        parser.error(f"--workdir {args.workdir} is not an empty folder (an earlier run's?): remove it or name "
                     "another; it is never cleared for you")
    # One message each, before anything is built (a missing --sample ended in a FileNotFoundError traceback,
    # --train 0 in the reference run's "lists no images" RuntimeError after dvc had started).
    for name in ("train", "valid", "test", "epochs", "image_size", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.kills < 0:
        parser.error(f"--kills must be >= 0, got {args.kills}")
    if not (args.sample / "gt_avg_train.csv").is_file():
        parser.error(f"--sample {args.sample} is not a sample in the APPA-REAL layout (no gt_avg_train.csv); the "
                     "default is the shared sample (set FACEAGE_SHARED_DATASETS, or ../shared/datasets)")
    exit_on_sigterm()  # so the dvc repro running then is stopped and the temporary project removed
    try:
        summary = run(args)
    except BenchError as e:
        print(f"kill_resume: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    if args.json:
        write_text(args.json, json.dumps(summary, indent=2) + "\n")  # never half a file
    return 0 if summary["ok"] else 1


def run(args: argparse.Namespace) -> dict:
    """The whole experiment; returns ``{"ok", "kills": [...], ...}``."""
    sys.path.insert(0, str(REPO))
    from tests.conftest import make_subset

    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    rng = random.Random(seed)
    # Absolute: the project's params.yaml names the subset under it, and DVC reads a relative
    # fetch_data.source from the project's root (a relative --workdir failed the reference run).
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill-resume-")).resolve()
    try:
        source = make_subset(args.sample, work / "source", {"train": args.train, "valid": args.valid,
                                                           "test": args.test})
        root = (work / "project").resolve()
        root.mkdir(parents=True)
        env = make_project(root, source, epochs=args.epochs, image_size=args.image_size,
                           batch_size=args.batch_size, seed=0)
        ref_run = repro(root, env, [])
        if ref_run.rc != 0:
            print(ref_run.output[-4000:], file=sys.stderr)
            raise BenchError(f"the reference `dvc repro` failed (exit {ref_run.rc}), its output is above: nothing "
                             "to compare kills with")
        if ref_run.train_s is None:  # the kill times are drawn over its lifetime
            raise BenchError("the reference `dvc repro` never showed a running stages/train.py (the train stage "
                             "cached, or over before the first poll): no lifetime to draw kill times over")
        reference, problems = snapshot(root), mlflow_check(root)
        summary = {"seed": seed, "reference_train_s": round(ref_run.train_s, 1),
                   "reference_state_s": None if ref_run.state_at is None else
                   [round(ref_run.state_at, 1), round(ref_run.state_last, 1)],
                   "kills": [],
                   "reference_mlflow_problems": problems}
        print(f"reference: train ran {ref_run.train_s:.1f} s; kill seed {seed}", flush=True)
        # The state file exists from training's start (after imports and the data load) until the run is
        # FINISHED. The first kill lands in the first half of that window, timed from the state's appearance in
        # its own run (runs differ in speed), so a run always has something to resume. The rest are drawn over
        # the whole lifetime (start-up, every epoch, the checkpoint and MLflow's last writes).
        window = (ref_run.state_last - ref_run.state_at) if ref_run.state_at is not None else 0.0
        for i in range(args.kills):
            first = i == 0 and window > 0
            delay = rng.uniform(0.0, 0.5) * window if first else rng.uniform(0.02, 0.98) * ref_run.train_s
            killed = repro(root, env, ["-f", "-s", "train"], kill_after=delay, after_state=first)
            left = state_run(root)
            t0 = time.time()
            # Train run again, as after a kill with params not run before: since round 38 every output of train is
            # in DVC's cache, and a plain `dvc repro` checked the reference's out of it (the same params) in a
            # second instead of resuming from the killed run's state
            rerun = repro(root, env, ["-f", "-s", "train"])
            got = snapshot(root) if rerun.rc == 0 else {}
            mismatched = [k for k in reference if got.get(k) != reference[k]]
            problems = mlflow_check(root) if rerun.rc == 0 else ["rerun failed"]
            # Resumed, not retrained: the rerun finished the killed run's MLflow run, from the epoch it reached
            # (a rerun from scratch gives the same bytes: training is deterministic).
            finished = json.loads((root / "models" / "run.json").read_text())["run_id"] if rerun.rc == 0 else None
            resumed = None if not left or not left[0] else (
                finished == left[0] and (left[1] == 0 or f"resuming from epoch {left[1]} " in rerun.output))
            result = {"kill": i + 1, "planned_s": round(delay, 2), "planned_after_state": first,
                      "killed_at_s": None if killed.killed_at is None else round(killed.killed_at, 2),
                      "missed": killed.killed_at is None, "state_left": left is not None,
                      "state_epoch": left[1] if left else None, "resumed": resumed, "rerun_rc": rerun.rc,
                      "rerun_s": round(time.time() - t0, 1), "mismatched": mismatched, "mlflow_problems": problems}
            if rerun.rc != 0:
                result["rerun_output"] = rerun.output[-3000:]
            summary["kills"].append(result)
            planned = f"{delay:.1f} s after its state's first write" if first else f"{delay:.1f} s"
            print(f"kill {i + 1}: at {result['killed_at_s']} s of the train process (planned {planned}), "
                  f"state left: {left is not None} (epoch {result['state_epoch']}), resumed: {resumed}; "
                  f"dvc repro rc {rerun.rc}; mismatched: {mismatched or 'none'}; "
                  f"MLflow: {problems or 'ok'}", flush=True)
        summary["ok"] = not summary["reference_mlflow_problems"] and all(
            k["rerun_rc"] == 0 and not k["mismatched"] and not k["mlflow_problems"] and k["resumed"] is not False
            for k in summary["kills"])
        return summary
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
