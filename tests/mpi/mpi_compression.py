# ranks: 2 3
"""Compressed synchronous steps: replicas stay bitwise identical, nothing lost or doubled.

Every rank is a replica with its own random gradients (its own seed, its own scale, plus
a term in the shared parameters so the gradients follow the model).  Each step it
compresses, exchanges packets with :class:`PacketExchange` and applies the decoded sum
to its own copy of the parameters.  Checked:

* the copies stay bitwise identical (Allgather of the arrays, every few steps);
* the total applied equals the sum of what every rank sent: exactly with a fixed tau
  that is a power of two (every partial sum is then exact in float32), and to float32
  rounding with adaptive tau (each sender's tau is an arbitrary float);
* with a 1% target after warm-up, each rank's bytes per step are >= 100x below dense
  float32, and the bytes the stats report are the words that really went on the wire.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.compressed_exchange import PacketExchange
from mpibelief.compression import AdaptiveTau, FixedTau, FractionSchedule, ThresholdCompressor

N = 200_003  # odd, not a multiple of anything the kernels might care about
STEPS = 60
CHECK_EVERY = 10
F32 = np.float32


def start() -> np.ndarray:
    """The same initial parameters on every rank, multiples of 1/16 (exact sums)."""
    return (np.random.default_rng(7).integers(-64, 65, N) / 16).astype(F32)


def gradient(rng, rank: int, params: np.ndarray) -> np.ndarray:
    return ((1 + rank) * rng.standard_normal(N) + 0.01 * params).astype(F32)


def assert_identical(comm, params: np.ndarray, where: str) -> None:
    copies = np.empty((comm.Get_size(), N), F32)
    comm.Allgather(params, copies)
    for r in range(1, comm.Get_size()):
        assert copies[r].tobytes() == copies[0].tobytes(), (
            f"{where}: rank {r}'s parameters differ from rank 0's in "
            f"{np.count_nonzero(copies[r] != copies[0])} entries")


def run(comm, policy, steps_per_epoch: int):
    """Train-like loop; returns (params, float64 sum of applied, own sent, taus, stats)."""
    rank = comm.Get_rank()
    rng = np.random.default_rng(1000 + rank)
    comp = ThresholdCompressor(N, policy)
    exchange = PacketExchange(N, comm=comm)
    params = start()
    update, applied = np.empty(N, F32), np.zeros(N, np.float64)
    sent, taus, all_stats = np.zeros(N, np.float64), [], []
    for step in range(STEPS):
        packet, stats = comp.compress(gradient(rng, rank, params), epoch=step / steps_per_epoch)
        own = comp.decompress(packet, np.zeros(N, F32))
        sent += own
        exchange.exchange(packet, update)
        # The wire: this rank's packet is the count it announced; stats count the same.
        assert 4 * exchange.counts[rank] + 4 == stats.bytes_compressed
        params -= update
        applied += update
        taus.append(stats.tau)
        all_stats.append(stats)
        if step % CHECK_EVERY == CHECK_EVERY - 1:
            assert_identical(comm, params, f"step {step}")
    return params, applied, sent, taus, all_stats


def sum_of_sent(comm, sent: np.ndarray) -> np.ndarray:
    every = np.empty((comm.Get_size(), N), np.float64)
    comm.Allgather(sent, every)
    return every.sum(axis=0)


def fixed_tau_is_exact(comm) -> None:
    tau = 4.0  # a power of two: every partial sum below is exact in float32
    params, applied, sent, _, stats = run(comm, FixedTau(tau), steps_per_epoch=10)
    total = sum_of_sent(comm, sent)
    assert np.array_equal(applied, total), "applied != sum of what the ranks sent"
    assert np.array_equal(start().astype(np.float64) - applied, params), "params drifted"
    assert sum(s.sent for s in stats) > 0 and np.count_nonzero(total) > 0
    if comm.Get_rank() == 0:
        mean_k = np.mean([s.sent for s in stats])
        print(f"fixed tau {tau}: {STEPS} steps, mean {mean_k:.0f} entries sent/step", flush=True)


def adaptive_tau_keeps_replicas_identical(comm) -> None:
    schedule = FractionSchedule.geometric(0.01, start=0.25, stages=3)
    params, applied, sent, taus, stats = run(comm, AdaptiveTau(schedule), steps_per_epoch=10)
    assert_identical(comm, params, "end")
    total = sum_of_sent(comm, sent)
    max_tau = comm.allreduce(max(taus), op=MPI.MAX)
    tolerance = STEPS * comm.Get_size() * max_tau * 2.0**-22  # float32 rounding per step
    assert np.max(np.abs(applied - total)) <= tolerance, np.max(np.abs(applied - total))
    last = np.array(comm.allgather(taus[-1]))
    assert len(set(last.tolist())) == comm.Get_size(), f"taus should differ by rank: {last}"
    after_warmup = [s for step, s in enumerate(stats) if schedule(step / 10) == 0.01]
    assert len(after_warmup) == STEPS - 30
    for s in after_warmup:
        assert s.fraction <= 0.01 and s.bytes_dense >= 100 * s.bytes_compressed, s
    ratio = min(s.ratio for s in after_warmup)
    ratios = comm.gather(ratio, root=0)
    if comm.Get_rank() == 0:
        print(f"adaptive 1%: dense/compressed bytes per step >= {min(ratios):.2f}x "
              f"on every rank; warm-up ratio at step 0 {stats[0].ratio:.2f}x", flush=True)


def main() -> None:
    comm = MPI.COMM_WORLD
    fixed_tau_is_exact(comm)
    adaptive_tau_keeps_replicas_identical(comm)
    if comm.Get_rank() == 0:
        print("mpi_compression: ok", flush=True)


if __name__ == "__main__":
    main()
