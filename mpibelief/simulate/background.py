"""The machine's other load while a job runs: how many other sessions want a core.

A simulated workstation (:class:`~mpibelief.simulate.cores.Machine`) shares its cores
among the job's ranks and ``background`` other runnable entities.  On this machine the
scheduler shares the cores by session (autogroups: see :mod:`.cores`), so the figure
that slows a rank is the number of *other sessions* with at least one runnable task, not
the load average (tasks, averaged over a minute) nor ``procs_running`` (tasks: one
pytest session with three busy threads counts three there and one here).

:class:`BackgroundLoad` samples it from ``/proc`` every ``every`` seconds while a job
runs, leaving out the job's own processes (the launcher's descendants) and the sampler's
process.  A sample reads every task's state (``/proc/PID/task/TID/stat``) and, for the
processes with a runnable task, their session group (``/proc/PID/autogroup``).

Why during the job and not before it: the other helpers' jobs on this machine start and
stop within seconds (``procs_running`` read 3 to 12 within 4 s; a calibration run's
replica got 0.32 of a core and the real run one minute later 0.43).  What the sampler
sees is the machine the job met, not the job: it never reads the job's own ranks.
"""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

PROC = Path("/proc")


def _stat(path: str) -> list[bytes]:
    """The fields of a ``stat`` file after the command (which may hold spaces):
    ``[state, parent pid, ...]``."""
    with open(path, "rb") as f:
        return f.read().rsplit(b")", 1)[1].split()


THREADS = 17  # num_threads, counted in _stat's fields (state is 0)


def snapshot() -> dict[int, tuple[int, bool]]:
    """Every process now: ``pid -> (parent pid, has a runnable task)``."""
    found = {}
    for entry in os.scandir(PROC):
        if not entry.name.isdigit():
            continue
        try:
            fields = _stat(f"{entry.path}/stat")
            runnable = fields[0] == b"R"
            if not runnable and int(fields[THREADS]) > 1:  # another thread may be
                runnable = any(_stat(f"{task.path}/stat")[0] == b"R"
                               for task in os.scandir(f"{entry.path}/task"))
        except (OSError, IndexError, ValueError):
            continue  # it ended while we looked
        found[int(entry.name)] = (int(fields[1]), runnable)
    return found


def descendants(processes: dict[int, tuple[int, bool]], root: int) -> set[int]:
    """``root`` and every process below it."""
    children: dict[int, list[int]] = {}
    for pid, (parent, _) in processes.items():
        children.setdefault(parent, []).append(pid)
    found, todo = {root}, [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def other_runnable_sessions(root: int | None) -> int:
    """Sessions with a runnable task, besides ``root``'s tree and this process."""
    processes = snapshot()
    mine = descendants(processes, root) if root is not None else set()
    mine.add(os.getpid())
    groups = set()
    for pid, (_, runnable) in processes.items():
        if runnable and pid not in mine:
            try:
                groups.add((PROC / str(pid) / "autogroup").read_text().split()[0])
            except (OSError, IndexError):
                groups.add(f"pid {pid}")  # no autogroup file: count it on its own
    return len(groups)


class BackgroundLoad:
    """Samples :func:`other_runnable_sessions` in a thread; a context manager.

    ``with BackgroundLoad(every=0.1) as load: load.root = job.pid; job.wait()``, then
    ``load.mean()`` (``load.samples`` holds every sample).  Each sample cost about
    3 ms of CPU here (100 processes, 160 tasks), so 10 per second take about 3% of a
    core from the job it measures.
    """

    def __init__(self, every: float = 0.1):
        self.every, self.root = every, None
        self.samples: list[int] = []
        self.times: list[float] = []  # time.monotonic() of each sample
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every):
            self.samples.append(other_runnable_sessions(self.root))
            self.times.append(time.monotonic())

    def __enter__(self) -> BackgroundLoad:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

