"""The simulated Sandblaster: the real L-BFGS driver and dispatcher on a SimPy clock.

What is real and what is simulated::

    real        LBFGSDriver (two-loop recursion, Wolfe line search) over a ShardSpace;
                its vector commands (VectorCommands) on in-memory ShardStates; the
                Dispatcher's decisions (PortionBook: dynamic load balancing, backup
                copies, every portion summed exactly once); every portion's loss and
                gradient on the real rows of its batch with the real kernels (done
                once per evaluation, see below); the shards' counts of every push and
                their sums; the Evaluator and the result file
    simulated   when each of those happens: durations from a Costs calibrated on
                this machine (:mod:`mpibelief.simulate.calibrate`), so R replicas and
                S shards need neither R + S cores nor R + S processes

Timeline of one evaluation (the gradient over the batch at the published ``t``): R = 2,
S = 2, three portions, replica 1 a straggler whose portion a backup copy (p1') wins::

    coordinator |reset, publish t|   (decides as messages arrive)                    |samples|dots|
    replica 0   |>|pull|-p0-|>|put|put|..|>|-p2-|>|put|put|..|>|-p1'-|>|put|put|..|>|
    replica 1   |>|pull|--------------------p1, slow---------------------|>| drop
    shards 0, 1                       |+|                 |+|                  |+|

``|>|`` is a message to the coordinator and its answer (``ready``/``task``,
``done``/``push``, ``pushed``/``task``, ``done``/``drop``), each way ``latency + pickled
bytes / bandwidth``; the coordinator decides in no time (its own cost is not
calibrated).  ``..`` is the replica waiting until every shard has summed its push
(``|+|``, both shards at once).

- command: the driver's vector commands travel to every shard at once
  (:class:`~mpibelief.ps.vectors.ShardSpace` queues those that return nothing and sends
  them with the next that does); per shard ``transfer(command) + passes * slice *
  apply_per_param + transfer(answer)``, and the coordinator waits for the slowest.  A
  vector op is one pass over the shard's slice (``push_history`` two, ``samples`` none)
  at the calibrated apply rate: an apply is one pass too.
- pull: a replica's first portion of an evaluation first reads the parameters, shard
  after shard, ``transfer(4 * slice)`` each (once per evaluation, as
  :class:`~mpibelief.portion_worker.PortionWorker`); with ``Costs.shard_links`` each
  through the shard's outgoing link (:mod:`.links`, as Downpour's pulls), so the R
  replicas' pulls of an evaluation take at least ``R * 4 * slice / bandwidth``.
- compute: ``rows * compute_per_sample``, times a drawn step spread (``Costs.spread``),
  a straggler slowdown when drawn (:class:`~mpibelief.simulate.cluster.Faults`) and the
  config's slow replica (``sandblaster.slow_replica``, ``faults.slow_rank``).
- push (every ``push_every`` portions, or each one in the batch's tail): the sum is put
  to the shards one after another, ``transfer(4 * slice)`` each (with shard links
  through the shard's incoming link, as Downpour's pushes), then every piece
  queues at its shard (a SimPy ``Resource``: one sum at a time, in arrival order) and
  is summed for ``slice * apply_per_param`` (times the shard's slowdown); the replica
  waits until every shard has summed it, then answers ``pushed``.

The arithmetic, done once per evaluation (:class:`PortionMath`).  Every replica of an
evaluation pulls the same published parameters, so one model holds them, and a backup
copy computes exactly what its original computes.  So:

- losses: one forward pass over the batch gives every portion's loss
  (:meth:`~mpibelief.model.Model.range_losses`: what ``loss_and_grad`` on the
  portion's rows alone returns); a replica's ``done`` carries its portion's;
- gradients: each shard counts a push when it sums it, in simulated time (applied,
  samples per replica: what the exactly-once check reads,
  :meth:`~mpibelief.ps.state.ShardState.count_summed`) and notes its portions; when
  the evaluation is complete, before any command reads the accumulator, every shard
  adds its pushes' data at once.  A push's data is the sum of its portions' gradients
  times their rows, so by linearity the sum of all of a shard's pushes is the
  gradient over the union of their rows, and that union is the batch (each shard
  checks it summed every portion exactly once): one forward and backward pass over
  the batch.  Only the float32 summation order differs from R replicas' sums (as it
  differs between two real runs); a non-finite gradient ends the run with one line
  (the real shards would refuse the push, and the driver's count check would fail).

So the real work per evaluation is two forward passes and one backward pass over the
batch, whatever R is; a copy that lost costs nothing but its simulated time.

Links (``Costs.shard_links``, the campaigns' cluster; off for shared memory, where the
validation runs): the vectors move only between replicas and shards, through the shards'
links, as in the real run (:mod:`mpibelief.algorithms.sandblaster`: the coordinator
never holds them).  The coordinator's traffic is small and not put on links: its
commands (a few hundred pickled bytes; they run between evaluations, when no replica
moves vectors) and its messages to and from the replicas (pickled tuples of 21-36
bytes, about three each way per replica and evaluation: 0.2 MB each way at R = 2000,
under 2 ms on 1 GbE, against 4 GB of pushes).

Not modelled: the coordinator's own time per message and per evaluation, contention
on the coordinator's link and in the network's core, replica failures (``--fail``,
``faults.stop_replica``, ``faults.kill_rank`` are refused), checkpoints, partitioned
replicas (P = 1).
"""

