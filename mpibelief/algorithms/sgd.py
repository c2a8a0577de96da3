"""Single-replica mini-batch SGD: the paper's "SGD [1]" baseline.

One replica holds the whole training set, steps through shuffled mini-batches and
evaluates at a fixed interval of *training* time: the clock is paused while it
evaluates, so accuracy-against-time curves compare with methods whose evaluation runs
on a separate coordinator.  The replica is one process, or ``layout.partitions`` ranks
that each hold one partition of the model (:mod:`mpibelief.partition`): they step on
the same mini-batches in lock step, evaluate together, and partition 0 (rank 0)
decides when to evaluate and writes the results.
"""

from __future__ import annotations

import io

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
    if (lay.shards, lay.replicas) != (0, 1):
        raise ConfigError(
            "run.algorithm = 'sgd' trains one replica (of layout.partitions ranks) with no"
            " shards: set layout.shards = 0, layout.replicas = 1"
        )


def diverged(step: int) -> UserError:
    return UserError(f"training diverged: non-finite loss at step {step} (try a smaller"
                     " train.lr)")


def replica_model(ctx):
    """The whole model (one partition), or this rank's partition of it, initialised."""
    if ctx.layout.partitions == 1:
        return ctx.model
    from mpibelief.partition import PartitionedModel

    model = PartitionedModel(ctx.model, ctx.comms.replica)
    model.init(ctx.cfg.run.seed, ctx.cfg.model.init_scale)
    return model


def train_sgd(ctx) -> dict:
    """Train the model (this rank's partition) in place; the coordinating rank appends
    metrics to ``ctx.writer``; returns a summary.

    Checkpoints (every ``checkpoint.every`` seconds, on SIGUSR1, and on SIGTERM before
    stopping) hold the parameters, the optimiser state and the step; resuming replays
    the batch order to that step, so the run goes on exactly where it was.  A replica
    of several partitions writes none yet: it stops on SIGTERM without one, and
    ``--resume`` refuses it.
    """
    cfg, data, writer, clock = ctx.cfg, ctx.data, ctx.writer, ctx.clock
    split = ctx.layout.partitions > 1
    if split and ctx.resume is not None:
        raise ConfigError("--resume of sgd over several partitions is not built yet (its"
                          " checkpoints are not written)")
    model = replica_model(ctx)
    # Partition 0's clock and signals decide for every partition (a broadcast each).
    agree = getattr(model, "agree", lambda *values: values)
    train = cfg.train
    opt = Optimizer.from_config(train)
    state = opt.state(model.n_params)
    evaluate = Evaluator(data, train.eval_samples, cfg.run.seed)
    order = batches(len(data.y_train), train.batch, np.random.default_rng(cfg.run.seed + 1))
    steps_per_epoch = max(len(data.y_train) // train.batch, 1)
    total_steps = max(int(train.epochs * steps_per_epoch), 1)
    if writer is not None:  # partitions other than the coordinating one report nowhere
        method = "sgd[1]" + ("+adagrad" if train.optimizer == "adagrad" else "")
        writer.set_attrs({"method": method})  # the label in plots
    progress = Progress(total_steps * train.batch, f"sgd[{cfg.run.name}]",
                        stream=None if writer else io.StringIO())
    elapsed, step, stopped, row = 0.0, 0, None, None
    if ctx.resume is not None:
        elapsed, step = _restore(ctx, state), ctx.resume["step"]
        for _ in range(step):
            next(order)
    else:
        row = _record(writer, evaluate(model), elapsed, 0)
        progress.update(0, test_acc=row["test_accuracy"])
    every = (cfg.checkpoint.every or float("inf")) if not split else float("inf")
    next_eval, next_ckpt, started = elapsed, elapsed + every, clock.now()
    for idx in order:
        (wall,) = agree(clock.now() - started)
        if step >= total_steps or 0 < train.max_seconds <= wall:
            break
        tick = clock.now()
        loss, _ = model.loss_and_grad(data.x_train[idx], data.y_train[idx])
        if not np.isfinite(loss) or not opt.apply(model.params, model.grads, state):
            raise diverged(step)
        elapsed, wall, terminate = agree(elapsed + clock.now() - tick, clock.now() - started,
                                         float(ctx.signals.terminate.is_set()))
        step += 1
        progress.update(train.batch)
        done = step >= total_steps or 0 < train.max_seconds <= wall
        if elapsed >= next_eval or done:
            next_eval = elapsed + train.eval_every
            row = _record(writer, evaluate(model), elapsed, step * train.batch, step)
            progress.update(0, loss=loss, test_acc=row["test_accuracy"],
                            train_acc=row["train_accuracy"])
        if terminate:
            stopped = "none" if split else _checkpoint(ctx, model, state, elapsed, step)
            break
        if not split and (elapsed >= next_ckpt or ctx.signals.take_checkpoint()):
            _checkpoint(ctx, model, state, elapsed, step)
            next_ckpt = elapsed + every
    progress.close()
    samples = step * train.batch  # per replica: every partition saw the same samples
    waited = getattr(model, "wait_seconds", 0.0)
    rows = _gather_rows(ctx, RankStats(ctx.rank, samples, elapsed, elapsed - waited, 0.0,
                                       waited, 0, 0))
    if writer is not None:
        writer.write_ranks(rows)
    if row is None or row["updates"] != step:  # stopped between two evaluations
        row = _record(writer, evaluate(model), elapsed, step * train.batch, step)
    summary = {"steps": step, "train_seconds": elapsed, **row}
    if stopped is not None:
        summary["status"] = ("stopped: SIGTERM (no checkpoint: sgd over partitions writes"
                             " none yet)" if split else
                             f"stopped: SIGTERM (checkpoint {stopped} written; --resume)")
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


def _gather_rows(ctx, stats: RankStats) -> list:
    """Every partition's statistics on partition 0 (sleeping, not spinning, there)."""
    if ctx.layout.partitions == 1:
        return [stats]
    from mpibelief.comm import Tag, quiet_recv, quiet_send

    replica = ctx.comms.replica
    if replica.rank:
        quiet_send(replica, stats, [0], Tag.REPORT)
        return []
    return [stats] + [quiet_recv(replica, q, Tag.REPORT) for q in range(1, replica.size)]


def _record(writer, figures: dict, elapsed: float, samples: int, updates: int = 0) -> dict:
    row = {"wall_seconds": elapsed, "samples": samples, "updates": updates, **figures}
    if writer is not None:
        writer.append_metrics(row)
    return row


SGD = register(Algorithm("sgd", {WORKER: train_sgd}, check,
                         "one replica, no parameter server (the paper's SGD [1])"))
