"""Role: one Downpour replica (a single partition for now): fetch, compute, push.

The replica trains on its own shard of the training set.  Every ``n_fetch`` steps it
pulls fresh parameters from the shards; every ``n_push`` steps it pushes the sum of
its gradients since the last push, together with the shard versions it computed
from, so the shards can measure staleness.  The update rule runs on the shards.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from mpibelief.algorithms.sgd import batches


@dataclass
class WorkerStats:
    """What a replica reports to the coordinator when it is done."""

    rank: int
    steps: int = 0
    samples: int = 0
    nonfinite: int = 0
    train_seconds: float = 0.0
    compute_seconds: float = 0.0
    comm_seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_pushed: int = 0
    bytes_pulled: int = 0


class Replica:
    """A model replica bound to a parameter-server client and its data shard."""

    def __init__(self, rank: int, model, client, data, train, downpour, seed: int):
        self.model, self.client, self.data = model, client, data
        self.batch, self.n_fetch, self.n_push = train.batch, downpour.n_fetch, downpour.n_push
        self.stats = WorkerStats(rank)
        self.batches = batches(len(data.y_train), train.batch, np.random.default_rng(seed))
        # With n_push > 1 gradients are summed here between pushes.
        self.accum = np.zeros(model.n_params, np.float32) if self.n_push > 1 else None
        self.versions = None
        self.fault_step = _injected_fault(rank)

    def train(self, steps: int, deadline: float = float("inf")) -> None:
        """Run ``steps`` Downpour steps (fewer if ``deadline``, a perf_counter time, passes)."""
        for _ in range(steps):
            tick = time.perf_counter()
            if tick >= deadline:
                break
            self.step()
            self.stats.train_seconds += time.perf_counter() - tick

    def step(self) -> None:
        s, model = self.stats, self.model
        if s.steps == self.fault_step:
            raise RuntimeError(f"fault injected on rank {s.rank} at step {s.steps}")
        if s.steps % self.n_fetch == 0:
            tick = time.perf_counter()
            self.versions = self.client.pull(model.params)
            s.comm_seconds += time.perf_counter() - tick
        tick = time.perf_counter()
        idx = next(self.batches)
        loss, _ = model.loss_and_grad(self.data.x_train[idx], self.data.y_train[idx])
        if not np.isfinite(loss):
            s.nonfinite += 1  # pushed anyway: the shards refuse and count it
        grad = model.grads
        if self.accum is not None:
            self.accum += model.grads
            grad = self.accum
        s.compute_seconds += time.perf_counter() - tick
        s.steps += 1
        s.samples += self.batch
        if s.steps % self.n_push == 0:
            tick = time.perf_counter()
            self.client.push(grad, self.versions)
            s.comm_seconds += time.perf_counter() - tick
            if self.accum is not None:
                self.accum[...] = 0.0

    def finish(self) -> WorkerStats:
        """Flush a partial gradient sum and return the stats with the client's counters."""
        if self.accum is not None and self.stats.steps % self.n_push:
            self.client.push(self.accum, self.versions)
        cs = self.client.stats
        self.stats.bytes_pushed, self.stats.bytes_pulled = cs.bytes_pushed, cs.bytes_pulled
        self.stats.wait_seconds = cs.wait_seconds
        return self.stats


def _injected_fault(rank: int) -> int:
    """The step at which to fail, from ``MPIBELIEF_INJECT_FAULT=RANK:STEP``, else -1.

    Fault injection for resilience tests: proves that a rank dying mid-run ends the
    whole job promptly with its message, instead of leaving its peers waiting.
    """
    spec = os.environ.get("MPIBELIEF_INJECT_FAULT", "")
    target, _, step = spec.partition(":")
    return int(step or 0) if target.strip() == str(rank) else -1
