"""Role: the coordinator of a parameter-server run: metrics, evaluation, results.

It never trains.  While the replicas work it wakes every ``train.eval_every`` seconds,
pulls a fresh copy of the parameters from the shards (the same one-sided path the
replicas use), evaluates it and appends a row to the result file; between
evaluations it sleeps, so on a workstation it leaves the cores to the replicas.
"""

from __future__ import annotations

import time

import numpy as np

from mpibelief.comm import CONTROL_TAG, quiet_recv
from mpibelief.errors import UserError
from mpibelief.progress import Progress


class Coordinator:
    """Samples the shards' parameters and the replicas' progress into ``/metrics``."""

    def __init__(self, comm, client, model, evaluate, writer, samples_per_update: int,
                 total_samples: int, eval_every: float, name: str):
        self.comm, self.client, self.model = comm, client, model
        self.evaluate, self.writer = evaluate, writer
        self.samples_per_update, self.eval_every = samples_per_update, eval_every
        self.progress = Progress(total_samples, name)
        self.start = time.perf_counter()
        self.row: dict = {}

    def sample(self) -> dict:
        """Pull, evaluate and record one metrics row."""
        wall = time.perf_counter() - self.start
        versions = self.client.pull(self.model.params)
        updates = int(np.min(versions))  # every push reaches every shard
        row = {"wall_seconds": wall, "updates": updates,
               "samples": updates * self.samples_per_update, **self.evaluate(self.model)}
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
        """Evaluate periodically until every worker reports; returns their stats by rank.

        The final sample is the caller's, once the shards have applied every push.
        """
        pending = {r: self.comm.irecv(source=r, tag=CONTROL_TAG) for r in workers}
        reports: dict = {}
        next_eval = 0.0
        while pending:
            for rank, request in list(pending.items()):
                done, message = request.test()
                if done:
                    reports[rank] = message
                    del pending[rank]
            now = time.perf_counter() - self.start
            if now >= next_eval:
                self.sample()
                next_eval = time.perf_counter() - self.start + self.eval_every
            elif pending:
                time.sleep(min(0.02, next_eval - now))
        return reports

    def finish(self) -> dict:
        """The last sample, taken after the shards have stopped; closes the progress bar."""
        row = self.sample()
        self.progress.close()
        return row

    def collect(self, sources: list[int]) -> list:
        """Receive one control message from each of ``sources``, without spinning."""
        return [quiet_recv(self.comm, source=s) for s in sources]
