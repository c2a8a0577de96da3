"""A machine's cores with a run queue each: where Linux puts the ranks, not just how much.

:class:`~.cores.Cores` shares all cores equally among everything runnable, the limit of
a scheduler that migrates instantly.  Linux does not: each core has its own run queue,
and a rank stays on a core until the load balancer moves it.  That decides how two
replicas on this 2-core workstation interleave their pushes.  Measured on a real R2_S2
run (each rank's ``processor`` field in ``/proc/PID/stat`` sampled at 100 Hz): every
rank changed core 11-23 times in 9.5 s, about every half second; the replicas' pushes
alternated at a shard 84-89% of the time and one replica ran up to 11-39 steps ahead
of the other at some point of each run (four runs), so the staleness histogram was
{1: 14-22%, 2: 61-71%, 3: 11-17%}.  Shared equally (:class:`Cores`) the simulated
replicas locked in step (pushes alternating 96-98%, never more than 2 steps apart,
staleness 2 for 87-95% of pushes) and ended 1.3-1.8 points less accurate than real ones
in three validations: which version a push was computed from decides a run.

The model, per job's owner (a rank):

- a replica, always runnable, lives on core ``r % cores`` (the balancer spreads the
  busy ranks);
- a sleeper (a shard waking to apply, the coordinator evaluating) wakes onto an idle
  core if there is one (as ``select_idle_sibling`` does), else onto the core it last
  ran on; the balancer redraws that core at random every ``migrate`` seconds on average
  (exponential), so a shard may share one replica's core for a while, and that replica
  falls behind;
- on each core, urgent work (a shard's apply: see :class:`Cores`) takes the core at
  once, the rest share what is left with that core's part of the background.

With a free core (one replica and its shards on 2 cores) this is :class:`Cores`'s
sharing; only when every core is busy does the placement matter.
"""

from __future__ import annotations

import numpy as np
import simpy

from mpibelief.simulate.cores import Cores

MIGRATE = 0.5  # seconds a sleeper stays on a busy core, on average (measured: above)


class RunQueues(Cores):
    """``cores`` run queues; ``work(seconds, urgent, owner)`` runs on the owner's core.

    ``owner`` is ``("replica", r)``, ``("shard", s)`` or ``("coordinator", 0)``.
    """

    def __init__(self, env: simpy.Environment, cores: int, background: float = 0.0,
                 rng: np.random.Generator | None = None, migrate: float = MIGRATE):
        super().__init__(env, cores, background)
        self.rng = rng or np.random.default_rng(0)
        self.placed: dict[tuple, int] = {}  # a sleeper's last core
        if migrate > 0 and cores > 1:
            env.process(self._balance(migrate))

    def core(self, owner: tuple) -> int:
        """The core ``owner``'s new job runs on (see the module docstring)."""
        kind, index = owner
        if kind == "replica":
            return index % self.cores
        busy = {job[2] for job in self.jobs.values()}
        idle = [c for c in range(self.cores) if c not in busy]
        last = self.placed.get(owner)
        if last is None or (idle and last not in idle):
            last = int(self.rng.choice(idle)) if idle else int(self.rng.integers(self.cores))
        self.placed[owner] = last
        return last

    def _job(self, seconds: float, urgent: bool, owner: tuple | None) -> list:
        if owner is None:
            raise ValueError("work on run queues needs its owner (the rank doing it)")
        return [seconds, urgent, self.core(owner)]

    def _balance(self, migrate: float):
        """Every ``migrate`` s on average, each sleeper's last core is drawn anew."""
        while True:
            yield self.env.timeout(self.rng.exponential(migrate))
            for owner in self.placed:
                self.placed[owner] = int(self.rng.integers(self.cores))

    def core_rates(self) -> dict[int, tuple[float, float]]:
        """``{core: (urgent, normal)}``: each job's speed there, as a free core's fraction
        (per core, where :meth:`Cores.rates` is the whole machine's)."""
        out = {}
        for c in range(self.cores):
            here = [urgent for _, urgent, core in self.jobs.values() if core == c]
            urgent = sum(here)
            normal = len(here) - urgent
            fast = 1.0 / urgent if urgent else 0.0
            left = 1.0 - urgent * fast
            share = normal + self.background / self.cores
            out[c] = (fast, min(1.0, left / share) if normal and left > 0 else 0.0)
        return out

    def _speeds(self) -> list[tuple[list, float]]:
        rates = self.core_rates()
        return [(job, rates[job[2]][0 if job[1] else 1]) for job in self.jobs.values()]
