"""Round 37, second read: faceage.chips' worker start under a signal that lands while its handlers are being swapped.

Real signals in a process of its own (its handlers and profiler are its own).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import REPO

# A stage's SIGTERM handler raises (run_stage(main, interrupt_on_sigterm=True)). The SIGTERM is sent the moment
# _WorkerProcess.start has swapped SIGINT's handler for its holding one and looks at SIGTERM's: the window between
# the two swaps (a profile function times it, at the call of signal.getsignal, Python code; os.kill runs the handler
# at once).
SIGTERM_BETWEEN_THE_SWAPS = """
import os, signal, sys
from faceage.chips import _WorkerProcess

class Stopped(Exception):
    pass

def on_sigterm(signum, frame):
    raise Stopped

signal.signal(signal.SIGTERM, on_sigterm)
sent = []

def profile(frame, event, arg):
    if (event == "call" and frame.f_code is signal.getsignal.__code__ and not sent
            and frame.f_back.f_code is _WorkerProcess.start.__code__
            and signal.getsignal(signal.SIGINT) is not signal.default_int_handler):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGTERM)

worker = _WorkerProcess(target=os.getpid)
sys.setprofile(profile)
try:
    worker.start()
except Stopped:
    print("stopped", flush=True)
finally:
    sys.setprofile(None)
if worker.pid is not None:
    worker.join()
print("sent" if sent else "not sent", flush=True)
print("sigint", "default" if signal.getsignal(signal.SIGINT) is signal.default_int_handler else "swapped", flush=True)
print("sigterm", "restored" if signal.getsignal(signal.SIGTERM) is on_sigterm else "swapped", flush=True)
try:  # a later Ctrl-C
    os.kill(os.getpid(), signal.SIGINT)
    print("ctrl-c dropped", flush=True)
except KeyboardInterrupt:
    print("ctrl-c raised", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_between_the_handler_swaps_leaves_ctrl_c_working():
    """The handlers were swapped before the try whose finally puts them back: a SIGTERM raised between SIGINT's swap
    and SIGTERM's left SIGINT's handler the one that only records the signal, so every later Ctrl-C of the process
    (a stage stopping its workers, a sweep) was silently dropped."""
    done = subprocess.run([sys.executable, "-c", SIGTERM_BETWEEN_THE_SWAPS], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "sent" in lines, done.stdout  # the SIGTERM did land in the window
    assert "stopped" in lines, done.stdout  # raised by the stage's handler: it came before SIGTERM was held
    assert "sigint default" in lines and "sigterm restored" in lines and "ctrl-c raised" in lines, done.stdout


# The same, where the handlers are put back: a Ctrl-C lands once SIGINT's own handler is back, before SIGTERM's is
# (signal.signal runs the handlers of pending signals before it swaps: the Ctrl-C is raised there).
CTRL_C_BETWEEN_THE_RESTORES = """
import os, signal, sys
from faceage.chips import _WorkerProcess

def on_sigterm(signum, frame):
    raise SystemExit("SIGTERM")

signal.signal(signal.SIGTERM, on_sigterm)
sent = []

def profile(frame, event, arg):
    if (event == "call" and frame.f_code is signal.signal.__code__ and not sent
            and frame.f_back.f_globals.get("__name__") == "faceage.chips"
            and frame.f_locals["signalnum"] == signal.SIGTERM and frame.f_locals["handler"] is on_sigterm
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        sent.append(True)
        os.kill(os.getpid(), signal.SIGINT)

worker = _WorkerProcess(target=os.getpid)
sys.setprofile(profile)
try:
    worker.start()
except KeyboardInterrupt:
    print("interrupted", flush=True)
finally:
    sys.setprofile(None)
if worker.pid is not None:
    worker.join()
    print("worker", worker.exitcode, flush=True)
print("sent" if sent else "not sent", flush=True)
print("sigint", "default" if signal.getsignal(signal.SIGINT) is signal.default_int_handler else "swapped", flush=True)
print("sigterm", "restored" if signal.getsignal(signal.SIGTERM) is on_sigterm else "swapped", flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_ctrl_c_between_the_handler_restores_leaves_sigterm_working():
    """The handlers went back one after the other: a Ctrl-C raised by SIGINT's handler, back first, stopped the loop
    before SIGTERM's, and every later SIGTERM of the process (a `timeout`, a `kill`) was dropped. The Ctrl-C is still
    raised, after every handler is back."""
    done = subprocess.run([sys.executable, "-c", CTRL_C_BETWEEN_THE_RESTORES], cwd=REPO, capture_output=True,
                          text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)})
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert "sent" in lines and "interrupted" in lines and "worker 0" in lines, done.stdout
    assert "sigint default" in lines and "sigterm restored" in lines, done.stdout


def test_a_card_that_cannot_be_put_in_place_leaves_the_previous_predictions_too(tiny_run, tmp_path):
    """evaluate puts its staged outputs in place one by one: the model card (a path of its own, outside the output
    folder) went after the predictions and plots, so a card that could not be written (a folder there) left the new
    predictions beside the previous metrics.json. The card goes first now: the output folder is the previous one."""
    from tests.unit.test_evaluation_r37b import PREVIOUS_METRICS, PREVIOUS_PREDICTIONS, _evaluate, _leftovers

    out = tmp_path / "eval"
    out.mkdir()
    (out / "metrics.json").write_text(PREVIOUS_METRICS)
    (out / "predictions.csv").write_text(PREVIOUS_PREDICTIONS)
    card = tmp_path / "reports" / "model_card.md"
    card.mkdir(parents=True)  # a folder where the card goes
    with pytest.raises(IsADirectoryError):
        _evaluate(tiny_run, out, card)
    assert (out / "metrics.json").read_text() == PREVIOUS_METRICS
    assert (out / "predictions.csv").read_text() == PREVIOUS_PREDICTIONS
    assert not (out / "pred_vs_true.png").exists()
    assert _leftovers(out) == [] and _leftovers(card.parent) == []
