# ranks: 3
"""An idle shard must not spin: over ~2 s with nothing to apply it uses < 10% of a core.

A workstation run has more ranks than cores, so a shard that busy-waits steals the
core a replica needs.  Rank 0 coordinates, rank 1 is the shard, rank 2 a client that
pushes a few updates (so the shard has been busy once) and then goes quiet.  The shard
measures its own CPU time with ``time.process_time()`` around ``serve()``.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_barrier
from mpibelief.optim import Optimizer
from mpibelief.ps.server import ParameterServer

IDLE_SECONDS = 2.0
MAX_CORE_SHARE = 0.10


def main() -> None:
    comm = MPI.COMM_WORLD
    assert comm.Get_size() == 3, "run on 3 ranks: coordinator, shard, client"
    rank = comm.Get_rank()
    others = comm.Split(0 if rank != 1 else 1, rank)
    ps = ParameterServer(comm, 4096, [1], [2], Optimizer("sgd", lr=0.5))
    share = None
    if rank == 1:
        cpu, wall = time.process_time(), time.perf_counter()
        stats = ps.serve()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
        share = cpu / wall
        print(f"idle shard: {cpu * 1e3:.1f} ms CPU over {wall:.2f} s wall = "
              f"{100 * share:.1f}% of a core (applied {stats.applied})", flush=True)
        assert stats.applied == 5, stats.applied
        assert wall >= IDLE_SECONDS, wall
    elif rank == 2:
        client = ps.client()
        buf = np.empty(4096, np.float32)
        for _ in range(5):
            client.push(np.ones(4096, np.float32), client.pull(buf))
        client.wait_applied()
        quiet_barrier(others)
    else:
        quiet_barrier(others)
        time.sleep(IDLE_SECONDS)
        ps.stop()
    share = comm.bcast(share, root=1)
    ps.free()
    others.Free()
    assert share < MAX_CORE_SHARE, f"idle shard used {100 * share:.1f}% of a core"
    if rank == 0:
        print("mpi_shard_idle: ok", flush=True)


if __name__ == "__main__":
    main()
