"""``mpibelief simulate CONFIG``: a run on a simulated cluster, as a result file.

:data:`SIMULATORS` picks the simulator by ``run.algorithm``: Downpour is here (on
:mod:`.cluster`); synchronous SGD, Strom-compressed or not, and SGD [1] are in
:mod:`.sync`; Sandblaster L-BFGS in :mod:`.sandblaster`.  The rest of this docstring
is Downpour's.

The run is the config's (``layout.shards`` shards, ``layout.replicas`` replicas, the
same data, model, seeds, ``train`` and ``downpour`` tables as ``mpibelief train``), the
file is the layout of :mod:`mpibelief.results`, and the coordinator's part is played
here: every ``train.eval_every`` *simulated* seconds (or, given ``sample_at``, once the
samples applied reach each of those counts: sampling costs no simulated time) the
shards' parameters are evaluated into ``/metrics`` (``wall_seconds`` is simulated
seconds), and at the end ``/ranks`` and ``/server`` (staleness histogram, busy
fractions) are written.  The root attributes say ``simulated = True``, name the
calibration file the costs came from and the machine (``cores``: 0 for a core per rank;
``background``; :mod:`.cores`).  Replicas of ``layout.partitions`` > 1: see
:mod:`.partitioned` (``/ranks`` then has a row per partition, as a real run's, each with
its replica's times and its own bytes).
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np

from mpibelief.errors import ConfigError
from mpibelief.simulate import calibrate, partitioned
from mpibelief.simulate import sync as sync_sim
from mpibelief.simulate.cluster import Cluster, Costs, Faults, SimStore
from mpibelief.simulate.cores import Machine


class SimClock:
    """The replicas' clock: the simulation's time (set once the cluster exists)."""

    simulated = True
    env = None

    def now(self) -> float:
        return self.env.now if self.env is not None else 0.0

    def sleep(self, seconds: float) -> None:
        raise RuntimeError("a simulated role must not sleep: the cluster moves time")

    cpu = now


def check(cfg) -> None:
    """The config's simulator accepts it (one-line ConfigError otherwise)."""
    _simulator(cfg)[0](cfg)


def simulate(cfg, out: Path, calibration: Path, faults: Faults | None = None,
             overwrite: bool = False, start=None, **options) -> dict:
    """Run the config on its simulator; write ``out``; return the last ``/metrics`` row.
    ``start``: float32 parameters to begin from (a warmstart), where the simulator takes
    one; ``options`` (not None) the simulator's own, e.g. Downpour's ``machine``,
    ``sample_at`` and ``seed`` (:func:`simulate_downpour`)."""
    extra = {k: v for k, v in {"start": start, **options}.items() if v is not None}
    return _simulator(cfg)[1](cfg, out, calibration, faults, overwrite, **extra)


def _sandblaster(name: str):
    """:mod:`.sandblaster`'s ``name``, imported when called (it imports this module)."""
    def call(*args, **kwargs):
        from mpibelief.simulate import sandblaster

        return getattr(sandblaster, name)(*args, **kwargs)
    return call


def _simulator(cfg):
    if cfg.run.algorithm not in SIMULATORS:
        raise ConfigError(f"simulate runs run.algorithm = {' or '.join(map(repr, SIMULATORS))},"
                          f" not {cfg.run.algorithm!r}")
    return SIMULATORS[cfg.run.algorithm]


def check_downpour(cfg) -> None:
    """What the Downpour simulator runs: dense pushes, explicit R and S."""
    lay = cfg.layout
    if lay.replicas < 1 or lay.shards < 1:
        raise ConfigError("simulate needs layout.replicas >= 1 and layout.shards >= 1"
                          " (e.g. --set layout.replicas=4)")
    if cfg.compression.enabled:
        raise ConfigError("simulate does not model compressed pushes yet")


