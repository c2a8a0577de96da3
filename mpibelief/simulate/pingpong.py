"""This machine's MPI latency and bandwidth, from a ping-pong between two ranks.

``mpiexec -n 2 python -m mpibelief.simulate.pingpong --out FILE.json``: rank 0 sends
messages of 8 B to 16 MiB to rank 1, which sends them back; a one-way time is half a
round trip, the median of ``--repeats``.  Latency is the one-way time of the smallest
message; bandwidth is the largest message's bytes over its one-way time less the
latency.  Blocking Send/Recv, as MPICH moves a large message fastest inside one call
(the partition's exchanges wait the same way, see :mod:`mpibelief.partition`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

SIZES = [8, 1024, 64 * 1024, 1 << 20, 4 << 20, 16 << 20]


def one_way(comm, nbytes: int, repeats: int) -> float:
    """Median one-way seconds for a message of ``nbytes`` (both ranks call this)."""
    import numpy as np

    buf = np.zeros(nbytes, np.uint8)
    times = []
    for _ in range(repeats + 1):  # the first round trip sets up the path: dropped
        comm.Barrier()
        tick = time.perf_counter()
        if comm.rank == 0:
            comm.Send(buf, dest=1)
            comm.Recv(buf, source=1)
        elif comm.rank == 1:
            comm.Recv(buf, source=0)
            comm.Send(buf, dest=0)
        times.append((time.perf_counter() - tick) / 2)
    return float(np.median(times[1:]))


def measure(comm, repeats: int = 20) -> dict:
    """``{sizes, seconds, latency, bandwidth}`` (seconds; bytes per second)."""
    seconds = [one_way(comm, n, repeats) for n in SIZES]
    latency = seconds[0]
    bandwidth = SIZES[-1] / max(seconds[-1] - latency, 1e-12)
    return {"sizes": SIZES, "seconds": seconds, "latency": latency, "bandwidth": bandwidth}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    if comm.size < 2:
        sys.exit("mpibelief: error: the ping-pong needs two ranks (mpiexec -n 2)")
    found = measure(comm, args.repeats)
    if comm.rank == 0:
        with open(args.out, "w") as f:
            json.dump(found, f)
    return 0


if __name__ == "__main__":
    sys.exit(main())
