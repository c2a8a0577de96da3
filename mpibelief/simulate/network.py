"""A network description for the scaling model: per-message latency and bandwidth.

A message of ``b`` bytes costs ``latency + b / bandwidth`` seconds.  ``local`` is
measured on this machine (:mod:`mpibelief.simulate.pingpong`: MPICH's shared memory
between two ranks); the presets stand for a cluster's interconnect, with MPI-level
figures rather than the wire's (a 1 Gb/s link delivers about 117 MB/s of payload, and
TCP through the kernel adds tens of microseconds per message):

=============  ============  ===============  ===========================================
preset         latency       bandwidth        stands for
=============  ============  ===============  ===========================================
``1gbe``       50 us         117 MB/s         the paper's era: 2012 data-centre Ethernet
``10gbe``      15 us         1.17 GB/s        TCP over 10 Gb Ethernet
``infiniband`` 1.5 us        6 GB/s           FDR InfiniBand, MPI over verbs
=============  ============  ===============  ===========================================
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Network:
    """Latency (seconds per message) and bandwidth (bytes per second)."""

    name: str
    latency: float
    bandwidth: float

    def seconds(self, nbytes: float, messages: float = 1.0) -> float:
        """Time to move ``messages`` messages holding ``nbytes`` bytes in all."""
        return messages * self.latency + nbytes / self.bandwidth


PRESETS = {
    "1gbe": Network("1gbe", 50e-6, 117e6),
    "10gbe": Network("10gbe", 15e-6, 1.17e9),
    "infiniband": Network("infiniband", 1.5e-6, 6e9),
}


def preset(name: str) -> Network:
    from mpibelief.errors import UserError

    if name not in PRESETS:
        raise UserError(f"unknown network preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
