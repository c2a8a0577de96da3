# ranks: 4 5
"""Compressed pushes through the real windows: every packet applied exactly once.

Rank 0 loads the initial state, ranks 1-2 are shards, the rest are clients.  The first
client covers the whole vector, the second (with 5 ranks) only a range that starts
inside shard 0 and ends inside shard 1, so its words are split and rebased.  Every
client compresses random gradients with a fixed tau of 0.5 and pushes the packets
(``push_packet``: a ``PACKET`` slot with the word count and tau in the meta words);
with SGD at lr = 1 and a state of multiples of 0.5, every sum is exact, so the final
state must equal the start minus the sum of every decoded packet, bitwise.  One push
per client is a refusal (a None packet) that no shard applies.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_barrier
from mpibelief.compression import FixedTau, ThresholdCompressor
from mpibelief.optim import Optimizer
from mpibelief.ps.server import ParameterServer

N = 50_001
SHARDS = [1, 2]
ROUNDS = 120
REFUSED_ROUND = 40
RANGES = [(0, N), (10_000, 40_000)]


def start() -> np.ndarray:
    return (np.random.default_rng(3).integers(-8, 9, N) / 2).astype(np.float32)


def run_client(ps, index: int) -> np.ndarray:
    """Push ROUNDS packets; returns the sum of what was sent, over the whole vector."""
    lo, hi = RANGES[index]
    client, codec = ps.client(), ThresholdCompressor(hi - lo, FixedTau(0.5))
    rng = np.random.default_rng(10 + index)
    sent, wire = np.zeros(N, np.float64), 0
    params = np.empty(hi - lo, np.float32)
    for r in range(ROUNDS):
        versions = client.pull(params)
        if r == REFUSED_ROUND:
            client.push_packet(None, versions, samples=1)
            continue
        packet, stats = codec.compress(rng.standard_normal(hi - lo).astype(np.float32))
        client.push_packet(packet, versions, samples=1)
        wire += 4 * (packet.size - 1) + 8 * len(client.parts)  # words, count + tau per shard
        sent[lo:hi] += codec.decompress(packet, np.zeros(hi - lo, np.float32))
    client.wait_applied()
    assert client.stats.pushes == ROUNDS and client.stats.refused == 1, client.stats
    assert client.stats.bytes_pushed == wire, (client.stats.bytes_pushed, wire)
    return sent


def main() -> None:
    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    clients = list(range(3, comm.Get_size()))
    ranges = [(0, N), *RANGES[:len(clients)]]
    ps = ParameterServer(comm, N, SHARDS, [0, *clients], Optimizer("sgd", lr=1.0),
                         ranges=ranges)
    others = comm.Split(1 if rank in SHARDS else 0, rank)
    stats, sent = None, np.zeros(N, np.float64)
    if rank in SHARDS:
        stats = ps.serve()
    else:
        if rank == 0:
            ps.client().load(start())
        quiet_barrier(others)  # loaded before any client pulls
        if rank in clients:
            sent = run_client(ps, clients.index(rank))
        quiet_barrier(others)  # every push returned and was applied
        if rank == 0:
            ps.stop()
    total = np.zeros(N, np.float64)
    comm.Reduce(sent, total, MPI.SUM, root=0)
    everyone = comm.gather(stats)
    if rank == 0:
        final = np.empty(N, np.float32)
        ps.client(pull_only=True).pull(final)
        expected = (start().astype(np.float64) - total).astype(np.float32)
        wrong = np.flatnonzero(final != expected)
        assert wrong.size == 0, f"{wrong.size} entries wrong, e.g. {final[wrong[:3]]}"
        assert np.count_nonzero(total) > N // 2
        for s in SHARDS:
            st = everyone[s]
            assert st.refused == len(clients), (s, st.refused)
            assert st.applied == len(clients) * (ROUNDS - 1), (s, st.applied)
        print(f"mpi_ps_packets: {len(clients)} clients x {ROUNDS} compressed pushes exact;"
              f" shard bytes in {[everyone[s].bytes_in for s in SHARDS]}", flush=True)
    others.Free()
    ps.free()


if __name__ == "__main__":
    main()
