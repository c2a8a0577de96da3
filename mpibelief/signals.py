"""The signals a run answers, as flags its loops poll (handlers only set flags).

- SIGTERM (how Slurm and ``kill`` end a job; ``mpiexec`` forwards it to every rank):
  write a checkpoint, then stop cleanly;
- SIGUSR1: write a checkpoint now and go on (Slurm's ``--signal`` before the time limit).

A handler runs between two bytecodes of the main thread, wherever it is, so it must not
call MPI or write files: it only sets a flag, and the algorithm acts at its next check.
"""

from __future__ import annotations

import signal
import threading


class Signals:
    """Flags set by SIGTERM and SIGUSR1; ``install()`` once per process."""

    def __init__(self):
        self.terminate = threading.Event()
        self.checkpoint = threading.Event()

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
