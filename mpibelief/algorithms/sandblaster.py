"""Sandblaster L-BFGS (Dean et al. 2012, section 4.2): a coordinator that never holds
the parameters drives L-BFGS on the shards, and replicas compute the batch's gradient
portion by portion, balanced dynamically, with backup copies of late portions.

One entry point per role, over one :class:`~mpibelief.ps.server.ParameterServer`
(built collectively, as Downpour's):

- shards serve their slice and run the vector commands of :mod:`mpibelief.ps.vectors`;
  their gradient pushes are summed into the ``grad`` accumulator instead of applied;
- replicas (:class:`~mpibelief.portion_worker.PortionWorker`) compute the portions
  they are handed and push their sums;
- the coordinator loads the model into the shards, runs
  :class:`~mpibelief.algorithms.sandblaster_lbfgs.LBFGSDriver` batch after batch,
  evaluates the parameters now and then (its clock paused, as SGD [1] does), and
  writes ``/metrics``, ``/ranks``, ``/server`` and the per-batch ``/sandblaster`` table.

The coordinator's traffic for training (commands to the shards, messages to the
replicas) is counted per batch; its pulls for evaluation are not training and are
counted apart, in ``/ranks``.  Partitioned replicas (``P`` > 1) are not built yet: the
server already gives each partition its own client range, and the shards count samples
per client (see :mod:`mpibelief.portion_worker`).
"""

from __future__ import annotations

import dataclasses

import numpy as np

from mpibelief.algorithms import Algorithm, register
from mpibelief.algorithms.downpour import replica_samples
from mpibelief.algorithms.sandblaster_dispatch import Dispatcher
from mpibelief.algorithms.sandblaster_lbfgs import BatchRecord, LBFGSDriver
from mpibelief.comm import Tag, quiet_send
from mpibelief.coordinator import Coordinator
from mpibelief.errors import ConfigError
from mpibelief.layout import COORDINATOR, SHARD, WORKER
from mpibelief.optim import Optimizer
from mpibelief.portion_worker import PortionWorker
from mpibelief.ps.server import ParameterServer
from mpibelief.ps.vectors import ShardSpace, install
from mpibelief.results import RankStats


def check(cfg) -> None:
    sb = cfg.sandblaster
    if cfg.layout.shards < 1:
        raise ConfigError("run.algorithm = 'sandblaster' needs layout.shards >= 1")
    if cfg.layout.partitions != 1:
        raise ConfigError("run.algorithm = 'sandblaster' runs replicas of one partition:"
                          " partitioned Sandblaster replicas are not built yet"
                          " (layout.partitions = 1)")
    if sb.batch and sb.batch < sb.portions:
        raise ConfigError(f"sandblaster.batch = {sb.batch} cannot be cut into"
                          f" {sb.portions} portions")


def server(ctx) -> ParameterServer:
    """The server: the coordinator (which loads) and every replica partition are clients.

    Every rank checks the replica count first (``layout.replicas = 0`` is only known
    now), so a refusal is the same on all of them, before anything collective.
    """
    lay = ctx.layout
    if ctx.cfg.sandblaster.portions < lay.replicas:
        raise ConfigError(f"sandblaster.portions = {ctx.cfg.sandblaster.portions} is fewer"
                          f" than the {lay.replicas} replicas: cut the batch finer")
    param_layout = ctx.model.layout(lay.partitions)
    workers = lay.worker_ranks()
    ranges = [(0, ctx.model.n_params)]
    ranges += [param_layout.partition(lay.roles[w].partition) for w in workers]
    return ParameterServer(ctx.comms.world, ctx.model.n_params, lay.shard_ranks(),
                           [lay.coordinator_rank, *workers], Optimizer("sgd", 1.0),
                           ranges=ranges, clock=ctx.clock)


