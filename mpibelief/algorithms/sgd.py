"""Single-replica mini-batch SGD: the paper's "SGD [1]" baseline.

One process holds the whole model and the whole training set, steps through shuffled
mini-batches and evaluates at a fixed interval of *training* time: the clock is paused
while it evaluates, so accuracy-against-time curves compare with methods whose
evaluation runs on a separate coordinator.
"""

from __future__ import annotations

import numpy as np

from mpibelief.algorithms import Algorithm, register
from mpibelief.coordinator import Evaluator
from mpibelief.data import batches
from mpibelief.errors import ConfigError, UserError
from mpibelief.layout import WORKER
from mpibelief.optim import Optimizer
from mpibelief.progress import Progress
from mpibelief.results import RankStats


def check(cfg) -> None:
    lay = cfg.layout
    if (lay.shards, lay.replicas, lay.partitions) != (0, 1, 1):
        raise ConfigError(
            "run.algorithm = 'sgd' trains one replica of one partition with no shards:"
            " set layout.shards = 0, layout.replicas = 1, layout.partitions = 1"
        )


def diverged(step: int) -> UserError:
    return UserError(f"training diverged: non-finite loss at step {step} (try a smaller"
                     " train.lr)")


def train_sgd(ctx) -> dict:
    """Train ``ctx.model`` in place; append metrics to ``ctx.writer``; return a summary."""
    cfg, data, model, writer, clock = ctx.cfg, ctx.data, ctx.model, ctx.writer, ctx.clock
    train = cfg.train
    opt = Optimizer.from_config(train)
    state = opt.state(model.n_params)
    evaluate = Evaluator(data, train.eval_samples, cfg.run.seed)
    rng = np.random.default_rng(cfg.run.seed + 1)
    steps_per_epoch = max(len(data.y_train) // train.batch, 1)
    total_steps = max(int(train.epochs * steps_per_epoch), 1)
    method = "sgd[1]" + ("+adagrad" if train.optimizer == "adagrad" else "")
    writer.set_attrs({"method": method})  # the label in plots
    progress = Progress(total_steps * train.batch, f"sgd[{cfg.run.name}]")

    elapsed, step, next_eval = 0.0, 0, 0.0
    row = _record(writer, evaluate(model), elapsed, 0)
    progress.update(0, test_acc=row["test_accuracy"])
    for idx in batches(len(data.y_train), train.batch, rng):
        tick = clock.now()
        loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx])
        if not np.isfinite(loss) or not opt.apply(model.params, model.grads, state):
            raise diverged(step)
        elapsed += clock.now() - tick
        step += 1
        done = step >= total_steps or 0 < train.max_seconds <= elapsed
        progress.update(train.batch)
        if elapsed >= next_eval or done:
            next_eval = elapsed + train.eval_every
            row = _record(writer, evaluate(model), elapsed, step * train.batch, step)
            progress.update(0, loss=loss, test_acc=row["test_accuracy"],
                            train_acc=row["train_accuracy"])
        if done:
            break
    progress.close()
    samples = step * train.batch
    writer.write_ranks([RankStats(ctx.rank, samples, elapsed, elapsed)])  # all compute
    return {"steps": step, "train_seconds": elapsed, **row}


def _record(writer, figures: dict, elapsed: float, samples: int, updates: int = 0) -> dict:
    row = {"wall_seconds": elapsed, "samples": samples, "updates": updates, **figures}
    writer.append_metrics(row)
    return row


SGD = register(Algorithm("sgd", {WORKER: train_sgd}, check,
                         "one replica, no parameter server (the paper's SGD [1])"))
