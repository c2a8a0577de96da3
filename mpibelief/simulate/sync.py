"""Synchronous allreduce SGD (dense or Strom-compressed) and SGD [1] on a simulated clock.

What is real and what is simulated::

    real        every replica's gradient on its own shard of the real data, in its own
                batch order (``algorithms.sync.replica_batches``/``replica_gradient``);
                the dense average (sum in replica order, times float32 1/R) or each
                replica's Compressor (its residual, tau, packet) and decode_packets
                over the packets in rank order; Optimizer.apply; the Evaluator; the
                result file
    simulated   how long each of those takes: compute from the calibrated
                ``compute_per_sample`` (with the measured spread and straggler draws of
                :class:`~mpibelief.simulate.cluster.Faults`), the exchange from MPICH's
                collective algorithms over ``Costs.latency``/``bandwidth``
                (:mod:`.collectives`), its arithmetic from :mod:`.exchange_work`, the
                update from ``apply_per_param``

So R replicas need one process and R gradient evaluations a step, not R cores: all
virtual replicas hold the same parameters (that is what synchronous SGD guarantees), so
one :class:`~mpibelief.model.Model` serves them all, computing each replica's gradient
in turn before the update.  Real cost per simulated step is about R gradients of the
batch (plus R encodes, compressed); per epoch it is the same work whatever R is.
Measured (``bench/sim_sync.py``, FSDD 440-512-512-50, batch 64, one thread, load 7 on
2 cores; medians of 5 steps): 0.09, 0.59 and 2.1 s of real time per simulated step at
R = 8, 64 and 200 dense, 0.11, 0.84 and 3.1 s compressed (9-15 ms per replica
gradient throughout); an epoch is 9 steps at R = 200.  Memory: a residual and a
histogram per compressed replica, 2.5 MB each here (0.5 GB at R = 200).

Checked against the real run (``mpiexec -n 2 ... train configs/sync{,_strom}.toml``,
0.3 epochs, 277 steps): the simulated run ends on the same test loss and accuracy to
the last bit, dense and compressed, with the same taus and bytes in ``/ranks``.

Timeline of one step (R = 3, compressed; dense has one allreduce and its additions
instead of encode, allgather and decode)::

    replica 0  |---compute---|enc|........wait.........|--allgather--|dec|-apply-|
    replica 1  |-----compute-----|enc|......wait.......|--allgather--|dec|-apply-|
    replica 2  |--------compute (straggler)--------|enc|--allgather--|dec|-apply-|
               ^ every replica starts together          ^ the collective completes only
                 (the last step ended everywhere)         once the last replica joins

    step = max_r compute_r + encode(n) + exchange + decode(n, words) + n * apply_per_param
    dense: exchange = Iallreduce(4n bytes, R) + its additions; no encode or decode

- compute_r: ``batch * compute_per_sample``, times a draw from the measured spread,
  times ``straggler_slowdown`` with chance ``straggler_fraction``; plus ``first_step``
  on the first step (each real replica is a fresh process).  The maximum is the point:
  in a synchronous method one straggler holds up every replica, where a Downpour
  replica (:mod:`.cluster`) only delays its own pushes.
- exchange: the real packets' sizes (``4 * (k + 1)`` bytes each, the count beside them),
  so the bytes saved are the ones the real codec saves.
- ``/ranks``: a replica's ``compute_seconds`` is its own compute plus the update, its
  ``comm_seconds`` the rest of the step (waiting for the slowest, codec, transfer), as
  the real sync's rank records them.

SGD [1] over ``layout.partitions`` > 1 (the paper's model-parallel baseline): the same
loop, the whole model's gradient (the math of P = 1), its compute scaled by the
scaling model's ``t(P) / t(1)`` (:mod:`.partitioned`); ``/ranks`` has a row per
partition, as the real run's.  The real sync refuses P > 1, and so does this.

Evaluation follows the real sync's rank 0: after the step whose compute ended past the
next evaluation time (or the last step), taking no simulated time.  SGD [1]
(``run.algorithm = "sgd"``) is the same loop with one replica and no exchange: the same
batch order (seed + 1), the same optimiser, compute and update only.

Why a :class:`~mpibelief.clock.VirtualClock` and not SimPy as :mod:`.cluster`: a
synchronous step is a barrier; its time is a maximum and a sum, and nothing queues or
interleaves between steps.  Not modelled: failures (a real sync job ends when a replica
dies, so ``Faults.fail_at`` is refused), the control Iallreduce beside the gradient
exchange (three ints; its latency hides behind the exchange), contention on links.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mpibelief.clock import VirtualClock
from mpibelief.errors import ConfigError, UserError
from mpibelief.simulate import calibrate, collectives, exchange_work, partitioned
from mpibelief.simulate.cluster import Costs, Faults
from mpibelief.simulate.exchange_work import LocalWork

ALGORITHMS = ("sync", "sgd")


def check(cfg) -> None:
    """The real algorithm's own check, and an explicit replica count."""
    from mpibelief.algorithms import resolve

    if cfg.run.algorithm not in ALGORITHMS:
        raise ConfigError(f"simulate.sync runs {' or '.join(ALGORITHMS)}, not"
                          f" {cfg.run.algorithm!r}")
    resolve(cfg)  # the real sync refuses layout.partitions > 1, sgd takes it
    if cfg.layout.replicas < 1:
        raise ConfigError("simulate needs layout.replicas >= 1 (e.g. --set"
                          " layout.replicas=64)")


