"""Exchanging threshold-compressed packets among replicas: every replica gets one update.

The protocol, per step, on the across-replicas communicator ``comm`` (R ranks)::

    every rank r:  packet_r = [tau_r bits, word, word, ...]      (mpibelief.compression)
    Allgather      len(packet_r)          -> counts[0..R-1]      (one int each)
    Allgatherv     packet_r               -> buffer = packet_0 | packet_1 | ... | packet_R-1
    decode         update = 0; for r = 0..R-1: for word in packet_r: update[i] +-= tau_r

No rank sends anything dense: the bytes on the wire are the packets and one count each,
and the dense vector is rebuilt locally.  Every rank decodes the same buffer with the
same kernel in the same order (rank order, then ascending index), and float addition is
done in that written order (no fastmath in :func:`mpibelief.compression.decode_packets`),
so the update is bitwise identical on every rank and so are replicas that apply it.
A different order would not be: ``(a + b) + c != a + (b + c)`` in float32.

Both collectives are started non-blocking and completed with
:func:`mpibelief.comm.quiet_wait`: a replica that finishes its gradient early sleeps
instead of spinning on a core the slower replica needs (a workstation has more ranks
than cores).  The receive buffer is kept between steps and only grows, so a step
allocates nothing once the packets stop growing.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_wait
from mpibelief.compression import decode_packets

_INT_MAX = 2**31 - 1  # MPI counts and displacements are C ints


class PacketExchange:
    """Allgathers every replica's packet and decodes their sum, in rank order.

    Args:
        n: length of the dense vector.
        comm: the intracommunicator across replicas (each rank one replica).
        capacity: words to reserve for the gathered packets up front (grows if needed).
        max_sleep: the longest sleep between tests while waiting (see ``quiet_wait``).
    """

    def __init__(self, n: int, *, comm: MPI.Intracomm, capacity: int = 0,
                 max_sleep: float = 0.002):
        self.n, self.comm, self.max_sleep = n, comm, max_sleep
        size = comm.Get_size()
        self.mine = np.zeros(1, np.int32)
        self.counts = np.zeros(size, np.int32)
        self.displs = np.zeros(size, np.int32)
        self.buffer = np.zeros(max(capacity, size), np.uint32)

    def gather(self, packet: np.ndarray) -> np.ndarray:
        """Allgather the packets; returns the filled part of the buffer (a view)."""
        if packet.dtype != np.uint32 or packet.ndim != 1 or packet.size < 1:
            raise ValueError("exchange: a packet is a 1-D uint32 array with a tau header")
        self.mine[0] = packet.size
        quiet_wait(self.comm.Iallgather(self.mine, self.counts), self.max_sleep)
        total = int(self.counts.astype(np.int64).sum())
        if total > _INT_MAX:
            raise ValueError(f"exchange: {total} words exceed MPI's int counts")
        self.displs[1:] = np.cumsum(self.counts[:-1])
        if total > self.buffer.size:
            self.buffer = np.zeros(max(total, 2 * self.buffer.size), np.uint32)
        recv = [self.buffer, (self.counts, self.displs), MPI.UINT32_T]
        quiet_wait(self.comm.Iallgatherv(packet, recv), self.max_sleep)
        return self.buffer[:total]

    def exchange(self, packet: np.ndarray, out: np.ndarray) -> np.ndarray:
        """``out`` = the sum over replicas of each one's decoded packet; returns ``out``.

        Collective over ``comm``.  ``out`` is float32 of length ``n`` and is overwritten.
        """
        if out.dtype != np.float32 or out.shape != (self.n,):
            raise ValueError(f"exchange: out must be float32 of shape ({self.n},)")
        buffer = self.gather(packet)
        decode_packets(buffer, self.counts, self.displs, out)
        return out


def exchange(packet: np.ndarray, out: np.ndarray, *, comm: MPI.Intracomm) -> np.ndarray:
    """One-off :meth:`PacketExchange.exchange` (keep a PacketExchange to reuse buffers)."""
    return PacketExchange(out.size, comm=comm).exchange(packet, out)
