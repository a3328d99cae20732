"""Round 36: closing a detection pool whose worker died while it waited at the start barrier.

A real spawned pool with a real (HOG) locator, and round 33's hung-start hook (``test_serving_r33``): one worker of two
hangs loading its detector, so the other waits at the pool's start barrier for it; that one is then SIGKILLed there
(the OOM killer, a ``kill -9``). ``close()`` used to release the barrier's waiters with ``Barrier.abort()``, whose
multiprocessing ``Condition.notify_all`` waits for every sleeper to acknowledge its wake-up: the dead one never does,
and the server's shutdown hung for ever (the clean-clone run of round 35 hung in
``test_serving_r31``'s kill-as-it-closes test this way, by chance).
"""

from __future__ import annotations

import os
import signal
import threading
import time

import faceage.serving as serving
from faceage.serving import LocatorPool
from tests.unit.test_serving_r33 import HANG_ONE, _gone, _hung_pids, hang, locator

FIXTURES = (hang, locator)  # shared fixtures, used by name


def _waiting_at_barrier(pool: LocatorPool, timeout: float = 60.0) -> None:
    barrier = pool._workers.barrier
    deadline = time.monotonic() + timeout
    while barrier.n_waiting < 1:
        assert time.monotonic() < deadline, "the worker that did not hang never reached the start barrier"
        time.sleep(0.02)


def test_closing_a_pool_whose_worker_died_waiting_at_the_start_barrier_does_not_hang(locator, hang, monkeypatch):
    monkeypatch.setenv(HANG_ONE, "1")
    monkeypatch.setattr(serving, "START_TIMEOUT_S", 120.0)  # the deadline plays no part: close() comes long before

    pool = LocatorPool(locator, 2)
    (hung,) = _hung_pids(hang)
    _waiting_at_barrier(pool)
    (waiter,) = [p.pid for p in pool._workers.processes if p.pid != hung]
    os.kill(waiter, signal.SIGKILL)
    assert _gone(waiter)

    closing = threading.Thread(target=pool.close, args=(3.0,), daemon=True)
    began = time.monotonic()
    closing.start()
    closing.join(30.0)
    took = time.monotonic() - began
    assert not closing.is_alive(), "close() hung on the start barrier of a worker that died waiting at it"
    assert took < 10.0, f"close() took {took:.1f} s"
    assert _gone(hung), "the worker hung in its start was left running"
