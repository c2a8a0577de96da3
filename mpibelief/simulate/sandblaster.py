"""Sandblaster L-BFGS on the simulated cluster: the real driver, real gradients, a SimPy clock.

What is real and what is simulated::

    real        LBFGSDriver (two-loop recursion, Wolfe line search) over a ShardSpace;
                its vector commands (VectorCommands) on in-memory ShardStates; the
                Dispatcher's decisions (PortionBook: dynamic load balancing, backup
                copies, every portion summed exactly once); each portion's loss and
                gradient on the real rows of its batch with the real kernels; the
                shards' sums (ShardState.consume into the accumulator); the Evaluator
                and the result file
    simulated   when each of those happens: durations from a Costs calibrated on
                this machine (:mod:`mpibelief.simulate.calibrate`), so R replicas and
                S shards need neither R + S cores nor R + S processes

Timeline of one evaluation (a gradient over the batch at the published ``t``; R = 2,
S = 2, ``push_every`` = 2, four portions, replica 1 a straggler)::

    coordinator |-reset, publish t-|  decides as messages arrive   |-samples-|-scale, dots-|
    replica 0                      |>|-pull-|-p0-|>|-p2-|>|-put s0-|-put s1-|..|>|-p3 copy-|>|
    replica 1                      |>|-pull-|---------p1---------|>|-p3------------------|>|
    shard 0                                                        |-sum-|
    shard 1                                                                 |-sum-|

``|>|`` is a message between a replica and the coordinator (``task``, ``done``,
``push``, ``pushed``, ``drop``, ``ready``), each ``latency + pickled bytes /
bandwidth``; the coordinator decides in no time (its own cost is not calibrated).

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

The arithmetic, done once.  Every replica of an evaluation pulls the same published
parameters, so one model holds them, and a backup copy computes what the original
computes.  So a portion's loss is computed (forward only) when its first copy
finishes, a push's gradient sum ``sum(rows * grad)`` (summed portion by portion in
float32, as PortionWorker sums it) when its first shard sums it, and kept until its
last shard has (within :data:`CACHE_BYTES`; beyond that it is recomputed, counted in
the ``gradient_sums_recomputed`` attribute).  A copy that lost is never computed: its
result is dropped unread.  The real work per evaluation is one forward and one forward
and backward over the batch, whatever R is; the shards still sum every push (R
pushes of the whole vector per evaluation when the batch is cut into R portions).

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
# Push sums kept between their first and their last shard (with equally fast shards
# that is one or two at a time; a slow shard lags, and past this they are recomputed).
CACHE_BYTES = 256 * 2**20


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
    the evaluation whose parameters it pulled), its report and its inbox."""

    stats: object  # WorkerStats
    inbox: simpy.Store
    slow: float = 1.0
    pending: list[int] = dataclasses.field(default_factory=list)
    evaluation: int = -1


@dataclasses.dataclass
class Push:
    """A replica's push on its way through the shards: its portions, and the gradient
    sum once the first shard needed it (until the last has summed it)."""

    portions: list[int]
    samples: int
    left: int  # shards still to sum it
    vector: np.ndarray | None = None