from __future__ import annotations

import dataclasses
import math
import pickle

import numpy as np
import simpy

from mpibelief.algorithms.sandblaster_dispatch import Dispatcher
from mpibelief.errors import ConfigError, UserError
from mpibelief.simulate.cluster import Costs, Faults, ShardTimes
from mpibelief.simulate.links import IN, OUT, ShardLinks
from mpibelief.simulate.run import SimClock

# A vector command's cost in passes over a shard's slice.
PASSES = {"dot": 1, "axpy": 1, "scale": 1, "copy": 1, "lincomb": 1, "add": 1, "mul": 1,
          "zero": 1, "push_history": 2, "reset_accumulator": 1, "samples": 0,
          "exclude": 0, "publish": 1}



@dataclasses.dataclass
class SimReplica:
    """A virtual replica: what PortionWorker holds (its pending sum as portion numbers,
    the evaluation whose parameters it pulled), its report, and ``mail``: the answer
    to its last message (one at a time: the protocol is strictly request and reply)."""

    stats: object  # WorkerStats
    mail: simpy.Event
    slow: float = 1.0
    pending: list[int] = dataclasses.field(default_factory=list)
    evaluation: int = -1


class PortionMath:
    """The replicas' arithmetic at an evaluation's parameters, done once (see the module
    docstring): every portion's loss, and the gradient over the batch.

    Args:
        model: a model of its own (its parameters are set per evaluation).
        data: the dataset; batch, seed: what :func:`~mpibelief.portions.batch_rows`
            needs; bounds: the portions' ranges of the batch.
    """

    def __init__(self, model, data, batch: int, seed: int, bounds: list[tuple[int, int]]):
        self.model, self.data, self.batch, self.seed = model, data, batch, seed
        self.bounds = bounds
        self.losses: list[float] = []
        self.number, self.rows = -1, np.empty(0, np.int64)
        self.x = self.y = None
        self.forward_rows = self.gradient_rows = 0

    def begin(self, params: np.ndarray, number: int) -> None:
        """A new evaluation: the published parameters, batch ``number``'s rows, every
        portion's loss sum (loss times rows, what a replica's ``done`` carries)."""
        from mpibelief.portions import batch_rows

        self.model.params[...] = params
        if number != self.number:
            self.number = number
            self.rows = batch_rows(len(self.data.y_train), self.batch, self.seed, number)
            self.x, self.y = self.data.x_train[self.rows], self.data.y_train[self.rows]
        means = self.model.range_losses(self.x, self.y, self.bounds)
        self.losses = [mean * (hi - lo) for mean, (lo, hi) in zip(means, self.bounds,
                                                                  strict=True)]
        self.forward_rows += len(self.y)

    def gradient_sum(self) -> np.ndarray:
        """The gradient over the batch times its rows: the sum of every portion's
        ``rows * grad``."""
        self.model.loss_and_grad(self.x, self.y)
        self.gradient_rows += len(self.y)
        return self.model.grads * np.float32(len(self.y))


