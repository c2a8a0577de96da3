"""Sandblaster with partitioned replicas: R = 2 replicas of P = 2 partitions each.

Real ``mpibelief train`` jobs under mpiexec (world ``1 + S + R * P`` = 6 for P = 2:
coordinator, one shard, replica 0 on ranks 2-3, replica 1 on ranks 4-5), on the small
synthetic problem of :mod:`tests.e2e.test_sandblaster` with a tiny model of one hidden
layer (20-16-5), so that the partitions exchange the hidden units at the cut.
"""

from __future__ import annotations

import shutil

import h5py
import numpy as np

from mpibelief import checkpoint
from tests.e2e.test_cli import cli
from tests.e2e.test_sandblaster import TINY
from tests.e2e.test_sandblaster_faults import BATCH, ENDLESS, table

PORTIONS = 8  # TINY's sandblaster.portions
SB = ["train", "configs/sandblaster.toml", *TINY, "--set", "model.layers=1",
      "--set", "model.hidden=16", "--set", "layout.replicas=2"]
STRAGGLER = ["--set", "sandblaster.slow_replica=1", "--set", "sandblaster.slow_factor=200.0"]


def train(out, partitions: int, *more: str, timeout: float = 240):
    result = cli(*SB, "--set", f"layout.partitions={partitions}", *more, "--out", out,
                 np=2 + 2 * partitions, mpi=True, timeout=timeout)
    assert result.returncode == 0, result.stderr
    return result


def assert_exact(t: dict) -> None:
    """Every evaluation summed the batch, every portion committed once."""
    assert (t["samples_applied"] == t["evals"] * BATCH).all(), t["samples_applied"]
    assert (t["done_by"].sum(axis=1) == t["evals"] * PORTIONS).all(), t["done_by"]


def test_partitioned_replicas_compute_the_unpartitioned_gradient(tmp_path):
    """The same config at P = 1 and P = 2, replica 1 slowed 200x and backups on: the
    same L-BFGS steps to float32 rounding (the partitioned gradient is the whole
    model's), every batch summed exactly once, and the P = 2 job ends cleanly with
    every rank's report in its result file."""
    runs = {}
    for partitions in (1, 2):
        out = tmp_path / f"p{partitions}.h5"
        result = train(out, partitions, *STRAGGLER)
        runs[partitions] = table(out)
        assert_exact(runs[partitions])
    one, two = runs[1], runs[2]
    assert "complete after" in result.stdout
    with h5py.File(tmp_path / "p2.h5") as f:
        assert f.attrs["status"] == "complete"
        assert sorted(f["ranks/rank"][()]) == [0, 1, 2, 3, 4, 5]
        assert len(f["metrics/test_accuracy"]) >= 2
    np.testing.assert_array_equal(one["evals"], two["evals"])
    worst = max(np.abs(two[n] / one[n] - 1).max() for n in ("loss", "grad_norm"))
    print(f"P = 2 against P = 1: worst relative difference {worst:.1e}")
    for name in ("loss_before", "loss", "grad_norm", "step"):
        np.testing.assert_allclose(two[name], one[name], rtol=2e-5, err_msg=name)
    assert one["loss"][-1] < 0.8 * one["loss_before"][0]  # it did optimise
    assert two["backups_issued"].sum() > 0  # backups ran, and counted nothing twice
    assert two["done_by"][:, 0].sum() > two["done_by"][:, 1].sum()  # the straggler


def test_a_silent_partitioned_replica_is_given_up_on_whole(tmp_path):
    """Replica 1 (ranks 4 and 5) stops while holding work: both its ranks are given up
    on, the other replica finishes every batch exactly, and all six ranks report."""
    out = tmp_path / "s.h5"
    result = train(out, 2, *ENDLESS, "--set", "train.max_seconds=6.0", "--set",
                   "faults.stop_replica=1", "--set", "faults.stop_after=1.0", "--set",
                   "faults.replica_timeout=2.0")
    assert "rank 4 failed (replica 1 (ranks [4, 5]): no message for" in result.stdout
    with h5py.File(out) as f:
        assert f.attrs["status"].startswith("complete without 2 failed replica rank(s)")
        assert list(f["failures/rank"][()]) == [4, 5]
        assert sorted(f["ranks/rank"][()]) == [0, 1, 2, 3, 4, 5]
    t = table(out)
    assert_exact(t)
    assert t["done_by"][-1, 1] == 0 and t["done_by"][-1, 0] > 0


def test_a_partitioned_run_resumes_the_same_next_iteration(tmp_path):
    """Checkpoints between batches hold the shards' vectors in partition order; a
    resumed P = 2 run repeats the checkpointed next iteration from the same bits."""
    out, ref = tmp_path / "r.h5", tmp_path / "uninterrupted.h5"
    run = ["--set", "sandblaster.iterations=8", "--set", "checkpoint.every=0.05"]
    train(out, 2, *run)
    shutil.copy(out, ref)
    k = checkpoint.newest_valid(checkpoint.folder_for(out))["sandblaster"]["next"]
    train(out, 2, *run, "--resume")
    a, b = table(ref), table(out)
    assert 0 < k < 8 and len(b["iteration"]) == 8
    assert (b["iteration"] == np.arange(8)).all()  # no gap, no repeat
    assert_exact(b)
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and "resumed_from" in f.attrs
    np.testing.assert_array_equal(a["loss"][:k], b["loss"][:k])  # restored rows
    np.testing.assert_allclose(b["loss_before"][k], a["loss_before"][k], rtol=1e-9)
    np.testing.assert_allclose(b["grad_norm"][k], a["grad_norm"][k], rtol=1e-4)