def method(cfg) -> str:
    """The label the real run writes: ``sync[R]...`` or ``sgd[1]...``."""
    if cfg.run.algorithm == "sgd":
        return "sgd[1]" + ("+adagrad" if cfg.train.optimizer == "adagrad" else "")
    from mpibelief.algorithms.sync import method as sync_method

    return sync_method(cfg, cfg.layout.replicas)


class SyncSim:
    """R virtual replicas of synchronous SGD over one model, on a virtual clock.

    Args:
        cfg: the run's config (``sync`` or ``sgd``).
        data: the whole dataset; replica r trains on ``data.shard(r, R)``.
        model: the parameters every replica holds (initialised, or a warmstart).
        costs, work, faults: the machine (see the module docstring).
    """

    def __init__(self, cfg, data, model, costs: Costs, work: LocalWork,
                 faults: Faults | None = None):
        from mpibelief.algorithms.sync import replica_batches, schedule
        from mpibelief.compressor import Compressor
        from mpibelief.optim import Optimizer

        if faults is not None and faults.fail_at:
            raise ConfigError("simulate: replica failures are not modelled for synchronous"
                              " SGD (a real sync job ends when a replica dies)")
        self.cfg, self.model, self.costs, self.work = cfg, model, costs, work
        self.faults = faults or Faults()
        self.R, self.n, self.batch = cfg.layout.replicas, model.n_params, cfg.train.batch
        self.opt = Optimizer.from_config(cfg.train)
        self.opt.warm()
        self.opt_state = self.opt.state(self.n)
        self.shards = [data.shard(r, self.R) for r in range(self.R)]
        self.orders = [replica_batches(cfg, s, r) for r, s in enumerate(self.shards)]
        self.steps_per_epoch, self.total_steps = schedule(cfg, len(data.y_train), self.R)
        self.codecs = None
        if cfg.run.algorithm == "sync" and cfg.compression.enabled:
            Compressor.warm()
            self.codecs = [Compressor(self.n, cfg.compression, r) for r in range(self.R)]
        self.update = np.zeros(self.n, np.float32)
        self.scale = np.float32(1.0 / self.R)
        self.clock = VirtualClock()
        self.rng = np.random.default_rng(cfg.run.seed)
        self.compute = np.zeros(self.R)  # per replica: its compute and update seconds
        self.received = np.zeros(self.R, np.int64)  # bytes, as the real StromExchange counts
        self.steps = 0
        self.sizes: np.ndarray | None = None  # the last step's packets, bytes each
        self.last: dict[str, float] = {}

    def draw_compute(self, step: int) -> np.ndarray:
        """Each replica's compute seconds this step (spread and straggler draws)."""
        c, f = self.costs, self.faults
        seconds = np.full(self.R, self.batch * c.compute_per_sample)
        if c.spread:
            seconds *= np.asarray(c.spread)[self.rng.integers(len(c.spread), size=self.R)]
        if f.straggler_fraction:
            slow = self.rng.random(self.R) < f.straggler_fraction
            seconds[slow] *= f.straggler_slowdown
        if step == 1:
            seconds += c.first_step
        return seconds

    def gradients(self, step: int) -> list | None:
        """Every replica's real gradient: summed into ``update`` (dense), or each
        compressed by its own codec (returns the packets, in rank order)."""
        from mpibelief.algorithms.sync import diverged, replica_gradient

        epoch = (step - 1) / self.steps_per_epoch
        packets = [] if self.codecs is not None else None
        self.update[:] = 0.0
        for r in range(self.R):
            if not replica_gradient(self.model, self.shards[r], next(self.orders[r]),
                                    packets is not None):
                raise diverged(step, "a replica's loss or gradient")
            if packets is None:
                self.update += self.model.grads
            else:
                packets.append(self.codecs[r].compress(self.model.grads, epoch)[0])
        return packets

    def exchange(self, packets: list | None) -> tuple[float, float]:
        """``update`` = the average every replica applies; returns the exchange's
        ``(network seconds, arithmetic seconds)``."""
        from mpibelief.compression import decode_packets

        n, R = self.n, self.R
        if packets is None:
            self.update *= self.scale
            self.sizes = None
            return self.network_seconds(), self.work.reduce(n, R)
        counts = np.array([p.size for p in packets], np.int32)
        displs = np.zeros(R, np.int32)
        displs[1:] = np.cumsum(counts[:-1])
        decode_packets(np.concatenate(packets), counts, displs, self.update)
        self.update *= self.scale
        words = int(counts.sum())
        self.received += 4 * words + 4 * R
        self.sizes = 4 * counts
        return self.network_seconds(), self.work.encode(n) + self.work.decode(n, words)

    def network_seconds(self, latency: float | None = None,
                        bandwidth: float | None = None) -> float:
        """The last step's exchange on the wire (on another network, if given): the
        dense allreduce, or the real packets' allgather."""
        latency = self.costs.latency if latency is None else latency
        bandwidth = self.costs.bandwidth if bandwidth is None else bandwidth
        if self.sizes is None:
            return collectives.allreduce_seconds(4 * self.n, self.R, latency, bandwidth)
        return collectives.packet_exchange_seconds(self.sizes, latency, bandwidth)

    def step(self, step: int) -> tuple[float, float]:
        """One synchronous step; ``(rank 0's compute seconds, the step's seconds)``.
        ``last`` holds the step's parts: compute (the slowest replica's), network,
        arithmetic (the exchange's), apply."""
        from mpibelief.algorithms.sync import diverged

        compute = self.draw_compute(step)
        network, arithmetic = self.exchange(self.gradients(step))
        if not self.opt.apply(self.model.params, self.update, self.opt_state):
            raise diverged(step, "the averaged gradient")
        apply = self.n * self.costs.apply_per_param
        self.last = {"compute": float(compute.max()), "network": network,
                     "arithmetic": arithmetic, "apply": apply}
        seconds = sum(self.last.values())
        self.compute += compute + apply
        self.clock.advance(seconds)
        self.steps = step
        return float(compute[0]), seconds

    def rank_stats(self) -> list:
        """``/ranks`` as the real run writes it (rank ``r * P + p``: replica r, partition p)."""
        from mpibelief.results import RankStats

        now, steps, rows, P = self.clock.now(), self.steps, [], self.cfg.layout.partitions
        for r in range(self.R):
            if self.cfg.run.algorithm == "sgd":
                pushed = pulled = 0
            elif self.codecs is not None:
                pushed, pulled = self.codecs[r].log.totals()[1], int(self.received[r])
            else:
                pushed = pulled = steps * 4 * self.n
            compute = float(self.compute[r])
            rows += [RankStats(r * P + p, steps * self.batch, now, compute, now - compute,
                               0.0, pushed, pulled) for p in range(P)]  # lock step
        return rows


