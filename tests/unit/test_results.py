"""The result file: the layout documented in mpibelief/results.py, and nothing else."""

from __future__ import annotations

import h5py
import numpy as np
import pytest

from mpibelief.errors import UserError
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
    with pytest.raises(UserError, match="no /metrics"):
        read_metrics(path)


def test_an_existing_result_is_never_replaced_silently(tmp_path):
    path = tmp_path / "run.h5"
    with ResultWriter(path, {}) as w:
        w.append_metrics({"wall_seconds": 1.0})
    with pytest.raises(UserError, match="exists: pass --overwrite"):
        ResultWriter(path, {})
    _, series = read_metrics(path)
    assert list(series["wall_seconds"]) == [1.0]  # the first run's file is intact
    ResultWriter(path, {}, overwrite=True).close()
    assert len(read_metrics(path)[1]["wall_seconds"]) == 0


def test_a_live_runs_file_is_readable_and_not_replaceable(tmp_path):
    path = tmp_path / "run.h5"
    w = ResultWriter(path, {})
    w.append_metrics({"wall_seconds": 1.0})
    attrs, series = read_metrics(path)  # while the writer is alive
    assert attrs["status"] == "running" and len(series["wall_seconds"]) == 1
    with pytest.raises(UserError, match="being written by a running job"):
        ResultWriter(path, {}, overwrite=True)
    w.close()
    assert read_metrics(path)[0]["status"] == "complete"


def test_two_claims_of_one_path_leave_the_first_intact(tmp_path, monkeypatch):
    """The claim is atomic: a second writer that loses the race gets an error, and the
    first file is never truncated (its rows survive)."""
    path = tmp_path / "run.h5"
    first = ResultWriter(path, {})
    first.append_metrics({"wall_seconds": 1.0})
    monkeypatch.setattr("pathlib.Path.exists", lambda self: False)  # lose the race late
    with pytest.raises(UserError, match="just created by another run"):
        ResultWriter(path, {})
    monkeypatch.undo()
    first.append_metrics({"wall_seconds": 2.0})
    first.close()
    assert list(read_metrics(path)[1]["wall_seconds"]) == [1.0, 2.0]
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary left behind


def test_series_grow_together(tmp_path):
    with ResultWriter(tmp_path / "run.h5", {}) as w:
        w.append("compression", {"ratio": 100.0})
        w.extend("compression", {"ratio": [50.0, 20.0], "sent": [10.0, 20.0]})
    with h5py.File(tmp_path / "run.h5") as f:
        assert list(f["compression/ratio"][()]) == [100.0, 50.0, 20.0]
        assert np.isnan(f["compression/sent"][0]) and f["compression/sent"][2] == 20.0
