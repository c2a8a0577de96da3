# ranks: 4 5
"""Acceptance test of the parameter server under concurrency: exactly once, or refused.

Rank 0 coordinates, ranks 1-2 are shards, the rest (1 or 2) are clients.  Every client
pushes hundreds of known gradients while pulling between pushes; with plain SGD at
lr=1 and integer-valued float32 gradients, the final state must be the exact sum:
nothing lost, nothing applied twice.  Every gradient is ``alpha * w`` for one fixed
vector ``w``, so every consistent snapshot of a shard is a multiple of ``w`` there; a
pull that mixed two versions (a torn read) would break that.  Then Adagrad from one
client must match numpy exactly.
"""

from __future__ import annotations

import sys

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_barrier
from mpibelief.optim import Optimizer
from mpibelief.ps.server import ParameterServer
from tests.oracle import (
    BETA,
    FORCED_ROUND,
    NAN_ROUND,
    ROUNDS,
    N,
    alpha,
    check_snapshot,
    expected_alpha_sum,
    weights,
)

SHARDS = [1, 2]
LOADS = 1  # set_params publishes the initial state as the shards' first version


def run_client(ps, index: int, w, clients_comm) -> None:
    client = ps.client()
    buf = np.empty(N, np.float32)
    for r in range(ROUNDS):
        for _ in range(2):  # more pulls, more chances to catch a torn one
            versions = client.pull(buf)
            check_snapshot(buf, w, ps.slices, f"client {index} round {r}")
        grad = alpha(index, r) * w
        if r == NAN_ROUND:
            grad[ps.slices[1].start + 5] = np.nan
        if r == FORCED_ROUND and index == 0:
            grad[ps.slices[0].start] = np.inf
            grad[ps.slices[1].stop - 1] = np.nan
            client.check_finite = False  # as with one shard: only the shards check
            client.push(grad, versions)
            client.check_finite = True
            continue
        client.push(grad, versions)
    client.wait_applied()
    assert client.stats.pushes == ROUNDS and client.stats.refused == 1, client.stats
    assert client.check_finite  # two shards: the client checks the whole gradient
    # Staleness, deterministically: once every client is done, one pull, three pushes.
    quiet_barrier(clients_comm)
    if index == 0:
        versions = client.pull(buf)
        for _ in range(3):
            client.push(2 * w, versions)
        client.wait_applied()


def test_sgd_exactly_once(comm, others, clients_comm) -> None:
    rank, n_clients = comm.Get_rank(), comm.Get_size() - 3
    clients = list(range(3, comm.Get_size()))
    # Rank 0 is a client too: it loads the initial state, as a push of kind LOAD.
    ps = ParameterServer(comm, N, SHARDS, [0, *clients], Optimizer("sgd", lr=1.0))
    w = weights(N)
    stats = None
    if rank in SHARDS:
        stats = ps.serve()
    elif rank == 0:
        ps.client().set_params(BETA * w)
        quiet_barrier(others)  # the sync point: initialised before any client pulls
        quiet_barrier(others)  # every client's pushes have returned
        ps.stop()
    else:
        quiet_barrier(others)
        run_client(ps, clients.index(rank), w, clients_comm)
        quiet_barrier(others)
    everyone = comm.gather(stats)
    if rank == 0:
        check_sgd_result(ps, everyone, w, n_clients)
    ps.free()