def simulate(cfg, out: Path, calibration: Path, faults: Faults | None = None,
             overwrite: bool = False, start: np.ndarray | None = None) -> dict:
    """Run the config (``sync`` or ``sgd``) on the simulated clock; write ``out``; return
    the last ``/metrics`` row.  ``start``: float32 parameters to begin from (a warmstart)
    instead of the model's initialisation."""
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import load_dataset
    from mpibelief.layout import make_layout
    from mpibelief.model import Model
    from mpibelief.progress import Progress
    from mpibelief.results import ResultWriter

    check(cfg)
    costs = calibrate.read(calibration)
    data = load_dataset(cfg.data)
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    if start is not None:
        start = np.asarray(start)
        if start.dtype != np.float32 or start.shape != (model.n_params,):
            raise UserError(f"simulate: the warmstart must be float32 of shape"
                            f" ({model.n_params},), got {start.dtype} {start.shape}")
        model.params[:] = start
    work, work_source = exchange_work.for_run(calibration, model.n_params, cfg.compression)
    P = cfg.layout.partitions
    replica, split = partitioned.replica_costs(costs, model, cfg.train.batch, P)
    sim = SyncSim(cfg, data, model, replica, work, faults)
    R, name = sim.R, method(cfg)
    lay = make_layout(R * P, 0, R, P)
    attrs = {"config": cfg.to_toml(), "algorithm": cfg.run.algorithm, "method": name,
             "world_size": lay.world, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "n_params": model.n_params, "replicas": R,
             "simulated": True, "calibration": str(calibration),
             **{f"cost_{k}": getattr(costs, k) for k in calibrate.FIELDS},
             **work.attrs(), "work_source": work_source, "faults": repr(sim.faults),
             "exchange_model": "MPICH Iallreduce (Rabenseifner) / Iallgather(v) by size;"
                               " see mpibelief.simulate.collectives",
             "warmstart": start is not None, **split.attrs()}
    evaluate = Evaluator(data, cfg.train.eval_samples, cfg.run.seed)
    with ResultWriter(out, attrs, overwrite) as writer:
        progress = Progress(sim.total_steps * cfg.train.batch * R, f"{name} (simulated)")
        started = time.perf_counter()
        row = _loop(cfg, sim, evaluate, writer, progress)
        progress.close()
        _tables(writer, sim)
        real = time.perf_counter() - started
        writer.set_attrs({"real_seconds": real, "steps": sim.steps,
                          "real_seconds_per_step": real / max(sim.steps, 1)})
    return row


