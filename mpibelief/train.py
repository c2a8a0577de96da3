"""``mpibelief train``: set up a run on every rank and hand it to its algorithm.

The only module that touches ``COMM_WORLD`` (besides the CLI's error handling):
it looks the algorithm up in the registry (:mod:`mpibelief.algorithms`) and lets it
check the config, checks the world against the layout, loads the data (rank 0 builds
the feature cache first so the other ranks read it instead of all extracting at once),
builds the model, opens the result file on the coordinating rank, splits the
communicators, and hands the one :class:`~mpibelief.context.RunContext` to the
algorithm's entry point for this rank's role.
"""

from __future__ import annotations

import os
import shutil
import socket
from collections import Counter
from pathlib import Path

from mpibelief import algorithms, checkpoint, guard
from mpibelief import layout as layouts
from mpibelief.config import Config
from mpibelief.errors import ConfigError, UserError


def model_summary(model) -> str:
    shapes = ["x".join(map(str, s)) if s[:2] != (1, 1) else str(s[2])
              for s in [model.input_shape] + [layer.out_shape for layer in model.layers]]
    return f"{'-'.join(shapes)} ({model.n_params / 1e6:.2f}M parameters)"


def result_path(cfg: Config, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.run.results_dir) / f"{cfg.run.name}.h5"


