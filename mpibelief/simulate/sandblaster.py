"""Sandblaster L-BFGS on the simulated cluster: the real driver, real gradients, a SimPy clock.

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
  :class:`~mpibelief.portion_worker.PortionWorker`).
- compute: ``rows * compute_per_sample``, times a drawn step spread (``Costs.spread``),
  a straggler slowdown when drawn (:class:`~mpibelief.simulate.cluster.Faults`) and the
  config's slow replica (``sandblaster.slow_replica``, ``faults.slow_rank``).
- push (every ``push_every`` portions, or each one in the batch's tail): the sum is put
  to the shards one after another, ``transfer(4 * slice)`` each, then every piece
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

Defaults: a batch must have at least as many portions as replicas; when
``sandblaster.portions`` is fewer, the run cuts the batch into R portions (one per
replica at first, the rest of the evaluation balanced by backups) and says so.

Not modelled: the coordinator's own time per message and per evaluation, contention
on network links, replica failures (``--fail``, ``faults.stop_replica``,
``faults.kill_rank`` are refused), checkpoints, partitioned replicas (P = 1).
"""

from __future__ import annotations

import dataclasses
import math
import pickle
import time
from pathlib import Path

import numpy as np
import simpy

from mpibelief.algorithms.sandblaster_dispatch import Dispatcher
from mpibelief.errors import ConfigError, UserError
from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs, Faults, ShardTimes
from mpibelief.simulate.run import SimClock

# A vector command's cost in passes over a shard's slice.
PASSES = {"dot": 1, "axpy": 1, "scale": 1, "copy": 1, "lincomb": 1, "add": 1, "mul": 1,
          "zero": 1, "push_history": 2, "reset_accumulator": 1, "samples": 0,
          "exclude": 0, "publish": 1}


def portions_for(cfg) -> int:
    """The portions a batch is cut into: ``sandblaster.portions``, at least R."""
    return max(cfg.sandblaster.portions, cfg.layout.replicas)


def check(cfg) -> None:
    """What the simulated Sandblaster runs: explicit R and S, P = 1, no injected stops."""
    lay, sb, faults = cfg.layout, cfg.sandblaster, cfg.faults
    if lay.replicas < 1 or lay.shards < 1 or lay.partitions != 1:
        raise ConfigError("simulate needs layout.replicas >= 1, layout.shards >= 1 and"
                          " layout.partitions = 1 (e.g. --set layout.replicas=200)")
    if faults.stop_replica >= 0 or faults.kill_rank >= 0:
        raise ConfigError("simulate does not model stopped or killed Sandblaster replicas"
                          " (faults.stop_replica, faults.kill_rank)")
    portions = portions_for(cfg)
    if sb.batch and sb.batch < portions:
        raise ConfigError(f"sandblaster.batch = {sb.batch} cannot be cut into {portions}"
                          f" portions (at least one per replica, {lay.replicas}): raise"
                          " sandblaster.batch or lower layout.replicas")


def resolved(cfg):
    """The config as simulated: ``sandblaster.portions`` raised to R where it is fewer."""
    portions = portions_for(cfg)
    if portions == cfg.sandblaster.portions:
        return cfg
    return dataclasses.replace(
        cfg, sandblaster=dataclasses.replace(cfg.sandblaster, portions=portions))


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
        cfg: the resolved config (:func:`resolved`); data: the dataset.
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
        seconds = sum(self.costs.transfer(4 * s.current.size) for s in self.states)
        rep.stats.comm_seconds += seconds
        rep.stats.bytes_pulled += 4 * self.model.n_params
        yield self.env.timeout(seconds)

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
        for state in self.states:
            yield env.timeout(self.costs.transfer(4 * state.current.size))
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


def build(cfg, data, costs: Costs, faults: Faults | None = None,
          start: np.ndarray | None = None) -> SimSandblaster:
    """The simulated run of ``cfg`` (checked and resolved), ready for its first step."""
    check(cfg)
    return SimSandblaster(resolved(cfg), data, costs, faults, start)


def method(cfg) -> str:
    """The run's label for plots, as the real run's: ``sandblaster[R]``."""
    return f"sandblaster[{cfg.layout.replicas}]"


