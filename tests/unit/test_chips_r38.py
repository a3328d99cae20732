"""Round 38: signals held back while a worker of faceage.chips' pool starts are all raised once it has started.

Real processes, real signals: a stage script started as dvc.yaml starts one, with run_stage's SIGTERM handling.
"""

from __future__ import annotations

import sys

import pytest

from tests.unit.test_chips_r37 import POOL_STAGE, assert_stopped_by_sigterm

# A stage as stages/*.py runs one (run_stage with interrupt_on_sigterm), whose pool starts 2 workers. While the first
# worker is spawned, a Ctrl-C comes (SIGINT, blocked there: it waits), and just as the start unblocks it, a SIGTERM
# (`timeout`, `kill`): both are held back by the start, in that order, every time.
CTRL_C_THEN_SIGTERM_AT_LAUNCH = """
import multiprocessing.util, os, signal, time
from faceage.logs import run_stage, setup_logging

_spawn, _mask = multiprocessing.util.spawnv_passfds, signal.pthread_sigmask
_sent = []

def spawn_then_ctrl_c(path, args, passfds):
    pid = _spawn(path, args, passfds)
    if not _sent and any("spawn_main" in str(a) for a in args):  # a worker, not the resource tracker
        _sent.append(pid)
        os.kill(os.getpid(), signal.SIGINT)  # blocked while the worker starts: pending
    return pid

def unmask_then_sigterm(how, mask):
    previous = _mask(how, mask)  # the pending Ctrl-C is taken here, by the start's holding handler
    if how == signal.SIG_SETMASK and len(_sent) == 1:
        _sent.append("term")
        os.kill(os.getpid(), signal.SIGTERM)  # before the start puts the handlers back: held too
    return previous

multiprocessing.util.spawnv_passfds = spawn_then_ctrl_c
signal.pthread_sigmask = unmask_then_sigterm

""" + POOL_STAGE


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_sigterm_held_after_a_ctrl_c_during_a_worker_start_is_not_dropped(tmp_path):
    """The start raised the held signals one after the other, but the first one's handler raised (Ctrl-C's
    KeyboardInterrupt) and the loop stopped there: the SIGTERM was dropped, its handler never ran, and the stage died
    of SIGINT ("interrupted (Ctrl-C)", 130) although it had been told to terminate. Now every held signal's handler
    runs, in the order they came (the later one raised while the earlier one's exception propagates, as two
    signals arriving outside a start would), and the stage dies of the SIGTERM."""
    assert_stopped_by_sigterm(tmp_path, CTRL_C_THEN_SIGTERM_AT_LAUNCH)


# A SIGTERM comes while the first worker is spawned (held by the start), and a Ctrl-C just after the start has put
# SIGINT's own handler back, while it puts back SIGTERM's: the Ctrl-C raises there, in the start's clean-up.
SIGTERM_THEN_CTRL_C_AT_PUT_BACK = """
import multiprocessing.util, os, signal, time
from faceage.logs import run_stage, setup_logging

_spawn, _signal = multiprocessing.util.spawnv_passfds, signal.signal
_sent = []

def spawn_then_sigterm(path, args, passfds):
    pid = _spawn(path, args, passfds)
    if not _sent and any("spawn_main" in str(a) for a in args):  # a worker, not the resource tracker
        _sent.append(pid)
        os.kill(os.getpid(), signal.SIGTERM)  # held by the start
    return pid

def swap_then_ctrl_c(signum, handler):
    previous = _signal(signum, handler)
    if signum == signal.SIGINT and handler is signal.default_int_handler and len(_sent) == 1:
        _sent.append("int")
        os.kill(os.getpid(), signal.SIGINT)  # its own handler is back: KeyboardInterrupt, here
    return previous

multiprocessing.util.spawnv_passfds = spawn_then_sigterm
signal.signal = swap_then_ctrl_c

""" + POOL_STAGE


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")
def test_a_held_sigterm_is_raised_also_when_a_ctrl_c_interrupts_putting_the_handlers_back(tmp_path):
    """The held signals were raised after the handlers were put back, in the same ``finally``: a Ctrl-C that raised
    while they were put back skipped that, and the SIGTERM held during the start was dropped (the stage died of the
    Ctrl-C). Now the held signals are raised also then."""
    assert_stopped_by_sigterm(tmp_path, SIGTERM_THEN_CTRL_C_AT_PUT_BACK)
