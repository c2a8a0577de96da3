"""The one HDF5 writer: every run leaves one file in this layout, written by one rank.

File layout (``mpibelief plot`` and the figure scripts read nothing else)::

    /                    attributes
        config           the resolved config as TOML text
        algorithm        e.g. "sgd", "downpour", "sync"
        method           where the algorithm sets it: a label for plots, e.g.
                         "sync[2]", "sync[2]+strom(1%)"
        world_size       number of MPI ranks
        roles            the rank/role table, one line per rank
        status           "running" while training, then "complete" or "failed: <why>"
        start_time       ISO 8601, UTC
        hosts            host names of the ranks, comma separated, with rank counts
        slurm_job_id     "" outside Slurm
        git_commit       "" outside a git checkout
        version_mpibelief, version_numpy, version_numba, version_mpi4py, version_h5py,
        mpi_library      versions of everything that shapes the numbers
    /metrics/<name>      1-D float64 time series, chunked and resizable, one row per sample:
        wall_seconds     training time since the start (evaluation pauses excluded
                         where the trainer evaluates itself)
        samples          training samples whose gradients have been applied to the
                         parameters, all replicas together (refused pushes not counted;
                         with a server, counted by the shards per client)
        updates          parameter updates applied (with a server: by the least-updated
                         shard)
        train_loss, train_accuracy   on a fixed sample of the training set
        test_loss, test_accuracy     on the whole test set
    /ranks/<name>        one entry per rank: rank, samples (trained on), train_seconds
                         (wall time in the training loop; a shard's: serving),
                         compute_seconds (a shard's: applying updates), comm_seconds,
                         wait_seconds (a shard's: idle), bytes_pushed, bytes_pulled.
                         Sync SGD: comm_seconds is the gradient exchange (with encode
                         and decode, and waiting for the slowest replica), wait_seconds
                         the pauses for rank 0's evaluations; bytes_pushed is the
                         rank's share (4 n per step dense, its packets compressed),
                         bytes_pulled what it receives (4 n, or every rank's packets)
    /server/<name>       parameter-server runs only: shard_rank, applied, refused,
                         bytes_in, busy_fraction (applying / serving time), one per
                         shard; staleness (histogram: count of pushes by updates missed)
    /compression/<name>  compressed runs only (``compression.enabled``): 1-D float64
                         time series, chunked and resizable, one row per compressed
                         step (sync) or push (Downpour) of each replica rank, written in
                         chunks of rows (:class:`Series`):
        rank, step       who sent it, and its step (1-based) on that rank
        epoch            the epoch the warm-up schedule saw
        tau              the threshold used
        fraction         entries sent / entries in the gradient
        bytes_dense      4 * entries: the float32 gradient
        bytes_compressed 4 * entries sent + 8 (tau and the count)
        ratio            bytes_dense / bytes_compressed
        residual_norm    L2 norm of the rank's residual after the step
    /bench/<name>/...    benchmark results (each bench documents its own group); bench
                         files carry the same provenance attributes (:func:`stamp`)
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import socket
import subprocess
from pathlib import Path

import h5py
import numpy as np

from mpibelief.errors import UserError

METRICS = (
    "wall_seconds", "samples", "updates",
    "train_loss", "train_accuracy", "test_loss", "test_accuracy",
)


@dataclasses.dataclass
class RankStats:
    """One rank's row of ``/ranks``: what it did, by name (see the module docstring)."""

    rank: int
    samples: int = 0
    train_seconds: float = 0.0
    compute_seconds: float = 0.0
    comm_seconds: float = 0.0
    wait_seconds: float = 0.0
    bytes_pushed: int = 0
    bytes_pulled: int = 0


COMPRESSION = ("rank", "step", "epoch", "tau", "fraction", "bytes_dense",
               "bytes_compressed", "ratio", "residual_norm")

RANK_FIELDS = tuple(f.name for f in dataclasses.fields(RankStats))


def provenance() -> dict[str, str]:
    """Versions, host, Slurm job and git commit, for the root attributes."""
    import mpi4py
    import numba

    import mpibelief

    attrs = {
        "version_mpibelief": mpibelief.__version__,
        "version_numpy": np.__version__,
        "version_numba": numba.__version__,
        "version_mpi4py": mpi4py.__version__,
        "version_h5py": h5py.__version__,
        "slurm_job_id": os.environ.get("SLURM_JOB_ID", ""),
        "git_commit": _git_commit(),
        "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hosts": socket.gethostname(),
    }
    try:
        from mpi4py import MPI

        attrs["mpi_library"] = MPI.Get_library_version().strip().splitlines()[0]
    except Exception:  # noqa: BLE001 - provenance must never fail a run
        attrs["mpi_library"] = "unknown"
    return attrs


