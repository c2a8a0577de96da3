"""A machine's cores, shared by its ranks: processor sharing on a SimPy clock.

On a cluster every rank has a core of its own, and a phase takes its CPU time.  On a
workstation with fewer cores than ranks (this one: 2 cores for 1 + S + R ranks, and other
users' jobs) a rank does not queue for a core: Linux's scheduler gives every runnable
entity an equal share of the cores, in slices of a few milliseconds, so over a phase
several slices long each proceeds at the same fraction of its speed alone.  This module
is that fair share's limit, processor sharing::

    rate = min(1, cores / (active + background))

``active`` counts the simulated ranks with CPU work in progress (a replica's compute or
copy, a shard's apply, the coordinator's evaluation); ``background`` the other runnable
processes on the machine (measured from a real run: :func:`.calibrate.from_run`).  Work
is CPU seconds, the phase's time alone on a free core; it ends once it has received
that much CPU.

Equal shares per rank, not per thread: this machine's kernel groups processes by session
(``/proc/sys/kernel/sched_autogroup_enabled`` = 1), and hydra starts every rank in a
session of its own (``/proc/PID/autogroup`` differs per rank), so the cores are shared
equally among ranks and other sessions, however many threads each runs.

Two cores, four jobs of 1 s CPU arriving together: each runs at rate 0.5, all end at
2 s (on four cores: at 1 s).  One core, a replica's 1 s compute and a shard's 0.5 s
apply arriving together::

    compute  |== rate 1/2 ==|==== rate 1 ====|  ends at 1.5 s
    apply    |== rate 1/2 ==|                   ends at 1.0 s
             0             1.0              1.5
"""

from __future__ import annotations

from dataclasses import dataclass

import simpy

TIE = 1e-12  # CPU seconds: jobs this close to done end together (float rounding)


@dataclass(frozen=True)
class Machine:
    """Where simulated ranks run.

    Attributes:
        cores: cores the ranks share, or None for a core per rank (a cluster: a phase
            takes its CPU time, whatever the other ranks do).
        background: other runnable processes sharing those cores (mean).
    """

    cores: int | None = None
    background: float = 0.0

    def __post_init__(self):
        if self.cores is not None and self.cores < 1:
            raise ValueError(f"a machine needs at least one core, not {self.cores}")
        if self.background < 0:
            raise ValueError(f"background load cannot be negative ({self.background})")


class Cores:
    """``cores`` cores shared equally by the work in progress and ``background`` jobs.

    ``yield from cores.work(seconds)`` in a SimPy process returns once ``seconds`` of
    CPU have been given to it.  Every arrival and departure changes everyone's rate, so
    each one charges the elapsed time to the jobs in progress and plans the next
    departure anew (an earlier plan is dropped by its generation number).

    ``urgent`` work (a short burst of a rank that sleeps between them) takes a core
    of its own at once, ahead of the others and the background, which share what is
    left.
    """

    def __init__(self, env: simpy.Environment, cores: int, background: float = 0.0):
        Machine(cores, background)  # the same checks
        self.env, self.cores, self.background = env, cores, background
        self.jobs: dict[simpy.Event, list] = {}  # [CPU seconds left, urgent, ...], by end
        self.since = env.now
        self.generation = 0

    def rates(self) -> tuple[float, float]:
        """``(urgent, normal)``: each job's speed, as a fraction of a free core's."""
        urgent = sum(1 for _, u in self.jobs.values() if u)
        normal = len(self.jobs) - urgent
        fast = min(1.0, self.cores / urgent) if urgent else 0.0
        left = self.cores - urgent * fast
        slow = min(1.0, left / (normal + self.background)) if normal and left > 0 else 0.0
        return fast, slow

    def work(self, seconds: float, urgent: bool = False, owner: tuple | None = None):
        """Run ``seconds`` of CPU work on the shared cores (a generator to yield from);
        ``owner``, the rank doing it, matters only to :class:`~.runqueues.RunQueues`."""
        if seconds <= 0:
            return
        self._charge()
        done = self.env.event()
        self.jobs[done] = self._job(seconds, urgent, owner)
        self._plan()
        yield done

    def _job(self, seconds: float, urgent: bool, owner: tuple | None) -> list:
        return [seconds, urgent]

    def _speeds(self) -> list[tuple[list, float]]:
        """Every job in progress with its speed now."""
        fast, slow = self.rates()
        return [(job, fast if job[1] else slow) for job in self.jobs.values()]

    def _charge(self) -> None:
        """Give every job in progress its share of the time since the last change."""
        elapsed = self.env.now - self.since
        for job, speed in self._speeds():
            job[0] -= elapsed * speed
        self.since = self.env.now

    def _plan(self) -> None:
        self.generation += 1
        waits = [job[0] / speed for job, speed in self._speeds() if speed > 0]
        if waits:
            generation = self.generation
            wake = self.env.timeout(max(min(waits), 0.0))
            wake.callbacks.append(lambda _: self._depart(generation))

    def _depart(self, generation: int) -> None:
        if generation != self.generation:
            return  # an arrival or departure since re-planned
        self._charge()
        for done, job in list(self.jobs.items()):
            if job[0] <= TIE:
                del self.jobs[done]
                done.succeed()
        self._plan()
