"""Two replicas and one shard state through the in-memory store, on a virtual clock.

No MPI: the same :class:`~mpibelief.worker.Replica` phases and the same
:class:`~mpibelief.ps.state.ShardState` that run under mpiexec are driven here by a
small discrete-event loop, so the interleaving (and the staleness it causes) is exact
and repeatable.  The gradients follow the exactly-once oracle of ``tests/oracle.py``,
so the final parameters must equal the MPI test's exact sums.
"""

from __future__ import annotations

import heapq
from types import SimpleNamespace

import numpy as np
import pytest

from mpibelief.clock import VirtualClock
from mpibelief.optim import Optimizer
from mpibelief.ps.memory import MemoryServer
from mpibelief.worker import Replica
from tests.oracle import BETA, FORCED_ROUND, NAN_ROUND, ROUNDS, alpha, expected_alpha_sum, weights

N = 1_003
LOADER = 2  # client index of the coordinator, which loads the initial state
# Simulated seconds per phase, different per replica so that their pushes interleave.
COSTS = [{"fetch": 0.1, "compute": 1.0, "push": 0.1}, {"fetch": 0.2, "compute": 1.7, "push": 0.1}]


class ScriptedModel:
    """A model whose gradient at step ``r`` is the oracle's ``alpha(client, r) * w``.

    It stands in for the network only: what is under test is the replica's phases,
    the store and the shard state, which it leaves untouched.
    """

    def __init__(self, client: int, w: np.ndarray):
        self.client, self.w, self.step = client, w, 0
        self.n_params = w.size
        self.params = np.zeros(w.size, np.float32)
        self.grads = np.zeros(w.size, np.float32)

    def loss_and_grad(self, x, y) -> tuple[float, int]:
        r = self.step
        self.grads[:] = alpha(self.client, r) * self.w
        if r == NAN_ROUND:
            self.grads[N // 2] = np.nan
        if r == FORCED_ROUND and self.client == 0:
            self.grads[[0, -1]] = np.inf, np.nan
        self.step += 1
        return float(r), 0


def make_replicas(server, w, n_push: int, clock):
    data = SimpleNamespace(x_train=np.zeros((8, 1), np.float32), y_train=np.zeros(8, np.int32))
    train = SimpleNamespace(batch=1)
    downpour = SimpleNamespace(n_fetch=1, n_push=n_push)
    return [Replica(c, ScriptedModel(c, w), server.client(c), data, train, downpour, seed=c,
                    clock=clock) for c in range(2)]


def drive(replicas, clock, steps: int) -> None:
    """Run every replica's phases in simulated-time order until each made ``steps`` steps.

    A phase runs when the clock reaches its start; the next one starts after its cost.
    """
    events = [(0.0, c, None) for c in range(len(replicas))]
    while events:
        t, c, phases = heapq.heappop(events)
        clock.t = t
        if phases is None:
            if replicas[c].stats.steps == steps:
                continue
            phases = replicas[c].phases()
        name = next(phases, None)
        if name is None:  # the step is over: start the next one now
            heapq.heappush(events, (t, c, None))
        else:
            heapq.heappush(events, (t + COSTS[c][name], c, phases))


def run(n_push: int):
    w = weights(N)
    clock = VirtualClock()
    server = MemoryServer(N, 1, Optimizer("sgd", lr=1.0), ranges=[(0, N)] * 3)
    server.client(LOADER).load(BETA * w)
    replicas = make_replicas(server, w, n_push, clock)
    drive(replicas, clock, ROUNDS)
    for replica in replicas:
        replica.finish()
    return server, replicas, w, clock


def test_exact_sums_of_the_mpi_oracle():
    server, replicas, w, clock = run(n_push=1)
    # The oracle's staleness phase: one pull, then three pushes of 2 * w by client 0.
    client = server.client(0)
    versions = client.pull(np.empty(N, np.float32))
    for _ in range(3):
        client.push(2 * w, versions, samples=1)
    np.testing.assert_array_equal(server.params(), (BETA - expected_alpha_sum(2)) * w)
    st = server.states[0].stats
    applied = 2 * (ROUNDS - 1) - 1 + 3
    assert (st.applied, st.refused) == (applied, 2 + 1)
    assert st.version == applied + 1  # and the load
    assert st.staleness.sum() == applied
    assert st.staleness[1:].sum() > 0  # the replicas really did interleave
    assert list(server.samples_applied()) == [ROUNDS - 2 + 3, ROUNDS - 1, 0]
    assert clock.now() > ROUNDS * 1.2  # simulated time passed, nobody waited for it


@pytest.mark.parametrize("n_push", [7, 300, 301])
def test_pushes_sum_n_push_steps_and_the_last_partial_sum(n_push):
    server, replicas, w, _ = run(n_push)
    groups = [range(start, min(start + n_push, ROUNDS)) for start in range(0, ROUNDS, n_push)]
    total, applied = 0, 0
    for c in range(2):
        for group in groups:
            bad = NAN_ROUND in group or (c == 0 and FORCED_ROUND in group)
            if not bad:  # a sum with one NaN in it is refused whole
                total += sum(alpha(c, r) for r in group)
                applied += 1
    np.testing.assert_array_equal(server.params(), (BETA - total) * w)
    st = server.states[0].stats
    assert st.applied == applied and st.applied + st.refused == 2 * len(groups)
    for replica in replicas:
        assert replica.stats.pushes == len(groups)  # the last, partial sum included
        assert replica.stats.steps == ROUNDS


def test_two_shards_and_two_partition_ranges():
    """Clients over disjoint ranges reach only their shards; samples count per client."""
    n = 10
    server = MemoryServer(n, 2, Optimizer("sgd", lr=1.0), ranges=[(0, 3), (3, 10)])
    low, high = server.client(0), server.client(1)
    assert [p.rank for p in low.parts] == [0] and [p.rank for p in high.parts] == [0, 1]
    high.push(np.ones(7, np.float32), high.pull(np.empty(7, np.float32)), samples=4)
    low.push(np.full(3, 2.0, np.float32), None, samples=4)
    np.testing.assert_array_equal(server.params(), [-2, -2, -2] + [-1] * 7)
    assert list(server.samples_applied()) == [4, 4]
    assert [s.stats.version for s in server.states] == [2, 1]
