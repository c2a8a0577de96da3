"""Synchronous data-parallel SGD: every step, the replicas average their gradients.

``R`` replicas (``layout.shards = 0``, so ``world = R``), each on its own shard of the
training set (:meth:`~mpibelief.data.Dataset.shard`), run in lock step over
``comms.across`` (one rank per replica)::

    every replica r:  g_r = gradient of its own mini-batch of b rows
    exchange:         g   = (g_0 + ... + g_R-1) / R        (Iallreduce, or packets)
    every replica:    params = Optimizer.step(params, g)   (sgd or adagrad)

Each ``g_r`` is a mean over its batch, so ``g`` is the mean over the ``R * b`` rows of
the step: R replicas on batch b take the steps one replica would take on batch ``R*b``
(``tests/mpi/mpi_sync.py`` checks it to float32 tolerance).  Every replica applies the
same ``g`` with the same rule from the same start, so all replicas hold the same
parameters and no parameter server is needed.

With ``compression.enabled`` the exchange is Strom's (Interspeech 2015): each replica
adds its gradient to its own residual and sends only the entries beyond tau, as +-tau
(:mod:`mpibelief.compression`); :class:`~mpibelief.compressed_exchange.PacketExchange`
allgathers the packets and every replica decodes them in rank order, so the update, and
the replicas, stay bitwise identical.  Every step is logged in ``/compression``.

No idle coordinator: rank 0 trains as replica 0 and also evaluates and writes the
results.  Its decisions travel with each step in a small control Iallreduce
(``[stop, evaluate, diverged]``, MAX), started beside the gradient exchange so its
latency hides behind it: every replica stops at the same step (``train.max_seconds``
is rank 0's training time), and while rank 0 evaluates every replica pauses its
training clock and sleeps in a barrier, so ``wall_seconds`` is training time on every
rank.  A replica whose loss is not finite raises ``diverged`` there; every replica
learns it in the same step, and rank 0 alone ends the run with one error line.

Waiting: the collectives are non-blocking and completed with
:func:`~mpibelief.comm.quiet_wait`, which sleeps between tests.  A blocking
``Allreduce`` in MPICH spins, and on a 2-core workstation a replica that finished its
gradient first would steal the core the slower one is computing on.  The sleeps are
capped at 0.2 ms (``STEP_SLEEP``), not the control messages' 2 ms: MPICH moves a
non-blocking collective on only inside a test, so a long sleep stalls it mid-way.
Measured, 2 ranks, a 2 MiB Iallreduce on the loaded workstation (load ~15, median
of 60): 10.9 ms with a 2 ms cap, 7.7 ms with 0.2 ms, 6.8 ms spinning in ``Wait``,
4.4 ms in a blocking ``Allreduce`` (which spins).
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.algorithms import Algorithm, register
from mpibelief.comm import Tag, quiet_barrier, quiet_recv, quiet_send, quiet_wait
from mpibelief.compressed_exchange import PacketExchange
from mpibelief.compressor import Compressor, label
from mpibelief.coordinator import Evaluator
from mpibelief.data import batches
from mpibelief.errors import ConfigError, UserError
from mpibelief.layout import WORKER
from mpibelief.optim import Optimizer, all_finite
from mpibelief.progress import Progress
from mpibelief.results import COMPRESSION, RankStats

STOP, EVALUATE, DIVERGED = 0, 1, 2  # the control words
STEP_SLEEP = 2e-4  # longest sleep while a step's collective is under way (see above)


def check(cfg) -> None:
    if cfg.layout.shards != 0:
        raise ConfigError("run.algorithm = 'sync' needs no parameter server: set"
                          " layout.shards = 0 (world = replicas)")
    if cfg.layout.partitions != 1:
        raise ConfigError("run.algorithm = 'sync' runs replicas of one partition: model"
                          " parallelism with sync is not built yet (layout.partitions = 1)")


def method(cfg, replicas: int) -> str:
    """The run's label for plots, e.g. ``sync[2]`` or ``sync[2]+strom(1%)``."""
    name = f"sync[{replicas}]"
    if cfg.compression.enabled:
        name += "+" + label(cfg.compression)
    return name + ("+adagrad" if cfg.train.optimizer == "adagrad" else "")


