"""The command line as a user meets it: info tables, training runs, plots, one-line errors."""

from __future__ import annotations

import h5py
import pytest

from tests.conftest import run_job

SMALL = [
    "--set", "data.source='synthetic'", "--set", "data.n_train=2000", "--set", "data.n_test=500",
    "--set", "data.n_inputs=20", "--set", "data.n_classes=5", "--set", "model.hidden=32",
    "--set", "train.epochs=5.0", "--set", "train.lr=0.05", "--set", "train.batch=32",
    "--set", "train.eval_every=0.01",
]


def cli(*args, np: int = 1, mpi: bool = False, timeout: float = 120, **kw):
    return run_job(["-m", "mpibelief", *args], np=np, mpi=mpi, timeout=timeout, guard=False,
                   **kw)


def assert_one_line_error(result, needle: str):
    assert result.returncode != 0, result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("mpibelief: error:")]
    assert errors, result.stderr
    assert needle in errors[0], errors[0]
    assert "Traceback" not in result.stderr, result.stderr


def test_info_prints_the_role_table():
    result = cli("info", "--np", "7", "configs/demo.toml")
    assert result.returncode == 0, result.stderr
    assert "coordinator" in result.stdout and "parameter shard 1" in result.stdout
    assert "parameters" in result.stdout


def test_info_wrong_world_size_is_one_line():
    result = cli("info", "--np", "3", "configs/demo.toml")
    assert_one_line_error(result, "need 4 ranks")
    assert "got 3" in result.stderr


def test_help_lists_commands():
    result = cli("--help")
    assert result.returncode == 0
    for command in ("train", "info", "plot", "data"):
        assert command in result.stdout


def test_sgd_trains_alone_and_plots(tmp_path):
    out = tmp_path / "sgd.h5"
    result = cli("train", "configs/sgd.toml", *SMALL, "--out", out)
    assert result.returncode == 0, result.stderr
    with h5py.File(out) as f:
        assert f.attrs["status"] == "complete"
        assert f.attrs["algorithm"] == "sgd"
        assert "[train]" in f.attrs["config"]
        acc = f["metrics/test_accuracy"][()]
        assert len(acc) >= 3 and acc[-1] > 0.6  # 5 classes: chance is 0.2
    plot = cli("plot", "accuracy", out, "--out", tmp_path / "a.png")
    assert plot.returncode == 0, plot.stderr
    assert (tmp_path / "a.png").stat().st_size > 10_000


def test_sgd_under_mpiexec_with_wrong_world(tmp_path):
    result = cli("train", "configs/sgd.toml", *SMALL, "--out", tmp_path / "x.h5", np=2, mpi=True)
    assert_one_line_error(result, "need 1 ranks, got 2")
    assert result.stderr.count("mpibelief: error:") == 1


@pytest.mark.parametrize(
    ("override", "needle"),
    [
        ("train.learnrate=0.1", "unknown key train.learnrate"),
        ("model.hidden='big'", "model.hidden must be int"),
        ("data.path='/nonexistent/fsdd'", "/nonexistent/fsdd"),
    ],
)
def test_bad_input_is_one_line(override, needle, tmp_path):
    result = cli("train", "configs/sgd.toml", "--set", override, "--out", tmp_path / "x.h5")
    assert_one_line_error(result, needle)


def test_diverging_sgd_stops_with_one_line(tmp_path):
    result = cli("train", "configs/sgd.toml", *SMALL, "--set", "train.lr=1e30",
                 "--set", "train.optimizer='sgd'", "--out", tmp_path / "x.h5")
    assert_one_line_error(result, "non-finite")


def test_plot_of_missing_file_is_one_line(tmp_path):
    result = cli("plot", "accuracy", tmp_path / "none.h5")
    assert_one_line_error(result, "none.h5")



def test_config_error_under_mpiexec_is_printed_once(tmp_path):
    result = cli("train", "configs/demo.toml", "--set", "train.lr='fast'",
                 "--out", tmp_path / "x.h5", np=5, mpi=True)
    assert_one_line_error(result, "train.lr must be float")
    assert result.stderr.count("mpibelief: error:") == 1
