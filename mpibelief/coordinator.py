"""Role: the coordinator of a run: evaluation, metrics, the progress bar, reports.

It never trains.  While the replicas work it wakes every ``train.eval_every`` seconds,
takes a fresh copy of the parameters (for Downpour, one-sidedly from the shards, the
path the replicas use), evaluates it and appends a row to the result file; between
evaluations it sleeps, so on a workstation it leaves the cores to the replicas.  It
reads the time only through the run's clock.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from mpibelief.comm import Tag, quiet_recv, quiet_send, try_recv
from mpibelief.errors import UserError
from mpibelief.progress import Progress
from mpibelief.signals import Signals


class Evaluator:
    """Test-set and fixed training-sample accuracy, the ``/metrics`` row."""

    def __init__(self, data, eval_samples: int, seed: int):
        n = eval_samples or len(data.y_test)
        pick = np.random.default_rng(seed).permutation(len(data.y_train))[:n]
        pick.sort()
        self.x_train, self.y_train = data.x_train[pick], data.y_train[pick]
        self.x_test, self.y_test = data.x_test, data.y_test

    def __call__(self, model) -> dict:
        train_loss, train_acc = model.evaluate(self.x_train, self.y_train)
        test_loss, test_acc = model.evaluate(self.x_test, self.y_test)
        return {"train_loss": train_loss, "train_accuracy": train_acc,
                "test_loss": test_loss, "test_accuracy": test_acc}


@dataclass
class Failure:
    """A replica given up on: who, when (run seconds) and why."""

    rank: int
    seconds: float
    reason: str


@dataclass
class Supervision:
    """What the algorithm lets the coordinator watch and do while replicas train.

    Attributes:
        progress: samples applied per worker (in ``workers`` order), read live.
        versions: every shard's version, read live (a shard that stops moving stalls).
        checkpoint: writes a checkpoint; returns its number.
        shard_ranks: the shards, in ``versions`` order (for messages).
    """

    progress: Callable[[], np.ndarray] | None = None
    versions: Callable[[], np.ndarray] | None = None
    checkpoint: Callable[[], int] | None = None
    shard_ranks: list[int] = field(default_factory=list)


class Coordinator:
    """Samples the parameters and the replicas' progress into ``/metrics``, and keeps the
    run alive and bounded: time limit, checkpoints, failed replicas, stalled shards.

    Args:
        ctx: the run context (model, writer, clock, control communicator, config).
        snapshot: fills ``ctx.model.params`` with the current parameters and returns
            ``(updates, samples)`` applied so far.
        total_samples: what the progress bar counts up to.
        name: the progress bar's label.
        offset: run seconds already behind this run (resuming from a checkpoint).
    """

    def __init__(self, ctx, snapshot: Callable[[np.ndarray], tuple[int, int]],
                 total_samples: int, name: str, offset: float = 0.0,
                 supervision: Supervision | None = None):
        self.ctx, self.snapshot = ctx, snapshot
        self.clock, self.model, self.writer = ctx.clock, ctx.model, ctx.writer
        self.cfg = ctx.cfg
        self.evaluate = Evaluator(ctx.data, ctx.cfg.train.eval_samples, ctx.cfg.run.seed)
        self.eval_every = ctx.cfg.train.eval_every
        self.progress = Progress(total_samples, name)
        self.start, self.offset = self.clock.now(), offset
        self.supervision = supervision or Supervision()
        self.signals = ctx.signals or Signals()
        self.row: dict = {}
        self.failures: list[Failure] = []
        self.lost: set[int] = set()  # failed workers, whose reports are not waited for
        self.stopped_by: str | None = None  # "SIGTERM" when the run was told to end
        self.error: UserError | None = None  # divergence: raised once all have stopped
        self.cpu_seconds = 0.0  # process CPU in watch(): mostly its evaluations

    def elapsed(self) -> float:
        """Run seconds, continuing across a resume."""
        return self.offset + self.clock.now() - self.start

    def sample(self) -> dict:
        """Snapshot, evaluate and record one metrics row."""
        wall = self.elapsed()
        updates, samples = self.snapshot(self.model.params)
        row = {"wall_seconds": wall, "updates": updates, "samples": samples,
               **self.evaluate(self.model)}
        self.writer.append_metrics(row)
        if not np.isfinite(row["test_loss"]):
            raise UserError(
                f"training diverged: the shards' parameters give a non-finite loss after"
                f" {updates} updates (try a smaller train.lr)"
            )
        self.progress.update(row["samples"] - self.progress.done,
                             test_acc=row["test_accuracy"], train_acc=row["train_accuracy"])
        self.row = row
        return row

    def watch(self, workers: list[int]) -> dict:
        """Evaluate, checkpoint and supervise until every live worker reports.

        Returns the reports by rank.  Workers that make no progress for
        ``faults.replica_timeout`` seconds are recorded in :attr:`failures` and not
        waited for; on SIGTERM, past ``train.max_seconds`` or on divergence every
        worker is told to stop (:attr:`Tag.STOP`).  The final sample is the caller's
        (:meth:`finish`), once every update is applied.
        """
        comm, faults = self.ctx.comms.control, self.cfg.faults
        pending, reports = set(workers), {}
        watchdog = _Watchdog(self, workers)
        next_eval, next_ckpt = 0.0, self.cfg.checkpoint.every or float("inf")
        stop_at = None  # clock time the stop was sent
        cpu = self.clock.cpu()
        while pending:
            for rank in sorted(pending):
                done, message = try_recv(comm, rank, Tag.REPORT)  # any size
                if done:
                    reports[rank] = message
                    pending.discard(rank)
            now = self.clock.now() - self.start
            if stop_at is None and self._should_stop():
                self.tell_stop(list(pending))
                stop_at = self.clock.now()
            elif stop_at is not None and self.clock.now() - stop_at > faults.stall_seconds:
                raise UserError(f"rank(s) {sorted(pending)} did not stop within"
                                f" {faults.stall_seconds:g} s of being told to")
            if self._checkpoint_due(now >= next_ckpt):
                next_ckpt = now + (self.cfg.checkpoint.every or float("inf"))
            if now >= next_eval and self.error is None:
                try:
                    self.sample()
                except UserError as exc:  # divergence: stop everyone, then report it
                    self.error = exc
                next_eval = self.clock.now() - self.start + self.eval_every
            watchdog.check(pending, stopping=stop_at is not None)
            if pending:
                self.clock.sleep(min(0.02, max(next_eval - now, 0.0)))
        self.cpu_seconds += self.clock.cpu() - cpu
        return reports

    def _should_stop(self) -> bool:
        """SIGTERM (after a checkpoint), divergence, or ``train.max_seconds`` of this
        invocation's training."""
        if self.signals.terminate.is_set():
            self.stopped_by = "SIGTERM"
            self.checkpoint()
            return True
        limit = self.cfg.train.max_seconds
        return self.error is not None or (0 < limit <= self.clock.now() - self.start)

    def _checkpoint_due(self, timer: bool) -> bool:
        if (timer or self.signals.take_checkpoint()) and self.supervision.checkpoint:
            self.checkpoint()
            return True
        return timer

    def checkpoint(self) -> int | None:
        if self.supervision.checkpoint is None:
            return None
        number = self.supervision.checkpoint()
        print(f"mpibelief: wrote checkpoint {number} at {self.elapsed():.1f} s", flush=True)
        return number

    def gather_lost(self) -> tuple[dict, list[int]]:
        """Stop the failed workers and take their reports; returns ``(reports, gone)``,
        ``gone`` the ranks that did not answer within ``faults.stall_seconds`` (hung)."""
        self.tell_stop(sorted(self.lost))
        reports, gone = {}, []
        for rank in sorted(self.lost):
            try:
                reports[rank] = quiet_recv(self.ctx.comms.control, source=rank,
                                           tag=Tag.REPORT, timeout=self.cfg.faults.stall_seconds)
            except TimeoutError:
                gone.append(rank)
        return reports, gone

    def tell_stop(self, ranks: list[int]) -> None:
        """Tell workers to stop training and report (they check between steps)."""
        quiet_send(self.ctx.comms.control, None, ranks, Tag.STOP)

    def finish(self) -> dict:
        """The last sample, taken after every update is applied; closes the progress bar."""
        row = self.sample() if self.error is None else self.row
        self.progress.close()
        return row

    def collect(self, sources: list[int]) -> list:
        """Receive one report from each of ``sources``, without spinning.

        Raises:
            UserError: a source does not answer within ``faults.stall_seconds``.
        """
        limit, found = self.cfg.faults.stall_seconds, []
        for s in sources:
            try:
                found.append(quiet_recv(self.ctx.comms.control, source=s, tag=Tag.REPORT,
                                        timeout=limit))
            except TimeoutError:
                raise UserError(f"rank {s} did not report within {limit:g} s (stalled or"
                                " stopped?)") from None
        return found

    def status(self) -> str | None:
        """How the run ended, when not plainly ``complete``: told to stop, or finished
        without the replicas it gave up on."""
        if self.stopped_by:
            return f"stopped: {self.stopped_by} (checkpoint written; --resume)"
        if self.failures:
            return (f"complete without {len(self.failures)} failed replica rank(s)"
                    f" {[f.rank for f in self.failures]}")
        return None

    def fail(self, rank: int, reason: str) -> None:
        """Record replica ``rank`` as given up on, now, and say so once."""
        self.failures.append(Failure(rank, self.elapsed(), reason))
        print(f"mpibelief: rank {rank} failed ({reason}); going on without it", flush=True)

    def record_failures(self) -> None:
        """``/failures``: the replicas given up on, with run seconds and reason."""
        if self.failures:
            self.writer.write_table("failures", {
                "rank": [f.rank for f in self.failures],
                "seconds": [f.seconds for f in self.failures],
                "reason": [f.reason for f in self.failures]})


