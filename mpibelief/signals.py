"""The signals a run answers, as flags its loops poll (handlers only set flags).

- SIGTERM (how Slurm and ``kill`` end a job; ``mpiexec`` forwards it to every rank):
  write a checkpoint, then stop cleanly;
- SIGUSR1: write a checkpoint now and go on (Slurm's ``--signal`` before the time limit).

A handler runs between two bytecodes of the main thread, wherever it is, so it must not
call MPI or write files: it only sets a flag, and the algorithm acts at its next check.
Nor may it take a lock: a second signal can arrive while the first handler runs, and
then runs the handler again, in the same thread, on top of it (see :class:`Flag`).
"""

from __future__ import annotations

import signal
import threading


class Flag:
    """A flag that a signal handler may set: one attribute store, no lock.

    Not ``threading.Event``: its ``set()`` holds a lock, and a signal arriving while the
    handler holds it runs the handler again, which then waits forever for the lock its
    own thread holds.  Seen on a Slurm requeue, where every rank gets SIGTERM twice (from
    Slurm and from the batch script): one replica in ten hung in ``Event.set`` and the
    job never stopped.  A store to an attribute is atomic under the GIL, so the notice
    thread (:class:`~mpibelief.guard.NoticeListener`) may set it too.
    """

    __slots__ = ("_set",)

    def __init__(self):
        self._set = False

    def set(self) -> None:
        self._set = True

    def clear(self) -> None:
        self._set = False

    def is_set(self) -> bool:
        return self._set


class Signals:
    """Flags set by SIGTERM and SIGUSR1; ``install()`` once per process."""

    def __init__(self):
        self.terminate = Flag()
        self.checkpoint = Flag()

    def install(self) -> Signals:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, lambda *_: self.terminate.set())
            signal.signal(signal.SIGUSR1, lambda *_: self.checkpoint.set())
        return self

    def take_checkpoint(self) -> bool:
        """True once per SIGUSR1 received (the flag is cleared)."""
        if self.checkpoint.is_set():
            self.checkpoint.clear()
            return True
        return False
