"""``mpibelief simulate ... --set layout.partitions=4``: Downpour and SGD [1] over
replicas of four partitions, from the command line.

The calibration is written here (chosen costs), so each command runs in a few seconds;
the partitioned step's ratio is the scaling model's for the config's model, timed in the
command's own process.
"""

from __future__ import annotations

import h5py
import pytest

from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs
from tests.e2e.test_cli import SMALL, cli

pytestmark = pytest.mark.e2e
P4 = ["--set", "layout.partitions=4", "--set", "train.epochs=1.0"]


@pytest.fixture
def calibration(tmp_path):
    path = tmp_path / "cal.h5"
    calibrate.write(path, Costs(5e-5, 2e-9, 1e-5, 1e9), {})
    return path


def test_simulate_downpour_over_four_partitions(tmp_path, calibration):
    out = tmp_path / "downpour.h5"
    result = cli("simulate", "configs/demo.toml", *SMALL, *P4, "--set", "layout.replicas=2",
                 "--set", "downpour.warmstart_steps=5", "--calibration", calibration,
                 "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and f.attrs["partitions"] == 4
        assert f.attrs["partition_ratio"] > 0 and f.attrs["partition_comm_seconds"] > 0
        assert f.attrs["world_size"] == 1 + 2 + 2 * 4 and len(f["ranks/rank"]) == 11
        assert f["metrics/test_accuracy"][-1] > 0.3  # 5 classes: chance is 0.2


def test_simulate_sgd_over_four_partitions(tmp_path, calibration):
    out = tmp_path / "sgd.h5"
    result = cli("simulate", "configs/sgd.toml", *SMALL, *P4, "--calibration", calibration,
                 "--out", out, timeout=120)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["method"] == "sgd[1]+adagrad" and f.attrs["partitions"] == 4
        ratio, n = f.attrs["partition_ratio"], int(f.attrs["n_params"])
        steps = 2000 // 32
        assert f["metrics/wall_seconds"][-1] == pytest.approx(
            steps * (32 * 5e-5 * ratio + n * 2e-9))
        assert list(f["ranks/rank"][()]) == [0, 1, 2, 3]
