"""Plots read what the writers write: the bench's compression file, the run's method."""

from __future__ import annotations

import importlib.util
from argparse import Namespace
from pathlib import Path

import h5py
import pytest

from mpibelief.errors import UserError
from mpibelief.plots.accuracy import _label
from mpibelief.plots.compression import plot_compression, read_cases

BENCH = Path(__file__).resolve().parents[2] / "bench" / "compression.py"


def bench_module():
    spec = importlib.util.spec_from_file_location("bench_compression", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_compression_plot_reads_what_the_bench_writes(tmp_path, capsys):
    bench = bench_module()
    out = tmp_path / "compression.h5"
    args = Namespace(out=str(out), repeats=2, epochs=2.0, replicas=2)
    # (accuracy, seconds per step, ratio, fraction) per repeat, as figures() returns them
    found = {"dense": [(0.67, 0.010, 1.0, 1.0), (0.68, 0.011, 1.0, 1.0)],  # seeds 0, 1
             "f0.01": [(0.678, 0.008, 100.0, 0.00999), (0.672, 0.009, 100.0, 0.00999)],
             "f0.001": [(0.62, 0.007, 1000.0, 0.00099), (0.63, 0.007, 1000.0, 0.00099)]}
    bench.report(found, bench.cases([0.01, 0.001], []), args)
    printed = capsys.readouterr().out
    assert "PASS: f0.01 sends >= 100x fewer bytes" in printed
    assert "median +0.00, worst -0.80 points over 2 seed(s)" in printed  # paired by round
    cases = read_cases(out)
    assert set(cases) == set(found) and cases["f0.001"]["kept"] == 0.001
    assert list(cases["dense"]["accuracy"]) == [0.67, 0.68]
    with h5py.File(out) as f:
        assert f.attrs["epochs"] == 2.0 and "git_commit" in f.attrs  # stamped
    png = plot_compression(str(out), str(tmp_path / "c.png"))
    assert png.stat().st_size > 10_000


def test_a_file_without_the_bench_group_is_one_line(tmp_path):
    path = tmp_path / "x.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(UserError, match="not a compression bench file|cannot read"):
        plot_compression(str(path))


def test_accuracy_labels_name_the_method():
    attrs = {"algorithm": "sync", "method": "sync[2]+strom(1%)+adagrad", "world_size": 2}
    assert _label(Path("r/s.h5"), attrs) == "s: sync[2]+strom(1%)+adagrad, 2 ranks"
    assert _label(Path("old.h5"), {"algorithm": "sgd", "world_size": 1}) == "old: sgd, 1 ranks"