def build(cfg, data, costs: Costs, faults: Faults, start: np.ndarray | None = None,
          machine: Machine | None = None, seed: int | None = None):
    """The coordinator's model, the shard states (loaded) and the cluster.  ``costs`` are
    a replica's (for P partitions: :func:`.partitioned.replica_costs`); the stores move
    each partition's range in parallel.

    ``start``: a parameter vector to start from instead of the seeded initialisation
    (a shared warmstart, as every distributed run of the paper's Figure 4 had);
    ``machine``: the cores the ranks share (default: a core each); ``seed``: the
    cluster's timing draws (default ``run.seed``)."""
    from mpibelief.algorithms.downpour import steps_per_replica
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer
    from mpibelief.ps.memory import MemoryServer
    from mpibelief.worker import Replica

    R, S, P = cfg.layout.replicas, cfg.layout.shards, cfg.layout.partitions
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    if start is not None:
        if start.shape != model.params.shape:
            raise ConfigError(f"simulate: the start vector has {start.size} parameters,"
                              f" the model {model.n_params}")
        model.params[:] = start
    optimizer = Optimizer.from_config(cfg.train)
    optimizer.warm()
    n = model.n_params
    server = MemoryServer(n, S, optimizer, ranges=[(0, n)] * (R + 1))
    server.client(0).load(model.params)
    clock, stores, replicas, steps, start_up = SimClock(), [], [], [], []
    pieces = partitioned.shard_pieces(model, P, server.slices)
    for r in range(R):
        stores.append(SimStore(server.client(r + 1), pieces))
        tick = time.process_time()  # the real replica's start-up: this same copy
        shard = data.shard(r, R)
        start_up.append(time.process_time() - tick)
        own = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
        replicas.append(Replica(1 + S + r * P, own, stores[-1], shard, cfg.train, cfg.downpour,
                                seed=cfg.run.seed + 1 + r, clock=clock))
        warm = cfg.downpour.warmstart_steps if r == 0 else 0
        steps.append(steps_per_replica(cfg, len(shard.y_train)) + warm)
    cluster = Cluster(server, replicas, stores, costs, steps, faults,
                      cfg.downpour.warmstart_steps, cfg.run.seed if seed is None else seed,
                      machine or Machine(), cfg.train.eval_every, tuple(start_up))
    clock.env = cluster.env
    return model, server, cluster


def simulate_downpour(cfg, out: Path, calibration: Path, faults: Faults | None = None,
                      overwrite: bool = False, start: np.ndarray | None = None,
                      machine: Machine | None = None, sample_at=None,
                      seed: int | None = None) -> dict:
    """Run the config on the simulated cluster; write ``out``; return the last row.

    ``start``: float32 parameters to start from (e.g. a shared warmstart) instead of
    the seeded initialisation; the file then says ``started_from = "given vector"``.
    ``machine``: the cores the ranks share (default: a core each); ``sample_at``:
    samples-applied counts to evaluate at (default: every ``train.eval_every``);
    ``seed``: the timing draws' (default ``run.seed``)."""
    from mpibelief.algorithms.downpour import method
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import load_dataset
    from mpibelief.layout import make_layout
    from mpibelief.progress import Progress
    from mpibelief.results import ResultWriter

    check_downpour(cfg)
    faults, machine = faults or Faults(), machine or Machine()
    costs = calibrate.read(calibration)
    data = load_dataset(cfg.data)
    R, S, P = cfg.layout.replicas, cfg.layout.shards, cfg.layout.partitions
    replica, split = partitioned.replica_costs(costs, _shape(cfg, data), cfg.train.batch, P)
    model, server, cluster = build(cfg, data, replica, faults, start, machine, seed)
    lay = make_layout(1 + S + R * P, S, R, P)
    name = method(cfg, R)
    attrs = {"config": cfg.to_toml(), "algorithm": "downpour", "method": name,
             "world_size": lay.world, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "n_params": model.n_params, "replicas": R,
             "simulated": True, "calibration": str(calibration),
             **{f"cost_{k}": getattr(costs, k) for k in calibrate.FIELDS + calibrate.OPTIONAL},
             "faults": repr(faults), **split.attrs(), "cores": machine.cores or 0,
             "background": machine.background,
             "started_from": "init" if start is None else "given vector"}
    evaluate = Evaluator(data, cfg.train.eval_samples, cfg.run.seed)
    total = sum(cluster.steps) * cfg.train.batch
    with ResultWriter(out, attrs, overwrite) as writer:
        progress = Progress(total, f"{name} (simulated)")
        started = time.perf_counter()
        row = _loop(cfg, cluster, server, model, evaluate, writer, progress, sample_at)
        progress.close()
        _tables(writer, lay, server, cluster)
        writer.set_attrs({"real_seconds": time.perf_counter() - started,
                          "failed_replicas": sorted(cluster.failed)})
    return row


