"""Waiting on MPI without burning a core.

MPICH's blocking calls (``Recv``, ``Barrier``, ``Wait``) poll in a tight loop.  A
workstation run has more ranks than cores, so a rank that merely waits would steal
its core from a rank that computes.  These helpers start the non-blocking form and
test it with short sleeps in between, backing off to ``max_sleep``.
"""

from __future__ import annotations

import time

from mpi4py import MPI

CONTROL_TAG = 17  # two-sided control messages (done, stats); never the data path


def quiet_wait(request: MPI.Request, max_sleep: float = 0.002, timeout: float | None = None):
    """Complete ``request`` while sleeping between tests; returns its message if any.

    Raises:
        TimeoutError: when ``timeout`` seconds pass first (the request stays pending).
    """
    sleep, start = 20e-6, time.monotonic()
    while True:
        done, message = request.test()
        if done:
            return message
        if timeout is not None and time.monotonic() - start > timeout:
            raise TimeoutError(f"no completion within {timeout}s")
        time.sleep(sleep)
        sleep = min(sleep * 2, max_sleep)


def quiet_barrier(comm: MPI.Comm, max_sleep: float = 0.002) -> None:
    """A barrier that sleeps instead of spinning while the slowest rank catches up."""
    quiet_wait(comm.Ibarrier(), max_sleep)


def quiet_recv(comm: MPI.Comm, source: int = MPI.ANY_SOURCE, tag: int = CONTROL_TAG,
               max_sleep: float = 0.002):
    """Receive one pickled control message without spinning."""
    return quiet_wait(comm.irecv(source=source, tag=tag), max_sleep)


def quiet_bcast(comm: MPI.Comm, obj, root: int = 0, max_sleep: float = 0.002):
    """Broadcast a small pickled object from ``root``; the others sleep while waiting."""
    if comm.rank == root:
        requests = [comm.isend(obj, dest=r, tag=CONTROL_TAG) for r in range(comm.size)
                    if r != root]
        for request in requests:
            quiet_wait(request, max_sleep)
        return obj
    return quiet_recv(comm, source=root, max_sleep=max_sleep)
