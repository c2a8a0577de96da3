"""Clocks: the one way role code reads or spends time.

Roles (replicas, shards, the coordinator) never call ``time`` themselves: they ask the
clock they were given.  On a real run that is :class:`WallClock`; the virtual-time
simulator drops in a clock whose seconds are simulated, so the same role code can be
driven without MPI and without waiting (see :class:`VirtualClock`).
"""

from __future__ import annotations

import time


class WallClock:
    """Real time: ``now`` is ``time.perf_counter``, ``sleep`` really sleeps."""

    simulated = False

    def now(self) -> float:
        """Seconds since an arbitrary origin (only differences mean anything)."""
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    def cpu(self) -> float:
        """This process's CPU seconds (``time.process_time``), for idle-cost figures."""
        return time.process_time()


class VirtualClock:
    """Simulated time that moves only when told: ``advance`` or ``sleep``.

    A driver (a test, the simulator) decides what each phase costs and advances the
    clock accordingly; code that times itself with ``now()`` then records simulated
    seconds.  ``cpu()`` follows ``now()``: a simulated rank is always busy.
    """

    simulated = True

    def __init__(self, start: float = 0.0):
        self.t = float(start)

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"time cannot go back ({seconds} s)")
        self.t += seconds

    def sleep(self, seconds: float) -> None:
        self.advance(max(seconds, 0.0))

    def cpu(self) -> float:
        return self.t
