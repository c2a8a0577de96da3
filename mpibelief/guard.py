"""What guards a run from outside its algorithm: inputs, memory, and how it ends.

- :func:`check_result_path`: the result file is never one of the run's inputs;
- :func:`check_memory`: a model too large for this machine is a one-line error, not an
  out-of-memory kill halfway through allocating it;
- :class:`NoticeListener`: on the coordinating rank, a thread that hears other ranks
  say they are failing (or got SIGTERM) and records it in the result file at once, so
  the file says why a job ended, whichever rank failed;
- :func:`start_janitor`: a detached watcher that marks the file failed if the job is
  killed before it can (see :mod:`mpibelief.janitor`).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from pathlib import Path

from mpibelief.comm import Tag
from mpibelief.errors import ConfigError, UserError


def check_result_path(cfg, path: Path) -> None:
    """Refuse a result path that is the config file, the data or the feature cache."""
    target = path.resolve()
    inputs = [("the config file", getattr(cfg, "source", "")), ("the training data",
              cfg.data.path), ("the feature cache", cfg.data.cache_dir)]
    for what, name in inputs:
        if not name or name.startswith("<"):
            continue
        source = Path(name).resolve()
        if target == source or source in target.parents:
            raise ConfigError(f"result file {path} is {what} ({name}) of this run:"
                              " choose another --out or run.name")


def check_memory(n_params: int, copies: int = 4) -> None:
    """One line instead of an out-of-memory kill: parameters, gradients and their kin."""
    need = n_params * 4 * copies
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        have = int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        have = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > have:
        raise ConfigError(f"the model has {n_params:,} parameters: about {need / 2**30:.1f} GiB"
                          f" per rank, and this machine has {have / 2**30:.1f} GiB available")


class NoticeListener(threading.Thread):
    """Receives ``(kind, text)`` notices on ``comm`` (tag :attr:`Tag.NOTICE`).

    ``failed``: the sender is about to abort the job; its reason goes into the result
    file now, because the abort will not let anyone write it later.  ``sigterm``: the
    sender got SIGTERM; the run's SIGTERM flag is set, so the coordinator checkpoints
    and stops.  Polls every 50 ms (MPI is initialised with MPI_THREAD_MULTIPLE).
    """

    def __init__(self, comm, writer, signals):
        super().__init__(name="mpibelief-notices", daemon=True)
        self.comm, self.writer, self.signals = comm, writer, signals
        self.done = threading.Event()

    def run(self) -> None:
        from mpi4py import MPI

        while not self.done.is_set():
            request, status = self.comm.irecv(source=MPI.ANY_SOURCE, tag=Tag.NOTICE), None
            while not self.done.is_set():
                status = MPI.Status()
                flag, message = request.test(status)
                if flag:
                    self.handle(status.Get_source(), *message)
                    break
                self.done.wait(0.05)
            else:
                request.Cancel()
                request.Wait()  # complete the cancelled receive (uppercase: no unpickling)

    def handle(self, source: int, kind: str, text: str) -> None:
        if kind == "failed" and self.writer is not None:
            self.writer.close(f"failed: rank {source}: {text}")
        elif kind == "sigterm":
            self.signals.terminate.set()

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=1.0)


def send_notice(kind: str, text: str) -> None:
    """From a failing rank (not the coordinator): tell rank 0, without waiting long."""
    from mpi4py import MPI

    world = MPI.COMM_WORLD
    if world.size > 1 and world.rank != 0:
        request = world.isend((kind, text), dest=0, tag=Tag.NOTICE)
        flag = False
        for _ in range(100):  # at most ~0.2 s: the abort follows anyway
            flag, _ = request.test()
            if flag:
                break
            threading.Event().wait(0.002)


def start_janitor(path: Path, pids: dict[int, int], coordinator: int) -> None:
    """Start the detached watcher of :mod:`mpibelief.janitor` for this run's file."""
    try:
        subprocess.Popen(
            [sys.executable, "-m", "mpibelief.janitor", str(path), json.dumps(pids),
             str(coordinator)],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
            start_new_session=True, close_fds=True)  # stderr shared: it may report there
    except OSError as exc:  # the run goes on; only the after-death marking is lost
        raise UserError(f"cannot start the result-file watcher: {exc}") from None
