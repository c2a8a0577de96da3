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
counted apart, in ``/ranks``.

Partitioned replicas (``layout.partitions`` = P > 1), as in Downpour: each partition
is a parameter client over its own range, and the shards hold the flat vectors in
partition-major order (which the coordinator converts to and from the whole model's
order when it loads and evaluates; L-BFGS itself is blind to the order: its vector
commands are coefficient-wise or sums over all coefficients).  The coordinator talks
to partition 0 of each replica only, which relays to the others
(:mod:`mpibelief.portion_worker`), and counts a replica's samples as the least over
its partitions.  A replica given up on is given up on whole: the shards refuse the
pushes of all its partitions, all of them are stopped and report.

Faults.  A replica silent for ``faults.replica_timeout`` seconds while it holds work is
given up on (:mod:`~mpibelief.algorithms.sandblaster_dispatch`): recorded in
``/failures``, its portions reassigned, its later pushes refused by the shards; every
batch still sums exactly its batch size.  Checkpoints are taken between batches (every
``checkpoint.every`` seconds of training, on SIGUSR1, and on SIGTERM before a clean
stop), when nothing is in flight: each shard writes its slice of every vector (the
parameters ``x``, the gradient ``g``, the history pairs), the manifest the
coordinator's scalars (the next iteration, the L-BFGS ``rho`` and ``gamma``, the
counters and the ``/sandblaster`` rows so far, see :class:`_Run`).  ``--resume``
restores both and runs the same next iteration on the same batch from the very bits
checkpointed; only the float32 sums of the replicas' pushes may add up in another
order, as they may in any two runs.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

from mpibelief.algorithms import Algorithm, register
from mpibelief.algorithms.downpour import (
    replica_samples,
    restore_shards,
    shards_order,
    sigterm_notice,
    write_checkpoint,
)
from mpibelief.algorithms.sandblaster_dispatch import Dispatcher
from mpibelief.algorithms.sandblaster_lbfgs import BatchRecord, LBFGSDriver
from mpibelief.comm import Tag, quiet_send
from mpibelief.coordinator import Coordinator, Supervision
from mpibelief.errors import ConfigError, UserError
from mpibelief.faults import Injector
from mpibelief.layout import COORDINATOR, SHARD, WORKER
from mpibelief.optim import Optimizer
from mpibelief.partition import PartitionedModel
from mpibelief.portion_worker import PortionWorker
from mpibelief.ps.server import ParameterServer
from mpibelief.ps.vectors import ShardSpace, install
from mpibelief.results import RankStats


def check(cfg) -> None:
    sb = cfg.sandblaster
    if cfg.layout.shards < 1:
        raise ConfigError("run.algorithm = 'sandblaster' needs layout.shards >= 1")
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
                           ranges=ranges, clock=ctx.clock,
                           stall_seconds=ctx.cfg.faults.stall_seconds)


def shard(ctx) -> None:
    ps = server(ctx)
    install(ps.shard)
    stats = ps.serve(tick=sigterm_notice(ctx))
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def replica(ctx) -> None:
    """A replica (or one partition of one): portions until told to stop, a report."""
    cfg, role, comms = ctx.cfg, ctx.role, ctx.comms
    sb = cfg.sandblaster
    ps = server(ctx)
    model, lo, hi, peers = ctx.model, 0, None, None
    if ctx.layout.partitions > 1:  # this rank's partition only: its range is all of it
        model, peers = PartitionedModel(ctx.model, comms.replica), comms.replica
    slow = sb.slow_factor if role.index == sb.slow_replica else 1.0
    # Only partition 0 may stop the replica (faults.stop_replica): it stops as one.
    injector = Injector(cfg.faults, ctx.rank, role.index if role.partition == 0 else -1,
                        ctx.clock, slow)
    worker = PortionWorker(ctx.rank, model, ps.client(), ctx.data, sb.batch or
                           len(ctx.data.y_train), cfg.run.seed, ctx.clock, injector, lo, hi)
    stats = worker.serve(comms.control, comms.coordinator, peers)
    quiet_send(ctx.comms.control, stats, [ctx.comms.coordinator], Tag.REPORT)
    ps.free()


