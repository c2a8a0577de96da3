"""Sync SGD and Strom compression end to end: real mpiexec jobs, complete result files."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief.results import COMPRESSION, METRICS, RANK_FIELDS
from tests.e2e.test_cli import SMALL, assert_one_line_error, cli

STROM = ["--set", "compression.enabled=true"]


def check_complete(path, ranks: int, method: str) -> h5py.File:
    f = h5py.File(path)
    assert f.attrs["status"] == "complete" and f.attrs["world_size"] == ranks
    assert f.attrs["method"] == method
    assert set(f["metrics"]) == set(METRICS) and len(f["metrics/test_accuracy"]) >= 2
    assert set(RANK_FIELDS) <= set(f["ranks"]) and list(f["ranks/rank"][()]) == list(range(ranks))
    assert (f["ranks/samples"][()] > 0).all() and (f["ranks/bytes_pushed"][()] > 0).all()
    return f


@pytest.mark.parametrize("config", ["configs/sync.toml", "configs/sync_strom.toml"])
def test_sync_writes_a_complete_result_file(tmp_path, config):
    out = tmp_path / "sync.h5"
    result = cli("train", config, *SMALL, "--set", "train.batch=16", "--out", out, np=2,
                 mpi=True)
    assert result.returncode == 0, result.stderr
    strom = "strom" in config
    with check_complete(out, 2, "sync[2]+strom(1%)+adagrad" if strom else "sync[2]+adagrad") as f:
        metrics = {k: f["metrics"][k][()] for k in METRICS}
        assert metrics["test_accuracy"][-1] > 0.6  # 5 classes: chance is 0.2
        steps = int(metrics["updates"][-1])
        assert metrics["samples"][-1] == steps * 2 * 16  # both replicas, every step
        assert "server" not in f and ("compression" in f) == strom
        if strom:
            rows = {k: f["compression"][k][()] for k in COMPRESSION}
            assert len(rows["step"]) == 2 * steps  # every step of both replicas
            assert sorted(set(rows["rank"].tolist())) == [0, 1]
            assert (rows["fraction"] <= 0.01).all()
            assert (rows["bytes_dense"] >= 100 * rows["bytes_compressed"]).all()
            assert f["ranks/bytes_pushed"][0] == rows["bytes_compressed"][rows["rank"] == 0].sum()


def test_downpour_with_compressed_pushes(tmp_path):
    out = tmp_path / "dp.h5"
    result = cli("train", "configs/demo.toml", *SMALL, *STROM, "--set",
                 "downpour.warmstart_steps=20", "--out", out, np=5, mpi=True)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete"
        assert f.attrs["method"] == "downpour[2]+strom(1%)+adagrad"
        applied = f["server/applied"][()]
        rows = {k: f["compression"][k][()] for k in COMPRESSION}
        assert sorted(set(rows["rank"].tolist())) == [3, 4]
        assert len(rows["step"]) == applied[0]  # every push reached both shards
        # The shards received packets, not dense gradients.
        dense = rows["bytes_dense"].sum()
        assert f["server/bytes_in"][()].sum() < dense / 10, (f["server/bytes_in"][()], dense)
        assert f["metrics/test_accuracy"][-1] > 0.6


def test_sync_refuses_a_parameter_server(tmp_path):
    result = cli("train", "configs/sync.toml", "--set", "layout.shards=1",
                 "--out", tmp_path / "x.h5", np=2, mpi=True)
    assert_one_line_error(result, "run.algorithm = 'sync' needs no parameter server")


@pytest.mark.parametrize("config", ["configs/sync.toml", "configs/sync_strom.toml"])
def test_diverging_sync_fails_with_one_line(tmp_path, config):
    out = tmp_path / "x.h5"
    result = cli("train", config, *SMALL, "--set", "train.optimizer='sgd'", "--set",
                 "train.lr=1e30", "--out", out, np=2, mpi=True, timeout=60)
    assert_one_line_error(result, "training diverged")
    assert result.stderr.count("mpibelief: error:") == 1  # rank 0 speaks for every replica
    with h5py.File(out) as f:
        assert f.attrs["status"].startswith("failed: training diverged")


@pytest.mark.usefixtures("fsdd_path")
def test_compression_at_one_percent_matches_dense_sync_on_speech(tmp_path):
    """Acceptance: sending <= 1% of entries per step (>= 100x fewer bytes than dense
    float32), 2 replicas reach the test frame accuracy of uncompressed sync SGD within
    1 point after the same number of epochs.

    Two epochs: a run is deterministic given its seed (2 replicas), so the margin is
    what counts, not repeats: seed 0 gives dense 66.99%, keep 1% 68.08%, and over
    seeds 0-2 the paired difference is +0.20 to +1.09 points (``bench/compression.py``).
    At 0.1% it is -1.30 to -2.65 points: too far, so 1% is the test.  Took 81-151 s on
    the shared 2-core workstation at load 11-15 (the Downpour test beside it: 137 s).
    """
    epochs = ["--set", f"train.epochs={EPOCHS}", "--set", "train.eval_every=1e9"]
    runs = {}
    for name in ("sync", "sync_strom"):
        result = cli("train", f"configs/{name}.toml", *epochs, "--out", tmp_path / f"{name}.h5",
                     np=2, mpi=True, timeout=300)
        assert result.returncode == 0, result.stderr
        runs[name] = h5py.File(tmp_path / f"{name}.h5")
    dense, strom = runs["sync"], runs["sync_strom"]
    base, compressed = dense["metrics/test_accuracy"][-1], strom["metrics/test_accuracy"][-1]
    fraction = strom["compression/fraction"][()]
    ratio = strom["compression/bytes_dense"][()] / strom["compression/bytes_compressed"][()]
    assert base > 0.6
    assert fraction.max() <= 0.01 and ratio.min() >= 100, (fraction.max(), ratio.min())
    assert compressed >= base - 0.01, (compressed, base)
    assert np.isfinite(strom["compression/residual_norm"][()]).all()


EPOCHS = 2.0
