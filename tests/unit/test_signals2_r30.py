"""Round 30 (2): Ctrl-C in a stage (run_stage), SIGTERM to the profile runner, an interrupted sweep, a failing
recipe row. Real subprocesses and real signals wherever the behaviour is about signals."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tests.unit.test_signals_r30 as signals_r30

REPO = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals and scripts as dvc")


def _default_sigint() -> None:  # a test run in the background (SIGINT ignored) would pass that on to the child
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _wait_for(path: Path, proc: subprocess.Popen, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert proc.poll() is None and time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.05)


# --- run_stage: Ctrl-C ---------------------------------------------------------------------------------------

def _stage(tmp_path: Path, body: str) -> subprocess.Popen:
    """A stage script run as round 30's SIGTERM tests run theirs, with Ctrl-C's default handling."""
    return signals_r30._stage(tmp_path, body, preexec_fn=_default_sigint)


def _int_after(proc: subprocess.Popen, line: str) -> tuple[int, str, str]:
    return signals_r30._signal_after(proc, line, signal.SIGINT)


SLEEP_THEN_CLEAN = ("def main():\n    try:\n        print('ready', flush=True)\n        time.sleep(30)\n"
                    "    finally:\n        print('cleaning up', flush=True)\n")


@pytest.mark.parametrize("sigterm", [False, True])
def test_ctrl_c_in_a_stage_runs_its_clean_up_prints_one_line_and_dies_by_sigint(tmp_path, sigterm):
    """Ctrl-C printed Python's KeyboardInterrupt traceback (the stage's frames, time.sleep)."""
    proc = _stage(tmp_path, SLEEP_THEN_CLEAN + f"run_stage(main, interrupt_on_sigterm={sigterm})\n")
    code, out, err = _int_after(proc, "ready")
    assert code == -signal.SIGINT, (code, err)
    assert out.count("cleaning up") == 1
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err
    [line] = [x for x in err.splitlines() if x.strip()]
    assert line.endswith(" ERROR faceage: interrupted (Ctrl-C)"), err


def test_ctrl_c_while_a_stage_logs_its_error_ends_it_by_sigint_without_a_traceback(tmp_path):
    proc = _stage(tmp_path, "def main():\n    raise FaceAgeError('SLOW bad input')\nrun_stage(main)\n")
    code, out, err = _int_after(proc, "logging")
    assert code == -signal.SIGINT, (code, err)
    assert "Traceback" not in err, err


def test_a_clean_up_that_fails_after_ctrl_c_logs_its_line_and_still_ends_by_sigint(tmp_path):
    """The clean-up's FaceAgeError after Ctrl-C was taken for the stage's own failure: exit 1, as if no Ctrl-C."""
    proc = _stage(tmp_path, signals_r30.clean_up_that_fails("run_stage(main)"))
    code, out, err = _int_after(proc, "ready")
    assert code == -signal.SIGINT, (code, err)
    assert "FaceAgeError: tracking server http://h:5000 does not answer" in err and "interrupted (Ctrl-C)" in err
    assert "Traceback" not in err, err


def test_a_shell_script_stops_after_a_stage_stopped_by_ctrl_c(tmp_path):
    """Why death by SIGINT and not exit 130: bash goes on with a script (or a loop) after a child that exited 130,
    taking it to have handled Ctrl-C itself, and stops only after one that died of SIGINT."""
    script = tmp_path / "stage.py"
    script.write_text(signals_r30.STAGE_HEAD + SLEEP_THEN_CLEAN + "run_stage(main)\n")
    after = tmp_path / "after"
    proc = subprocess.Popen(["bash", "-c", f"{sys.executable} {script}; echo next > {after}"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            env={**os.environ, "PYTHONPATH": str(REPO)}, preexec_fn=_default_sigint)
    try:
        assert proc.stdout.readline().strip() == "ready"
        os.killpg(proc.pid, signal.SIGINT)  # what the terminal does on Ctrl-C
        proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not after.exists() and proc.returncode in (130, -signal.SIGINT)


def test_run_stage_in_process_puts_back_pythons_ctrl_c(tmp_path):
    from faceage.logs import run_stage

    run_stage(lambda: None)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- the profile runner: SIGTERM --------------------------------------------------------------------------------

FAKE_DVC = """#!{python}
import signal, subprocess, sys, time
from pathlib import Path
here = Path({here!r})
def on_term(signum, frame):  # real dvc has no handler: SIGTERM kills it outright; recorded here
    (here / "dvc-got-sigterm").write_text("x")
    sys.exit(143)
signal.signal(signal.SIGTERM, on_term)
stage = subprocess.Popen([sys.executable, "-c", {stage!r}])
signal.signal(signal.SIGINT, signal.SIG_IGN)  # as dvc.stage.run does while a stage runs
code = stage.wait()
time.sleep(0.5)  # its clean-up: refs, locks
(here / "dvc-cleaned").write_text(str(code))
sys.exit(255 if code else 0)
"""
FAKE_STAGE = """import sys, time
from pathlib import Path
here = Path({here!r})
try:
    (here / "stage-up").write_text("x")
    time.sleep(30)
