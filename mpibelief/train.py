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

import socket
from collections import Counter
from pathlib import Path

from mpibelief import algorithms
from mpibelief import layout as layouts
from mpibelief.config import Config
from mpibelief.errors import ConfigError


def model_summary(model) -> str:
    shapes = ["x".join(map(str, s)) if s[:2] != (1, 1) else str(s[2])
              for s in [model.input_shape] + [layer.out_shape for layer in model.layers]]
    return f"{'-'.join(shapes)} ({model.n_params / 1e6:.2f}M parameters)"


def result_path(cfg: Config, out: str | None) -> Path:
    return Path(out) if out else Path(cfg.run.results_dir) / f"{cfg.run.name}.h5"


def run(cfg: Config, out: str | None = None) -> dict | None:
    """Train as the config says; returns the summary on the coordinating rank."""
    from mpi4py import MPI

    from mpibelief.clock import WallClock
    from mpibelief.comm import Comms, quiet_barrier
    from mpibelief.context import RunContext
    from mpibelief.data import load_dataset
    from mpibelief.model import Model
    from mpibelief.results import ResultWriter

    comm = MPI.COMM_WORLD
    algorithm = algorithms.resolve(cfg)
    lay = layouts.layout_for(comm.size, cfg)
    role = lay.roles[comm.rank]
    entry = algorithm.entry(role.kind)
    hosts = comm.gather(socket.gethostname())  # now, while every rank arrives at once
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
    # A rank that holds one partition of a model builds only the description of the
    # whole: each partition allocates and initialises its own piece (mpibelief.partition).
    # (Shards need only its size; the coordinator evaluates the whole.)
    whole = lay.partitions == 1 or role.kind == layouts.COORDINATOR
    model = Model.from_config(cfg.model, data.x_train.shape[1], data.n_classes, whole)
    if whole:
        model.init(cfg.run.seed, cfg.model.init_scale)

    writer = None
    if role.coordinates:
        path = result_path(cfg, out)
        print(f"mpibelief: {cfg.run.algorithm} on {data.name}: {len(data.y_train)} train /"
              f" {len(data.y_test)} test frames, {data.n_classes} classes; model"
              f" {model_summary(model)}; {comm.size} rank(s); results -> {path}", flush=True)
        writer = ResultWriter(path, {
            "config": cfg.to_toml(), "algorithm": cfg.run.algorithm,
            "world_size": comm.size, "roles": lay.table(), "dataset": data.name,
            "n_classes": data.n_classes, "hosts": _host_list(hosts),
            "n_params": model.n_params,
        })
    comms = Comms.split(comm, lay)
    ctx = RunContext(cfg, comms, lay, comm.rank, data, model, writer, WallClock())
    try:
        summary = entry(ctx)
    except BaseException as exc:
        if writer is not None:
            writer.close(f"failed: {exc}")
        raise
    comms.free()
    if writer is not None:
        writer.close()
        print(f"mpibelief: done in {summary['train_seconds']:.1f}s training time:"
              f" test accuracy {summary['test_accuracy']:.4f}, train accuracy"
              f" {summary['train_accuracy']:.4f}; wrote {writer.path}", flush=True)
    return summary


def _host_list(hosts: list[str]) -> str:
    counts = Counter(hosts)
    return ", ".join(f"{host} x{n}" for host, n in sorted(counts.items()))
