"""Role: a Sandblaster replica, computing the portions of a batch the coordinator hands it.

It serves the coordinator's requests one at a time, two-sided on the control
communicator (:attr:`~mpibelief.comm.Tag.TASK` in, :attr:`~mpibelief.comm.Tag.WORK`
out; the protocol and why it counts every portion exactly once are drawn in
:mod:`mpibelief.portions`):

- ``task``: compute the gradient of one portion of a batch; the first portion of an
  evaluation first pulls the parameters (once per evaluation: the coordinator
  publishes new ones between evaluations); the gradient, times the portion's size,
  is added to this replica's running sum; answers ``done`` with the loss sum;
- ``push``: push the sum to the shards (they add it into their accumulator), wait
  until they have, answer ``pushed``;
- ``drop``: a copy of one of the portions in the sum lost the race: zero the sum,
  answer ``ready``;
- ``stop``: return the statistics (also the answer to a replica the coordinator has
  given up on, should it speak again: it is out of the run, see below).

Faults, through the rank's :class:`~mpibelief.faults.Injector`, after every portion:
a straggler (``sandblaster.slow_replica`` or ``faults.slow_rank``) sleeps
``(factor - 1)`` times what the portion's compute took, through its clock, so it runs
that much slower without stealing a core from anyone; a stopped replica
(``faults.stop_replica``) goes silent holding its unpushed sum, exactly as a replica
whose machine lost its work, until the coordinator tells it to stop
(:attr:`~mpibelief.comm.Tag.STOP`) and it reports.  The coordinator notices the
silence (``faults.replica_timeout``), reopens its portions, and has the shards refuse
its pushes from then on (:mod:`mpibelief.algorithms.sandblaster_dispatch`).

Model parallelism (``P`` > 1): a replica is ``P`` ranks, one partition each
(:class:`~mpibelief.partition.PartitionedModel`), and each partition is a parameter
client over its own range: it pulls, sums and pushes only that range.  Partition 0
alone talks to the coordinator, and passes every message it receives on to the
others over the replica communicator (``peers``, the same :attr:`Tag.TASK`) before
acting on it itself, so all ``P`` run the same command together::

    coordinator        partition 0                    partitions 1..P-1
    task ----------->  relay -------------------->   (same portion)
                       forward/backward, exchanging only boundary state
    <----------- done  (the loss: every partition has the allreduced one)
    push ----------->  relay -------------------->   push own range, wait
                       push own range, wait  <-----   pushed (Tag.WORK)
    <--------- pushed  (once every partition's push is summed)
    drop / stop ---->  relay -------------------->   zero the sum / report

The shards count samples per client, so the coordinator takes a replica's count as
the least over its partitions: a sum counts once every partition's part of it is in.
Only partition 0's injector can stop the replica (the others are built with no
replica index): the replica goes silent as one, and its peers wait for the relayed
``stop`` that partition 0 passes on once the coordinator tells it to stop.
"""

from __future__ import annotations

import numpy as np

from mpibelief.comm import Tag, quiet_recv, quiet_send
from mpibelief.faults import Injector, ReplicaStoppedError
from mpibelief.portions import batch_rows
from mpibelief.worker import WorkerStats


