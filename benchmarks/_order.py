"""The order two measured sides run in, shared by the side-by-side benchmarks."""

from __future__ import annotations

from typing import Callable


def alternating(first: Callable[[], float], second: Callable[[], float], rounds: int) -> tuple[list[float], list[float]]:
    """``rounds`` measurements of ``first()`` and of ``second()`` (each returns seconds), one of each per round.

    The one that goes first alternates from round to round: the side that runs second finds the machine
    (caches, the allocator, a server just stopped) as the other left it, and with a fixed order that always
    fell to the same side.
    """
    times: tuple[list[float], list[float]] = ([], [])
    sides = (first, second)
    for r in range(rounds):
        for side in ((0, 1) if r % 2 == 0 else (1, 0)):
            times[side].append(sides[side]())
    return times