def simulate(cfg, out: Path, calibration: Path, faults: Faults | None = None,
             overwrite: bool = False, start: np.ndarray | None = None) -> dict:
    """Run the config's Sandblaster on the simulated cluster; write ``out`` in a real
    Sandblaster run's layout; return the last ``/metrics`` row.

    Args:
        start: float32 parameters loaded into the shards instead of the model's
            initialisation (a warmstart shared between methods).
    """
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import load_dataset
    from mpibelief.layout import make_layout
    from mpibelief.progress import Progress
    from mpibelief.results import ResultWriter

    check(cfg)
    sim_cfg = resolved(cfg)
    R, S, sb = cfg.layout.replicas, cfg.layout.shards, sim_cfg.sandblaster
    if sb.portions != cfg.sandblaster.portions:
        print(f"mpibelief: simulate: sandblaster.portions = {cfg.sandblaster.portions} is"
              f" fewer than the {R} replicas: the batch is cut into {sb.portions}",
              flush=True)
    costs = calibrate.read(calibration)
    data = load_dataset(sim_cfg.data)
    sim = SimSandblaster(sim_cfg, data, costs, faults, start)
    lay = make_layout(1 + S + R, S, R, 1)
    name = method(sim_cfg)
    attrs = {"config": sim_cfg.to_toml(), "algorithm": "sandblaster", "method": name,
             "world_size": lay.world, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "n_params": sim.model.n_params, "replicas": R,
             "simulated": True, "calibration": str(calibration),
             **{f"cost_{k}": getattr(costs, k) for k in calibrate.FIELDS},
             "faults": repr(sim.faults), "warmstart": start is not None,
             "portions_configured": cfg.sandblaster.portions}
    evaluate = Evaluator(data, sim_cfg.train.eval_samples, sim_cfg.run.seed)
    with ResultWriter(out, attrs, overwrite) as writer:
        progress = Progress(3 * sb.iterations * sim.driver.batch, f"{name} (simulated)")
        started = time.perf_counter()
        records, row = _train(sim_cfg, sim, evaluate, writer, progress)
        progress.close()
        _tables(writer, sim, records, lay)
        writer.set_attrs({"real_seconds": time.perf_counter() - started,
                          "simulated_seconds": sim.env.now,
                          "forward_rows": sim.math.forward_rows,
                          "gradient_rows": sim.math.gradient_rows})
    return row


def _train(cfg, sim: SimSandblaster, evaluate, writer, progress) -> tuple[list, dict]:
    """Batches until ``iterations``, three rejected steps in a row or
    ``train.max_seconds`` of simulated training (as the real coordinator's loop);
    ``/metrics`` every ``train.eval_every`` simulated seconds, evaluation taking none."""
    sb, limit = cfg.sandblaster, cfg.train.max_seconds
    trained = {"seconds": 0.0, "samples": 0, "batches": 0}
    records, rejected = [], 0
    row = _sample(sim, evaluate, writer, trained)
    next_eval = cfg.train.eval_every
    for k in range(sb.iterations):
        rec = sim.step(k)
        records.append(rec)
        trained["seconds"] += rec.seconds
        trained["samples"] += rec.samples_applied
        trained["batches"] += 1
        rejected = 0 if rec.accepted else rejected + 1
        done = k + 1 == sb.iterations or rejected >= 3 or 0 < limit <= trained["seconds"]
        figures = {"loss": rec.loss, "sim_s": round(trained["seconds"], 2)}
        if trained["seconds"] >= next_eval or done:
            row = _sample(sim, evaluate, writer, trained)
            next_eval = trained["seconds"] + cfg.train.eval_every
            figures["test_acc"] = row["test_accuracy"]
        progress.update(trained["samples"] - progress.done, **figures)
        if done:
            break
    sim.finish()
    return records, row


def _sample(sim: SimSandblaster, evaluate, writer, trained: dict) -> dict:
    """One ``/metrics`` row: the shards' parameters (the coordinator's pull), evaluated."""
    sim.client.pull(sim.model.params)
    row = {"wall_seconds": trained["seconds"], "updates": trained["batches"],
           "samples": trained["samples"], **evaluate(sim.model)}
    writer.append_metrics(row)
    if not np.isfinite(row["test_loss"]):
        raise UserError(f"training diverged: the shards' parameters give a non-finite loss"
                        f" after {trained['batches']} L-BFGS steps")
    return row


def _tables(writer, sim: SimSandblaster, records: list, lay) -> None:
    """``/sandblaster``, ``/ranks`` and ``/server`` as the real run writes them."""
    from mpibelief.algorithms.sandblaster import write_tables

    reports = {rep.stats.rank: rep.stats for rep in sim.replicas}
    write_tables(writer, records, sim.client, [s.stats for s in sim.states], reports, lay,
                 sim.dispatcher, sim.space)