class PortionWorker:
    """One replica, or one partition of one, computing portions for the coordinator.

    Args:
        rank: its rank (for the report).
        model: the model, or this rank's :class:`~mpibelief.partition.PartitionedModel`;
            ``params[lo:hi]`` are pulled, ``grads[lo:hi]`` summed.
        store: the parameter client over ``[lo, hi)``.
        data: the whole dataset (a batch draws from all of it).
        batch, seed: what :func:`~mpibelief.portions.batch_rows` needs.
        clock: the run's clock.
        injector: the faults due on this rank (default: none).
    """

    def __init__(self, rank: int, model, store, data, batch: int, seed: int, clock,
                 injector: Injector | None = None, lo: int = 0, hi: int | None = None):
        self.model, self.store, self.data, self.clock = model, store, data, clock
        self.batch, self.seed = batch, seed
        self.injector = injector
        hi = model.n_params if hi is None else hi
        self.params, self.grads = model.params[lo:hi], model.grads[lo:hi]
        self.sum = np.zeros_like(self.grads)
        self.summed = 0  # samples in self.sum
        self.evaluation = -1  # whose parameters self.params holds
        self.rows_of: tuple[int, np.ndarray] = (-1, np.empty(0, np.int64))
        self.stats = WorkerStats(rank)
        self.peers = None  # the replica communicator, with several partitions

    def rows(self, number: int) -> np.ndarray:
        if self.rows_of[0] != number:
            n_train = len(self.data.y_train)
            self.rows_of = (number, batch_rows(n_train, self.batch, self.seed, number))
        return self.rows_of[1]

    def compute(self, evaluation: int, number: int, lo: int, hi: int) -> float:
        """Add portion ``[lo, hi)`` of batch ``number``'s gradient to the sum; its loss sum."""
        if evaluation != self.evaluation:
            if self.summed:
                raise RuntimeError("a new evaluation began with an unpushed sum")
            tick = self.clock.now()
            self.store.pull(self.params)
            self.stats.comm_seconds += self.clock.now() - tick
            self.evaluation = evaluation
        idx = self.rows(number)[lo:hi]
        tick = self.clock.now()
        loss, _ = self.model.loss_and_grad(self.data.x_train[idx], self.data.y_train[idx])
        n = hi - lo
        self.sum += np.float32(n) * self.grads
        spent = self.clock.now() - tick
        self.stats.compute_seconds += spent
        self.summed += n
        self.stats.steps += 1
        self.stats.samples += n
        if not np.isfinite(loss):
            self.stats.nonfinite += 1
        if self.injector is not None:  # may sleep, or stop this replica for good
            self.injector.after_step(self.stats.steps, spent)
        return float(loss) * n

    def push(self) -> None:
        """Push the sum (the shards add it to their accumulator) and wait until they did."""
        tick = self.clock.now()
        self.store.push(self.sum, None, samples=self.summed)
        self.store.wait_applied()
        self.stats.comm_seconds += self.clock.now() - tick
        self.stats.pushes += 1
        self.drop()

    def drop(self) -> None:
        self.sum[...] = 0.0
        self.summed = 0

    def warm(self) -> None:
        """Compile the kernels (or load numba's cache) before the first timed portion."""
        keep = self.model.params.copy()
        self.model.loss_and_grad(self.data.x_train[:2], self.data.y_train[:2])
        self.model.params[...] = keep

    def serve(self, comm, coordinator: int, peers=None) -> WorkerStats:
        """Answer the coordinator until it says stop; returns the statistics.

        ``peers``: the replica communicator when the replica has several partitions
        (this one's rank in it is its partition); partition 0 answers the coordinator
        and relays, the others follow it.
        """
        self.peers = peers if peers is not None and peers.size > 1 else None
        self.warm()
        start = self.clock.now()
        try:
            if self.peers is None or self.peers.rank == 0:
                self._answer(comm, coordinator)
            else:
                self._follow()
        except ReplicaStoppedError:  # injected: silent from now on, until told to stop
            quiet_recv(comm, source=coordinator, tag=Tag.STOP)
            self._relay(("stop",))
        cs = self.store.stats
        self.stats.bytes_pushed, self.stats.bytes_pulled = cs.bytes_pushed, cs.bytes_pulled
        # A partition also waits for its peers inside forward/backward (boundaries).
        self.stats.wait_seconds += getattr(self.model, "wait_seconds", 0.0)
        self.stats.train_seconds = self.clock.now() - start
        return self.stats

    def _answer(self, comm, coordinator: int) -> None:
        """Partition 0 (or the only one): the coordinator's messages, relayed first."""
        comm.send(("ready",), dest=coordinator, tag=Tag.WORK)
        while True:
            message = self._receive(comm, coordinator)
            self._relay(message)  # the peers start at once: forward/backward is collective
            answer = self._run(message)
            if answer is None:
                break
            comm.send(answer, dest=coordinator, tag=Tag.WORK)

    def _follow(self) -> None:
        """Partitions 1..P-1: partition 0's relays, until stop."""
        while self._run(self._receive(self.peers, 0)) is not None:
            pass

    def _receive(self, comm, source: int) -> tuple:
        tick = self.clock.now()
        message = quiet_recv(comm, source=source, tag=Tag.TASK, max_sleep=5e-4)
        self.stats.wait_seconds += self.clock.now() - tick
        return message

    def _relay(self, message: tuple) -> None:
        if self.peers is not None and self.peers.rank == 0:
            quiet_send(self.peers, message, range(1, self.peers.size), Tag.TASK)

    def _run(self, message: tuple) -> tuple | None:
        """Carry out one command; its answer to the coordinator (None: stop)."""
        kind, *args = message
        if kind == "stop":
            return None
        if kind == "task":
            evaluation, number, portion, lo, hi = args
            return ("done", evaluation, portion, self.compute(evaluation, number, lo, hi))
        if kind == "push":
            self.push()
            self._gather_pushed()
            return ("pushed", args[0])
        self.drop()  # "drop"
        return ("ready",)

    def _gather_pushed(self) -> None:
        """With peers: partition 0 waits until every partition's push is summed (each
        says so once its own ``wait_applied`` returned); the others say so."""
        if self.peers is None:
            return
        tick = self.clock.now()
        if self.peers.rank:
            quiet_send(self.peers, ("pushed",), [0], Tag.WORK)
        else:
            for q in range(1, self.peers.size):
                quiet_recv(self.peers, source=q, tag=Tag.WORK, max_sleep=5e-4)
        self.stats.wait_seconds += self.clock.now() - tick