class PortionMath:
    """The replicas' arithmetic at the evaluation's parameters, each piece done once.

    Args:
        model: a model of its own (its parameters are set per evaluation).
        data: the dataset; batch, seed: what :func:`~mpibelief.portions.batch_rows`
            needs; bounds: the portions' ranges of the batch.
    """

    def __init__(self, model, data, batch: int, seed: int, bounds: list[tuple[int, int]]):
        self.model, self.data, self.batch, self.seed = model, data, batch, seed
        self.bounds = bounds
        self.losses: dict[int, float] = {}
        self.number, self.rows = -1, np.empty(0, np.int64)
        self.forward_rows = self.gradient_rows = 0

    def begin(self, params: np.ndarray, number: int) -> None:
        """A new evaluation: the published parameters, batch ``number``'s rows."""
        from mpibelief.portions import batch_rows

        self.model.params[...] = params
        self.losses.clear()
        if number != self.number:
            self.number = number
            self.rows = batch_rows(len(self.data.y_train), self.batch, self.seed, number)

    def _rows(self, portion: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self.bounds[portion]
        idx = self.rows[lo:hi]
        return self.data.x_train[idx], self.data.y_train[idx]

    def loss_sum(self, portion: int) -> float:
        """The portion's loss times its rows (what a replica's ``done`` carries)."""
        if portion not in self.losses:
            x, y = self._rows(portion)
            mean, _ = self.model.evaluate(x, y, batch=len(y))
            self.losses[portion] = mean * len(y)
            self.forward_rows += len(y)
        return self.losses[portion]

    def gradient_sum(self, portions: list[int]) -> np.ndarray:
        """``sum(rows * grad)`` over ``portions``, portion by portion, in float32."""
        total = np.zeros(self.model.n_params, np.float32)
        for portion in portions:
            x, y = self._rows(portion)
            self.model.loss_and_grad(x, y)
            total += np.float32(len(y)) * self.model.grads
            self.gradient_rows += len(y)
        return total


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
        return self._end()

    def stop(self) -> None:
        """Nothing to stop: the replicas' processes end with the simulation."""

    def _deliver(self, r: int, message: tuple) -> None:
        self.sim.env.process(self.sim.deliver(r, message))

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
            self.replicas.append(SimReplica(WorkerStats(rank), simpy.Store(self.env), slow))
            self.env.process(self._replica(r))
        self.cached = 0  # bytes of push sums kept
        self.gradient_sums = self.recomputed = 0

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

    def deliver(self, r: int, message: tuple):
        """The coordinator's answer travels to replica ``r``."""
        yield self.env.timeout(self.costs.transfer(len(pickle.dumps(message, -1))))
        self.replicas[r].inbox.put(message)

    def _say(self, r: int, message: tuple):
        """Replica ``r``'s message travels to the coordinator, which handles it on arrival."""
        yield self.env.timeout(self.costs.transfer(len(pickle.dumps(message, -1))))
        self.dispatcher._receive(r, message)

    def _replica(self, r: int):
        """Replica ``r``: PortionWorker's request and reply loop, in simulated time."""
        rep, env = self.replicas[r], self.env
        yield from self._say(r, ("ready",))
        while True:
            tick = env.now
            kind, *args = yield rep.inbox.get()
            rep.stats.wait_seconds += env.now - tick
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
            yield from self._say(r, answer)

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
        """The finished portion's loss sum; NaN where the coordinator will surely drop
        the copy unread (its evaluation is over, or the portion is committed already:
        commitments are final), so a lost copy is never computed."""
        d = self.dispatcher
        if d.book is None or evaluation != d.evaluation or portion in d.book.committed:
            return math.nan
        return self.math.loss_sum(portion)

    def _push(self, r: int):
        """Put the sum to every shard, let each sum it in its turn, wait for all."""
        rep, env = self.replicas[r], self.env
        portions, rep.pending = rep.pending, []
        committed, _ = self.dispatcher.book.inflight[r]
        assert committed == portions, (committed, portions)  # the book's view is ours
        sizes = [hi - lo for lo, hi in (self.driver.bounds[p] for p in portions)]
        push = Push(portions, sum(sizes), len(self.states))
        tick = env.now
        for state in self.states:
            yield env.timeout(self.costs.transfer(4 * state.current.size))
        summed = [env.process(self._sum(s, push, r + 1)) for s in range(len(self.states))]
        yield simpy.AllOf(env, summed)
        rep.stats.comm_seconds += env.now - tick
        rep.stats.pushes += 1
        rep.stats.bytes_pushed += 4 * self.model.n_params

    def _sum(self, s: int, push: Push, client: int):
        """Shard ``s`` sums one push into its accumulator, in its turn."""
        from mpibelief.ps.state import GRADIENT

        state, times = self.states[s], self.times[s]
        with self.queues[s].request() as turn:
            times.max_queue = max(times.max_queue, len(self.queues[s].queue) + 1)
            yield turn
            seconds = state.current.size * self.costs.apply_per_param * self.slowdown(s)
            yield self.env.timeout(seconds)
            times.busy_seconds += seconds
            part = self.server.parts[client][s]
            state.consume(GRADIENT, self._piece(push, part), part.offset, -1, client,
                          push.samples)

    def _piece(self, push: Push, part) -> np.ndarray:
        """Shard ``part.rank``'s piece of the push's gradient sum (computed on first need)."""
        vector = push.vector
        if vector is None:
            vector = self.math.gradient_sum(push.portions)
            self.gradient_sums += 1
            self.recomputed += int(push.left < len(self.states))
            if push.left > 1 and self.cached + vector.nbytes <= CACHE_BYTES:
                push.vector = vector
                self.cached += vector.nbytes
        push.left -= 1
        if push.left == 0 and push.vector is not None:
            self.cached -= push.vector.nbytes
            push.vector = None
        return vector[part.local]

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
                          "portion_forward_rows": sim.math.forward_rows,
                          "gradient_rows": sim.math.gradient_rows,
                          "gradient_sums_recomputed": sim.recomputed})
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
