"""The simulated cluster: real Downpour replicas and shard states on a SimPy clock.

What is real and what is simulated::

    real        Replica phases (worker.py), the model's gradients on the real data,
                ShardState.consume (the update rule, versions, staleness counters),
                the Evaluator, the result file
    simulated   when each of those happens: compute, transfer and apply durations
                come from a :class:`Costs` calibrated on this machine
                (:mod:`mpibelief.simulate.calibrate`), so R replicas and S shards
                need neither R + S cores nor R + S processes

Timeline of one Downpour step of replica r (``n_fetch = n_push = 1``)::

    replica r   |-fetch-|------compute------|-put s0-|-put s1-|-fetch-|---compute ...
                ^ pull reads the shards     ^ gradient computed    (wait here while its
                  (versions) now              at the start          slot on a shard still
    shard s0                                          |--apply--|   holds its last push)
    shard s1                                                   |q|--apply--|

- fetch: the real pull reads the shards' current versions when the phase starts; it
  then lasts ``latency + bytes / bandwidth`` per shard (the client Gets the shards
  one after another, as ``ParameterClient.pull`` does).  A replica of P partitions:
  each partition its own range, the partitions in parallel (:mod:`.partitioned`).
- compute: the real forward and backward runs when the phase starts; it lasts
  ``batch * compute_per_sample`` (times a straggler's slowdown, if drawn; for P
  partitions the caller scales the cost, :func:`.partitioned.replica_costs`).
- push: per shard, the replica waits until its inbox slot there is free (the MPI
  server has one slot per client per shard: ``depth = 1``) and puts its piece
  (``latency + bytes / bandwidth``); then it publishes all pieces at once (as the real
  client does) and goes on.  Each piece then queues at its shard,
  a SimPy ``Resource`` of capacity 1: a shard applies one push at a time, in simulated
  arrival order, for ``params * apply_per_param`` seconds, and publishes the new version
  at the end of the apply (:meth:`ShardState.consume` runs then).  So staleness is
  what R real replicas would see, and a slow shard queues pushes and becomes the
  bottleneck (its busy fraction goes to 1).

Why SimPy rather than the hand-written heapq loop of ``tests/unit/test_replicas_in_memory``:
that loop suffices for replicas that only advance their own clock, but shards are
shared servers with FIFO queues, pushes wait for free inbox slots (an event another
process triggers), the warmstart releases replicas on an event, and the coordinator
samples on a timer.  SimPy's ``Resource``, ``Event`` and ``timeout`` say each of these
in one line, with deterministic ordering of simultaneous events (by time, then
creation order); a hand-written loop would re-implement them.  SimPy is pure Python,
small and maintained (4.x); it is the only dependency the simulator adds.

Cores (``machine``, :mod:`.cores`): by default every rank has a core of its own, and
every phase lasts its cost.  Given a machine with fewer cores (this workstation), every
phase above is CPU work on those cores, each with its run queue (:mod:`.runqueues`: a
replica keeps its core, a shard or the coordinator wakes on an idle core, else where it
last ran), shared fairly on each core by its ranks and its part of the machine's other
processes: a transfer is then a copy by the replica's core (MPI's shared memory), and
the coordinator, which evaluates the shards' parameters every
``eval_every`` seconds (after the last evaluation ends, as ``Coordinator.watch`` does),
takes its share too.  A shard's apply is urgent work (it takes a core at once): a shard
sleeps between pushes, and the scheduler runs such a short burst ahead of the ranks that
compute all the time.  So R + S + 1 ranks on 2 cores slow each other as real ones do.

Who reads a push first on a shared machine, the shard or its replica's next pull, is a
race that decides the staleness, and the staleness the accuracy (measured: one replica
whose pulls always came after its push was applied reached 3-9 points more test accuracy
mid-run than one whose pulls always came before).  Three things decide it, as measured
on the real ranks (timestamps in the client and the shard, 461 pushes, load 4):

- a replica pins the shards one after another, each after the Get before it (0.09 and
  0.21 ms after its push, medians: at full speed, not at a fair share's);
- an idle shard notices a push at its next poll (it sleeps up to 1 ms between polls:
  ``ShardServer.serve``'s backoff; the apply started 0.84 ms after the push, median);
  here a uniform delay in ``[0, SHARD_POLL)`` when the shard is idle;
- the replica is sometimes off its core right after an MPI call (MPICH calls
  ``sched_yield`` inside one-sided calls, about 20 times a step, and on a busy machine
  the core goes to another process for its time slice): the pin came after 1.35 ms
  (shard 0) or 2.17 ms (shard 1) in one pull in ten, late enough for the shard to
  apply first (9% and 19% of pulls: shard 1 is pinned after two such calls, shard 0
  after one).  Here the pull reads every shard when it starts, except that after the
  push, and after each pin, with chance ``costs.descheduled`` the replica reads the
  next shards only once they have applied its push; the chance is the share of such
  pulls in the calibration run (one replica, one shard: one call between push and pin,
  :func:`.calibrate.from_run`).  Two simpler models made too many such pulls (49% of a
  two-shard run's, where the real run had 15%): an exponential delay of the same mean
  (the real delay is nearly always short, now and then a whole time slice), and pins
  paced by the Gets at a fair share of a core (the Gets run at full speed).

Contention on network links is modelled only at the shards, and only with
``Costs.shard_links``: each shard's link then carries one transfer at a time per
direction (:mod:`.links`, shared with the simulated Sandblaster).  A replica's own
transfers are sequential anyway (with P partitions, each partition's).  Not modelled
(each would need a measurement to calibrate it first): the network's core (any two
links can talk at full speed) and the coordinator's own costs on a machine with a core
per rank (there it slows nobody).  A replica of P partitions computes the whole
model's gradient (the same math); only its step time and parallel transfers see P
(:mod:`.partitioned`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import simpy

from mpibelief.optim import all_finite
from mpibelief.ps.memory import MemoryServer
from mpibelief.ps.state import GRADIENT, REFUSED
from mpibelief.simulate.cores import Machine
from mpibelief.simulate.links import IN, OUT, ShardLinks
from mpibelief.simulate.partitioned import transfer_seconds
from mpibelief.simulate.runqueues import RunQueues

SHARD_POLL = 1e-3  # seconds an idle shard sleeps between polls (ShardServer.serve's backoff)


@dataclass(frozen=True)
class Costs:
    """What each phase costs in simulated seconds (see :mod:`.calibrate`).

    Attributes:
        compute_per_sample: forward and backward, seconds per training sample.
        apply_per_param: a shard's update, seconds per parameter applied.
        latency: seconds per message (each Get or Put to one shard).
        bandwidth: bytes per second of one transfer.
        spread: measured step times over their mean; when given, each compute
            phase is drawn from them (real steps vary, and a simulation in which every
            replica takes exactly the median keeps them in lockstep, which changes the
            staleness they see).
        first_step: a fresh replica's start-up: with a core per rank, seconds added
            to its first compute (a cluster's replicas pay it too); on a shared
            machine, CPU work before its first pull, drawn from ``spread``
            (``Cluster._start``).
        shard_links: each shard's network link carries one transfer at a time per
            direction (pulls out, pushes in), so replicas talking to one shard share
            its bandwidth, as on a cluster's network; False: transfers are
            independent (shared memory, where the validation runs).
        evaluation: the coordinator's CPU seconds per evaluation (costs a shared
            machine's cores only; see ``Cluster.machine``).
        descheduled: on a shared machine, the chance that a replica, after one of its
            MPI calls (a push's last flush, a pin), is off its core until the shards
            have applied its push (see ``Cluster``).

    Every cost is CPU time on a core of its own: on a shared machine
    (:class:`~mpibelief.simulate.cores.Machine`) a phase takes longer.
    """

    compute_per_sample: float
    apply_per_param: float
    latency: float
    bandwidth: float
    spread: tuple[float, ...] = ()
    first_step: float = 0.0
    shard_links: bool = False
    evaluation: float = 0.0
    descheduled: float = 0.0

    def transfer(self, nbytes: int) -> float:
        return self.latency + nbytes / self.bandwidth


@dataclass(frozen=True)
class Faults:
    """Stragglers and failures of simulated replicas.

    Attributes:
        straggler_fraction: chance that a compute phase is slowed.
        straggler_slowdown: its duration factor when it is.
        shard_slowdown: per shard, a factor on its apply time (a slow machine).
        fail_at: ``(replica, seconds)``: the replica stops at that simulated time
            (after the step in progress; its unpushed gradient is lost).
    """

    straggler_fraction: float = 0.0
    straggler_slowdown: float = 1.0
    shard_slowdown: tuple[float, ...] = ()
    fail_at: tuple[tuple[int, float], ...] = ()


@dataclass
class ShardTimes:
    """A simulated shard's time: busy applying, and the queue it kept."""

    busy_seconds: float = 0.0
    max_queue: int = 0


@dataclass
class Pending:
    """A push handed to the store and not yet put: the gradient (copied) and its tags."""

    grad: np.ndarray | None
    versions: np.ndarray | None
    samples: int


class SimStore:
    """A replica's parameter store in simulation: pulls read the shards now, pushes wait.

    It wraps a :class:`~mpibelief.ps.memory.MemoryClient` (same parts, same counters),
    but a push is only recorded here; the cluster puts it on the simulated network and
    the shards apply it when their turn comes.  ``pieces``: per partition, ``[(shard,
    parameters)]`` it moves (:func:`.partitioned.shard_pieces`; default one partition).
    """

    def __init__(self, client, pieces: list | None = None):
        self.client = client
        self.parts, self.stats, self.n_params = client.parts, client.stats, client.n_params
        self.pieces = pieces or [[(p.rank, p.local.stop - p.local.start) for p in self.parts]]
        self.pending: Pending | None = None

    def pull(self, out: np.ndarray) -> np.ndarray:
        return self.client.pull(out)

    def push(self, grad: np.ndarray, versions=None, samples: int = 0) -> None:
        finite = all_finite(grad) if self.client.check_finite else True
        self.pending = Pending(grad.copy() if finite else None, versions, samples)
        self.stats.pushes += 1
        self.stats.refused += int(not finite)
        self.stats.bytes_pushed += grad.nbytes if finite else 0

    def take(self) -> Pending | None:
        pending, self.pending = self.pending, None
        return pending


@dataclass
class Cluster:
    """R replicas (real :class:`~mpibelief.worker.Replica` objects over :class:`SimStore`)
    and the shard states of ``server``, on one SimPy environment.

    Args:
        server: the shard states; client 0 is the coordinator, client ``r + 1`` replica r.
        replicas: the replicas, built by the caller over ``stores``.
        stores: replica r's :class:`SimStore`.
        costs, faults: the machine.
        steps: each replica's steps (replica 0's include the warmstart).
        warmstart: steps replica 0 makes alone before the others start.
        seed: the straggler draws.
        machine: the cores the ranks run on (default: a core per rank).
        eval_every: seconds between the coordinator's evaluations (a shared machine's).
        start_up: on a shared machine, each replica's CPU seconds between its start
            and its first pull (``_start``; default ``costs.first_step``).
    """

    server: MemoryServer
    replicas: list
    stores: list[SimStore]
    costs: Costs
    steps: list[int]
    faults: Faults = field(default_factory=Faults)
    warmstart: int = 0
    seed: int = 0
    machine: Machine = field(default_factory=Machine)
    eval_every: float = 0.0
    start_up: tuple[float, ...] = ()

    def __post_init__(self):
        self.env = simpy.Environment()
        m = self.machine
        self.rng = np.random.default_rng(self.seed)
        self.cores = None if m.cores is None else RunQueues(
            self.env, m.cores, m.background, np.random.default_rng([self.seed, 1]))
        n = len(self.server.states)
        self.shards = [simpy.Resource(self.env, capacity=1) for _ in range(n)]
        self.times = [ShardTimes() for _ in range(n)]
        # Shard s's link, out (pulls) and in (pushes); None: no contention.
        self.links = ShardLinks(self.env, n, self.costs) if self.costs.shard_links else None
        # slot[r][s]: fires when replica r's last push to shard s has been applied.
        self.slots = [[None] * n for _ in self.replicas]
        self.warm_done = self.env.event()
        self.failed: set[int] = set()
        # A plain event, not AllOf: SimPy strips a nested condition's callbacks when an
        # AnyOf around it fires first (run's timeout would leave it never triggering).
        self.all_done = self.env.event()
        self.ended = 0
        for r in range(len(self.replicas)):
            self.env.process(self._replica(r))
        if self.cores is not None and self.costs.evaluation > 0 and self.eval_every > 0:
            self.env.process(self._coordinator())

    def run(self, seconds: float = float("inf")) -> None:
        """Advance simulated time by ``seconds``, or less if every replica ends first
        (a replica ends once its last push is applied)."""
        if self.all_done.triggered:
            return
        until = [self.all_done]
        if seconds < float("inf"):
            until.append(self.env.timeout(seconds))
        self.env.run(until=simpy.AnyOf(self.env, until))

    @property
    def finished(self) -> bool:
        return self.all_done.triggered

    def _busy(self, seconds: float, owner: tuple, urgent: bool = False):
        """``seconds`` of ``owner``'s CPU work (a rank: ``("replica", r)``, ``("shard",
        s)`` or ``("coordinator", 0)``): on its own core, or on the shared ones."""
        if self.cores is None:
            yield self.env.timeout(seconds)
        else:
            yield from self.cores.work(seconds, urgent, owner)

    def _coordinator(self):
        """Evaluations on the shared cores, ``eval_every`` apart, while replicas train."""
        while not self.all_done.triggered:
            yield from self._busy(self.costs.evaluation, ("coordinator", 0))
            yield self.env.timeout(self.eval_every)

    def _replica(self, r: int):
        yield from self._life(r)
        self.ended += 1
        if self.ended == len(self.replicas):
            self.all_done.succeed()

    def _life(self, r: int):
        rep, env = self.replicas[r], self.env
        fail = dict(self.faults.fail_at).get(r, float("inf"))
        if r > 0 and self.warmstart:
            yield self.warm_done
        if self.cores is not None:
            yield from self._start(r)
        while rep.stats.steps < self.steps[r]:
            if env.now >= fail:
                self.failed.add(r)
                return
            if r == 0 and rep.stats.steps == self.warmstart and not self.warm_done.triggered:
                self.warm_done.succeed()
            tick = env.now
            for name in rep.phases():
                yield from self._phase(r, name)
            rep.stats.train_seconds += env.now - tick
        if r == 0 and not self.warm_done.triggered:
            self.warm_done.succeed()
        rep.push()  # the last partial sum, as Replica.finish would
        yield from self._phase(r, "push")
        yield simpy.AllOf(self.env, [e for e in self.slots[r] if e is not None])
        rep.finish()

    def _phase(self, r: int, name: str):
        rep, c = self.replicas[r], self.costs
        tick = self.env.now
        if name == "fetch":
            for s, part in enumerate(self.stores[r].parts):
                if s and self.cores is not None:  # pinned after another MPI call
                    yield from self._descheduled(r, [part], s)
            if self.links is None:  # each partition's Gets follow one another
                yield from self._busy(transfer_seconds(c, self.stores[r].pieces), ("replica", r))
            else:  # per shard, through its link (partitions' Gets in turn here)
                for group in self.stores[r].pieces:
                    for shard, size in group:
                        yield from self._send(r, shard, OUT, 4 * size)
            rep.stats.comm_seconds += self.env.now - tick
        elif name == "compute":
            seconds = rep.batch * c.compute_per_sample
            if c.spread:
                seconds *= c.spread[self.rng.integers(len(c.spread))]
            if self.faults.straggler_fraction and \
                    self.rng.random() < self.faults.straggler_fraction:
                seconds *= self.faults.straggler_slowdown
            if rep.stats.steps == 1 and self.cores is None:  # its first step (_start)
                seconds += c.first_step
            yield from self._busy(seconds, ("replica", r))
            rep.stats.compute_seconds += self.env.now - tick
        elif name == "push":
            pending = self.stores[r].take()
            if pending is not None:
                yield from self._put(r, pending)
                if self.cores is not None:
                    yield from self._descheduled(r, self.stores[r].parts)
                rep.stats.comm_seconds += self.env.now - tick

    def _start(self, r: int):
        """On a shared machine: replica ``r``'s start-up, before its first pull.

        A real replica, once told to start, copies its shard of the data (R > 1) and
        only then pulls; on shared cores each takes its own time (the copy of R = 2:
        0.11-0.18 s CPU, 0.44-0.84 s wall, 0.05-0.15 s apart in three runs; the first
        step's kernels then cost 0.03 s more than a step, not ``first_step``'s 0.3 s
        of a fresh interpreter: the rank loaded them before), so a latecomer's first
        pull may read the leader's pushes.  Started at once and alike (``first_step``
        inside the first compute, after the pull), both replicas of R2_S1 computed their
        first two gradients from the initial parameters, and that decides a run: of
        nine real runs, the three with 1-2 pushes from version 1 ended at 62.5-62.8%
        test accuracy, the three with 4 at 58.7-60.2%; replaying a run's logged apply
        order in memory gives its accuracy, and a real run's first 100 pushes with a
        simulated run's others gave 63.2% (the simulated order alone 59.6%).  So the
        start-up is ``start_up[r]`` (the simulator's own copy of the shard, timed:
        :func:`.run.build`), drawn from the measured ``spread`` as the computes are;
        4 simulated R2_S1 runs then ended at 61.2% on average (real: 61.1% over 15),
        at 0.3 s 62.1%.  With a core per rank the first compute pays ``first_step``.
        """
        c = self.costs
        seconds = self.start_up[r] if self.start_up else c.first_step
        if seconds > 0:
            factor = c.spread[self.rng.integers(len(c.spread))] if c.spread else 1.0
            yield from self._busy(seconds * factor, ("replica", r))

    def _descheduled(self, r: int, parts, pin: int | None = None):
        """With chance ``costs.descheduled``, replica ``r`` is off its core until those
        shards have applied its last push (it yielded its core in an MPI call); then,
        given the position ``pin`` of a shard in its pull, it reads that shard anew."""
        if self.costs.descheduled and self.rng.random() < self.costs.descheduled:
            pending = [self.slots[r][p.rank] for p in parts]
            yield simpy.AllOf(self.env, [e for e in pending if e is not None])
            if pin is not None:  # its fetch read every shard at its start: this one now
                part, rep = parts[0], self.replicas[r]
                state, size = self.server.states[part.rank], part.local.stop - part.local.start
                rep.params[part.local] = state.current[part.offset:part.offset + size]
                rep.versions[pin] = state.version

    def _put(self, r: int, pending: Pending):
        """Put every shard's piece, then publish them all; the shards apply them later.

        As ``ParameterClient.push``: wait for this client's slot on each shard, Put the
        pieces one after another, flush, and only then publish every slot word, so the
        shards all see the push at the same moment, at its end.  A replica of several
        partitions puts each partition's pieces at once, and publishes after the slowest.
        """
        parts, pieces = self.stores[r].parts, self.stores[r].pieces
        nbytes = 4 if pending.grad is not None else 0
        if len(pieces) == 1:
            yield from self._put_pieces(r, pieces[0], nbytes)
        else:
            yield simpy.AllOf(self.env, [self.env.process(self._put_pieces(r, group, nbytes))
                                         for group in pieces])
        for s, part in enumerate(parts):
            version = -1 if pending.versions is None else int(pending.versions[s])
            piece = None if pending.grad is None else pending.grad[part.local]
            applied = self.env.event()
            self.slots[r][part.rank] = applied
            self.env.process(self._apply(part, piece, version, r + 1, pending.samples, applied))

    def _put_pieces(self, r: int, group: list, nbytes: int):
        """One partition's Puts: per shard, wait for the replica's slot, then put."""
        for shard, size in group:
            slot = self.slots[r][shard]
            if slot is not None and not slot.triggered:
                tick = self.env.now
                yield slot
                self.stores[r].stats.wait_seconds += self.env.now - tick
            yield from self._send(r, shard, IN, nbytes * size)

    def _send(self, r: int, shard: int, way: int, nbytes: int):
        """Replica ``r``'s ``nbytes`` to (``way`` IN) or from (OUT) ``shard``: ``latency + nbytes /
        bandwidth``.  With shard links the bytes wait for that direction of the shard's
        link (:mod:`.links`: FIFO turns; the latency does not hold the link)."""
        if self.links is None:
            yield from self._busy(self.costs.transfer(nbytes), ("replica", r))
            return
        yield from self.links.send(shard, way, nbytes)

    def _apply(self, part, piece, version: int, client: int, samples: int, applied):
        """One push at shard ``part.rank``: queue, apply for its cost, then publish."""
        s = part.rank
        shard, times = self.shards[s], self.times[s]
        if self.cores is not None and not shard.count and not shard.queue:
            yield self.env.timeout(self.rng.uniform(0.0, SHARD_POLL))  # its next poll
        with shard.request() as turn:
            times.max_queue = max(times.max_queue, len(shard.queue) + 1)
            yield turn
            factor = (self.faults.shard_slowdown[s]
                      if s < len(self.faults.shard_slowdown) else 1.0)
            seconds = 0.0 if piece is None else \
                piece.size * self.costs.apply_per_param * factor
            tick = self.env.now
            yield from self._busy(seconds, ("shard", s), urgent=True)  # wakes to apply: Cores
            times.busy_seconds += self.env.now - tick
            self.server.states[s].stats.busy_cpu_seconds += seconds
            kind = REFUSED if piece is None else GRADIENT
            self.server.states[s].consume(kind, piece, part.offset, version, client, samples)
        applied.succeed()

    def busy_fractions(self) -> list[float]:
        """Each shard's applying time over the simulated run time."""
        now = self.env.now
        return [t.busy_seconds / now if now else 0.0 for t in self.times]
