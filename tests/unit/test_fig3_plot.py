"""`mpibelief plot fig3` draws from what the bench and the scaling model write."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import h5py
import numpy as np
import pytest

from mpibelief.__main__ import main
from mpibelief.errors import UserError
from mpibelief.model import Model
from mpibelief.plots.fig3 import PAPER, read_fig3
from mpibelief.simulate.network import preset
from mpibelief.simulate.scaling import Scaling, local_network, validate, write_model

BENCH = Path(__file__).resolve().parents[2] / "bench" / "model_parallel.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_model_parallel", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def case(seconds: float, P: int) -> dict:
    return {"seconds": seconds, "compute_seconds": np.full(P, 0.9 * seconds),
            "wait_seconds": np.full(P, 0.1 * seconds), "cpu_seconds": np.full(P, seconds / 2),
            "bytes_sent": np.full(P, 1000),
            "max_rss_bytes": np.full(P, 2**20), "batch": 8, "n_params": 500}


def small_file(path: Path) -> None:
    bench = bench_module()
    found = {("speech", 1): [case(1.0, 1), case(1.2, 1)],
             ("speech", 2): [case(0.5, 2), case(0.8, 2)]}
    network = {"sizes": [8, 1024], "seconds": [2e-6, 3e-6], "latency": 2e-6,
               "bandwidth": 8e9}
    bench.write(path, found, {("images_1700m", 2): "does not fit"}, network,
                Namespace(repeats=2, steps=1,
                          configs={"speech": BENCH.parents[1] / "configs" / "speech.toml"}))
    fitted = {"speech": Scaling(Model(20, 6, 16, 2, "sigmoid", allocate=False), 8, [2, 4])}
    with h5py.File(path, "r+") as f:
        rows = validate(f, fitted, local_network(f))
        write_model(f, fitted, preset("1gbe"), 2.0, rows, 1.0)


def test_fig3_draws_from_the_bench_file(tmp_path, capsys):
    path = tmp_path / "fig3_measured.h5"
    small_file(path)
    data = read_fig3(path)
    assert (data["preset"], data["factor"]) == ("1gbe", 2.0)  # stored for the acceptance
    median, rounds, cpu = data["measured"]["speech"][2]
    assert median == pytest.approx(1.1 / 0.65)  # medians of this run's P = 1 and P = 2
    np.testing.assert_allclose(rounds, [2.0, 1.5])  # paired by round
    assert cpu == pytest.approx(0.55 / 0.325)  # busiest rank's CPU seconds, medians
    assert list(data["curves"]["speech"]["partitions"]) == [1, 2, 4]
    with h5py.File(path) as f:
        assert len(f["model/validation/error"]) == 2 and "git_commit" in f.attrs
        assert f["measured/speech"].attrs["config"] == "configs/speech.toml"  # for a refit
    out = tmp_path / "fig3.png"
    assert main(["plot", "fig3", str(path), "--out", str(out)]) == 0
    assert out.stat().st_size > 20_000 and "wrote" in capsys.readouterr().out


def test_a_file_without_the_model_is_one_line(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f.create_group("measured")
    with pytest.raises(UserError, match="Figure 3 file"):
        read_fig3(path)


def test_the_paper_table_starts_at_one_machine():
    assert all(values[1] == 1.0 for values in PAPER.values())
    assert max(PAPER["speech"], key=PAPER["speech"].get) == 8  # peaks at 8 (2.2x)
