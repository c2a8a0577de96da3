"""The result file: the layout documented in mpibelief/results.py, and nothing else."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief.results import METRICS, ResultWriter, read_metrics


def test_layout_and_provenance(tmp_path):
    path = tmp_path / "run.h5"
    with ResultWriter(path, {"config": "[run]\n", "algorithm": "sgd", "world_size": 1}) as w:
        w.append_metrics({"wall_seconds": 1.0, "test_accuracy": 0.5})
        w.append_metrics({"wall_seconds": 2.0, "test_accuracy": 0.6, "samples": 10})
        w.write_table("ranks", {"rank": [0], "compute_seconds": [1.5]})
    with h5py.File(path) as f:
        for key in ("config", "algorithm", "world_size", "status", "start_time", "hosts",
                    "git_commit", "slurm_job_id", "version_numpy", "version_numba",
                    "version_mpi4py", "mpi_library"):
            assert key in f.attrs, key
        assert f.attrs["status"] == "complete"
        assert set(f["metrics"]) == set(METRICS)
        assert f["metrics/wall_seconds"].maxshape == (None,)
        assert f["ranks/compute_seconds"][0] == 1.5
    attrs, series = read_metrics(path)
    assert list(series["test_accuracy"]) == [0.5, 0.6]
    assert np.isnan(series["samples"][0]) and series["samples"][1] == 10


def test_slurm_provenance_is_recorded_and_empty_outside_slurm(tmp_path, monkeypatch):
    slurm = {"SLURM_JOB_ID": "4242", "SLURM_ARRAY_JOB_ID": "4240", "SLURM_ARRAY_TASK_ID": "2",
             "SLURM_JOB_NODELIST": "node[01-04]", "SLURM_TASKS_PER_NODE": "16(x4)"}
    for var in slurm:
        monkeypatch.delenv(var, raising=False)
    with ResultWriter(tmp_path / "plain.h5", {}):
        pass
    for var, value in slurm.items():
        monkeypatch.setenv(var, value)
    with ResultWriter(tmp_path / "slurm.h5", {}):
        pass
    with h5py.File(tmp_path / "plain.h5") as plain, h5py.File(tmp_path / "slurm.h5") as job:
        for key, value in [("slurm_job_id", "4242"), ("slurm_array_job_id", "4240"),
                           ("slurm_array_task_id", "2"), ("slurm_nodelist", "node[01-04]"),
                           ("slurm_tasks_per_node", "16(x4)")]:
            assert plain.attrs[key] == "", key
            assert job.attrs[key] == value, key


def test_a_failed_run_says_so(tmp_path):
    path = tmp_path / "run.h5"
    with pytest.raises(RuntimeError), ResultWriter(path, {}) as w:
        w.append_metrics({"wall_seconds": 1.0})
        raise RuntimeError("boom")
    with h5py.File(path) as f:
        assert f.attrs["status"] == "failed: boom"
        assert len(f["metrics/wall_seconds"]) == 1


def test_reading_a_foreign_file_is_an_error(tmp_path):
    path = tmp_path / "other.h5"
    with h5py.File(path, "w") as f:
        f["x"] = 1
    with pytest.raises(KeyError, match="no /metrics"):
        read_metrics(path)