def stamp(target, attrs: dict | None = None) -> None:
    """Write :func:`provenance` and ``attrs`` as attributes of an h5py file or group.

    The one provenance writer: run files and every ``bench/`` file use it, so the
    same attribute names mean the same things everywhere.
    """
    for key, value in {**provenance(), **(attrs or {})}.items():
        target.attrs[key] = value


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
            cwd=Path(__file__).resolve().parent,
        )
        return out.stdout.strip() if out.returncode == 0 else ""
    except (OSError, subprocess.SubprocessError):
        return ""


class Series:
    """Rows of named float64 columns under ``/group``, buffered and written in chunks.

    One HDF5 resize per row costs more than a small training step (h5py and the HDF5
    B-tree each time), so rows wait in a numpy buffer and go out ``chunk`` at a time,
    one resize per column; :meth:`flush` (and the writer's ``close``) writes the rest.
    """

    def __init__(self, file, group: str, names: tuple[str, ...], chunk: int = 1024):
        self.file, self.names = file, tuple(names)
        grp = file.require_group(group)
        self.data = [grp.require_dataset(name, shape=(0,), maxshape=(None,), dtype="f8",
                                         chunks=(chunk,)) for name in self.names]
        self.rows = np.empty((chunk, len(self.names)))
        self.filled = 0

    def append(self, row: dict) -> None:
        """Add one row; missing names are NaN.  Written once ``chunk`` rows wait."""
        self.rows[self.filled] = [row.get(name, np.nan) for name in self.names]
        self.filled += 1
        if self.filled == len(self.rows):
            self.flush()

    def extend(self, columns: dict) -> None:
        """Add many rows at once (equal-length arrays by name; missing names are NaN)."""
        self.flush()
        length = len(next(iter(columns.values()))) if columns else 0
        block = np.full((length, len(self.names)), np.nan)
        for i, name in enumerate(self.names):
            if name in columns:
                block[:, i] = columns[name]
        self._write(block)

    def flush(self) -> None:
        if self.filled:
            self._write(self.rows[:self.filled])
            self.filled = 0

    def _write(self, block: np.ndarray) -> None:
        if not len(block) or not self.file.id.valid:
            return
        for i, data in enumerate(self.data):
            start = data.shape[0]
            data.resize((start + len(block),))
            data[start:] = block[:, i]
        self.file.flush()


class ResultWriter:
    """Creates a run's HDF5 file and appends to it as the run goes.

    The file is flushed after every metrics row, so a run that dies still leaves
    everything measured up to then, with ``status`` saying it did not complete.
    """

    def __init__(self, path: str | Path, attrs: dict):
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = h5py.File(self.path, "w")
        except OSError as exc:
            raise UserError(f"cannot write result file {self.path}: {exc}") from None
        stamp(self.file, attrs)
        self.file.attrs["status"] = "running"
        group = self.file.create_group("metrics")
        for name in METRICS:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))
        self.file.flush()
        self.series_open: list[Series] = []

    def series(self, group: str, names: tuple[str, ...], chunk: int = 1024) -> Series:
        """A buffered time series under ``/group`` (flushed by :meth:`close` at the latest)."""
        found = Series(self.file, group, names, chunk)
        self.series_open.append(found)
        return found

    def set_attrs(self, attrs: dict) -> None:
        """Add root attributes (e.g. ``method``, known only once the algorithm runs)."""
        for key, value in attrs.items():
            self.file.attrs[key] = value

    def append_metrics(self, row: dict) -> None:
        """Append one sample; missing names are stored as NaN."""
        group = self.file["metrics"]
        for name in METRICS:
            data = group[name]
            data.resize((data.shape[0] + 1,))
            data[-1] = row.get(name, np.nan)
        self.file.flush()

    def write_table(self, group: str, columns: dict) -> None:
        """Write named 1-D arrays under ``/group`` (e.g. per-rank or per-shard stats)."""
        grp = self.file.require_group(group)
        for name, values in columns.items():
            if name in grp:
                del grp[name]
            grp.create_dataset(name, data=np.asarray(values))

    def write_ranks(self, records: list[RankStats]) -> None:
        """``/ranks``: one row per rank, in the order given."""
        self.write_table("ranks", {name: [getattr(r, name) for r in records]
                                   for name in RANK_FIELDS})

    def close(self, status: str = "complete") -> None:
        if self.file.id.valid:
            for series in self.series_open:
                series.flush()
            self.file.attrs["status"] = status
            self.file.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close("complete" if exc is None else f"failed: {exc}")


def read_metrics(path: str | Path) -> tuple[dict, dict]:
    """The root attributes and the ``/metrics`` series of a result file."""
    with h5py.File(path, "r") as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if "metrics" not in f:
            raise KeyError(f"{path}: no /metrics group (not an mpibelief result file?)")
        series = {name: f["metrics"][name][()] for name in f["metrics"]}
    return attrs, series
