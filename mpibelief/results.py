"""The one HDF5 writer: every run leaves one file in this layout, written by one rank.

File layout (``mpibelief plot`` and the figure scripts read nothing else)::

    /                    attributes
        config           the resolved config as TOML text
        algorithm        e.g. "sgd", "downpour", "sync"
        method           where the algorithm sets it: a label for plots, e.g.
                         "sync[2]", "sync[2]+strom(1%)"
        world_size       number of MPI ranks
        roles            the rank/role table, one line per rank
        status           "running" while training, then "complete" (perhaps "complete
                         without N failed replica(s) ..."), "stopped: SIGTERM ..." or
                         "failed: [rank N: ]<why>"
        writer_pid, writer_host  the process writing the file (a live one is never
                         replaced); resumed_from, resume_params_sha256 after --resume
        start_time       ISO 8601, UTC
        hosts            host names of the ranks, comma separated, with rank counts
        replicas         model replicas (plots label curves method[replicas])
        slurm_job_id     "" outside Slurm (so are the other slurm_* attributes)
        slurm_array_job_id, slurm_array_task_id   the job array and this run's index in
                         it ("" for a job that is not part of an array)
        slurm_nodelist   the job's nodes in Slurm's compressed form, e.g. "node[01-04]"
        slurm_tasks_per_node   Slurm's tasks per node for the step that ran the ranks,
                         e.g. "16(x4)" (under mpiexec inside a job: its launcher step's;
                         ``hosts`` always has where the ranks really ran)
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
                         wait_seconds (a shard's: idle), bytes_pushed, bytes_pulled,
                         cpu_seconds (process CPU time over train_seconds: below it
                         where the rank waited or shared its core; Downpour's ranks,
                         the coordinator's while it watched the replicas; 0 where
                         not measured).
                         Sync SGD: comm_seconds is the gradient exchange (with encode
                         and decode, and waiting for the slowest replica), wait_seconds
                         the pauses for rank 0's evaluations; bytes_pushed is the
                         rank's share (4 n per step dense, its packets compressed),
                         bytes_pulled what it receives (4 n, or every rank's packets)
    /server/<name>       parameter-server runs only: shard_rank, applied, refused,
                         bytes_in, busy_fraction (applying / serving time),
                         apply_cpu_seconds (Downpour: CPU time applying), one per
                         shard; staleness (histogram: count of pushes by updates missed)
    /failures/<name>     replicas given up on: rank, seconds (run time), reason
    /sandblaster/<name>  Sandblaster runs only, one row per batch (L-BFGS step): loss_before,
                         loss (mean over the batch, after the step), grad_norm, step
                         (accepted line-search step), step_norm, evals (gradients over the
                         batch), accepted, portions_issued, backups_issued, backups_wasted,
                         samples_applied (counted by the shards: evals x batch), batch,
                         seconds, gradient_seconds (of which, handing out portions
                         until their sums are in), bytes_in and bytes_out (the
                         coordinator's training traffic: shard commands and replica
                         messages, pickled sizes),
                         done_by (batches x replicas: portions each replica's pushes held)
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

import contextlib
import dataclasses
import datetime
import os
import socket
import subprocess
import threading
import time
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
    cpu_seconds: float = 0.0


COMPRESSION = ("rank", "step", "epoch", "tau", "fraction", "bytes_dense",
               "bytes_compressed", "ratio", "residual_norm")

RANK_FIELDS = tuple(f.name for f in dataclasses.fields(RankStats))


# Provenance attribute -> the Slurm environment variable it records.
SLURM_ATTRS = {
    "slurm_job_id": "SLURM_JOB_ID",
    "slurm_array_job_id": "SLURM_ARRAY_JOB_ID",
    "slurm_array_task_id": "SLURM_ARRAY_TASK_ID",
    "slurm_nodelist": "SLURM_JOB_NODELIST",
    "slurm_tasks_per_node": "SLURM_TASKS_PER_NODE",
}


def provenance() -> dict[str, str]:
    """Versions, host, Slurm job (array, nodes, tasks per node) and git commit."""
    import mpi4py
    import numba

    import mpibelief

    attrs = {
        "version_mpibelief": mpibelief.__version__,
        "version_numpy": np.__version__,
        "version_numba": numba.__version__,
        "version_mpi4py": mpi4py.__version__,
        "version_h5py": h5py.__version__,
        **{name: os.environ.get(var, "") for name, var in SLURM_ATTRS.items()},
        "git_commit": _git_commit(),
        "start_time": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "hosts": socket.gethostname(),
    }
    try:
        from mpi4py import MPI

        # Open MPI's string ends in a NUL, which HDF5 string attributes refuse.
        attrs["mpi_library"] = MPI.Get_library_version().strip("\x00 \n").splitlines()[0]
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

    One HDF5 append per row costs more than a small training step (the file is opened,
    resized and closed each time), so rows wait in a numpy buffer and go out ``chunk``
    at a time; :meth:`flush` (and the writer's ``close``) writes the rest.
    """

    def __init__(self, writer, group: str, names: tuple[str, ...], chunk: int = 1024):
        self.writer, self.group, self.names = writer, group, tuple(names)
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
        if len(block) and not self.writer.closed:
            self.writer.extend(self.group, {name: block[:, i]
                                            for i, name in enumerate(self.names)})


