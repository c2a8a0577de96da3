"""A new algorithm needs no edit outside its own code: this test registers one and runs it.

The algorithm is defined and registered in a script the test writes, then trained
through the real command line entry point (``mpibelief.__main__.main``) as any run is.
"""

from __future__ import annotations

import h5py

from tests.conftest import run_job
from tests.e2e.test_cli import SMALL

SCRIPT = '''
import sys
from mpibelief.__main__ import main
from mpibelief.algorithms import Algorithm, register
from mpibelief.errors import ConfigError
from mpibelief.layout import WORKER


def do_nothing(ctx):
    """One metrics row from the untrained model, and the summary every run returns."""
    row = {"wall_seconds": 0.0, "samples": 0, "updates": 0, "test_accuracy": 0.25,
           "train_accuracy": 0.25}
    ctx.writer.append_metrics(row)
    return {"train_seconds": 0.0, **row}


def one_rank(cfg):
    if cfg.layout.shards:
        raise ConfigError("run.algorithm = 'noop' runs on one rank: layout.shards = 0")


register(Algorithm("noop", {WORKER: do_nothing}, one_rank, "does nothing, for a test"))
sys.exit(main(sys.argv[1:]))
'''


def test_an_algorithm_registered_by_a_test_runs(tmp_path):
    script = tmp_path / "noop.py"
    script.write_text(SCRIPT)
    out = tmp_path / "noop.h5"
    result = run_job([script, "train", "configs/sgd.toml", *SMALL, "--set",
                      "run.algorithm='noop'", "--out", out], mpi=False, guard=False)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete" and f.attrs["algorithm"] == "noop"
        assert list(f["metrics/test_accuracy"][()]) == [0.25]
    refused = run_job([script, "train", "configs/sgd.toml", *SMALL, "--set",
                       "run.algorithm='noop'", "--set", "layout.shards=1", "--out",
                       tmp_path / "x.h5"], mpi=False, guard=False)
    assert refused.returncode != 0 and "runs on one rank" in refused.stderr
