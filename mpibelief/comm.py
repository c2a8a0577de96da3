"""Communicators, message tags, and waiting on MPI without burning a core.

:class:`Comms` splits ``COMM_WORLD`` once per run into what the roles need, so no
role ever builds a communicator of its own or names rank 0:

- ``control``: a private duplicate of the world for two-sided control messages (reports,
  warmstart, shard commands), so they can never meet a user's or a library's message;
- ``replica``: the ``P`` partitions of this rank's replica (model parallelism);
- ``across``: one rank per replica, same partition index (allreduce, compression).

Waiting: MPICH's blocking calls (``Recv``, ``Barrier``, ``Wait``) poll in a tight loop.
A workstation run has more ranks than cores, so a rank that merely waits would steal its
core from a rank that computes.  Everything here that waits goes through :func:`poll`,
the one sleep-poll loop: test, sleep a little, sleep longer next time.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum

from mpi4py import MPI


class Tag(IntEnum):
    """Tags of two-sided control messages, all on :attr:`Comms.control`."""

    REPORT = 17  # a rank's closing statistics, to the coordinator
    WARMSTART = 18  # replica 0 releases the others after training alone
    START = 19  # the coordinator releases the replicas once the shards hold the model
    STOP = 20  # the coordinator tells a replica to stop training and report
    COMMAND = 23  # a command for a shard's serve loop (see mpibelief.ps.shard)
    REPLY = 24  # a shard's answer to a command
    NOTICE = 25  # on the WORLD communicator: a rank tells the coordinator it is failing
    # or received SIGTERM (see mpibelief.train); the coordinator listens in a thread


class Backoff:
    """Sleeps that grow from ``low`` to ``high`` while a wait goes on, so waiting is cheap.

    A waiter that spins steals the core of the rank it waits for.  ``reset()`` after
    progress makes the next wait short.
    """

    def __init__(self, low: float = 50e-6, high: float = 1e-3):
        self.low, self.high = low, high
        self.delay = low

    def reset(self) -> None:
        self.delay = self.low

    def sleep(self) -> float:
        """Sleep once, lengthen the next sleep; returns the seconds slept."""
        start = time.perf_counter()
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.high)
        return time.perf_counter() - start


def poll(ready: Callable[[], bool], low: float = 20e-6, high: float = 2e-3,
         timeout: float | None = None) -> float:
    """Call ``ready()`` until it is true, sleeping (backing off) in between.

    Returns:
        the seconds waited (0.0 when ``ready()`` was true at once).

    Raises:
        TimeoutError: when ``timeout`` seconds pass first.
    """
    if ready():
        return 0.0
    start = time.perf_counter()
    backoff = Backoff(low, high)
    while not ready():
        if timeout is not None and time.perf_counter() - start > timeout:
            raise TimeoutError(f"no completion within {timeout}s")
        backoff.sleep()
    return time.perf_counter() - start


def quiet_wait(request: MPI.Request, max_sleep: float = 0.002, timeout: float | None = None):
    """Complete ``request`` while sleeping between tests; returns its message if any.

    Raises:
        TimeoutError: when ``timeout`` seconds pass first (the request stays pending).
    """
    result = []

    def done() -> bool:
        flag, message = request.test()
        if flag:
            result.append(message)
        return flag

    poll(done, high=max_sleep, timeout=timeout)
    return result[0]


def quiet_barrier(comm: MPI.Comm, max_sleep: float = 0.002) -> None:
    """A barrier that sleeps instead of spinning while the slowest rank catches up."""
    quiet_wait(comm.Ibarrier(), max_sleep)


def quiet_recv(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = Tag.REPORT,
               max_sleep: float = 0.002, timeout: float | None = None):
    """Receive one pickled control message without spinning.

    Raises:
        TimeoutError: when ``timeout`` seconds pass first (the receive is cancelled).
    """
    request = comm.irecv(source=source, tag=tag)
    try:
        return quiet_wait(request, max_sleep, timeout)
    except TimeoutError:
        request.Cancel()
        request.Wait()  # complete the cancelled receive (uppercase: no unpickling)
        raise


def quiet_send(comm: MPI.Comm, obj, dests, tag: int) -> None:
    """Send one pickled control message to each of ``dests``; wait without spinning."""
    for request in [comm.isend(obj, dest=d, tag=tag) for d in dests]:
        quiet_wait(request)


def quiet_bcast(comm: MPI.Comm, obj, root: int = 0, max_sleep: float = 0.002):
    """Broadcast a small pickled object from ``root``; the others sleep while waiting."""
    if comm.rank == root:
        quiet_send(comm, obj, [r for r in range(comm.size) if r != root], Tag.REPORT)
        return obj
    return quiet_recv(comm, source=root, max_sleep=max_sleep)


@dataclass
class Comms:
    """The communicators of one rank, split once from the world (see the module doc).

    Attributes:
        world: every rank of the run (ranks are the layout's ranks).
        control: private duplicate of ``world`` for control messages (:class:`Tag`).
        replica: this replica's partitions, ordered by partition; ``COMM_NULL`` off workers.
        across: the ranks holding this partition in every replica, ordered by replica;
            ``COMM_NULL`` off workers.
        coordinator: the world rank that coordinates (writes results).
    """

    world: MPI.Intracomm
    control: MPI.Intracomm
    replica: MPI.Intracomm
    across: MPI.Intracomm
    coordinator: int

    @classmethod
    def split(cls, world: MPI.Intracomm, layout) -> Comms:
        """Collective over ``world``: build every communicator the layout's roles use."""
        role = layout.roles[world.rank]
        worker = role.kind == "worker"
        undefined = MPI.UNDEFINED
        replica = world.Split(role.index if worker else undefined, role.partition)
        across = world.Split(role.partition if worker else undefined, role.index)
        return cls(world, world.Dup(), replica, across, layout.coordinator_rank)

    def free(self) -> None:
        """Free what :meth:`split` made (collective over the world)."""
        for comm in (self.replica, self.across, self.control):
            if comm != MPI.COMM_NULL:
                comm.Free()