class ResultWriter:
    """Creates a run's HDF5 file and appends to it as the run goes.

    Nothing is ever lost:

    - The path is claimed atomically before anything can be overwritten: the file is
      built under a temporary name beside it and hard-linked into place (``link(2)``
      fails if the name exists), so of two runs started together one gets a clear
      error and the other's file is never touched.  An existing file is replaced only
      with ``overwrite``, and never while the run that wrote it is still alive (its
      host and pid are in the file and checked).
    - The file is open only while it is written (each append opens, writes, flushes and
      closes it), so a live run can be read and plotted at any moment, and a run that
      dies leaves everything measured up to then, with ``status`` saying it did not
      complete.  Measured: an open-append-close costs about 2 ms; rows come every few
      seconds.
    """

    def __init__(self, path: str | Path, attrs: dict, overwrite: bool = False):
        self.path = Path(path)
        self.closed = False
        self.lock = threading.Lock()  # a notice thread may close the file mid-append
        self.series_open: list[Series] = []
        _claim(self.path, overwrite, lambda f: self._build(f, attrs))

    @classmethod
    def reopen(cls, path: str | Path, rows: int, attrs: dict) -> ResultWriter:
        """Continue an existing run's file (``--resume``): keep its first ``rows`` rows.

        Rows written after the checkpoint being resumed are dropped, so the time series
        has no repeated steps.

        Raises:
            UserError: the file is missing, not a result file, or still being written.
        """
        self = cls.__new__(cls)
        self.path, self.closed, self.lock = Path(path), False, threading.Lock()
        self.series_open = []
        if not self.path.exists():
            raise UserError(f"cannot resume: result file {path} does not exist")
        _check_replaceable(self.path)
        read_metrics(self.path)  # one-line error if it is not a result file
        with self._open() as f:
            for group in f.values():
                for data in group.values() if isinstance(group, h5py.Group) else []:
                    if data.maxshape == (None,) and data.shape[0] > rows:
                        data.resize((rows,))
            for key, value in {**attrs, "status": "running", "writer_pid": os.getpid(),
                               "writer_host": socket.gethostname()}.items():
                f.attrs[key] = value
        return self

    @staticmethod
    def _build(f: h5py.File, attrs: dict) -> None:
        stamp(f, attrs)
        f.attrs["status"] = "running"
        f.attrs["writer_pid"] = os.getpid()
        f.attrs["writer_host"] = socket.gethostname()
        group = f.create_group("metrics")
        for name in METRICS:
            group.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))

    @contextlib.contextmanager
    def _open(self):
        with self.lock:
            if self.closed:
                raise RuntimeError(f"{self.path} is closed")
            with h5py.File(self.path, "r+", locking=False) as f:
                yield f

    def series(self, group: str, names: tuple[str, ...], chunk: int = 1024) -> Series:
        """A buffered time series under ``/group`` (flushed by :meth:`close` at the latest)."""
        found = Series(self, group, names, chunk)
        self.series_open.append(found)
        return found

    def append_metrics(self, row: dict) -> None:
        """Append one sample; missing names are stored as NaN."""
        self.append("metrics", {name: row.get(name, np.nan) for name in METRICS})

    def append(self, group: str, row: dict) -> None:
        """Append one row to the 1-D float64 time series under ``/group``.

        Series are created on first use; a name missing from a later row gets NaN, so
        every series of a group keeps the same length.
        """
        self.extend(group, {name: [value] for name, value in row.items()})

    def extend(self, group: str, rows: dict) -> None:
        """Append several rows at once (``{name: values}``, equal lengths)."""
        count = len(next(iter(rows.values())))
        with self._open() as f:
            grp = f.require_group(group)
            length = max((grp[n].shape[0] for n in grp), default=0)
            for name in set(grp) | set(rows):
                if name not in grp:
                    grp.create_dataset(name, data=np.full(length, np.nan), maxshape=(None,),
                                       chunks=(256,), dtype="f8")
                data = grp[name]
                data.resize((length + count,))
                data[length:] = rows.get(name, np.full(count, np.nan))
            f.flush()

    def write_table(self, group: str, columns: dict) -> None:
        """Write named 1-D arrays under ``/group`` (e.g. per-rank or per-shard stats)."""
        with self._open() as f:
            grp = f.require_group(group)
            for name, values in columns.items():
                if name in grp:
                    del grp[name]
                data = np.asarray(values)
                if data.dtype.kind == "U":  # text: HDF5 variable-length UTF-8 strings
                    data = data.astype(object)
                    grp.create_dataset(name, data=data, dtype=h5py.string_dtype())
                else:
                    grp.create_dataset(name, data=data)

    def write_ranks(self, records: list[RankStats]) -> None:
        """``/ranks``: one row per rank, in the order given."""
        self.write_table("ranks", {name: [getattr(r, name) for r in records]
                                   for name in RANK_FIELDS})

    def set_attrs(self, attrs: dict) -> None:
        with self._open() as f:
            for key, value in attrs.items():
                f.attrs[key] = value

    def rows(self) -> int:
        """Rows in ``/metrics`` so far."""
        with self._open() as f:
            return int(f["metrics/wall_seconds"].shape[0])

    def close(self, status: str = "complete") -> None:
        """Record how the run ended (once; later calls do nothing; thread-safe)."""
        if threading.current_thread() is threading.main_thread():
            for series in self.series_open:  # buffered rows first
                series.flush()
        with self.lock:  # the first status wins, whichever thread sets it
            if self.closed:
                return
            self.closed = True
            with h5py.File(self.path, "r+", locking=False) as f:
                f.attrs["status"] = status

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, kind, exc, tb) -> None:
        self.close("complete" if exc is None else f"failed: {exc}")


