"""``mpibelief simulate`` for synchronous SGD with Strom compression and for SGD [1].

The calibration is written here (chosen costs, as a measured file would hold them), so
each command runs in a few seconds and needs no benchmark file.
"""

from __future__ import annotations

import h5py
import pytest

from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs
from mpibelief.simulate.exchange_work import LocalWork
from tests.e2e.test_cli import SMALL, assert_one_line_error, cli

pytestmark = pytest.mark.e2e


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "cal.h5"
    work = LocalWork(1e-10, 3e-9, 1e-10, 2e-9)
    calibrate.write(path, Costs(5e-5, 2e-9, 1e-5, 1e10), work.attrs())
    return path


def test_simulate_sync_with_compression(tmp_path, calibration):
    out = tmp_path / "strom.h5"
    result = cli("simulate", "configs/sync_strom.toml", *SMALL, "--set", "layout.replicas=8",
                 "--set", "train.epochs=2.0", "--calibration", calibration, "--straggler",
                 "0.1:3", "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "mpibelief: simulated" in result.stdout
    with h5py.File(out) as f:
        assert f.attrs["simulated"] and f.attrs["status"] == "complete"
        assert f.attrs["method"] == "sync[8]+strom(1%)+adagrad" and f.attrs["replicas"] == 8
        assert f.attrs["calibration"] == str(calibration)
        rows = {k: f["compression"][k][()] for k in ("rank", "bytes_dense", "bytes_compressed")}
        assert len(rows["rank"]) == 8 * f.attrs["steps"]
        assert (rows["bytes_dense"] >= 100 * rows["bytes_compressed"]).all()
        assert f["metrics/test_accuracy"][-1] > 0.4  # 5 classes: chance is 0.2
    again = cli("simulate", "configs/sync_strom.toml", *SMALL, "--set", "layout.replicas=8",
                "--calibration", calibration, "--out", out, timeout=60)
    assert_one_line_error(again, "exists")


def test_simulate_sgd(tmp_path, calibration):
    out = tmp_path / "sgd.h5"
    result = cli("simulate", "configs/sgd.toml", *SMALL, "--set", "train.epochs=1.0",
                 "--calibration", calibration, "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "sgd[1]+adagrad" and f.attrs["algorithm"] == "sgd"
        assert f.attrs["world_size"] == 1 and "compression" not in f
        assert f["ranks/comm_seconds"][0] == 0 and f["ranks/bytes_pushed"][0] == 0
        steps = 2000 // 32
        # Compute and update only: 32 samples at 50 us, 2 ns per parameter, per step.
        n = int(f.attrs["n_params"])
        assert f["metrics/wall_seconds"][-1] == pytest.approx(steps * (32 * 5e-5 + n * 2e-9))