class _Watchdog:
    """Failed replicas (no progress for ``replica_timeout``) and stalled shards (no
    version change for ``stall_seconds`` while replicas train), checked once a second."""

    def __init__(self, coord: Coordinator, workers: list[int]):
        self.coord, self.workers = coord, workers
        self.faults = coord.cfg.faults
        self.next = 0.0
        self.seen: dict = {}  # key -> (value, clock time it last changed)

    def _changed(self, key, value, now: float) -> float:
        """Seconds since ``value`` of ``key`` last changed."""
        old = self.seen.get(key)
        if old is None or old[0] != value:
            self.seen[key] = (value, now)
            return 0.0
        return now - old[1]

    def check(self, pending: set, stopping: bool) -> None:
        coord, sup, now = self.coord, self.coord.supervision, self.coord.clock.now()
        if now < self.next:
            return
        self.next = now + 1.0
        if sup.progress is not None and self.faults.replica_timeout > 0:
            for rank, samples in zip(self.workers, sup.progress(), strict=True):
                idle = self._changed(("worker", rank), int(samples), now)
                if rank in pending and idle > self.faults.replica_timeout:
                    coord.fail(rank, f"no progress for {idle:.0f} s")
                    pending.discard(rank)  # not waited for, for now
                    coord.lost.add(rank)
        if sup.versions is not None and pending and not stopping:
            for rank, version in zip(sup.shard_ranks, sup.versions(), strict=True):
                idle = self._changed(("shard", rank), int(version), now)
                if idle > self.faults.stall_seconds:
                    raise UserError(f"shard rank {rank} has applied nothing for {idle:.0f} s"
                                    " while replicas train (stalled or stopped?)")
