"""Role: one replica partition, in phases: fetch, compute, push.

The replica trains on its own shard of the training set.  Its three phases are separate
calls, so that a driver can schedule them (the virtual-time simulator places each on a
simulated clock through :meth:`Replica.phases`; :meth:`Replica.step` runs them back
to back):

- :meth:`~Replica.fetch`: pull this partition's parameters from the store;
- :meth:`~Replica.compute`: one mini-batch forward and backward; with ``n_push`` > 1 the
  gradient is added to a running sum;
- :meth:`~Replica.push`: send the (summed) gradient with the versions it came from and
  the number of samples it covers; with a ``compressor``
  (:class:`~mpibelief.compressor.Compressor`), its threshold-compressed packet instead
  (the replica keeps the residual; the shards decode and apply).

Every ``n_fetch`` steps it fetches, every ``n_push`` steps it pushes; :meth:`finish`
pushes a last partial sum.  The store is anything with the parameter client's methods
(the MPI :class:`~mpibelief.ps.client.ParameterClient` or the in-memory
:class:`~mpibelief.ps.memory.MemoryClient`); time is read only through ``clock``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpibelief.data import batches
from mpibelief.optim import all_finite
from mpibelief.results import RankStats


@dataclass
class WorkerStats:
    """What a replica partition reports to the coordinator when it is done."""

    rank: int
    steps: int = 0
    samples: int = 0
    pushes: int = 0
    nonfinite: int = 0
    train_seconds: float = 0.0
    compute_seconds: float = 0.0
    comm_seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_pushed: int = 0
    bytes_pulled: int = 0
    cpu_seconds: float = 0.0  # process CPU over train_seconds (a shared core gives less)
    compression: dict | None = None  # the compressor's log by column, when compressing

    def rank_stats(self) -> RankStats:
        return RankStats(self.rank, self.samples, self.train_seconds, self.compute_seconds,
                         self.comm_seconds, self.wait_seconds, self.bytes_pushed,
                         self.bytes_pulled, self.cpu_seconds)


class Replica:
    """A model replica (one partition) bound to a parameter store, its data and a clock.

    Args:
        rank: the rank it runs on (for reports and fault injection).
        model: the model; its ``params``/``grads`` ``[lo, hi)`` are this partition's.
        store: the parameter client over ``[lo, hi)``.
        data: this replica's shard of the dataset.
        train, downpour: the config tables (batch; ``n_fetch``, ``n_push``).
        seed: the shuffling seed.
        clock: :class:`~mpibelief.clock.WallClock` or a virtual clock.
        compressor: a :class:`~mpibelief.compressor.Compressor` over ``[lo, hi)`` to push
            compressed packets, or None to push dense gradients.
    """

    def __init__(self, rank: int, model, store, data, train, downpour, seed: int, clock,
                 lo: int = 0, hi: int | None = None, injector=None, compressor=None):
        self.model, self.store, self.data, self.clock = model, store, data, clock
        self.compressor = compressor
        hi = model.n_params if hi is None else hi
        self.params, self.grads = model.params[lo:hi], model.grads[lo:hi]
        self.batch, self.n_fetch, self.n_push = train.batch, downpour.n_fetch, downpour.n_push
        self.stats = WorkerStats(rank)
        self.batches = batches(len(data.y_train), train.batch, np.random.default_rng(seed))
        # With n_push > 1 gradients are summed here between pushes.
        self.accum = np.zeros_like(self.grads) if self.n_push > 1 else None
        self.versions = None
        self.unpushed = 0  # steps computed since the last push
        self.injector = injector

    def skip(self, steps: int) -> None:
        """Fast-forward the batch order by ``steps`` (resuming: the same batches follow)."""
        for _ in range(steps):
            next(self.batches)

    def fetch(self) -> None:
        """Pull the current parameters of this partition from the store."""
        tick = self.clock.now()
        self.versions = self.store.pull(self.params)
        self.stats.comm_seconds += self.clock.now() - tick

    def compute(self) -> float:
        """One mini-batch forward and backward; returns its loss."""
        s, tick = self.stats, self.clock.now()
        idx = next(self.batches)
        loss, _ = self.model.loss_and_grad(self.data.x_train[idx], self.data.y_train[idx])
        if not np.isfinite(loss):
            s.nonfinite += 1  # pushed anyway: the shards refuse and count it
        if self.accum is not None:
            self.accum += self.grads
        s.compute_seconds += self.clock.now() - tick
        s.steps += 1
        s.samples += self.batch
        self.unpushed += 1
        return loss

    def push(self) -> None:
        """Send the gradient (or the sum since the last push) with its sample count."""
        if not self.unpushed:
            return
        tick = self.clock.now()
        grad = self.grads if self.accum is None else self.accum
        samples = self.unpushed * self.batch
        if self.compressor is None:
            self.store.push(grad, self.versions, samples=samples)
        else:  # a non-finite gradient goes as a refusal and stays out of the residual
            epoch = self.stats.samples / len(self.data.y_train)
            packet = self.compressor.compress(grad, epoch)[0] if all_finite(grad) else None
            self.store.push_packet(packet, self.versions, samples=samples)
        self.stats.comm_seconds += self.clock.now() - tick
        self.stats.pushes += 1
        self.unpushed = 0
        if self.accum is not None:
            self.accum[...] = 0.0

    def phases(self):
        """Downpour's step as its phases, yielding each one's name once it has run.

        ``fetch`` every ``n_fetch`` steps, ``compute``, ``push`` every ``n_push`` steps.
        A driver may run other replicas between the phases (the simulator places each
        phase on a virtual clock); :meth:`step` runs them back to back.
        """
        s = self.stats
        if s.steps % self.n_fetch == 0:
            self.fetch()
            yield "fetch"
        self.compute()
        yield "compute"
        if s.steps % self.n_push == 0:
            self.push()
            yield "push"

    def step(self) -> None:
        """One step, phases back to back."""
        for _ in self.phases():
            pass

    def train(self, steps: int, deadline: float = float("inf"), stop=None) -> None:
        """Run ``steps`` steps; fewer if ``deadline`` (a clock time) passes or ``stop()``.

        After each step the injector (if any) applies a due fault: it may slow the
        replica, stop it (:class:`~mpibelief.faults.ReplicaStoppedError`) or kill it.
        """
        for _ in range(steps):
            tick, cpu = self.clock.now(), self.clock.cpu()
            if tick >= deadline or (stop is not None and stop()):
                break
            compute = self.stats.compute_seconds
            self.step()
            if self.injector is not None:
                self.injector.after_step(self.stats.steps, self.stats.compute_seconds - compute)
            self.stats.train_seconds += self.clock.now() - tick
            self.stats.cpu_seconds += self.clock.cpu() - cpu

    def finish(self) -> WorkerStats:
        """Push a partial gradient sum; return the stats with the store's counters."""
        self.push()
        cs = self.store.stats
        self.stats.bytes_pushed, self.stats.bytes_pulled = cs.bytes_pushed, cs.bytes_pulled
        # A partitioned model also waits for its peer partitions (boundary exchange).
        self.stats.wait_seconds = cs.wait_seconds + getattr(self.model, "wait_seconds", 0.0)
        if self.compressor is not None:
            self.stats.compression = self.compressor.log.columns()
        return self.stats
