"""Oracles shared by tests of different tiers (plain functions, no MPI)."""

from __future__ import annotations

import numpy as np

from mpibelief.data import batches
from mpibelief.model import Model
from mpibelief.optim import Optimizer


def combined_batch(cfg, data, replicas: int, steps: int, batch: int) -> np.ndarray:
    """Synchronous data parallelism's oracle: SGD [1] stepping on every replica's batch
    concatenated (replica r's batches drawn as the real replica r draws them)."""
    model = Model.from_config(cfg.model, data.n_inputs, data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    opt = Optimizer.from_config(cfg.train)
    state = opt.state(model.n_params)
    shards = [data.shard(r, replicas) for r in range(replicas)]
    orders = [batches(len(s.y_train), batch, np.random.default_rng(cfg.run.seed + 1 + r))
              for r, s in enumerate(shards)]
    for _ in range(steps):
        picks = [(s, next(o)) for s, o in zip(shards, orders, strict=True)]
        model.loss_and_grad(np.concatenate([s.x_train[i] for s, i in picks]),
                            np.concatenate([s.y_train[i] for s, i in picks]))
        assert opt.apply(model.params, model.grads, state)
    return model.params
