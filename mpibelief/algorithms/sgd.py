"""Single-replica mini-batch SGD: the paper's "SGD [1]" baseline.

One process holds the whole model and the whole training set, steps through shuffled
mini-batches and evaluates at a fixed interval of *training* time: the clock is paused
while it evaluates, so accuracy-against-time curves compare with methods whose
evaluation runs on a separate coordinator.
"""

from __future__ import annotations

import math
import time

import numpy as np

from mpibelief.data import Dataset
from mpibelief.errors import UserError
from mpibelief.model import Model
from mpibelief.optim import Optimizer
from mpibelief.progress import Progress
from mpibelief.results import RANK_FIELDS


class Evaluator:
    """Test-set and fixed training-sample accuracy, the ``/metrics`` row."""

    def __init__(self, data: Dataset, eval_samples: int, seed: int):
        n = eval_samples or len(data.y_test)
        pick = np.random.default_rng(seed).permutation(len(data.y_train))[:n]
        pick.sort()
        self.x_train, self.y_train = data.x_train[pick], data.y_train[pick]
        self.x_test, self.y_test = data.x_test, data.y_test

    def __call__(self, model: Model) -> dict:
        train_loss, train_acc = model.evaluate(self.x_train, self.y_train)
        test_loss, test_acc = model.evaluate(self.x_test, self.y_test)
        return {"train_loss": train_loss, "train_accuracy": train_acc,
                "test_loss": test_loss, "test_accuracy": test_acc}


def batches(n: int, batch: int, rng: np.random.Generator):
    """Endless shuffled mini-batch index arrays, a new permutation every epoch."""
    if n < batch:  # no full batch: the loop below would spin without yielding
        raise ValueError(f"{n} rows cannot fill a batch of {batch}")
    return _shuffled(n, batch, rng)


def _shuffled(n: int, batch: int, rng: np.random.Generator):
    while True:
        order = rng.permutation(n)
        for start in range(0, n - batch + 1, batch):
            yield order[start:start + batch]


def check_finite(loss: float, step: int) -> None:
    if not math.isfinite(loss):
        raise UserError(
            f"training diverged: non-finite loss at step {step} (try a smaller train.lr)"
        )


def train_sgd(cfg, data: Dataset, model: Model, writer) -> dict:
    """Train ``model`` in place; append metrics to ``writer``; return a summary."""
    train = cfg.train
    opt = Optimizer.from_config(train)
    state = opt.state(model.n_params)
    evaluate = Evaluator(data, train.eval_samples, cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed + 1)
    steps_per_epoch = max(len(data.y_train) // train.batch, 1)
    total_steps = max(int(train.epochs * steps_per_epoch), 1)
    progress = Progress(total_steps * train.batch, f"sgd[{cfg.run.name}]")

    clock, step, next_eval = 0.0, 0, 0.0
    row = _record(writer, evaluate(model), clock, 0)
    progress.update(0, test_acc=row["test_accuracy"])
    for idx in batches(len(data.y_train), train.batch, rng):
        tick = time.perf_counter()
        loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx])
        check_finite(loss, step)
        opt.apply(model.params, model.grads, state)
        clock += time.perf_counter() - tick
        step += 1
        done = step >= total_steps or 0 < train.max_seconds <= clock
        progress.update(train.batch)
        if clock >= next_eval or done:
            next_eval = clock + train.eval_every
            row = _record(writer, evaluate(model), clock, step * train.batch, step)
            progress.update(0, loss=loss, test_acc=row["test_accuracy"],
                            train_acc=row["train_accuracy"])
        if done:
            break
    progress.close()
    samples = step * train.batch
    ranks = (0, samples, clock, clock, 0.0, 0.0, 0, 0)  # one rank, all compute
    writer.write_table("ranks", {n: [v] for n, v in zip(RANK_FIELDS, ranks, strict=True)})
    return {"steps": step, "train_seconds": clock, **row}


def _record(writer, figures: dict, clock: float, samples: int, updates: int = 0) -> dict:
    row = {"wall_seconds": clock, "samples": samples, "updates": updates, **figures}
    writer.append_metrics(row)
    return row
