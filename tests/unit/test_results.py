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


def test_series_buffers_rows_and_writes_them_in_chunks(tmp_path):
    path = tmp_path / "run.h5"
    with ResultWriter(path, {}) as w:
        series = w.series("compression", ("step", "ratio"), chunk=4)
        for step in range(6):
            series.append({"step": step, "ratio": 100.0 + step})
            written = len(w.file["compression/step"])
            assert written == (4 if step >= 3 else 0), (step, written)  # one chunk at a time
        series.extend({"step": np.array([10, 11])})  # the rest first, then these
    with h5py.File(path) as f:
        assert list(f["compression/step"][()]) == [0, 1, 2, 3, 4, 5, 10, 11]
        ratio = f["compression/ratio"][()]
        assert ratio[5] == 105.0 and np.isnan(ratio[6:]).all()
        assert f["compression/step"].maxshape == (None,)