class SimShards:
    """The shards as :class:`~mpibelief.ps.vectors.ShardSpace` sees them: the commands
    run on the in-memory states (:meth:`MemoryServer.command`), each round trip costed
    on the simulated clock (see the module docstring)."""

    def __init__(self, sim: SimSandblaster):
        self.sim = sim
        self.shard_ranks = sim.server.shard_ranks

    def command(self, name: str, *args, shards: list[int] | None = None,
                reply: bool = False) -> list | None:
        sim, costs = self.sim, self.sim.costs
        ranks = self.shard_ranks if shards is None else shards
        answers = sim.server.command(name, *args, shards=ranks, reply=True)
        ops = args[0] if name == "run" else [(name,)]
        passes = sum(PASSES[op[0]] for op in ops)
        sent = costs.transfer(len(pickle.dumps((name, *args), -1)))
        slowest = 0.0
        for s, answer in zip(ranks, answers, strict=True):
            work = passes * sim.states[s].current.size * costs.apply_per_param * sim.slowdown(s)
            sim.times[s].busy_seconds += work
            back = costs.transfer(len(pickle.dumps(answer, -1))) if reply else 0.0
            slowest = max(slowest, sent + work + back)
        sim.advance(slowest if reply else sent)  # without a reply: only the send
        return answers if reply else None


class SimDispatcher(Dispatcher):
    """The real :class:`Dispatcher`, its messages carried on the simulated network.

    Only the transport is replaced (``evaluate``, ``stop``, ``_deliver``, and
    ``_receive`` notes when the book is complete); every decision is the real one.
    """

    def __init__(self, sim: SimSandblaster, ranks: list[int], sb):
        super().__init__(None, ranks, sb.push_every, sb.backups, sb.max_copies, sim.clock)
        self.sim = sim
        self.complete: simpy.Event | None = None

    def evaluate(self, number: int, bounds: list[tuple[int, int]]):
        sim = self.sim
        sim.math.begin(sim.server.params(), number)  # what every replica's pull reads
        self.complete = sim.env.event()
        self._begin(number, bounds)
        sim.env.run(until=self.complete)  # the replicas work, in simulated time
        sim.add_sums(number)
        return self._end()

    def stop(self) -> None:
        """Nothing to stop: the replicas' processes end with the simulation."""

    def _deliver(self, r: int, message: tuple) -> None:
        self.sim.deliver(r, message)

    def _receive(self, r: int, message: tuple) -> None:
        super()._receive(r, message)
        if self.book is not None and self.book.complete and not self.complete.triggered:
            self.complete.succeed()