def shard(ctx) -> None:
    ps = server(ctx)
    install(ps.shard)
    stats = ps.serve()
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def replica(ctx) -> None:
    cfg, role = ctx.cfg, ctx.role
    sb = cfg.sandblaster
    ps = server(ctx)
    lo, hi = ctx.model.layout(ctx.layout.partitions).partition(role.partition)
    slow = sb.slow_factor if role.index == sb.slow_replica else 1.0
    worker = PortionWorker(ctx.rank, ctx.model, ps.client(), ctx.data, sb.batch or
                           len(ctx.data.y_train), cfg.run.seed, ctx.clock, slow, lo, hi)
    stats = worker.serve(ctx.comms.control, ctx.comms.coordinator)
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def coordinate(ctx) -> dict:
    """Load the model, run the batches, evaluate now and then, stop everyone, write."""
    cfg, lay = ctx.cfg, ctx.layout
    sb = cfg.sandblaster
    ps = server(ctx)
    client = ps.client()
    client.load(ctx.model.params)
    space = ShardSpace(ps)
    space.copy("x", "params")
    dispatcher = Dispatcher(ctx.comms.control, lay.worker_ranks(), sb.push_every, sb.backups,
                            sb.max_copies)
    driver = LBFGSDriver(space, dispatcher, lambda counts: _samples(counts, ps, lay), sb,
                         len(ctx.data.y_train), ctx.clock)
    trained = {"seconds": 0.0, "samples": 0, "batches": 0}

    def snapshot(out: np.ndarray) -> tuple[int, int]:
        client.pull(out)
        return trained["batches"], trained["samples"]

    # The bar counts gradient samples: about three evaluations of the batch per step.
    coord = Coordinator(ctx, snapshot, 3 * sb.iterations * driver.batch,
                        name=f"sandblaster[{lay.replicas}]")
    records = _train(ctx, driver, coord, trained)
    dispatcher.stop()
    workers = coord.collect(lay.worker_ranks())
    ps.stop()
    shard_stats = coord.collect(lay.shard_ranks())
    coord.progress.close()
    _write(ctx.writer, records, client, shard_stats, workers, lay, dispatcher, space)
    wasted = sum(r.backups_wasted for r in records)
    print(f"mpibelief: {len(records)} L-BFGS steps, {sum(r.evals for r in records)}"
          f" evaluations; {sum(r.backups_issued for r in records)} backup copies,"
          f" {wasted} portions wasted", flush=True)
    ps.free()
    return {"train_seconds": trained["seconds"], **coord.row}


def _train(ctx, driver: LBFGSDriver, coord: Coordinator, trained: dict) -> list:
    """Batches until ``iterations`` (or ``train.max_seconds``); evaluation pauses time."""
    cfg = ctx.cfg
    records: list[BatchRecord] = []
    next_eval, failures = 0.0, 0
    _metrics(coord, trained)
    for k in range(cfg.sandblaster.iterations):
        rec = driver.step(k)
        records.append(rec)
        trained["seconds"] += rec.seconds
        trained["samples"] += rec.samples_applied
        trained["batches"] += 1
        failures = 0 if rec.accepted else failures + 1
        done = (k + 1 == cfg.sandblaster.iterations or failures >= 3
                or 0 < cfg.train.max_seconds <= trained["seconds"])
        if trained["seconds"] >= next_eval or done:
            _metrics(coord, trained)
            next_eval = trained["seconds"] + cfg.train.eval_every
        coord.progress.update(trained["samples"] - coord.progress.done, loss=rec.loss)
        if done:
            break
    return records


def _metrics(coord: Coordinator, trained: dict) -> None:
    """One ``/metrics`` row at the training time so far (evaluation not counted)."""
    coord.start = coord.clock.now() - trained["seconds"]
    coord.sample()


def _samples(counts: np.ndarray, ps: ParameterServer, lay) -> int:
    """Samples the shards summed: per client the least over the shards its range
    meets, per replica the least over its partitions (the coordinator, client 0,
    never pushes gradients)."""
    per_client = [min(counts[ps.shard_ranks.index(p.rank)][c] for p in parts)
                  for c, parts in enumerate(ps.client_parts)]
    return replica_samples(per_client[1:], lay)


def _write(writer, records, client, shard_stats, workers, lay, dispatcher, space) -> None:
    columns = {f.name: [getattr(r, f.name) for r in records]
               for f in dataclasses.fields(BatchRecord)}
    columns["done_by"] = np.array(columns["done_by"], np.int64).reshape(len(records), -1)
    writer.write_table("sandblaster", columns)
    cs = client.stats
    rows = [RankStats(lay.coordinator_rank, comm_seconds=cs.pull_seconds,
                      bytes_pushed=cs.bytes_pushed + dispatcher.bytes_out + space.bytes_out,
                      bytes_pulled=cs.bytes_pulled + dispatcher.bytes_in + space.bytes_in)]
    rows += [RankStats(s.rank, 0, s.wall_seconds, s.busy_seconds, 0.0, s.idle_seconds)
             for s in shard_stats]
    rows += [w.rank_stats() for w in workers]
    writer.write_ranks(rows)
    writer.write_table("server", {
        "shard_rank": lay.shard_ranks(),
        "applied": [s.applied for s in shard_stats],
        "refused": [s.refused for s in shard_stats],
        "bytes_in": [s.bytes_in for s in shard_stats],
        "busy_fraction": [s.busy_fraction for s in shard_stats],
    })


SANDBLASTER = register(Algorithm(
    "sandblaster", {COORDINATOR: coordinate, SHARD: shard, WORKER: replica}, check,
    "L-BFGS driven by commands on the shards, portions balanced over replicas"))
