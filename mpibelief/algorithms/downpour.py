"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded server.

Every rank calls :func:`train_downpour`; its role decides what it does:

- shards serve their slice of the parameters until the coordinator stops them;
- the coordinator seeds the shards with the initial model, then samples and
  evaluates the parameters while the replicas train, and writes the result file;
- replicas pull, compute and push on their own shard of the data.  With
  ``downpour.warmstart_steps`` > 0, replica 0 first trains alone for that many steps
  and only then releases the others, which start from the shards' parameters.
"""

from __future__ import annotations

import time

import numpy as np

from mpibelief.algorithms.sgd import Evaluator
from mpibelief.comm import CONTROL_TAG, quiet_barrier, quiet_recv, quiet_wait
from mpibelief.coordinator import Coordinator
from mpibelief.layout import COORDINATOR, SHARD
from mpibelief.optim import Optimizer
from mpibelief.results import RANK_FIELDS
from mpibelief.server import ParameterServer
from mpibelief.worker import Replica

WARMSTART_TAG = CONTROL_TAG + 1


def steps_per_replica(cfg, shard_samples: int) -> int:
    """Steps for ``train.epochs`` passes over one replica's shard of the data."""
    return max(int(cfg.train.epochs * (shard_samples // cfg.train.batch)), 1)


def train_downpour(cfg, comm, lay, data, model, writer) -> dict | None:
    """Run Downpour on every rank; returns the summary on the coordinator."""
    role = lay.roles[comm.rank]
    clients = [0, *lay.worker_ranks()]
    ps = ParameterServer(comm, model.n_params, lay.shard_ranks(), clients,
                         Optimizer.from_config(cfg.train))
    summary = None
    if role.kind == SHARD:
        quiet_barrier(comm)  # the coordinator has seeded the shards
        stats = ps.serve()
        quiet_wait(comm.isend(stats, dest=0, tag=CONTROL_TAG))
    else:
        client = ps.client()
        if role.kind == COORDINATOR:
            client.set_params(model.params)
        quiet_barrier(comm)
        if role.kind == COORDINATOR:
            summary = _coordinate(cfg, comm, lay, ps, client, data, model, writer)
        else:
            _replicate(cfg, comm, lay, role, client, data, model)
    quiet_barrier(comm)
    ps.free()
    return summary


def _replicate(cfg, comm, lay, role, client, data, model) -> None:
    """A replica's life: optional warmstart, its share of the epochs, a report."""
    shard = data.shard(role.index, lay.replicas)
    replica = Replica(comm.rank, model, client, shard, cfg.train, cfg.downpour,
                      seed=cfg.run.seed + 1 + role.index)
    deadline = time.perf_counter() + (cfg.train.max_seconds or float("inf"))
    warm = cfg.downpour.warmstart_steps
    others = [r for r in lay.worker_ranks() if r != comm.rank]
    if warm and role.index == 0:
        replica.train(warm, deadline)
        for request in [comm.isend(None, dest=r, tag=WARMSTART_TAG) for r in others]:
            quiet_wait(request)
    elif warm:
        quiet_recv(comm, source=lay.worker_ranks(0)[0], tag=WARMSTART_TAG)
    replica.train(steps_per_replica(cfg, len(shard.y_train)), deadline)
    quiet_wait(comm.isend(replica.finish(), dest=0, tag=CONTROL_TAG))


def _coordinate(cfg, comm, lay, ps, client, data, model, writer) -> dict:
    """Watch the run, stop the shards, and write the per-rank and server tables."""
    shard_size = len(data.y_train) // lay.replicas
    total = (lay.replicas * steps_per_replica(cfg, shard_size)
             + cfg.downpour.warmstart_steps) * cfg.train.batch
    coord = Coordinator(comm, client, model,
                        Evaluator(data, cfg.train.eval_samples, cfg.run.seed), writer,
                        samples_per_update=cfg.train.batch * cfg.downpour.n_push,
                        total_samples=total, eval_every=cfg.train.eval_every,
                        name=f"downpour[{lay.replicas}]")
    reports = coord.watch(lay.worker_ranks())
    ps.stop()  # returns once the shards have applied every push
    shard_stats = coord.collect(lay.shard_ranks())
    row = coord.finish()
    _write_tables(writer, client, reports, shard_stats, lay)
    # Every push reaches every shard, so one shard's counts are the pushes'.
    nonfinite = sum(w.nonfinite for w in reports.values())
    print(f"mpibelief: {shard_stats[0].applied} pushes applied, {shard_stats[0].refused}"
          f" refused ({nonfinite} non-finite gradients computed); mean staleness"
          f" {mean_staleness(shard_stats):.2f} updates", flush=True)
    return {"train_seconds": row["wall_seconds"], **row}


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
    rows = [(0, 0, 0.0, 0.0, cs.pull_seconds, cs.wait_seconds, 0, cs.bytes_pulled)]
    rows += [(s.rank, 0, s.wall_seconds, s.busy_seconds, 0.0, s.idle_seconds, 0, 0)
             for s in shard_stats]
    rows += [(r, w.samples, w.train_seconds, w.compute_seconds, w.comm_seconds,
              w.wait_seconds, w.bytes_pushed, w.bytes_pulled) for r, w in sorted(reports.items())]
    writer.write_table("ranks", {n: [row[i] for row in rows] for i, n in enumerate(RANK_FIELDS)})
    writer.write_table("server", {
        "shard_rank": lay.shard_ranks(),
        "applied": [s.applied for s in shard_stats],
        "refused": [s.refused for s in shard_stats],
        "staleness": merged_staleness(shard_stats),
        "bytes_in": [s.bytes_in for s in shard_stats],
    })