def coordinate(ctx) -> dict:
    """Load the model (or a checkpoint), run the batches, evaluate now and then, stop
    everyone, write."""
    cfg, lay = ctx.cfg, ctx.layout
    sb = cfg.sandblaster
    ps = server(ctx)
    client = ps.client()
    space = ShardSpace(ps)
    P = lay.partitions
    if ctx.resume is None:
        client.load(shards_order(ctx.model, P))
        space.copy("x", "params")
    else:
        restore_shards(ctx, ps, client)
    # The coordinator talks to partition 0 of each replica; it relays to the others.
    heads = [lay.worker_ranks(r)[0] for r in range(lay.replicas)]
    dispatcher = Dispatcher(ctx.comms.control, heads, sb.push_every, sb.backups,
                            sb.max_copies, ctx.clock, cfg.faults.replica_timeout,
                            exclude=lambda r: _exclude(space, ps, lay, r))
    driver = LBFGSDriver(space, dispatcher, lambda counts: _samples(counts, ps, lay), sb,
                         len(ctx.data.y_train), ctx.clock)
    run = _Run.resumed(ctx.resume, driver)

    flat = np.empty_like(ctx.model.params) if P > 1 else None  # the shards' order

    def snapshot(out: np.ndarray) -> tuple[int, int]:
        client.pull(out if flat is None else flat)
        if flat is not None:
            ctx.model.from_layout(flat, P, out=out)
        return run.trained["batches"], run.trained["samples"]

    supervision = Supervision(checkpoint=lambda: write_checkpoint(
        ctx, ps, coord, {"sandblaster": run.state(driver)}))
    # The bar counts gradient samples: about three evaluations of the batch per step.
    coord = Coordinator(ctx, snapshot, 3 * sb.iterations * driver.batch,
                        name=f"sandblaster[{lay.replicas}]", supervision=supervision)
    dispatcher.on_fail = lambda head, reason: _fail_replica(coord, lay, head, reason)
    _train(ctx, driver, coord, run)
    reports, gone = _stop_everyone(ctx, dispatcher, coord)
    ps.stop()
    shard_stats = coord.collect(lay.shard_ranks())
    coord.progress.close()
    write_tables(ctx.writer, run.records, client, shard_stats, reports, lay, dispatcher,
                 space)
    coord.record_failures()
    if gone:  # hung ranks cannot join the shutdown: recorded, now end the job
        raise UserError(f"rank(s) {gone} stopped answering; the run finished without them"
                        f" ({ctx.writer.path} is complete); ending the job")
    _report(run.records)
    ps.free()
    summary = {"train_seconds": run.trained["seconds"], **coord.row}
    if coord.status():
        summary["status"] = coord.status()
    return summary


def _exclude(space: ShardSpace, ps: ParameterServer, lay, r: int) -> list[int]:
    """Have the shards refuse replica ``r``'s pushes (every partition's) from now on;
    returns what each of its partitions had summed on each shard its range meets."""
    clients = [1 + r * lay.partitions + p for p in range(lay.partitions)]  # 0: us
    summed = space.exclude(clients)  # per shard, per client
    return [summed[ps.shard_ranks.index(part.rank)][i] for i, c in enumerate(clients)
            for part in ps.client_parts[c]]


def _fail_replica(coord: Coordinator, lay, head: int, reason: str) -> None:
    """Record every rank of the replica whose partition 0 is ``head`` as given up on."""
    replica = lay.roles[head].index
    ranks = lay.worker_ranks(replica)
    if len(ranks) > 1:
        reason = f"replica {replica} (ranks {ranks}): {reason}"
    for rank in ranks:
        coord.fail(rank, reason)


def _stop_everyone(ctx, dispatcher: Dispatcher, coord: Coordinator) -> tuple[dict, list]:
    """Stop the live replicas (through the dispatcher, which tells partition 0, which
    relays) and the failed ones (told to stop, as Downpour's); returns the reports by
    rank, every partition's, and the ranks that never answered (hung:
    :meth:`Coordinator.gather_lost`)."""
    dispatcher.stop()
    lay = ctx.layout
    live = [w for r in range(lay.replicas) if r not in dispatcher.failed
            for w in lay.worker_ranks(r)]
    reports = dict(zip(live, coord.collect(live), strict=True))
    coord.lost = {w for r in dispatcher.failed for w in lay.worker_ranks(r)}
    lost, gone = coord.gather_lost()
    reports.update(lost)
    return reports, gone


