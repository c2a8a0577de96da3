# ranks: 4 5
"""Sandblaster end to end under mpiexec: distributed L-BFGS matches one process.

1 coordinator, 1 or 2 shards, 2 replicas, a real ``mpibelief train`` run on every rank.

* Convex: multinomial logistic regression (``model.layers = 0``: one dense layer and a
  softmax) on synthetic data, the whole training set as the batch.  The loss after
  every iteration must match :func:`tests.lbfgs_reference.minimize`, a single-process
  L-BFGS with its own two-loop recursion, to 1e-4 relative.
* Stochastic batches with replica 1 slowed 4x and backups on: in every batch the
  sizes of the portions the shards summed add up to exactly the batch size per
  evaluation, backups were issued, and the fast replica did more portions.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

import h5py
import numpy as np
from mpi4py import MPI

from mpibelief import config, train
from mpibelief.data import load_dataset
from mpibelief.model import Model
from tests.lbfgs_reference import minimize

ITERATIONS = 12
COMMON = {
    "run": {"algorithm": "sandblaster", "seed": 3},
    "data": {"source": "synthetic", "n_train": 3000, "n_test": 300, "n_inputs": 20,
             "n_classes": 5},
    "model": {"layers": 0, "hidden": 8},
    "train": {"eval_every": 1e9},
}


def cfg_for(shards: int, **sandblaster):
    raw = {**{k: dict(v) for k, v in COMMON.items()}, "layout": {"shards": shards, "replicas": 2},
           "sandblaster": sandblaster}
    return config.from_dict(raw, "<mpi_sandblaster>")


def convex(comm, out: Path, shards: int) -> None:
    # c2 = 0.1: a demanding curvature condition, so the search also brackets and zooms
    cfg = cfg_for(shards, batch=0, portions=12, push_every=3, history=5,
                  iterations=ITERATIONS, backups=True, c2=0.1)
    train.run(cfg, str(out))
    if comm.rank != 0:
        return
    with h5py.File(out) as f:
        losses = f["sandblaster/loss"][()]
        applied, evals = f["sandblaster/samples_applied"][()], f["sandblaster/evals"][()]
    data = load_dataset(cfg.data)
    model = Model.from_config(cfg.model, data.x_train.shape[1], data.n_classes)
    model.init(cfg.run.seed, cfg.model.init_scale)
    want = minimize(model, data.x_train, data.y_train, ITERATIONS, m=5, c2=0.1)
    rel = np.abs(losses - want) / np.abs(want)
    print(f"convex: distributed {losses[-1]:.6f}, reference {want[-1]:.6f},"
          f" worst relative difference {rel.max():.2e}", flush=True)
    assert len(losses) == ITERATIONS and rel.max() < 1e-4, (losses, want)
    assert want[-1] < 0.7 * want[0]  # it did optimise
    assert (applied == evals * len(data.y_train)).all()
    assert evals.sum() > ITERATIONS + 3  # some steps took more than one evaluation


def straggler(comm, out: Path, shards: int) -> None:
    # A tiny model computes a portion in microseconds, less than a message takes: the
    # straggler must be slow by far more than 4x for its slowness to show reliably.
    cfg = cfg_for(shards, batch=1000, portions=10, push_every=2, iterations=6,
                  backups=True, slow_replica=1, slow_factor=200.0)
    train.run(cfg, str(out))
    if comm.rank != 0:
        return
    with h5py.File(out) as f:
        t = {name: f["sandblaster"][name][()] for name in f["sandblaster"]}
    assert (t["samples_applied"] == t["evals"] * 1000).all(), t["samples_applied"]
    assert t["done_by"].sum(axis=1).tolist() == (t["evals"] * 10).tolist()
    assert t["backups_issued"].sum() > 0
    assert t["done_by"][:, 0].sum() > t["done_by"][:, 1].sum()
    assert (t["bytes_in"] > 0).all() and (t["bytes_out"] > 0).all()


def main() -> None:
    comm = MPI.COMM_WORLD
    shards = comm.size - 3
    tmp = Path(comm.bcast(tempfile.mkdtemp() if comm.rank == 0 else None))
    try:
        convex(comm, tmp / "convex.h5", shards)
        straggler(comm, tmp / "straggler.h5", shards)
    finally:
        comm.Barrier()
        if comm.rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
    if comm.rank == 0:
        print("mpi_sandblaster: ok", flush=True)


if __name__ == "__main__":
    sys.exit(main())
