"""Downpour SGD (Dean et al. 2012, section 4.1): asynchronous replicas, sharded server.

One entry point per role, all over one :class:`~mpibelief.ps.server.ParameterServer`
(built collectively by every rank):

- shards serve their slice of the parameters until the coordinator stops them;
- the coordinator loads the initial model (or a checkpoint) into the shards, releases
  the replicas, samples and evaluates the parameters while they train, writes
  checkpoints, gives up on replicas that stop making progress, and writes the result
  file;
- replicas pull, compute and push on their own shard of the data, each partition over
  its own range of the parameters, until their epochs are done or the coordinator says
  stop.  With ``layout.partitions`` > 1 a replica is that many ranks, each holding one
  partition (:mod:`mpibelief.partition`); the shards hold the flat vector in
  partition-major order, which the coordinator converts to and from the whole model's
  order when it loads and evaluates.  With ``downpour.warmstart_steps`` > 0, replica 0
  first trains alone for that many steps and then releases the others, which start
  from the shards' parameters.

Resuming (``--resume``): the shards load their slices, optimiser state and counters
from the checkpoint; each replica skips the batches whose pushes the shards had applied
(the same batch order follows, from the same seed), so no step is repeated or lost.

With ``compression.enabled`` every replica pushes Strom-compressed packets (its own
residual, :class:`~mpibelief.compressor.Compressor`) and the shards decode and apply
them; each push is logged in ``/compression``.
"""

from __future__ import annotations

import numpy as np

from mpibelief import checkpoint
from mpibelief.algorithms import Algorithm, register
from mpibelief.comm import Tag, quiet_recv, quiet_send
from mpibelief.compressor import Compressor, label
from mpibelief.coordinator import Coordinator, Supervision
from mpibelief.errors import ConfigError, UserError
from mpibelief.faults import Injector, ReplicaStoppedError
from mpibelief.layout import COORDINATOR, SHARD, WORKER
from mpibelief.optim import Optimizer
from mpibelief.partition import PartitionedModel
from mpibelief.ps.server import ParameterServer
from mpibelief.results import COMPRESSION, RankStats
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
                           clock=ctx.clock, stall_seconds=ctx.cfg.faults.stall_seconds)


def shard(ctx) -> None:
    ps = server(ctx)
    stats = ps.serve(tick=sigterm_notice(ctx))
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def sigterm_notice(ctx):
    """A per-loop hook: pass a SIGTERM this rank got on to the coordinator, once."""
    told = []

    def tick() -> None:
        if not told and ctx.signals is not None and ctx.signals.terminate.is_set():
            told.append(True)
            quiet_send(ctx.comms.world, ("sigterm", ""), [ctx.comms.coordinator], Tag.NOTICE)
    return tick


def _agreed(model, stop, deadline: float, clock):
    """For a replica of several partitions: stop when partition 0 says so (the stop
    message or the deadline), so that no partition starts a step its peers skip."""
    def stop_all() -> bool:
        return bool(model.agree(float(stop() or clock.now() >= deadline))[0])
    return stop_all


def replica(ctx) -> None:
    """A replica partition's life: start, optional warmstart, its steps, a report."""
    cfg, lay, role, comms = ctx.cfg, ctx.layout, ctx.role, ctx.comms
    ps = server(ctx)
    lo, hi = ctx.model.layout(lay.partitions).partition(role.partition)
    model = ctx.model
    if lay.partitions > 1:  # this rank's partition only; its range is all of its params
        model, lo, hi = PartitionedModel(ctx.model, comms.replica), 0, None
    start = quiet_recv(comms.control, source=comms.coordinator, tag=Tag.START)
    data = ctx.data.shard(role.index, lay.replicas)
    compressor = None
    if cfg.compression.enabled:  # each partition compresses its own range
        Compressor.warm()
        compressor = Compressor((model.n_params if hi is None else hi) - lo,
                                cfg.compression, ctx.rank)
    # Every partition of a replica has the same seed, so they step on the same batches.
    worker = Replica(ctx.rank, model, ps.client(), data, cfg.train, cfg.downpour,
                     seed=cfg.run.seed + 1 + role.index, clock=ctx.clock, lo=lo, hi=hi,
                     injector=Injector(cfg.faults, ctx.rank, role.index, ctx.clock),
                     compressor=compressor)
    done, warm = start["skip"][role.index], start["warm"]
    worker.skip(done)
    own_warm = cfg.downpour.warmstart_steps if role.index == 0 else 0
    total = steps_per_replica(cfg, len(data.y_train)) + own_warm
    stop = _stop_check(ctx)
    deadline = ctx.clock.now() + (cfg.train.max_seconds or float("inf"))
    until = _agreed(model, stop, deadline, ctx.clock) if lay.partitions > 1 else stop
    if lay.partitions > 1:
        deadline = float("inf")  # in the agreed stop
    try:
        if warm and role.index == 0:  # then release the same partition of the others
            worker.train(warm, deadline, until)
            quiet_send(comms.across, None, range(1, comms.across.size), Tag.WARMSTART)
        elif warm:
            quiet_recv(comms.across, source=0, tag=Tag.WARMSTART)
        worker.train(total - done - worker.stats.steps, deadline, until)
    except ReplicaStoppedError:
        stop.wait()  # an injected failure: silent from now on, until told to stop
    quiet_send(comms.control, worker.finish(), [comms.coordinator], Tag.REPORT)
    ps.free()


