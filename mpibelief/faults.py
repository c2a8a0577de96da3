"""Fault injection from the config's ``[faults]`` table, for tests and experiments.

Each rank builds one :class:`Injector`; a replica calls :meth:`Injector.after_step`
once per step.  What it can do (all times in seconds since the rank started training,
read through the run's clock):

- stop a replica: its training loop ends (``stop_mode = "exit"``: it stays alive and
  silent, as a replica whose machine lost its work would) or it stops answering for good
  (``"hang"``: it sleeps outside MPI);
- slow a rank by a factor: it sleeps ``(factor - 1)`` times its compute time (through
  the clock, so it runs slower without stealing a core); Sandblaster's own straggler
  option (``sandblaster.slow_replica``) is the same mechanism, passed in as ``slow``;
- kill a rank with SIGKILL, the way a machine dies: no handler, no goodbye.

``MPIBELIEF_INJECT_FAULT=RANK:STEP`` (an exception at a step) stays for the tests that
prove an exception anywhere ends the whole job.
"""

from __future__ import annotations

import os
import signal
import time


class ReplicaStoppedError(Exception):
    """Raised in a replica whose injected fault says: stop training now."""


class Injector:
    """The faults due on one rank (``replica``: its replica index, -1 for none).

    Args:
        slow: an extra slowdown factor for this rank (the larger one applies).
    """

    def __init__(self, faults, rank: int, replica: int, clock, slow: float = 1.0):
        self.faults, self.rank, self.replica, self.clock = faults, rank, replica, clock
        mine = faults.slow_factor if faults.slow_rank == rank else 1.0
        self.slow = max(mine, slow)
        self.start = clock.now()
        spec = os.environ.get("MPIBELIEF_INJECT_FAULT", "")
        target, _, step = spec.partition(":")
        self.raise_at = int(step or 0) if target.strip() == str(rank) else -1

    def after_step(self, step: int, compute_seconds: float) -> None:
        """Apply whatever fault is due after ``step`` steps (``compute_seconds``: its cost)."""
        f = self.faults
        if step == self.raise_at:
            raise RuntimeError(f"fault injected on rank {self.rank} at step {step}")
        if self.slow > 1:
            self.clock.sleep((self.slow - 1) * compute_seconds)
        elapsed = self.clock.now() - self.start
        if f.kill_rank == self.rank and elapsed >= f.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
        if 0 <= f.stop_replica == self.replica and elapsed >= f.stop_after:  # -1: none
            if f.stop_mode == "hang":
                while True:  # outside MPI for good, as a wedged process would be
                    time.sleep(3600)
            raise ReplicaStoppedError(
                f"replica {self.replica} stopped (injected) after {elapsed:.1f} s")