except KeyboardInterrupt:
    (here / "stage-got-ctrl-c").write_text("x")
    sys.exit(130)
"""


def _runner(tmp_path: Path, bin_dir: Path) -> tuple[subprocess.Popen, Path]:
    return signals_r30._runner(tmp_path, bin_dir, preexec_fn=_default_sigint)


def _kill_session(proc: subprocess.Popen) -> None:
    """Whatever is left of the runner's session (a fake dvc it left running)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _script(path: Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def test_sigterm_to_the_profile_runner_stops_dvc_and_its_stage_waits_and_ends_by_sigterm(tmp_path):
    """SIGTERM killed the runner at once: `dvc exp run` and its stage ran on with nobody waiting (then their locks)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "dvc", FAKE_DVC.format(python=sys.executable, here=str(tmp_path),
                                             stage=FAKE_STAGE.format(here=str(tmp_path))))
    proc, out = _runner(tmp_path, bin_dir)
    try:
        _wait_for(tmp_path / "stage-up", proc)
        time.sleep(0.3)  # dvc has set SIGINT ignored
        proc.send_signal(signal.SIGTERM)  # to the runner alone, as kill, timeout and supervisors do
        code = proc.wait(timeout=30)
        cleaned_when_runner_ended = (tmp_path / "dvc-cleaned").exists()
    finally:
        _kill_session(proc)
    text = out.read_text()
    assert code == -signal.SIGTERM, text
    assert cleaned_when_runner_ended, text
    assert (tmp_path / "stage-got-ctrl-c").exists() and not (tmp_path / "dvc-got-sigterm").exists(), text
    assert "Traceback" not in text and "stopped by SIGTERM; the `dvc exp run` it had started has stopped" in text, text


def test_sigterm_before_dvc_started_says_nothing_ran_and_ends_by_sigterm(tmp_path):
    bin_dir, asked, dvc_ran = tmp_path / "bin", tmp_path / "git-asked", tmp_path / "dvc-ran"
    bin_dir.mkdir()
    _script(bin_dir / "git", f"#!/bin/sh\necho up > {asked}\nsleep 30 & wait $!\n")  # a slow `git show HEAD:...`
    _script(bin_dir / "dvc", f"#!/bin/sh\necho ran > {dvc_ran}\n")
    proc, out = _runner(tmp_path, bin_dir)
    try:
        _wait_for(asked, proc)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=30)
    finally:
        _kill_session(proc)
    text = out.read_text()
    assert code == -signal.SIGTERM, text
    assert "stopped by SIGTERM before `dvc exp run` started: nothing ran" in text and "Traceback" not in text, text
    assert not dvc_ran.exists()


def test_run_profile_puts_back_the_sigterm_handler(tmp_path, monkeypatch):
    import faceage.experiment as experiment

    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _script(bin_dir / "dvc", "#!/bin/sh\nexit 0\n")
    monkeypatch.setenv("PATH", os.pathsep.join([str(bin_dir), str(Path(sys.executable).parent), os.environ["PATH"]]))
    before = signal.getsignal(signal.SIGTERM)
    experiment.run_profile(["train.epochs=1"], root=tmp_path)
    assert signal.getsignal(signal.SIGTERM) == before
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --- the sweep --------------------------------------------------------------------------------------------------


@pytest.fixture
def sweep_repo(tmp_path, monkeypatch):
    """A repo root with params.yaml and .dvc/, the sweep's runs faked as `dvc exp run -S` would leave them."""
    import faceage.sweep as sweep

    (tmp_path / ".dvc").mkdir()
    shutil.copy(REPO / "params.yaml", tmp_path / "params.yaml")
    (tmp_path / "params.yaml").write_text((tmp_path / "params.yaml").read_text() + "# an uncommitted edit\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sweep, "setup_logging", lambda: None)  # keep caplog's handler
    monkeypatch.setattr(sweep, "unknown_runs", lambda runs: [])
    monkeypatch.setattr(sweep, "read_run_file", lambda path: {"run_id": "run-" + Path("last").read_text()})
    monkeypatch.setattr(sweep, "collect", lambda runs: [])
    monkeypatch.setattr(sweep, "write_report", lambda *a: None)
    return tmp_path


def _fake_profile(stop_at: str | None = None, signum: int = signal.SIGINT):
    from dvc.utils.hydra import apply_overrides

    from faceage.experiment import ProfileInterrupted

    def run_profile(overrides):
        apply_overrides(Path("params.yaml"), [o for o in overrides if not o.startswith("fetch_data.source")])
        backbone = overrides[0].partition("=")[2]
        if backbone == stop_at:
            raise ProfileInterrupted(dvc_started=True, params_changed=True, signum=signum)
        Path("last").write_text(backbone)

    return run_profile


def test_an_interrupted_sweep_says_how_to_finish_it_without_a_traceback(sweep_repo, monkeypatch, caplog):
    """Ctrl-C during a sweep's run ended in ProfileInterrupted's traceback: no word of the runs kept or what to
    rerun; the rerun it names sweeps the rest, and the report has every backbone."""
    import faceage.sweep as sweep

    monkeypatch.setattr(sweep, "run_profile", _fake_profile(stop_at="resnet18"))
    argv = ["--profile", "cpu", "--backbones", "dlib_face", "resnet18", "resnet34"]
    with caplog.at_level(logging.ERROR, logger="faceage"):
        try:
            code = sweep.main(argv)
        except KeyboardInterrupt:
            pytest.fail("the interruption escaped sweep.main (a traceback)")
    assert code == 130
    assert "sweep interrupted (Ctrl-C) at resnet18" in caplog.text
    assert "python -m faceage.sweep --profile cpu --backbones resnet18 resnet34" in caplog.text, caplog.text
    assert list(json.loads((sweep_repo / sweep.RUNS).read_text())) == ["dlib_face"]
    monkeypatch.setattr(sweep, "run_profile", _fake_profile())
    reported = []
    monkeypatch.setattr(sweep, "collect", lambda runs: reported.append(sorted(runs)) or [])
    assert sweep.main(["--profile", "cpu", "--backbones", "resnet18", "resnet34"]) == 0
    assert reported == [["dlib_face", "resnet18", "resnet34"]]


def test_a_sweep_stopped_by_sigterm_ends_by_sigterm(sweep_repo, monkeypatch, caplog):
    import faceage.sweep as sweep

    class Died(Exception):
        pass

    def die(signum, message):
        logging.getLogger("faceage").error("%s", message)
        raise Died(signum)

    monkeypatch.setattr(sweep, "die_of_signal", die)
    monkeypatch.setattr(sweep, "run_profile", _fake_profile(stop_at="dlib_face", signum=signal.SIGTERM))
    with caplog.at_level(logging.ERROR, logger="faceage"), pytest.raises(Died) as e:
        sweep.main(["--profile", "cpu", "--backbones", "dlib_face"])
    assert e.value.args == (signal.SIGTERM,) and "sweep stopped by SIGTERM at dlib_face" in caplog.text


@pytest.mark.parametrize("stop_at", [None, "resnet18"])
def test_the_sweep_leaves_params_yaml_as_it_found_it(sweep_repo, monkeypatch, stop_at):
    """Each `dvc exp run -S` leaves its values in params.yaml: after the sweep a `dvc repro` trained the last
    backbone's profile, and an uncommitted edit of params.yaml was gone."""
    import faceage.sweep as sweep

    before = (sweep_repo / "params.yaml").read_bytes()
    monkeypatch.setattr(sweep, "run_profile", _fake_profile(stop_at=stop_at))
    sweep.main(["--profile", "cpu", "--backbones", "dlib_face", "resnet18"])
    assert (sweep_repo / "params.yaml").read_bytes() == before


# --- the recipe -------------------------------------------------------------------------------------------------


def test_a_failing_recipe_row_is_marked_and_the_other_rows_are_reported(tmp_path, monkeypatch):
    """One variant that failed (diverged, out of memory) ended the recipe with a traceback and no report."""
    import faceage.recipe as recipe
    import faceage.tracking
    from faceage.config import load_params
    from faceage.training import TrainingDivergedError

    monkeypatch.setattr(recipe, "setup_logging", lambda: None)
    monkeypatch.setattr(recipe, "committed_base", lambda root=".", *, user: load_params(REPO / "params.yaml"))
    monkeypatch.setattr(faceage.tracking, "setup_mlflow", lambda: None)
    monkeypatch.setattr(recipe, "_descriptors", lambda embeddings, *a: embeddings)
    monkeypatch.setattr(recipe, "_tta_rows", lambda *a: [])

    def run(name, *args, **kwargs):
        if name == "epochs=60":
            raise TrainingDivergedError("train loss is nan at epoch 3")
        mae = 5.0 if name == "default" else 5.5
        return {"variant": name, "val_mae": mae, "test_mae": mae, "coverage_1std": 0.7, "coverage_2std": 0.95,
                "run_id": "0123456789", "model": "m.pt", "train_s": 1.0, "external_mae": float("nan")}

    monkeypatch.setattr(recipe, "_run", run)
    out = tmp_path / "recipe.md"
    with pytest.raises(SystemExit, match="1 recipe row"):
        recipe.main(["--out", str(out), "--data", str(tmp_path)])
    text = out.read_text()
    assert "| epochs=60 (failed: TrainingDivergedError: train loss is nan at epoch 3) | - | - | - |" in text, text
    assert "| label_sigma=4 | 5.50 | 5.50 | +0.50 |" in text