class _stop_check:  # noqa: N801 - used as a function: stop() -> bool
    """Whether the coordinator said stop (checked between steps: one Iprobe)."""

    def __init__(self, ctx):
        self.comm, self.source = ctx.comms.control, ctx.comms.coordinator
        self.notice = sigterm_notice(ctx)
        self.told = False

    def __call__(self) -> bool:
        self.notice()
        if not self.told and self.comm.Iprobe(self.source, Tag.STOP):
            self.comm.recv(source=self.source, tag=Tag.STOP)
            self.told = True
        return self.told

    def wait(self) -> None:
        if not self.told:
            quiet_recv(self.comm, source=self.source, tag=Tag.STOP)
            self.told = True


def coordinate(ctx) -> dict:
    """Seed the shards, watch the run, stop the shards, write the tables."""
    cfg, lay = ctx.cfg, ctx.layout
    ps = server(ctx)
    client = ps.client()
    workers = lay.worker_ranks()
    skip, offset = _seed_shards(ctx, ps, client)
    warm = max(cfg.downpour.warmstart_steps - skip[0], 0)
    quiet_send(ctx.comms.control, {"skip": skip, "warm": warm}, workers, Tag.START)
    P, model = lay.partitions, ctx.model
    flat = np.empty_like(model.params) if P > 1 else None  # the shards' order

    def snapshot(out: np.ndarray) -> tuple[int, int]:
        updates = int(np.min(client.pull(out if flat is None else flat))) - 1  # not the load
        if flat is not None:
            model.from_layout(flat, P, out=out)
        return updates, replica_samples(ps.samples_applied()[1:], lay)

    shard_size = len(ctx.data.y_train) // lay.replicas
    total = (lay.replicas * steps_per_replica(cfg, shard_size)
             + cfg.downpour.warmstart_steps) * cfg.train.batch
    supervision = Supervision(progress=lambda: ps.samples_applied()[1:], versions=ps.versions,
                              checkpoint=lambda: write_checkpoint(ctx, ps, coord),
                              shard_ranks=lay.shard_ranks())
    name = method(cfg, lay.replicas)
    ctx.writer.set_attrs({"method": name})
    coord = Coordinator(ctx, snapshot, total, name, offset, supervision)
    reports = coord.watch(workers)
    lost, gone = coord.gather_lost()
    reports.update(lost)
    if gone:  # hung ranks cannot join the shutdown: record what we have, then end the job
        ps.stop()
        _close(ctx, coord, client, reports, coord.collect(lay.shard_ranks()))
        raise UserError(f"rank(s) {gone} stopped answering; the run finished without them"
                        f" ({ctx.writer.path} is complete); ending the job")
    ps.stop()  # the shards apply every push made before they return
    summary = _close(ctx, coord, client, reports, coord.collect(lay.shard_ranks()))
    ps.free()
    return summary


def _close(ctx, coord, client, reports: dict, shard_stats: list) -> dict:
    """Last sample, tables, the status line; raises a divergence after recording it."""
    row = coord.finish()
    _write_tables(ctx.writer, client, reports, shard_stats, ctx.layout)
    coord.record_failures()
    applied = sorted({s.applied for s in shard_stats})
    refused = sorted({s.refused for s in shard_stats})
    nonfinite = sum(w.nonfinite for w in reports.values())
    print(f"mpibelief: {_counts(applied)} pushes applied, {_counts(refused)} refused"
          f" ({nonfinite} non-finite gradients computed); mean staleness"
          f" {mean_staleness(shard_stats):.2f} updates", flush=True)
    if coord.error is not None:
        raise coord.error
    summary = {"train_seconds": row["wall_seconds"], **row}
    if coord.status():
        summary["status"] = coord.status()
    return summary


