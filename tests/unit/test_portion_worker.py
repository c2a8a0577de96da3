"""Sandblaster replicas without MPI: portions summed on shard states give the batch gradient.

Two :class:`~mpibelief.portion_worker.PortionWorker` objects over the in-memory store
compute interleaved portions of one batch and push their sums into two shard states in
accumulate mode; the shards' accumulator, divided by the batch size, must be the
gradient of the whole batch computed in one piece, and the shards' sample counts must
add up to the batch.
"""

from __future__ import annotations

import numpy as np

from mpibelief.clock import VirtualClock
from mpibelief.config import DataConfig, FaultsConfig
from mpibelief.data import load_dataset
from mpibelief.faults import Injector
from mpibelief.model import Model
from mpibelief.optim import Optimizer
from mpibelief.portion_worker import PortionWorker
from mpibelief.portions import batch_rows, portion_bounds
from mpibelief.ps.memory import MemoryServer
from mpibelief.ps.vectors import VectorCommands

BATCH = 300


def test_portion_sums_equal_the_batch_gradient():
    data = load_dataset(DataConfig(source="synthetic", n_train=1000, n_test=10, n_inputs=12,
                                   n_classes=4))
    models = [Model(12, 4, 16, 1, "tanh") for _ in range(2)]
    for m in models:
        m.init(5)
    n = models[0].n_params
    server = MemoryServer(n, 2, Optimizer("sgd", 1.0), ranges=[(0, n), (0, n)])
    server.client(0).load(models[0].params.copy())
    commands = [VectorCommands(state) for state in server.states]
    for c in commands:
        c.reset_accumulator("grad")
    clock = VirtualClock()
    slow = Injector(FaultsConfig(slow_rank=1, slow_factor=4.0), 1, 1, clock)
    workers = [PortionWorker(r, models[r], server.client(r), data, BATCH, seed=2, clock=clock,
                             injector=slow if r else None) for r in range(2)]
    for m in models:
        m.params[...] = 0.0  # the workers must pull what the shards hold
    bounds = portion_bounds(BATCH, 7)
    for p, (lo, hi) in enumerate(bounds):
        worker = workers[p % 2]
        worker.compute(evaluation=0, number=3, lo=lo, hi=hi)
        if p % 4 == 3:
            worker.push()
    for w in workers:
        w.push()
    grad = np.concatenate([s.vector("grad") for s in server.states]) / BATCH
    reference = Model(12, 4, 16, 1, "tanh")
    reference.init(5)
    rows = batch_rows(len(data.y_train), BATCH, 2, 3)
    reference.loss_and_grad(data.x_train[rows], data.y_train[rows])
    np.testing.assert_allclose(grad, reference.grads, rtol=1e-4, atol=1e-6)
    assert [sum(c.samples()) for c in commands] == [BATCH, BATCH]
    assert sum(w.stats.samples for w in workers) == BATCH
    assert [w.store.stats.pulls for w in workers] == [1, 1]  # once per evaluation
    assert server.states[0].version == 1  # pushes were summed, never applied
