"""Compressed pushes through the parameter server's shard states (no MPI).

A packet pushed with ``push_packet`` must change the shards exactly as a dense push of
its decoded gradient does (bitwise, under the same rule), however the client's range
is split over shards and wherever the range starts (the words are rebased per shard);
the counters (applied, samples, staleness) must agree too, while the bytes received are
the packet's.  A ``None`` packet is refused by every shard.  The MPI path (windows,
meta words, slot kind) is checked by ``tests/mpi/mpi_ps_packets.py``.
"""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

from mpibelief import config
from mpibelief.compression import (
    AdaptiveTau,
    FixedTau,
    FractionSchedule,
    ThresholdCompressor,
    split_words,
)
from mpibelief.compressor import Compressor
from mpibelief.optim import Optimizer
from mpibelief.ps.memory import MemoryServer
from mpibelief.worker import Replica

N = 10_007
RANGES = [(0, N), (3_001, 9_000)]  # a whole replica, and a partition spanning 2 shards


def twins(optimizer: Optimizer) -> tuple[MemoryServer, MemoryServer]:
    start = np.random.default_rng(1).standard_normal(N).astype(np.float32)
    servers = []
    for _ in range(2):
        server = MemoryServer(N, 3, optimizer, ranges=[*RANGES, (0, N)])
        server.client(2).load(start)
        servers.append(server)
    return servers[0], servers[1]


@pytest.mark.parametrize("policy", [FixedTau(0.75), AdaptiveTau(FractionSchedule(0.02))],
                         ids=["fixed", "adaptive"])
@pytest.mark.parametrize("rule", ["sgd", "adagrad"])
def test_a_packet_applies_as_its_decoded_gradient(policy, rule):
    packed, dense = twins(Optimizer(rule, lr=0.1))
    rng = np.random.default_rng(2)
    for c, (lo, hi) in enumerate(RANGES):
        codec = ThresholdCompressor(hi - lo, policy)
        for step in range(6):
            versions = packed.client(c).pull(np.empty(hi - lo, np.float32))
            packet, _ = codec.compress(rng.standard_normal(hi - lo).astype(np.float32))
            packed.client(c).push_packet(packet, versions, samples=5)
            decoded = codec.decompress(packet, np.zeros(hi - lo, np.float32))
            dense.client(c).push(decoded, versions, samples=5)
            if step == 3:
                packed.client(c).push_packet(None, versions, samples=5)
                dense.client(c).push(np.full(hi - lo, np.nan, np.float32), versions, samples=5)
    assert packed.params().tobytes() == dense.params().tobytes()
    assert not np.array_equal(packed.params(), dense.states[0].buffers[0])  # it moved
    assert list(packed.samples_applied()) == list(dense.samples_applied()) == [30, 30, 0]
    for a, b in zip(packed.states, dense.states, strict=True):
        assert (a.stats.applied, a.stats.refused) == (b.stats.applied, b.stats.refused)
        assert a.stats.refused >= 1 and list(a.stats.staleness) == list(b.stats.staleness)
        assert a.stats.bytes_in < b.stats.bytes_in


def test_split_words_rebases_each_part():
    words = np.array([0, 5, 6 | 1 << 31, 10, 17 | 1 << 31], np.uint32)
    parts = split_words(words, [(0, 6), (6, 11), (11, 20)])
    assert [p.tolist() for p in parts] == [[0, 5], [0 | 1 << 31, 4], [6 | 1 << 31]]


def test_a_compressing_replica_logs_every_push():
    server = MemoryServer(N, 1, Optimizer("sgd", lr=0.1))
    comp = config.load(None, ["compression.enabled=true"]).compression
    model = SimpleNamespace(n_params=N, params=np.zeros(N, np.float32),
                            grads=np.zeros(N, np.float32))
    rng = np.random.default_rng(0)

    def loss_and_grad(x, y):
        model.grads[:] = rng.standard_normal(N)
        return 1.0, 0

    model.loss_and_grad = loss_and_grad
    data = SimpleNamespace(x_train=np.zeros((8, 1), np.float32), y_train=np.zeros(8, np.int32))
    replica = Replica(0, model, server.client(0), data, SimpleNamespace(batch=2),
                      SimpleNamespace(n_fetch=1, n_push=2), seed=0, clock=None,
                      compressor=Compressor(N, comp, rank=0))
    replica.clock = SimpleNamespace(now=lambda: 0.0, cpu=lambda: 0.0)
    replica.train(7)
    stats = replica.finish()  # 3 pushes of 2 steps, then the last partial one
    log = stats.compression
    assert len(log["step"]) == 4 and server.states[0].stats.applied == 4
    assert stats.bytes_pushed == log["bytes_compressed"].sum()
    assert (log["ratio"] >= 100).all() and list(log["epoch"]) == [0.5, 1.0, 1.5, 1.75]
