"""Downpour end to end: real mpiexec jobs on real speech frames and on synthetic data."""

from __future__ import annotations

import time

import h5py
import pytest

from tests.e2e.test_cli import SMALL, assert_one_line_error, cli


def test_downpour_writes_server_and_rank_tables(tmp_path):
    out = tmp_path / "dp.h5"
    result = cli("train", "configs/demo.toml", *SMALL, "--set", "downpour.warmstart_steps=20",
                 "--out", out, np=5, mpi=True)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and f.attrs["world_size"] == 5
        applied = f["server/applied"][()]
        assert len(applied) == 2 and applied[0] == applied[1] > 0  # each push hits both
        assert f["server/refused"][()].sum() == 0
        assert f["server/staleness"][()].sum() == applied.sum()  # one entry per push
        assert list(f["ranks/rank"][()]) == [0, 1, 2, 3, 4]
        assert (f["ranks/samples"][()][3:] > 0).all()
        assert f["metrics/test_accuracy"][-1] > 0.6


def test_a_failing_rank_ends_the_whole_job_promptly(tmp_path):
    start = time.monotonic()
    result = cli("train", "configs/demo.toml", *SMALL, "--set", "train.epochs=50.0",
                 "--out", tmp_path / "x.h5", np=5, mpi=True,
                 env={"MPIBELIEF_INJECT_FAULT": "4:30"}, timeout=60)
    assert result.returncode != 0
    assert "fault injected on rank 4 at step 30" in result.stderr
    assert time.monotonic() - start < 30


def test_wrong_world_for_downpour(tmp_path):
    result = cli("train", "configs/demo.toml", "--set", "layout.replicas=2",
                 "--out", tmp_path / "x.h5", np=3, mpi=True)
    assert_one_line_error(result, "need 5 ranks, got 3")
    assert result.stderr.count("mpibelief: error:") == 1


@pytest.mark.usefixtures("fsdd_path")
def test_downpour_adagrad_matches_single_replica_on_speech(tmp_path):
    """Acceptance: 2 async replicas reach SGD [1]'s test frame accuracy within 1 point.

    Both train 6 epochs, where both have levelled off.  At 3 epochs stale gradients
    still hold Downpour back and the comparison is a coin toss (measured here: SGD [1]
    68.0%, four Downpour runs 66.9-67.8%); at 6, SGD [1] 68.7%, Downpour 68.3-68.9%.
    """
    epochs = ["--set", "train.epochs=6.0", "--set", "train.eval_every=1e9"]
    sgd = cli("train", "configs/sgd.toml", *epochs, "--out", tmp_path / "sgd.h5", timeout=300)
    assert sgd.returncode == 0, sgd.stderr
    dp = cli("train", "configs/demo.toml", *epochs, "--out", tmp_path / "dp.h5",
             np=5, mpi=True, timeout=300)
    assert dp.returncode == 0, dp.stderr
    with h5py.File(tmp_path / "sgd.h5") as a, h5py.File(tmp_path / "dp.h5") as b:
        base, downpour = a["metrics/test_accuracy"][-1], b["metrics/test_accuracy"][-1]
        staleness = b["server/staleness"][()]
    assert base > 0.6
    assert downpour >= base - 0.01, (downpour, base)
    assert staleness[1:].sum() > 0  # asynchronous for real: some pushes were stale


def test_diverging_downpour_fails_with_one_line(tmp_path):
    out = tmp_path / "x.h5"
    result = cli("train", "configs/demo.toml", *SMALL, "--set", "train.optimizer='sgd'",
                 "--set", "train.lr=1e30", "--out", out, np=4, mpi=True, timeout=60)
    assert_one_line_error(result, "training diverged")
    with h5py.File(out) as f:
        assert f.attrs["status"].startswith("failed: training diverged")
        # Everyone was stopped cleanly first: the tables are there (issue 10).
        assert f["server/refused"][()].sum() > 0 and len(f["ranks/rank"]) == 4


def test_batch_larger_than_a_replicas_data(tmp_path):
    result = cli("train", "configs/demo.toml", *SMALL, "--set", "data.n_train=200",
                 "--set", "train.batch=128", "--out", tmp_path / "x.h5", np=5, mpi=True)
    assert_one_line_error(result, "train.batch = 128 is more than the 100 training rows")
    assert result.stderr.count("mpibelief: error:") == 1