def _seed_shards(ctx, ps, client) -> tuple[list[int], float]:
    """Load the initial model, or restore the checkpoint being resumed.

    Returns each replica's steps already applied and the run seconds behind us.
    """
    if ctx.resume is None:
        client.load(shards_order(ctx.model, ctx.layout.partitions))
        return [0] * ctx.layout.replicas, 0.0
    restore_shards(ctx, ps, client)
    per_worker = ps.samples_applied()[1:]
    per_replica = np.asarray(per_worker).reshape(ctx.layout.replicas, -1).min(axis=1)
    return [int(s) // ctx.cfg.train.batch for s in per_replica], ctx.resume["wall_seconds"]


def restore_shards(ctx, ps, client) -> None:
    """The shards load their parts of the checkpoint being resumed (``ctx.resume``); the
    result file records which, and the digest of the parameters restored."""
    number = ctx.resume["number"]
    for answer in ps.command("restore", str(ctx.checkpoints), number, reply=True):
        if answer != "ok":
            raise UserError(f"cannot resume from checkpoint {number}: {answer}")
    ordered = np.empty_like(ctx.model.params)
    client.pull(ordered)
    ctx.model.params[:] = ordered if ctx.layout.partitions == 1 else ctx.model.from_layout(
        ordered, ctx.layout.partitions)
    ctx.writer.set_attrs({"resumed_from": number, "resume_params_sha256":
                          checkpoint.digest({"params": ctx.model.params})})


def shards_order(model, partitions: int) -> np.ndarray:
    """The whole model's parameters in the order the shards hold them."""
    return model.params if partitions == 1 else model.to_layout(model.params, partitions)


def write_checkpoint(ctx, ps, coord, extra: dict | None = None) -> int:
    """Every shard writes its part, then the manifest commits them; returns its number.

    ``extra``: the algorithm's own coordinator state, saved in the manifest beside the
    run's (JSON-able).
    """
    folder = ctx.checkpoints
    number = max(checkpoint.numbers(folder), default=0) + 1
    parts = ps.command("checkpoint", str(folder), number, reply=True)
    errors = [p for p in parts if p.startswith("error")]
    if errors:
        raise UserError(f"checkpoint {number} failed: {errors[0]}")
    state = {"config": ctx.cfg.to_toml(), "algorithm": ctx.cfg.run.algorithm,
             "n_params": ctx.model.n_params, "wall_seconds": coord.elapsed(),
             "metrics_rows": ctx.writer.rows(), **(extra or {})}
    checkpoint.write_manifest(folder, number, state, parts, ctx.cfg.checkpoint.keep)
    return number


def method(cfg, replicas: int) -> str:
    """The run's label for plots, e.g. ``downpour[2]+adagrad``."""
    name = f"downpour[{replicas}]"
    if cfg.compression.enabled:
        name += "+" + label(cfg.compression)
    return name + ("+adagrad" if cfg.train.optimizer == "adagrad" else "")


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
    """``/ranks`` (one row per rank that reported, coordinator first) and ``/server``."""
    cs = client.stats
    rows = [RankStats(lay.coordinator_rank, comm_seconds=cs.pull_seconds,
                      wait_seconds=cs.wait_seconds, bytes_pulled=cs.bytes_pulled)]
    rows += [RankStats(s.rank, 0, s.wall_seconds, s.busy_seconds, 0.0, s.idle_seconds)
             for s in shard_stats]
    rows += [w.rank_stats() for _, w in sorted(reports.items())]
    writer.write_ranks(rows)
    logs = [w.compression for _, w in sorted(reports.items()) if w.compression is not None]
    if logs:
        series = writer.series("compression", COMPRESSION)
        for log in logs:
            series.extend(log)
    writer.write_table("server", server_table(lay, shard_stats))


def server_table(lay, shard_stats: list, busy=None) -> dict:
    """The ``/server`` columns, one per shard (``busy``: busy fractions, if measured
    elsewhere than in the shards' own statistics, as in simulation)."""
    return {
        "shard_rank": lay.shard_ranks(),
        "applied": [s.applied for s in shard_stats],
        "refused": [s.refused for s in shard_stats],
        "staleness": merged_staleness(shard_stats),
        "bytes_in": [s.bytes_in for s in shard_stats],
        "busy_fraction": busy if busy is not None else [s.busy_fraction
                                                        for s in shard_stats],
    }


DOWNPOUR = register(Algorithm(
    "downpour", {COORDINATOR: coordinate, SHARD: shard, WORKER: replica}, check,
    "asynchronous replicas on a sharded parameter server (Downpour SGD)"))