def run(cfg: Config, out: str | None = None, overwrite: bool = False,
        resume: bool = False) -> dict | None:
    """Train as the config says; returns the summary on the coordinating rank.

    Args:
        out: the result file (default ``results_dir/run.name.h5``).
        overwrite: replace an existing result file (never one a live job writes).
        resume: continue the run in ``out`` from its newest valid checkpoint.
    """
    from mpi4py import MPI

    from mpibelief.clock import WallClock
    from mpibelief.comm import Comms, quiet_barrier
    from mpibelief.context import RunContext
    from mpibelief.data import load_dataset
    from mpibelief.model import Model
    from mpibelief.signals import Signals

    comm = MPI.COMM_WORLD
    algorithm = algorithms.resolve(cfg)
    lay = layouts.layout_for(comm.size, cfg)
    role = lay.roles[comm.rank]
    entry = algorithm.entry(role.kind)
    path = result_path(cfg, out)
    guard.check_result_path(cfg, path)
    if path.exists() and not (overwrite or resume):  # every rank: one line, printed once
        raise ConfigError(f"result file {path} exists: pass --overwrite to replace it,"
                          " --resume to continue it, or choose another run.name or --out")
    signals = Signals().install()
    hosts = comm.gather((socket.gethostname(), os.getpid()))  # while all arrive at once
    if comm.rank == 0:
        data = load_dataset(cfg.data)
    # A blocking Barrier spins: with more ranks than cores the waiting ranks would
    # steal the core rank 0 needs to build the feature cache.
    quiet_barrier(comm)
    if comm.rank != 0:
        data = load_dataset(cfg.data)
    per_replica = len(data.y_train) // lay.replicas
    if per_replica < cfg.train.batch:
        raise ConfigError(
            f"train.batch = {cfg.train.batch} is more than the {per_replica} training rows"
            f" each of {lay.replicas} replica(s) gets: use a smaller batch or more data"
        )
    n_params = Model.size_of(cfg.model, data.x_train.shape[1], data.n_classes)
    # A rank that holds one partition of a model builds only the description of the
    # whole: each partition allocates and initialises its own piece (mpibelief.partition).
    # (Shards need only its size; the coordinator evaluates the whole.)
    whole = lay.partitions == 1 or role.kind == layouts.COORDINATOR
    # The same verdict on every rank: the largest share any rank of the layout holds.
    held_whole = lay.partitions == 1 or lay.shards > 0
    check_model_size(cfg, n_params if held_whole else -(-n_params // lay.partitions))
    model = Model.from_config(cfg.model, data.x_train.shape[1], data.n_classes, whole)
    if whole:
        model.init(cfg.run.seed, cfg.model.init_scale)
    state = _resume_state(comm, cfg, path) if resume else None
    writer = _open_results(cfg, comm, lay, data, model, path, hosts, overwrite, state) \
        if role.coordinates else None
    comms = Comms.split(comm, lay)
    ctx = RunContext(cfg, comms, lay, comm.rank, data, model, writer, WallClock(), signals,
                     checkpoint.folder_for(path), state)
    listener = None
    if writer is not None and comm.size > 1:
        listener = guard.NoticeListener(comm, writer, signals)
        listener.start()
    try:
        summary = entry(ctx)
    except BaseException as exc:
        if writer is not None:
            writer.close(f"failed: {reason(exc)}")
        raise
    finally:
        if listener is not None:
            listener.stop()
    comms.free()
    if writer is not None:
        status = summary.get("status", "complete")
        writer.close(status)
        print(f"mpibelief: {status} after {summary['train_seconds']:.1f}s training time:"
              f" test accuracy {summary['test_accuracy']:.4f}, train accuracy"
              f" {summary['train_accuracy']:.4f}; wrote {writer.path}", flush=True)
    return summary


def reason(exc: BaseException) -> str:
    """What a failure says in the result file (never empty)."""
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (SIGINT)"
    return str(exc) or type(exc).__name__


def check_model_size(cfg: Config, n_params: int) -> None:
    """Refuse, in one line and before allocating, what cannot work."""
    if cfg.layout.shards > n_params:
        raise ConfigError(f"layout.shards = {cfg.layout.shards} is more than the model's"
                          f" {n_params} parameters: every shard needs at least one")
    guard.check_memory(n_params)


def _resume_state(comm, cfg: Config, path: Path) -> dict:
    """The checkpoint to resume (rank 0 finds and checks it; every rank gets the verdict,
    so a refusal is one line, printed once)."""
    from mpibelief.comm import quiet_bcast

    verdict = None
    if comm.rank == 0:
        try:
            state = checkpoint.newest_valid(checkpoint.folder_for(path))
            diff = checkpoint.config_difference(state["config"], cfg.to_toml())
            verdict = state if diff is None else (
                f"checkpoint {state['number']} in {checkpoint.folder_for(path)} is from a"
                f" different config: {diff}")
        except UserError as exc:
            verdict = str(exc)
    verdict = quiet_bcast(comm, verdict)
    if isinstance(verdict, str):
        raise ConfigError(verdict)
    return verdict


def _open_results(cfg, comm, lay, data, model, path, hosts, overwrite, state):
    from mpibelief.results import ResultWriter

    print(f"mpibelief: {cfg.run.algorithm} on {data.name}: {len(data.y_train)} train /"
          f" {len(data.y_test)} test frames, {data.n_classes} classes; model"
          f" {model_summary(model)}; {comm.size} rank(s); results -> {path}"
          + (f" (resuming from checkpoint {state['number']})" if state else ""), flush=True)
    attrs = {"config": cfg.to_toml(), "algorithm": cfg.run.algorithm,
             "world_size": comm.size, "roles": lay.table(), "dataset": data.name,
             "n_classes": data.n_classes, "hosts": _host_list([h for h, _ in hosts]),
             "n_params": model.n_params, "replicas": lay.replicas}
    if state is not None:
        writer = ResultWriter.reopen(path, state["metrics_rows"], attrs)
    else:
        writer = ResultWriter(path, attrs, overwrite)
        # A replaced run's checkpoints go with it: --resume must never find them.
        shutil.rmtree(checkpoint.folder_for(path), ignore_errors=True)
    here = socket.gethostname()
    guard.start_janitor(path, {r: pid for r, (h, pid) in enumerate(hosts) if h == here},
                        comm.rank)
    return writer


def _host_list(hosts: list[str]) -> str:
    counts = Counter(hosts)
    return ", ".join(f"{host} x{n}" for host, n in sorted(counts.items()))