def check_sgd_result(ps, everyone, w, n_clients: int) -> None:
    shard_stats = [everyone[r] for r in SHARDS]
    final = np.empty(N, np.float32)
    versions = ps.client().pull(final)
    expected = (BETA - expected_alpha_sum(n_clients)) * w
    wrong = np.flatnonzero(final != expected)
    assert wrong.size == 0, f"{wrong.size} wrong: {final[wrong[:3]]} != {expected[wrong[:3]]}"
    applied = n_clients * (ROUNDS - 1) - 1 + 3
    for s, st in enumerate(shard_stats):
        assert st.applied == applied, (s, st.applied, applied)
        assert st.refused == n_clients + 1, (s, st.refused)
        # The version counts published versions: every applied push, and the load.
        assert versions[s] == st.version == applied + LOADS, (s, versions[s], st.version)
        assert st.staleness.sum() == applied, (s, st.staleness)
        assert st.staleness[1] >= 1 and st.staleness[2] >= 1, st.staleness
        assert st.bytes_in == (applied + 1) * 4 * (ps.slices[s].stop - ps.slices[s].start)
    hist = [np.trim_zeros(st.staleness, "b").tolist() for st in shard_stats]
    print(f"sgd: {n_clients} clients x {ROUNDS} pushes exact; applied {applied} per shard, "
          f"refused {n_clients + 1}; staleness histograms {hist}", flush=True)


def adagrad_reference(p0, grads, lr, eps):
    p, acc = p0.copy(), np.zeros_like(p0)
    lr, eps = np.float32(lr), np.float32(eps)
    for g in grads:
        acc += g * g
        p = p - lr * g / np.sqrt(acc + eps)
    return p


def test_adagrad_matches_numpy(comm, others) -> None:
    n, steps, lr, eps = 1001, 40, 0.1, 1e-6
    rank, first = comm.Get_rank(), 3
    # Two slots and three buffers here (defaults elsewhere): the shard must still apply
    # one client's pushes in push order, or Adagrad would not match numpy.
    ps = ParameterServer(comm, n, SHARDS, [first], Optimizer("adagrad", lr=lr, eps=eps),
                         buffers=3, depth=2)
    stats = None
    if rank in SHARDS:
        stats = ps.serve()
    elif rank == first:
        rng = np.random.default_rng(7)
        p0 = rng.standard_normal(n).astype(np.float32)
        grads = [rng.standard_normal(n).astype(np.float32) for _ in range(steps)]
        client = ps.client()
        client.set_params(p0)
        for i, g in enumerate(grads):
            client.push(g, None)
            if i == steps // 2:
                bad = g.copy()
                bad[n // 2] = np.nan
                client.push(bad, None)  # refused whole by the client: no shard applies it
                bad[[0, -1]] = np.inf, np.nan
                client.check_finite = False
                client.push(bad, None)  # each shard finds a non-finite value and refuses
                client.check_finite = True
        client.wait_applied()
        got = np.empty(n, np.float32)
        versions = client.pull(got)
        want = adagrad_reference(p0, grads, lr, eps)
        np.testing.assert_allclose(got, want, rtol=2e-6, atol=1e-6)
        assert list(versions) == [steps + LOADS, steps + LOADS], versions
        print(f"adagrad: {steps} pushes match numpy (max abs diff "
              f"{np.abs(got - want).max():.2e}, bitwise equal: {np.array_equal(got, want)})")
    if rank not in SHARDS:
        quiet_barrier(others)
        if rank == 0:
            ps.stop()
    everyone = comm.gather(stats)
    if rank == 0:
        for r in SHARDS:
            st = everyone[r]
            assert (st.applied, st.refused) == (steps, 2), (st.applied, st.refused)
            assert st.staleness.sum() == 0  # no versions sent, nothing recorded
    ps.free()


def main() -> None:
    comm = MPI.COMM_WORLD
    if comm.Get_size() < 4:
        sys.exit("needs at least 4 ranks: coordinator, 2 shards, clients")
    rank = comm.Get_rank()
    others = comm.Split(0 if rank not in SHARDS else 1, rank)
    clients_comm = comm.Split(0 if rank >= 3 else 1, rank)
    test_sgd_exactly_once(comm, others, clients_comm)
    test_adagrad_matches_numpy(comm, others)
    others.Free()
    clients_comm.Free()
    if rank == 0:
        print("mpi_param_server: ok", flush=True)


if __name__ == "__main__":
    main()