def _loop(cfg, sim: SyncSim, evaluate, writer, progress) -> dict:
    """Step until the last step or ``max_seconds``, evaluating as the real rank 0 does."""
    limit, every = cfg.train.max_seconds, cfg.train.eval_every
    row = _evaluate(sim, evaluate, writer, progress, 0)
    next_eval = every
    for step in range(1, sim.total_steps + 1):
        before = sim.clock.now()
        computed, _ = sim.step(step)
        elapsed = before + computed  # rank 0 decides when its gradient is done
        stop = step >= sim.total_steps or 0 < limit <= elapsed
        progress.update(sim.R * sim.batch, sim_s=round(sim.clock.now(), 3))
        if stop or elapsed >= next_eval:
            row = _evaluate(sim, evaluate, writer, progress, step)
            next_eval = sim.clock.now() + every
        if stop:
            break
    return row


def _evaluate(sim: SyncSim, evaluate, writer, progress, step: int) -> dict:
    row = {"wall_seconds": sim.clock.now(), "samples": step * sim.batch * sim.R,
           "updates": step, **evaluate(sim.model)}
    writer.append_metrics(row)
    progress.update(0, test_acc=row["test_accuracy"], sim_s=round(row["wall_seconds"], 3))
    return row


def _tables(writer, sim: SyncSim) -> None:
    """``/ranks``, and ``/compression`` in the real file's order (rank by rank)."""
    from mpibelief.results import COMPRESSION

    writer.write_ranks(sim.rank_stats())
    if sim.codecs is not None:
        series = writer.series("compression", COMPRESSION)
        for codec in sim.codecs:
            series.extend(codec.log.columns())
        series.flush()
