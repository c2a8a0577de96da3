"""``mpibelief simulate CONFIG``: a Downpour run on the simulated cluster, as a result file.

The run is the config's (``layout.shards`` shards, ``layout.replicas`` replicas, the
same data, model, seeds, ``train`` and ``downpour`` tables as ``mpibelief train``), the
file is the layout of :mod:`mpibelief.results`, and the coordinator's part is played
here: every ``train.eval_every`` *simulated* seconds (or, given ``sample_at``, once the
samples applied reach each of those counts: sampling costs no simulated time) the
shards' parameters are evaluated into ``/metrics`` (``wall_seconds`` is simulated
seconds), and at the end ``/ranks`` and ``/server`` (staleness histogram, busy
fractions) are written.  The root attributes say ``simulated = True``, name the
calibration file the costs came from and the machine (``cores``: 0 for a core per rank;
``background``).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from mpibelief.errors import ConfigError
from mpibelief.simulate import calibrate
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
    """What the simulator runs today: Downpour, P = 1, dense pushes, explicit R and S."""
    if cfg.run.algorithm != "downpour":
        raise ConfigError(f"simulate runs run.algorithm = 'downpour', not {cfg.run.algorithm!r}")
    lay = cfg.layout
    if lay.replicas < 1 or lay.shards < 1 or lay.partitions != 1:
        raise ConfigError("simulate needs layout.replicas >= 1, layout.shards >= 1 and"
                          " layout.partitions = 1 (e.g. --set layout.replicas=4)")
    if cfg.compression.enabled:
        raise ConfigError("simulate does not model compressed pushes yet")


def build(cfg, data, costs: Costs, faults: Faults, machine: Machine | None = None,
          seed: int | None = None):
    """The coordinator's model, the shard states (loaded) and the cluster (``seed``: of
    its timing draws, default ``run.seed``)."""
    from mpibelief.algorithms.downpour import steps_per_replica
    from mpibelief.model import Model
    from mpibelief.optim import Optimizer
    from mpibelief.ps.memory import MemoryServer
    from mpibelief.worker import Replica

    R, S = cfg.layout.replicas, cfg.layout.shards
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    optimizer = Optimizer.from_config(cfg.train)
    optimizer.warm()
    n = model.n_params
    server = MemoryServer(n, S, optimizer, ranges=[(0, n)] * (R + 1))
    server.client(0).load(model.params)
    clock, stores, replicas, steps = SimClock(), [], [], []
    for r in range(R):
        stores.append(SimStore(server.client(r + 1)))
        shard = data.shard(r, R)
        own = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
        replicas.append(Replica(1 + S + r, own, stores[-1], shard, cfg.train, cfg.downpour,
                                seed=cfg.run.seed + 1 + r, clock=clock))
        warm = cfg.downpour.warmstart_steps if r == 0 else 0
        steps.append(steps_per_replica(cfg, len(shard.y_train)) + warm)
    cluster = Cluster(server, replicas, stores, costs, steps, faults,
                      cfg.downpour.warmstart_steps, cfg.run.seed if seed is None else seed,
                      machine or Machine(), cfg.train.eval_every)
    clock.env = cluster.env
    return model, server, cluster


def simulate(cfg, out: Path, calibration: Path, faults: Faults | None = None,
             overwrite: bool = False, machine: Machine | None = None,
             sample_at=None, seed: int | None = None) -> dict:
    """Run the config on the simulated cluster; write ``out``; return the last row.

    ``machine``: the cores the ranks share (default: a core each); ``sample_at``:
    samples-applied counts to evaluate at (default: every ``train.eval_every``);
    ``seed``: the timing draws' (default ``run.seed``).
    """
    from mpibelief.algorithms.downpour import method
    from mpibelief.coordinator import Evaluator
    from mpibelief.data import load_dataset
    from mpibelief.layout import make_layout
    from mpibelief.progress import Progress
    from mpibelief.results import ResultWriter

    check(cfg)
    faults, machine = faults or Faults(), machine or Machine()
    costs = calibrate.read(calibration)
    data = load_dataset(cfg.data)
    model, server, cluster = build(cfg, data, costs, faults, machine, seed)
    R, S = cfg.layout.replicas, cfg.layout.shards
    lay = make_layout(1 + S + R, S, R, 1)
    name = method(cfg, R)
    attrs = {"config": cfg.to_toml(), "algorithm": "downpour", "method": name,
             "world_size": lay.world, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "n_params": model.n_params, "replicas": R,
             "simulated": True, "calibration": str(calibration),
             **{f"cost_{k}": getattr(costs, k) for k in calibrate.FIELDS + calibrate.OPTIONAL},
             "faults": repr(faults), "cores": machine.cores or 0,
             "background": machine.background}
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
    for rep, store in zip(cluster.replicas, cluster.stores, strict=True):
        rep.stats.wait_seconds = store.stats.wait_seconds
        rep.stats.bytes_pushed, rep.stats.bytes_pulled = (store.stats.bytes_pushed,
                                                          store.stats.bytes_pulled)
        rows.append(rep.stats.rank_stats())
    writer.write_ranks(rows)
    writer.write_table("server", {
        **server_table(lay, shard_stats, np.array(cluster.busy_fractions())),
        "max_queue": [t.max_queue for t in cluster.times],
    })