def _report(records: list[BatchRecord]) -> None:
    wasted = sum(r.backups_wasted for r in records)
    print(f"mpibelief: {len(records)} L-BFGS steps, {sum(r.evals for r in records)}"
          f" evaluations; {sum(r.backups_issued for r in records)} backup copies,"
          f" {wasted} portions wasted", flush=True)


@dataclasses.dataclass
class _Run:
    """The coordinator's side of a run between batches: what a checkpoint saves.

    ``next`` is the next iteration (batch number), ``rejected`` the rejected steps in a
    row, ``next_eval`` the training time of the next ``/metrics`` row; the driver's
    L-BFGS scalars travel with them (:meth:`LBFGSDriver.state`).
    """

    trained: dict = dataclasses.field(
        default_factory=lambda: {"seconds": 0.0, "samples": 0, "batches": 0})
    records: list = dataclasses.field(default_factory=list)
    next: int = 0
    rejected: int = 0
    next_eval: float = 0.0

    @classmethod
    def resumed(cls, resume: dict | None, driver: LBFGSDriver) -> _Run:
        if resume is None:
            return cls()
        state = resume["sandblaster"]
        driver.load_state(state["driver"])
        return cls(state["trained"], [BatchRecord(**r) for r in state["records"]],
                   state["next"], state["rejected"], state["next_eval"])

    def state(self, driver: LBFGSDriver) -> dict:
        return {"trained": self.trained, "next": self.next, "rejected": self.rejected,
                "next_eval": self.next_eval, "driver": driver.state(),
                "records": [_plain(dataclasses.asdict(r)) for r in self.records]}

    def add(self, rec: BatchRecord) -> None:
        self.records.append(rec)
        self.trained["seconds"] += rec.seconds
        self.trained["samples"] += rec.samples_applied
        self.trained["batches"] += 1
        self.rejected = 0 if rec.accepted else self.rejected + 1
        self.next = rec.iteration + 1


def _plain(row: dict) -> dict:
    """numpy scalars as Python's (JSON takes only those)."""
    return {k: ([int(x) for x in v] if isinstance(v, list) else
                v.item() if isinstance(v, np.generic) else v) for k, v in row.items()}


def _train(ctx, driver: LBFGSDriver, coord: Coordinator, run: _Run) -> None:
    """Batches until ``iterations`` (or ``train.max_seconds`` of this invocation, or
    SIGTERM); evaluation pauses time; checkpoints between batches."""
    cfg, signals = ctx.cfg, coord.signals
    every = cfg.checkpoint.every or math.inf
    begun = run.trained["seconds"]
    next_ckpt = begun + every
    if run.next >= cfg.sandblaster.iterations:
        raise UserError(f"nothing to resume: the checkpoint was taken after the last of the"
                        f" {cfg.sandblaster.iterations} iterations")
    if not run.records:
        _metrics(coord, run.trained)  # the row at time 0 (a resumed run has it)
    for k in range(run.next, cfg.sandblaster.iterations):
        run.add(driver.step(k))
        seconds = run.trained["seconds"]
        terminate = signals.terminate.is_set()
        done = (k + 1 == cfg.sandblaster.iterations or run.rejected >= 3
                or 0 < cfg.train.max_seconds <= seconds - begun)
        if seconds >= run.next_eval or done or terminate:
            _metrics(coord, run.trained)
            run.next_eval = seconds + cfg.train.eval_every
        coord.progress.update(run.trained["samples"] - coord.progress.done,
                              loss=run.records[-1].loss)
        if done:
            break
        if terminate:  # Slurm's way to end a job: keep everything, then stop cleanly
            coord.stopped_by = "SIGTERM"
            coord.checkpoint()
            break
        if seconds >= next_ckpt or signals.take_checkpoint():
            coord.checkpoint()
            next_ckpt = seconds + every


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


def write_tables(writer, records, client, shard_stats, reports: dict, lay, dispatcher,
                 space) -> None:
    """``/sandblaster``, ``/ranks`` and ``/server``, for real and simulated runs alike."""
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
    rows += [w.rank_stats() for _, w in sorted(reports.items())]
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