class SimSandblaster:
    """R virtual replicas, S in-memory shards and the real L-BFGS driver on one SimPy
    environment; :meth:`step` runs one batch (one L-BFGS step).

    Args:
        cfg: the config as simulated (:func:`.sandblaster.resolved`); data: the
            dataset.
        costs, faults: the machine.
        start: parameters to load instead of the model's initialisation (a warmstart).
    """

    def __init__(self, cfg, data, costs: Costs, faults: Faults | None = None,
                 start: np.ndarray | None = None):
        from mpibelief.algorithms.sandblaster_lbfgs import LBFGSDriver
        from mpibelief.model import Model
        from mpibelief.optim import Optimizer
        from mpibelief.ps.memory import MemoryServer
        from mpibelief.ps.vectors import ShardSpace
        from mpibelief.worker import WorkerStats

        self.cfg, self.costs, self.faults = cfg, costs, faults or Faults()
        if self.faults.fail_at:
            raise ConfigError("simulate does not model failed Sandblaster replicas (--fail)")
        R, S, sb = cfg.layout.replicas, cfg.layout.shards, cfg.sandblaster
        self.env = simpy.Environment()
        self.clock = SimClock()
        self.clock.env = self.env
        self.rng = np.random.default_rng(cfg.run.seed)
        self.model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
        self.model.init(cfg.run.seed, cfg.model.init_scale)
        n = self.model.n_params
        if start is not None:
            if np.shape(start) != (n,):
                raise UserError(f"warmstart of {np.size(start)} parameters for a model of {n}")
            self.model.params[...] = start
        self.server = MemoryServer(n, S, Optimizer("sgd", 1.0), ranges=[(0, n)] * (R + 1))
        self.states = self.server.states
        for i, state in enumerate(self.states):
            state.stats.rank = 1 + i  # the shard ranks of the real layout
        self.client = self.server.client(0)  # the coordinator's
        self.client.load(self.model.params)
        self.times = [ShardTimes() for _ in range(S)]
        self.queues = [simpy.Resource(self.env, capacity=1) for _ in range(S)]
        self.links = ShardLinks(self.env, S, costs) if costs.shard_links else None
        self.space = ShardSpace(SimShards(self))
        self.space.copy("x", "params")
        ranks = [1 + S + r for r in range(R)]
        self.dispatcher = SimDispatcher(self, ranks, sb)
        self.driver = LBFGSDriver(self.space, self.dispatcher, _samples, sb,
                                  len(data.y_train), self.clock)
        if self.driver.batch < sb.portions:
            raise ConfigError(f"a batch of {self.driver.batch} rows cannot be cut into"
                              f" {sb.portions} portions")
        own = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
        self.math = PortionMath(own, data, self.driver.batch, cfg.run.seed,
                                self.driver.bounds)
        self.replicas = []
        for r, rank in enumerate(ranks):
            slow = (sb.slow_factor if r == sb.slow_replica else 1.0) * \
                (cfg.faults.slow_factor if rank == cfg.faults.slow_rank else 1.0)
            self.replicas.append(SimReplica(WorkerStats(rank), self.env.event(), slow))
            self.env.process(self._replica(r))
        self.summed: list[list[int]] = [[] for _ in range(S)]  # portions, per shard

    def step(self, k: int):
        """Batch ``k``: one L-BFGS step of the real driver; its ``BatchRecord``."""
        return self.driver.step(k)

    def advance(self, seconds: float) -> None:
        """Let ``seconds`` of simulated time pass (the coordinator waits; replicas still
        computing a lost copy go on)."""
        if seconds > 0:
            self.env.run(until=self.env.now + seconds)

    def slowdown(self, s: int) -> float:
        slow = self.faults.shard_slowdown
        return slow[s] if s < len(slow) else 1.0

    def deliver(self, r: int, message: tuple) -> None:
        """The coordinator's answer travels to replica ``r`` (a timeout and a callback:
        a process per message would double the events of a 2000-replica run)."""
        rep = self.replicas[r]
        arrive = self.env.timeout(self.costs.transfer(len(pickle.dumps(message, -1))))
        arrive.callbacks.append(lambda _: rep.mail.succeed(message))

    def _say(self, r: int, message: tuple):
        """Replica ``r``'s message travels to the coordinator, which handles it on
        arrival; returns the answer once it has travelled back."""
        rep = self.replicas[r]
        rep.mail = self.env.event()
        yield self.env.timeout(self.costs.transfer(len(pickle.dumps(message, -1))))
        self.dispatcher._receive(r, message)
        tick = self.env.now
        answer = yield rep.mail
        rep.stats.wait_seconds += self.env.now - tick
        return answer

    def _replica(self, r: int):
        """Replica ``r``: PortionWorker's request and reply loop, in simulated time."""
        rep = self.replicas[r]
        answer = ("ready",)
        while True:
            kind, *args = yield from self._say(r, answer)
            if kind == "stop":
                return
            if kind == "task":
                evaluation, number, portion, lo, hi = args
                if evaluation != rep.evaluation:
                    if rep.pending:
                        raise RuntimeError("a new evaluation began with an unpushed sum")
                    yield from self._pull(rep)
                    rep.evaluation = evaluation
                yield from self._compute(rep, hi - lo)
                rep.pending.append(portion)
                answer = ("done", evaluation, portion, self._loss(evaluation, portion))
            elif kind == "push":
                yield from self._push(r)
                answer = ("pushed", args[0])
            else:  # "drop": a copy of a portion in the sum lost the race
                rep.pending = []
                answer = ("ready",)

    def _pull(self, rep: SimReplica):
        """The parameters, shard after shard (through each shard's link, if modelled)."""
        rep.stats.bytes_pulled += 4 * self.model.n_params
        if self.links is None:
            seconds = sum(self.costs.transfer(4 * s.current.size) for s in self.states)
            rep.stats.comm_seconds += seconds
            yield self.env.timeout(seconds)
            return
        tick = self.env.now
        for s, state in enumerate(self.states):
            yield from self.links.send(s, OUT, 4 * state.current.size)
        rep.stats.comm_seconds += self.env.now - tick

    def _compute(self, rep: SimReplica, rows: int):
        c, faults = self.costs, self.faults
        seconds = rows * c.compute_per_sample * rep.slow
        if c.spread:
            seconds *= c.spread[self.rng.integers(len(c.spread))]
        if faults.straggler_fraction and self.rng.random() < faults.straggler_fraction:
            seconds *= faults.straggler_slowdown
        rep.stats.compute_seconds += seconds
        rep.stats.steps += 1
        rep.stats.samples += rows
        yield self.env.timeout(seconds)

    def _loss(self, evaluation: int, portion: int) -> float:
        """The finished portion's loss sum; NaN for a copy of an evaluation already over
        (the coordinator drops it unread)."""
        return self.math.losses[portion] if evaluation == self.dispatcher.evaluation \
            else math.nan

    def _push(self, r: int):
        """Put the sum to every shard, let each sum it in its turn, wait for all."""
        rep, env = self.replicas[r], self.env
        portions, rep.pending = rep.pending, []
        committed, _ = self.dispatcher.book.inflight[r]
        assert committed == portions, (committed, portions)  # the book's view is ours
        samples = sum(hi - lo for lo, hi in (self.driver.bounds[p] for p in portions))
        tick = env.now
        for s, state in enumerate(self.states):
            if self.links is None:
                yield env.timeout(self.costs.transfer(4 * state.current.size))
            else:
                yield from self.links.send(s, IN, 4 * state.current.size)
        summed = [env.process(self._sum(s, portions, samples, r + 1))
                  for s in range(len(self.states))]
        yield simpy.AllOf(env, summed)
        rep.stats.comm_seconds += env.now - tick
        rep.stats.pushes += 1
        rep.stats.bytes_pushed += 4 * self.model.n_params

    def _sum(self, s: int, portions: list[int], samples: int, client: int):
        """Shard ``s`` sums one push, in its turn: counted now, its data added with the
        evaluation's others (:meth:`add_sums`)."""
        state, times = self.states[s], self.times[s]
        with self.queues[s].request() as turn:
            times.max_queue = max(times.max_queue, len(self.queues[s].queue) + 1)
            yield turn
            seconds = state.current.size * self.costs.apply_per_param * self.slowdown(s)
            yield self.env.timeout(seconds)
            times.busy_seconds += seconds
            state.stats.bytes_in += 4 * state.current.size
            state.count_summed(client, samples)
            self.summed[s].extend(portions)

    def add_sums(self, number: int) -> None:
        """The evaluation is complete: every shard adds the data of the pushes it summed,
        the batch's gradient (after checking they cover every portion exactly once)."""
        from mpibelief.optim import all_finite

        everything = list(range(len(self.driver.bounds)))
        for s, portions in enumerate(self.summed):
            if sorted(portions) != everything:
                raise RuntimeError(f"batch {number}: shard {s} summed portions"
                                   f" {sorted(portions)}, not each of {len(everything)} once")
        total = self.math.gradient_sum()
        if not all_finite(total):
            raise UserError(f"training diverged: the gradient over batch {number} is not"
                            " finite")
        for state, piece in zip(self.states, self.server.slices, strict=True):
            state.vector(state.accumulate)[...] += total[piece]
        self.summed = [[] for _ in self.states]

    def finish(self) -> None:
        """Close the books: shard and replica times over the whole simulated run."""
        now = self.env.now
        for state, t in zip(self.states, self.times, strict=True):
            state.stats.wall_seconds, state.stats.busy_seconds = now, t.busy_seconds
            state.stats.idle_seconds = now - t.busy_seconds
        for rep in self.replicas:
            rep.stats.train_seconds = now


def _samples(counts: np.ndarray) -> int:
    """Samples the shards summed: per replica (clients 1..R; 0 is the coordinator) the
    least over the shards, all of whose ranges hold the whole vector (P = 1)."""
    return int(counts[:, 1:].min(axis=0).sum())