def schedule(cfg, n_train: int, replicas: int) -> tuple[int, int]:
    """``(steps per epoch, total steps)``: the same on every replica, computed from the
    whole training set (``n_train`` rows), ``replicas * batch`` rows a step."""
    per_epoch = max(n_train // (replicas * cfg.train.batch), 1)
    return per_epoch, max(int(cfg.train.epochs * per_epoch), 1)


def replica_batches(cfg, shard, index: int):
    """Replica ``index``'s endless mini-batch order over its ``shard`` (its own seed)."""
    rng = np.random.default_rng(cfg.run.seed + 1 + index)
    return batches(len(shard.y_train), cfg.train.batch, rng)


def replica_gradient(model, shard, idx, compressing: bool) -> bool:
    """``model.grads`` = the gradient of the rows ``idx`` of ``shard``; False if it is
    not finite.  The codec refuses a non-finite gradient (a finite loss can still
    overflow it), so compressed runs check it; dense, the averaged update's own check
    catches it."""
    loss, _ = model.loss_and_grad(shard.x_train[idx], shard.y_train[idx])
    return bool(np.isfinite(loss)) and (not compressing or all_finite(model.grads))


class DenseExchange:
    """The average of every replica's dense gradient (Iallreduce SUM, then / R)."""

    def __init__(self, n: int, comm):
        self.comm, self.total = comm, np.empty(n, np.float32)
        self.scale = np.float32(1.0 / comm.Get_size())
        self.log = None

    def __call__(self, grad: np.ndarray, epoch: float) -> tuple[np.ndarray, dict | None]:
        quiet_wait(self.comm.Iallreduce(grad, self.total, MPI.SUM), STEP_SLEEP)
        self.total *= self.scale
        return self.total, None

    def bytes_per_step(self) -> tuple[int, int]:
        """(sent, received) per step as the rank's share: its dense gradient each way."""
        return self.total.nbytes, self.total.nbytes


class StromExchange:
    """The average of every replica's decoded packet (Strom's threshold compression)."""

    def __init__(self, n: int, comm, comp, rank: int):
        self.compressor = Compressor(n, comp, rank)
        self.log = self.compressor.log
        self.packets = PacketExchange(n, comm=comm, max_sleep=STEP_SLEEP)
        self.update = np.empty(n, np.float32)
        self.scale = np.float32(1.0 / comm.Get_size())
        self.received = 0

    def __call__(self, grad: np.ndarray, epoch: float) -> tuple[np.ndarray, dict]:
        packet, row = self.compressor.compress(grad, epoch)
        self.packets.exchange(packet, self.update)
        self.received += 4 * int(self.packets.counts.sum()) + 4 * self.packets.counts.size
        self.update *= self.scale
        return self.update, row


class Trainer:
    """One replica's side of the run (rank 0's also evaluates and records)."""

    def __init__(self, ctx):
        cfg, comms, lay = ctx.cfg, ctx.comms, ctx.layout
        self.ctx, self.cfg, self.clock, self.model = ctx, cfg, ctx.clock, ctx.model
        self.across = comms.across
        self.replicas = lay.replicas
        self.data = ctx.data.shard(ctx.role.index, lay.replicas)
        self.opt = Optimizer.from_config(cfg.train)
        self.opt_state = self.opt.state(ctx.model.n_params)
        self.opt.warm()
        n = ctx.model.n_params
        if cfg.compression.enabled:
            Compressor.warm()
            self.exchange = StromExchange(n, self.across, cfg.compression, ctx.rank)
        else:
            self.exchange = DenseExchange(n, self.across)
        self.steps_per_epoch, self.total_steps = schedule(cfg, len(ctx.data.y_train),
                                                          lay.replicas)
        self.batches = replica_batches(cfg, self.data, ctx.role.index)
        self.stats = RankStats(ctx.rank)
        self.control = np.zeros(3, np.int32)
        self.decided = np.zeros(3, np.int32)
        self.recorder = Recorder(ctx, self) if ctx.role.coordinates else None

    def run(self) -> dict | None:
        """Train ``total_steps`` steps (fewer if rank 0 runs out of time); report."""
        if self.recorder:
            self.recorder.evaluate(0.0, 0)
        quiet_barrier(self.across)  # start the clocks together
        for step in range(1, self.total_steps + 1):
            self.step(step)
            if self.decided[EVALUATE]:
                self.pause(step)
            if self.decided[STOP]:
                break
        return self.report()

    def step(self, step: int) -> None:
        """Compute, exchange (with the control words), apply."""
        s, clock, model, cfg = self.stats, self.clock, self.model, self.cfg
        tick = clock.now()
        finite = replica_gradient(model, self.data, next(self.batches),
                                  self.exchange.log is not None)
        if not finite:  # take part in this step's collectives all the same; then fail
            model.grads[:] = 0.0
        computed = clock.now()
        self.decide(step, s.train_seconds + computed - tick)
        self.control[DIVERGED] = not finite
        control = self.across.Iallreduce(self.control, self.decided, MPI.MAX)
        epoch = (step - 1) / self.steps_per_epoch
        update, row = self.exchange(model.grads, epoch)
        quiet_wait(control, STEP_SLEEP)
        exchanged = clock.now()
        if self.decided[DIVERGED]:
            self.fail(step, "a replica's loss or gradient")
        if not self.opt.apply(model.params, update, self.opt_state):
            self.fail(step, "the averaged gradient")  # the same on every replica
        done = clock.now()
        s.compute_seconds += (computed - tick) + (done - exchanged)
        s.comm_seconds += exchanged - computed
        s.train_seconds += done - tick
        s.samples += cfg.train.batch
        if self.recorder and row is not None:
            self.recorder.compression.append(row)

    def decide(self, step: int, elapsed: float) -> None:
        """Rank 0 sets ``[stop, evaluate]`` for after this step; the others send zeros."""
        self.control[:] = 0
        if self.recorder:
            limit = self.cfg.train.max_seconds
            stop = step >= self.total_steps or 0 < limit <= elapsed
            self.control[STOP] = stop
            self.control[EVALUATE] = stop or elapsed >= self.recorder.next_eval

    def fail(self, step: int, what: str) -> None:
        """Rank 0 raises (one error line; the CLI ends the job); the others sleep
        until it does, in a barrier rank 0 never enters."""
        if self.recorder:
            raise diverged(step, what)
        quiet_barrier(self.ctx.comms.world)
        raise RuntimeError("unreachable: rank 0 ends the job when training diverges")

    def pause(self, step: int) -> None:
        """Rank 0 evaluates; everybody's training clock stops meanwhile."""
        tick = self.clock.now()
        if self.recorder:
            self.recorder.evaluate(self.stats.train_seconds, step)
        quiet_barrier(self.across)
        self.stats.wait_seconds += self.clock.now() - tick

    def report(self) -> dict | None:
        """Bytes into the rank's stats; rank 0 gathers every rank's and writes them."""
        s, ex = self.stats, self.exchange
        if ex.log is not None:
            s.bytes_pushed = ex.log.totals()[1]
            s.bytes_pulled = ex.received
        else:
            sent, received = ex.bytes_per_step()
            steps = s.samples // self.cfg.train.batch
            s.bytes_pushed, s.bytes_pulled = steps * sent, steps * received
        comms = self.ctx.comms
        log = ex.log.columns() if ex.log is not None else None
        if not self.recorder:
            quiet_send(comms.control, (s, log), [comms.coordinator], Tag.REPORT)
            quiet_barrier(comms.world)  # rank 0 writes; nobody spins meanwhile
            return None
        summary = self.recorder.finish(s, log)
        quiet_barrier(comms.world)
        return summary


class Recorder:
    """Rank 0's extra work: evaluation, ``/metrics``, ``/compression``, ``/ranks``."""

    def __init__(self, ctx, trainer: Trainer):
        self.ctx, self.trainer, self.writer = ctx, trainer, ctx.writer
        cfg = ctx.cfg
        self.evaluator = Evaluator(ctx.data, cfg.train.eval_samples, cfg.run.seed)
        self.eval_every, self.next_eval = cfg.train.eval_every, 0.0
        name = method(cfg, trainer.replicas)
        self.writer.set_attrs({"method": name})
        total = trainer.total_steps * cfg.train.batch * trainer.replicas
        self.progress = Progress(total, name)
        self.compression = (self.writer.series("compression", COMPRESSION)
                            if cfg.compression.enabled else None)
        self.row: dict = {}

    def evaluate(self, elapsed: float, step: int) -> None:
        samples = step * self.ctx.cfg.train.batch * self.trainer.replicas
        row = {"wall_seconds": elapsed, "samples": samples, "updates": step,
               **self.evaluator(self.ctx.model)}
        self.writer.append_metrics(row)
        self.progress.update(samples - self.progress.done, test_acc=row["test_accuracy"],
                             train_acc=row["train_accuracy"])
        self.next_eval = elapsed + self.eval_every
        self.row = row

    def finish(self, mine: RankStats, log) -> dict:
        """Collect every other rank's report; write ``/ranks`` and the logs; summary."""
        self.progress.close()
        comms, lay = self.ctx.comms, self.ctx.layout
        others = [r for r in lay.worker_ranks() if r != self.ctx.rank]
        reports = [quiet_recv(comms.control, source=r, tag=Tag.REPORT) for r in others]
        self.writer.write_ranks([mine] + [stats for stats, _ in reports])
        if self.compression is not None:
            self.compression.flush()
            for _, other in reports:
                self.compression.extend(other)
        return {"train_seconds": mine.train_seconds, **self.row}


def diverged(step: int, what: str) -> UserError:
    return UserError(f"training diverged: {what} is not finite at step {step} (try a"
                     " smaller train.lr)")


def train_sync(ctx) -> dict | None:
    """A replica's whole run; the summary on rank 0, None elsewhere."""
    return Trainer(ctx).run()


SYNC = register(Algorithm("sync", {WORKER: train_sync}, check,
                          "synchronous allreduce SGD, optionally Strom-compressed"))
