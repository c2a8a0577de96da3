"""Single-replica mini-batch SGD: the paper's "SGD [1]" baseline.

One process holds the whole model and the whole training set, steps through shuffled
mini-batches and evaluates at a fixed interval of *training* time: the clock is paused
while it evaluates, so accuracy-against-time curves compare with methods whose
evaluation runs on a separate coordinator.
"""

from __future__ import annotations

import numpy as np

from mpibelief import checkpoint
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
    """Train ``ctx.model`` in place; append metrics to ``ctx.writer``; return a summary.

    Checkpoints (every ``checkpoint.every`` seconds, on SIGUSR1, and on SIGTERM before
    stopping) hold the parameters, the optimiser state and the step; resuming replays
    the batch order to that step, so the run goes on exactly where it was.
    """
    cfg, data, model, writer, clock = ctx.cfg, ctx.data, ctx.model, ctx.writer, ctx.clock
    train = cfg.train
    opt = Optimizer.from_config(train)
    state = opt.state(model.n_params)
    evaluate = Evaluator(data, train.eval_samples, cfg.run.seed)
    order = batches(len(data.y_train), train.batch, np.random.default_rng(cfg.run.seed + 1))
    steps_per_epoch = max(len(data.y_train) // train.batch, 1)
    total_steps = max(int(train.epochs * steps_per_epoch), 1)
    method = "sgd[1]" + ("+adagrad" if train.optimizer == "adagrad" else "")
    writer.set_attrs({"method": method})  # the label in plots
    progress = Progress(total_steps * train.batch, f"sgd[{cfg.run.name}]")
    elapsed, step, stopped, row = 0.0, 0, None, None
    if ctx.resume is not None:
        elapsed, step = _restore(ctx, state), ctx.resume["step"]
        for _ in range(step):
            next(order)
    else:
        row = _record(writer, evaluate(model), elapsed, 0)
        progress.update(0, test_acc=row["test_accuracy"])
    every = cfg.checkpoint.every or float("inf")
    next_eval, next_ckpt, started = elapsed, elapsed + every, clock.now()
    for idx in order:
        if step >= total_steps or 0 < train.max_seconds <= clock.now() - started:
            break
        tick = clock.now()
        loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx])
        if not np.isfinite(loss) or not opt.apply(model.params, model.grads, state):
            raise diverged(step)
        elapsed += clock.now() - tick
        step += 1
        progress.update(train.batch)
        done = step >= total_steps or 0 < train.max_seconds <= clock.now() - started
        if elapsed >= next_eval or done:
            next_eval = elapsed + train.eval_every
            row = _record(writer, evaluate(model), elapsed, step * train.batch, step)
            progress.update(0, loss=loss, test_acc=row["test_accuracy"],
                            train_acc=row["train_accuracy"])
        if ctx.signals.terminate.is_set():
            stopped = _checkpoint(ctx, model, state, elapsed, step)
            break
        if elapsed >= next_ckpt or ctx.signals.take_checkpoint():
            _checkpoint(ctx, model, state, elapsed, step)
            next_ckpt = elapsed + every
    progress.close()
    writer.write_ranks([RankStats(ctx.rank, step * train.batch, elapsed, elapsed)])
    if row is None or row["updates"] != step:  # stopped between two evaluations
        row = _record(writer, evaluate(model), elapsed, step * train.batch, step)
    summary = {"steps": step, "train_seconds": elapsed, **row}
    if stopped is not None:
        summary["status"] = f"stopped: SIGTERM (checkpoint {stopped} written; --resume)"
    return summary


def _checkpoint(ctx, model, state, elapsed: float, step: int) -> int:
    arrays = {"params": model.params} if state is None else {"params": model.params,
                                                             "opt_state": state}
    number = max(checkpoint.numbers(ctx.checkpoints), default=0) + 1
    sha = checkpoint.write_part(ctx.checkpoints, number, 0, arrays)
    checkpoint.write_manifest(ctx.checkpoints, number, {
        "config": ctx.cfg.to_toml(), "algorithm": "sgd", "n_params": model.n_params,
        "wall_seconds": elapsed, "metrics_rows": ctx.writer.rows(), "step": step},
        [sha], ctx.cfg.checkpoint.keep)
    print(f"mpibelief: wrote checkpoint {number} at {elapsed:.1f} s", flush=True)
    return number


def _restore(ctx, state) -> float:
    """Load the checkpoint being resumed; returns its training seconds."""
    arrays, _ = checkpoint.read_part(ctx.checkpoints, ctx.resume["number"], 0)
    ctx.model.params[:] = arrays["params"]
    if state is not None:
        state[:] = arrays["opt_state"]
    ctx.writer.set_attrs({"resumed_from": ctx.resume["number"], "resume_params_sha256":
                          checkpoint.digest({"params": ctx.model.params})})
    return float(ctx.resume["wall_seconds"])


def _record(writer, figures: dict, elapsed: float, samples: int, updates: int = 0) -> dict:
    row = {"wall_seconds": elapsed, "samples": samples, "updates": updates, **figures}
    writer.append_metrics(row)
    return row


SGD = register(Algorithm("sgd", {WORKER: train_sgd}, check,
                         "one replica, no parameter server (the paper's SGD [1])"))
