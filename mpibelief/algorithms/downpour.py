"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded server.

One entry point per role, all over one :class:`~mpibelief.ps.server.ParameterServer`
(built collectively by every rank):

- shards serve their slice of the parameters until the coordinator stops them;
- the coordinator loads the initial model into the shards, releases the replicas,
  samples and evaluates the parameters while they train, and writes the result file;
- replicas pull, compute and push on their own shard of the data, each partition over
  its own range of the parameters.  With ``layout.partitions`` > 1 a replica is that
  many ranks, each holding one partition (:mod:`mpibelief.partition`); the shards hold
  the flat vector in partition-major order, which the coordinator converts to and
  from the whole model's order when it loads and evaluates.  With
  ``downpour.warmstart_steps`` > 0, replica 0 first trains alone for that many steps
  and then releases the others, which start from the shards' parameters.
"""

from __future__ import annotations

import numpy as np

from mpibelief.algorithms import Algorithm, register
from mpibelief.comm import Tag, quiet_recv, quiet_send
from mpibelief.coordinator import Coordinator
from mpibelief.errors import ConfigError
from mpibelief.layout import COORDINATOR, SHARD, WORKER
from mpibelief.optim import Optimizer
from mpibelief.partition import PartitionedModel
from mpibelief.ps.server import ParameterServer
from mpibelief.results import RankStats
from mpibelief.worker import Replica


def check(cfg) -> None:
    if cfg.layout.shards < 1:
        raise ConfigError("run.algorithm = 'downpour' needs layout.shards >= 1")


def steps_per_replica(cfg, shard_samples: int) -> int:
    """Steps for ``train.epochs`` passes over one replica's shard of the data."""
    return max(int(cfg.train.epochs * (shard_samples // cfg.train.batch)), 1)


def server(ctx) -> ParameterServer:
    """The parameter server of the run (collective): the coordinator and every replica
    partition are clients, each over its partition's range."""
    lay = ctx.layout
    param_layout = ctx.model.layout(lay.partitions)
    workers = lay.worker_ranks()
    ranges = [(0, ctx.model.n_params)]
    ranges += [param_layout.partition(lay.roles[w].partition) for w in workers]
    return ParameterServer(ctx.comms.world, ctx.model.n_params, lay.shard_ranks(),
                           [lay.coordinator_rank, *workers],
                           Optimizer.from_config(ctx.cfg.train), ranges=ranges,
                           clock=ctx.clock)


def shard(ctx) -> None:
    ps = server(ctx)
    stats = ps.serve()
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def replica(ctx) -> None:
    """A replica partition's life: optional warmstart, its share of the epochs, a report."""
    cfg, lay, role, comms = ctx.cfg, ctx.layout, ctx.role, ctx.comms
    ps = server(ctx)
    lo, hi = ctx.model.layout(lay.partitions).partition(role.partition)
    model = ctx.model
    if lay.partitions > 1:  # this rank's partition only; its range is all of its params
        model, lo, hi = PartitionedModel(ctx.model, comms.replica), 0, None
    quiet_recv(comms.control, source=comms.coordinator, tag=Tag.START)
    data = ctx.data.shard(role.index, lay.replicas)
    # Every partition of a replica has the same seed, so they step on the same batches.
    worker = Replica(ctx.rank, model, ps.client(), data, cfg.train, cfg.downpour,
                     seed=cfg.run.seed + 1 + role.index, clock=ctx.clock, lo=lo, hi=hi)
    deadline = ctx.clock.now() + (cfg.train.max_seconds or float("inf"))
    warm = cfg.downpour.warmstart_steps
    if warm and role.index == 0:  # then release the same partition of every other replica
        worker.train(warm, deadline)
        quiet_send(comms.across, None, range(1, comms.across.size), Tag.WARMSTART)
    elif warm:
        quiet_recv(comms.across, source=0, tag=Tag.WARMSTART)
    worker.train(steps_per_replica(cfg, len(data.y_train)), deadline)
    quiet_send(comms.control, worker.finish(), [comms.coordinator], Tag.REPORT)
    ps.free()


def coordinate(ctx) -> dict:
    """Seed the shards, watch the run, stop the shards, write the tables."""
    cfg, lay = ctx.cfg, ctx.layout
    ps = server(ctx)
    client = ps.client()
    P, model = lay.partitions, ctx.model
    client.load(model.params if P == 1 else model.to_layout(model.params, P))
    workers = lay.worker_ranks()
    quiet_send(ctx.comms.control, None, workers, Tag.START)
    flat = np.empty_like(model.params) if P > 1 else None  # the shards' order

    def snapshot(out: np.ndarray) -> tuple[int, int]:
        updates = int(np.min(client.pull(out if flat is None else flat))) - 1  # not the load
        if flat is not None:
            model.from_layout(flat, P, out=out)
        return updates, replica_samples(ps.samples_applied()[1:], lay)

    shard_size = len(ctx.data.y_train) // lay.replicas
    total = (lay.replicas * steps_per_replica(cfg, shard_size)
             + cfg.downpour.warmstart_steps) * cfg.train.batch
    coord = Coordinator(ctx, snapshot, total, name=f"downpour[{lay.replicas}]")
    reports = coord.watch(workers)
    ps.stop()  # the shards apply every push made before they return
    shard_stats = coord.collect(lay.shard_ranks())
    row = coord.finish()
    _write_tables(ctx.writer, client, reports, shard_stats, lay)
    applied = sorted({s.applied for s in shard_stats})
    refused = sorted({s.refused for s in shard_stats})
    nonfinite = sum(w.nonfinite for w in reports.values())
    print(f"mpibelief: {_counts(applied)} pushes applied, {_counts(refused)} refused"
          f" ({nonfinite} non-finite gradients computed); mean staleness"
          f" {mean_staleness(shard_stats):.2f} updates", flush=True)
    ps.free()
    return {"train_seconds": row["wall_seconds"], **row}


def replica_samples(per_worker: np.ndarray, lay) -> int:
    """Samples applied, all replicas together: a replica's step counts once all of its
    partitions' pushes are applied (``per_worker`` in ``lay.worker_ranks()`` order)."""
    per_replica = np.asarray(per_worker).reshape(lay.replicas, lay.partitions)
    return int(per_replica.min(axis=1).sum())


def _counts(values: list[int]) -> str:
    return str(values[0]) if len(values) == 1 else "/".join(map(str, values))


def merged_staleness(shard_stats) -> np.ndarray:
    width = max(len(s.staleness) for s in shard_stats)
    total = np.zeros(width, np.int64)
    for s in shard_stats:
        total[: len(s.staleness)] += s.staleness
    return total


def mean_staleness(shard_stats) -> float:
    hist = merged_staleness(shard_stats)
    return float((hist * np.arange(len(hist))).sum() / max(hist.sum(), 1))


def _write_tables(writer, client, reports: dict, shard_stats: list, lay) -> None:
    """``/ranks`` (one row per rank, coordinator first) and ``/server``."""
    cs = client.stats
    rows = [RankStats(lay.coordinator_rank, comm_seconds=cs.pull_seconds,
                      wait_seconds=cs.wait_seconds, bytes_pulled=cs.bytes_pulled)]
    rows += [RankStats(s.rank, 0, s.wall_seconds, s.busy_seconds, 0.0, s.idle_seconds)
             for s in shard_stats]
    rows += [w.rank_stats() for _, w in sorted(reports.items())]
    writer.write_ranks(rows)
    writer.write_table("server", {
        "shard_rank": lay.shard_ranks(),
        "applied": [s.applied for s in shard_stats],
        "refused": [s.refused for s in shard_stats],
        "staleness": merged_staleness(shard_stats),
        "bytes_in": [s.bytes_in for s in shard_stats],
        "busy_fraction": [s.busy_fraction for s in shard_stats],
    })


DOWNPOUR = register(Algorithm(
    "downpour", {COORDINATOR: coordinate, SHARD: shard, WORKER: replica}, check,
    "asynchronous replicas on a sharded parameter server (Downpour SGD)"))