def _claim(path: Path, overwrite: bool, build) -> None:
    """Create ``path`` atomically with ``build(file)``'s content, or raise UserError."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write result file {path}: {exc}") from None
    if path.exists() and not overwrite:
        raise UserError(f"result file {path} exists: pass --overwrite to replace it,"
                        " or choose another run.name or --out")
    if path.exists():
        _check_replaceable(path)
    tmp = path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")
    try:
        with h5py.File(tmp, "w") as f:
            build(f)
        if overwrite:
            os.replace(tmp, path)
        else:
            os.link(tmp, path)
    except FileExistsError:
        raise UserError(f"result file {path} was just created by another run:"
                        " two runs cannot write one file") from None
    except OSError as exc:
        raise UserError(f"cannot write result file {path}: {exc}") from None
    finally:
        tmp.unlink(missing_ok=True)


def _check_replaceable(path: Path) -> None:
    """Refuse to replace a result that a live run on this host is still writing."""
    try:
        with h5py.File(path, "r", locking=False) as f:
            status = str(f.attrs.get("status", ""))
            pid, host = int(f.attrs.get("writer_pid", 0)), str(f.attrs.get("writer_host", ""))
    except (OSError, ValueError):
        return  # not a readable result file: nothing running writes it
    if status == "running" and host == socket.gethostname() and pid and process_alive(pid):
        raise UserError(f"result file {path} is being written by a running job (pid {pid});"
                        " it cannot be replaced until that job ends")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` on this host runs (a zombie, dead but not yet reaped by
    its launcher, counts as dead)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def read_metrics(path: str | Path, attempts: int = 5) -> tuple[dict, dict]:
    """The root attributes and the ``/metrics`` series of a result file.

    Reads without taking HDF5's file lock, so a live run's file can be read; a read
    that meets the writer mid-append is retried.

    Raises:
        UserError: missing, unreadable, or not an mpibelief result file (one line).
    """
    for attempt in range(attempts):
        try:
            return _read_metrics(Path(path))
        except OSError as exc:
            if not Path(path).exists() or attempt == attempts - 1:
                raise UserError(f"cannot read result file {path}: {exc}") from None
            time.sleep(0.05 * (attempt + 1))
    raise AssertionError("unreachable")


def _read_metrics(path: Path) -> tuple[dict, dict]:
    with h5py.File(path, "r", locking=False) as f:
        attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in f.attrs.items()}
        if "metrics" not in f or "status" not in attrs:
            raise UserError(f"{path} is not an mpibelief result file (no /metrics and"
                            " status)")
        series = {name: np.asarray(f["metrics"][name][()], np.float64)
                  for name in f["metrics"]}
        if any(series[n].ndim != 1 for n in series) or not set(METRICS) <= set(series):
            raise UserError(f"{path}: /metrics does not have this version's series"
                            f" ({', '.join(METRICS)})")
    return attrs, series
