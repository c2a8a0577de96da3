"""``mpibelief simulate`` with a Sandblaster config, end to end through the CLI.

A calibration file with chosen costs (the calibration itself is tested with Downpour in
``test_simulate.py``), synthetic data and a linear model keep it to a few seconds, with
200 virtual replicas.
"""

from __future__ import annotations

import h5py

from mpibelief.simulate import calibrate
from mpibelief.simulate.cluster import Costs
from tests.e2e.test_cli import assert_one_line_error, cli
from tests.e2e.test_sandblaster import DATA

SETS = [*DATA, "--set", "model.layers=0", "--set", "sandblaster.batch=1000",
        "--set", "sandblaster.iterations=3", "--set", "train.eval_every=0.01"]


def test_simulate_sandblaster_with_200_replicas(tmp_path):
    calibration = tmp_path / "cal.h5"
    calibrate.write(calibration, Costs(1e-4, 1e-8, 1e-5, 1e9), {})
    out = tmp_path / "sb.h5"
    result = cli("simulate", "configs/sandblaster.toml", *SETS, "--set", "layout.replicas=200",
                 "--calibration", calibration, "--straggler", "0.05:4", "--out", out,
                 timeout=120)
    assert result.returncode == 0, result.stderr
    assert "the batch is cut into 200" in result.stdout  # 16 configured
    assert "mpibelief: simulated" in result.stdout
    with h5py.File(out) as f:
        assert f.attrs["simulated"] and f.attrs["status"] == "complete"
        assert f.attrs["method"] == "sandblaster[200]" and f.attrs["world_size"] == 203
        table = f["sandblaster"]
        assert (table["samples_applied"][()] == 1000 * table["evals"][()]).all()
        assert (table["done_by"][()].sum(axis=1) == 200 * table["evals"][()]).all()
        assert table["loss"][-1] < table["loss_before"][0]
        assert len(f["ranks/rank"][()]) == 203


def test_simulate_refuses_a_batch_too_small_for_its_replicas(tmp_path):
    result = cli("simulate", "configs/sandblaster.toml", *SETS, "--set",
                 "layout.replicas=2000", "--out", tmp_path / "x.h5", timeout=60)
    assert_one_line_error(result, "sandblaster.batch = 1000 cannot be cut into 2000 portions")
