"""Role: the coordinator of a run: evaluation, metrics, the progress bar, reports.

It never trains.  While the replicas work it wakes every ``train.eval_every`` seconds,
takes a fresh copy of the parameters (for Downpour, one-sidedly from the shards, the
path the replicas use), evaluates it and appends a row to the result file; between
evaluations it sleeps, so on a workstation it leaves the cores to the replicas.  It
reads the time only through the run's clock.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from mpibelief.comm import Tag, quiet_recv, try_recv
from mpibelief.errors import UserError
from mpibelief.progress import Progress


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


class Coordinator:
    """Samples the parameters and the replicas' progress into ``/metrics``.

    Args:
        ctx: the run context (model, writer, clock, control communicator, config).
        snapshot: fills ``ctx.model.params`` with the current parameters and returns
            ``(updates, samples)`` applied so far.
        total_samples: what the progress bar counts up to.
        name: the progress bar's label.
    """

    def __init__(self, ctx, snapshot: Callable[[np.ndarray], tuple[int, int]],
                 total_samples: int, name: str):
        self.ctx, self.snapshot = ctx, snapshot
        self.clock, self.model, self.writer = ctx.clock, ctx.model, ctx.writer
        self.evaluate = Evaluator(ctx.data, ctx.cfg.train.eval_samples, ctx.cfg.run.seed)
        self.eval_every = ctx.cfg.train.eval_every
        self.progress = Progress(total_samples, name)
        self.start = self.clock.now()
        self.row: dict = {}

    def sample(self) -> dict:
        """Snapshot, evaluate and record one metrics row."""
        wall = self.clock.now() - self.start
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
        """Evaluate periodically until every worker reports; returns their reports by rank.

        The final sample is the caller's (:meth:`finish`), once every update is applied.
        """
        comm = self.ctx.comms.control
        pending = set(workers)
        reports: dict = {}
        next_eval = 0.0
        while pending:
            for rank in sorted(pending):
                done, message = try_recv(comm, rank, Tag.REPORT)  # any size
                if done:
                    reports[rank] = message
                    pending.discard(rank)
            now = self.clock.now() - self.start
            if now >= next_eval:
                self.sample()
                next_eval = self.clock.now() - self.start + self.eval_every
            elif pending:
                self.clock.sleep(min(0.02, next_eval - now))
        return reports

    def finish(self) -> dict:
        """The last sample, taken after every update is applied; closes the progress bar."""
        row = self.sample()
        self.progress.close()
        return row

    def collect(self, sources: list[int]) -> list:
        """Receive one report from each of ``sources``, without spinning."""
        return [quiet_recv(self.ctx.comms.control, source=s, tag=Tag.REPORT) for s in sources]
