"""What MPICH's collectives cost on a latency-bandwidth network: the sync exchange's clock.

A message of ``b`` bytes costs ``latency + b / bandwidth`` (``alpha + b * beta``, the
:class:`~mpibelief.simulate.cluster.Costs` and :mod:`.network` model); a round in which
every rank sends one message and receives one (a ``sendrecv``) costs one message, since
the links are full duplex and independent (no contention, as in :mod:`.cluster`).  The
formulas are the critical path of the algorithm MPICH picks for the call the real sync
makes, per its default selection table (``maint/tuning/coll/mpir/generic.json`` in
MPICH 4-5; the ch4 device's table has no entry for the non-blocking collectives, so
they go there), and the algorithms' costs as in Thakur, Rabenseifner and Gropp,
"Optimization of collective communication operations in MPICH" (IJHPCA 2005).

Dense sync: ``Iallreduce`` (SUM, float32) of the ``n``-entry gradient.  For
``4n > 2048`` bytes and ``n >= p'`` (always, here) MPICH runs Rabenseifner's
reduce-scatter + allgather (``MPIR_Iallreduce_intra_sched_reduce_scatter_allgather``),
with ``p'`` the largest power of two ``<= R`` and ``r = R - p'``::

    if r > 0: the first 2r ranks pair up; each even one sends all 4n bytes to its odd
              neighbour (1 message of 4n) and waits out the rest
    reduce-scatter, recursive halving over p' ranks: log2 p' rounds of 4n/2, 4n/4, ...
    allgather, recursive doubling over p' ranks:    log2 p' rounds of ..., 4n/4, 4n/2
    if r > 0: each odd one sends the result back (1 message of 4n)

    T = (2 log2 p' + 2[r>0]) * alpha + (2 (p'-1)/p' + 2[r>0]) * 4n * beta

So 2 log2 R messages, not the ring's ``2(R-1)`` messages of ``4n/R`` (same bytes, far
fewer latencies: 16 against 398 at R = 200), and a non-power-of-two R pays two whole
extra vectors: 128 replicas move 1.98 vectors per step, 200 move 3.99.  The reduction
arithmetic (about one add per entry) is not in ``T``: the caller charges it.

Compressed sync (:mod:`mpibelief.compressed_exchange`): ``Iallgather`` of one int per
rank, then ``Iallgatherv`` of the packets (uint32 words).  MPICH's choice by the total
bytes ``B`` gathered: R a power of two and ``B < 512 KiB``: recursive doubling
(``log2 R`` rounds); otherwise ``B < 80 KiB``: Bruck (``ceil(log2 R)`` rounds);
otherwise the ring (``R - 1`` rounds).  Every algorithm delivers each rank the others'
bytes ``B - own``; the clock charges the slowest receiver's (``B - smallest packet``)
over the bandwidth, plus the rounds' latencies.  R = 1 exchanges nothing: 0 s.

So compressed bytes grow with R and dense ones do not: with a fraction f kept, a
replica receives about ``(R-1) f`` vectors against Rabenseifner's 2 (4 for R not a
power of two).  At f = 1% the two meet near R = 200 (measured in
``bench/sim_sync.py``: 3996 KiB compressed, 8001 KiB dense at R = 200; 141 and 3514
at R = 8).
"""

from __future__ import annotations

import math

ALLGATHER_RD_BYTES = 524288  # power-of-two R below this: recursive doubling (MPICH)
ALLGATHER_BRUCK_BYTES = 81920  # any R below this: Bruck; above both: ring


def pof2(ranks: int) -> int:
    """The largest power of two not above ``ranks``."""
    return 1 << (ranks.bit_length() - 1)


def allreduce_messages(ranks: int) -> int:
    """Messages on the critical path of Rabenseifner's allreduce over ``ranks`` ranks."""
    if ranks <= 1:
        return 0
    p = pof2(ranks)
    return 2 * int(math.log2(p)) + 2 * (p < ranks)  # + the fold-in and fold-out


def allreduce_bytes(nbytes: int, ranks: int) -> float:
    """Bytes received on that critical path (as many are sent)."""
    if ranks <= 1:
        return 0.0
    p = pof2(ranks)
    return (2 * (p - 1) / p + 2 * (p < ranks)) * nbytes


def allreduce_seconds(nbytes: int, ranks: int, latency: float, bandwidth: float) -> float:
    """One ``Iallreduce`` of ``nbytes`` per rank over ``ranks`` ranks (Rabenseifner)."""
    return allreduce_messages(ranks) * latency + allreduce_bytes(nbytes, ranks) / bandwidth


def allgather_rounds(total_bytes: int, ranks: int) -> int:
    """Rounds of MPICH's allgather(v) algorithm for that many bytes in all."""
    if ranks <= 1:
        return 0
    if ranks == pof2(ranks) and total_bytes < ALLGATHER_RD_BYTES:
        return int(math.log2(ranks))  # recursive doubling
    if ranks != pof2(ranks) and total_bytes < ALLGATHER_BRUCK_BYTES:
        return math.ceil(math.log2(ranks))  # Bruck
    return ranks - 1  # ring


def allgather_bytes(sizes) -> int:
    """Bytes the busiest receiver gets: everybody's but the smallest contribution."""
    sizes = [int(s) for s in sizes]
    return sum(sizes) - min(sizes) if len(sizes) > 1 else 0


def allgather_seconds(sizes, latency: float, bandwidth: float) -> float:
    """One ``Iallgather(v)`` in which rank r contributes ``sizes[r]`` bytes."""
    rounds = allgather_rounds(int(sum(int(s) for s in sizes)), len(sizes))
    return rounds * latency + allgather_bytes(sizes) / bandwidth


def packet_exchange_seconds(packet_bytes, latency: float, bandwidth: float) -> float:
    """:class:`~mpibelief.compressed_exchange.PacketExchange`: the counts (4 bytes a
    rank), then the packets (``packet_bytes[r]`` from rank r), one after the other."""
    counts = allgather_seconds([4] * len(packet_bytes), latency, bandwidth)
    return counts + allgather_seconds(packet_bytes, latency, bandwidth)
