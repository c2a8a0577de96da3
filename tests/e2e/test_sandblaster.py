"""Sandblaster end to end: real ``mpibelief train`` jobs under mpiexec."""

from __future__ import annotations

import h5py
import numpy as np

from tests.e2e.test_cli import SMALL, assert_one_line_error, cli

DATA = [a for pair in zip(SMALL[::2], SMALL[1::2], strict=True) if "data." in pair[1]
        for a in pair]
TINY = [*DATA,
    "--set", "run.algorithm='sandblaster'", "--set", "layout.shards=1",
    "--set", "train.eval_every=1e9", "--set", "sandblaster.portions=8",
    "--set", "sandblaster.push_every=2", "--set", "sandblaster.batch=500",
    "--set", "sandblaster.iterations=6"]



def traffic(path) -> tuple[np.ndarray, int]:
    with h5py.File(path) as f:
        assert f.attrs["status"] == "complete"
        table = f["sandblaster"]
        return table["bytes_in"][()] + table["bytes_out"][()], int(f.attrs["n_params"])


def test_coordinator_traffic_does_not_grow_with_the_model(tmp_path):
    """Acceptance: for a model of >= 1M parameters the coordinator's traffic stays
    under a few KiB per L-BFGS step, the same as for a model a thousand times smaller:
    only scalars and portion numbers travel through it."""
    runs = {}
    for name, width in (("small", ["--set", "model.hidden=32"]),
                        ("large", ["--set", "data.n_inputs=1000", "--set", "model.hidden=1000",
                                   "--set", "model.layers=1"])):
        out = tmp_path / f"{name}.h5"
        result = cli("train", "configs/sandblaster.toml", *TINY, *width, "--out", out,
                     np=4, mpi=True, timeout=240)
        assert result.returncode == 0, result.stderr
        runs[name] = traffic(out)
    (small, n_small), (large, n_large) = runs["small"], runs["large"]
    assert n_large >= 1_000_000 and n_small < 5_000
    print(f"bytes per step: small {small.tolist()}, large {large.tolist()}")
    assert large.max() < 8 * 1024  # a few KiB, for 4 MB of parameters
    assert large.mean() < 1.5 * small.mean()  # and it does not follow the size


def test_sandblaster_refuses_too_few_portions(tmp_path):
    result = cli("train", "configs/sandblaster.toml", *TINY, "--set", "sandblaster.portions=1",
                 "--out", tmp_path / "x.h5", np=4, mpi=True)
    assert_one_line_error(result, "sandblaster.portions = 1 is fewer than the 2 replicas")