def _shape(cfg, data):
    """The config's model, unallocated: its layers' shapes for the scaling model."""
    from mpibelief.model import Model

    return Model.from_config(cfg.model, data.n_inputs, data.n_classes, allocate=False)


def _loop(cfg, cluster, server, model, evaluate, writer, progress, at=None) -> dict:
    """Sample at the start, every ``eval_every`` simulated seconds (or, given ``at``, once
    the samples applied reach each of ``at``, looking every fiftieth of it) and at the
    end or ``max_seconds``."""
    limit = cfg.train.max_seconds or float("inf")
    every = cfg.train.eval_every if at is None else cfg.train.eval_every / 50
    targets = None if at is None else sorted(at)
    row = _sample(cluster, server, model, evaluate, writer, progress)
    while not (cluster.finished or cluster.env.now >= limit):
        cluster.run(min(every, limit - cluster.env.now))
        done = int(server.samples_applied()[1:].sum())
        if targets is None or (targets and done >= targets[0]) or cluster.finished \
                or cluster.env.now >= limit:
            row = _sample(cluster, server, model, evaluate, writer, progress)
            while targets and targets[0] <= done:
                targets.pop(0)
    return row


def _sample(cluster, server, model, evaluate, writer, progress) -> dict:
    model.params[:] = server.params()
    versions = [s.version for s in server.states]
    row = {"wall_seconds": cluster.env.now, "updates": min(versions) - 1,
           "samples": int(server.samples_applied()[1:].sum()), **evaluate(model)}
    writer.append_metrics(row)
    progress.update(row["samples"] - progress.done, test_acc=row["test_accuracy"],
                    sim_s=round(cluster.env.now, 2))
    return row


def _tables(writer, lay, server, cluster) -> None:
    """``/ranks`` and ``/server`` as a real Downpour run writes them."""
    from mpibelief.algorithms.downpour import server_table
    from mpibelief.results import RankStats

    now = cluster.env.now
    shard_stats = [s.stats for s in server.states]
    rows = [RankStats(lay.coordinator_rank)]
    rows += [RankStats(rank, 0, now, t.busy_seconds, 0.0, now - t.busy_seconds)
             for rank, t in zip(lay.shard_ranks(), cluster.times, strict=True)]
    n = server.n_params
    for r, (rep, store) in enumerate(zip(cluster.replicas, cluster.stores, strict=True)):
        rep.stats.wait_seconds = store.stats.wait_seconds
        rep.stats.bytes_pushed, rep.stats.bytes_pulled = (store.stats.bytes_pushed,
                                                          store.stats.bytes_pulled)
        whole = rep.stats.rank_stats()
        for rank, group in zip(lay.worker_ranks(r), store.pieces, strict=True):
            share = sum(size for _, size in group)  # this partition's parameters
            rows.append(dataclasses.replace(whole, rank=rank,
                                            bytes_pushed=whole.bytes_pushed // n * share,
                                            bytes_pulled=whole.bytes_pulled // n * share))
    writer.write_ranks(rows)
    writer.write_table("server", {
        **server_table(lay, shard_stats, np.array(cluster.busy_fractions())),
        "max_queue": [t.max_queue for t in cluster.times],
    })


SIMULATORS = {  # run.algorithm -> (check, simulate)
    "downpour": (check_downpour, simulate_downpour),
    "sync": (sync_sim.check, sync_sim.simulate),
    "sgd": (sync_sim.check, sync_sim.simulate),
    "sandblaster": (_sandblaster("check"), _sandblaster("simulate")),
}
