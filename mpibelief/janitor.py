"""Marks a result file failed when its job is killed before it can say so itself.

``mpiexec`` ends every rank with SIGKILL as soon as one dies, and SIGKILL cannot be
caught: the coordinator never gets to write ``status = failed``.  So the coordinator
starts this small watcher, in a session of its own (so the launcher's kill misses it),
with the pids of the ranks on its host.  It polls them; when the coordinator is gone
and the file still says ``running``, it records which rank died first and when, and
says so on the job's standard error (which it shares with the coordinator).  Ranks of
its host still running ``ORPHAN_GRACE`` seconds after the coordinator ended (however it
ended) it kills: their launcher is gone.  Seen under Slurm with Hydra's mpiexec, whose
ranks each run in a session of their own, so a step killed at the end of ``KillWait``
left its shards polling forever; a pidfd names the very process, never a reused pid.
Run: ``python -m mpibelief.janitor RESULT.h5 '{"rank": pid, ...}'`` (done by train.py).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time

ORPHAN_GRACE = 10.0  # seconds: a finished run's ranks leave MPI_Finalize well within it


def watch(path: str, pids: dict[int, int], coordinator: int,
          grace: float = ORPHAN_GRACE) -> None:
    """Wait (asleep, in ``poll(2)`` on pidfds) until the coordinator is gone.

    The launcher kills the other ranks within milliseconds of the first death; a pidfd
    wakes this process at the first one, so the rank that died first is usually the
    only one found dead; when several are, all are named.
    """
    fds = {}
    for rank, pid in pids.items():
        try:
            fds[os.pidfd_open(pid)] = rank
        except OSError:  # already gone (and reaped): it died before any we can watch
            fds[-1 - rank] = rank
    from mpibelief.results import process_alive  # h5py: slow to import on a busy machine

    poller = select.poll()
    for fd in fds:
        if fd >= 0:
            poller.register(fd, select.POLLIN)
    first_dead = sorted(rank for fd, rank in fds.items() if fd < 0)
    when = time.strftime("%H:%M:%S") if first_dead else ""
    wait = 0  # the first look takes the ranks that died (unreaped) before we started
    while True:
        ready = poller.poll(wait)
        wait = 1000
        if not first_dead and ready:
            first_dead = sorted(fds[fd] for fd, _ in ready)
            when = time.strftime("%H:%M:%S")
        for fd, _ in ready:
            poller.unregister(fd)
            del fds[fd]
        if not process_alive(pids[coordinator]):
            break
    report(path, first_dead or [coordinator], when or time.strftime("%H:%M:%S"))
    reap(poller, {fd: rank for fd, rank in fds.items() if fd >= 0}, grace)


def reap(poller, alive: dict[int, int], grace: float) -> None:
    """SIGKILL the ranks (pidfd -> rank) still running ``grace`` seconds from now."""
    deadline = time.monotonic() + grace
    while alive and time.monotonic() < deadline:
        for fd, _ in poller.poll(max(int(1000 * (deadline - time.monotonic())), 1)):
            poller.unregister(fd)
            del alive[fd]
    for fd in alive:
        with contextlib.suppress(ProcessLookupError):  # it ended meanwhile
            signal.pidfd_send_signal(fd, signal.SIGKILL)
    if alive:
        print(f"mpibelief: error: rank(s) {sorted(alive.values())} still ran {grace:g} s"
              " after the coordinator ended (their launcher is gone); killed them",
              file=sys.stderr, flush=True)


def report(path: str, first_dead: list[int], when: str) -> None:
    """Mark the file failed (if it still says running) and say so on stderr."""
    who = (f"rank {first_dead[0]}" if len(first_dead) == 1
           else f"one of ranks {first_dead}")
    message = f"{who} died at {when} (killed or crashed) and the job was ended"
    import h5py

    try:
        with h5py.File(path, "r+", locking=False) as f:
            if f.attrs.get("status") != "running":
                return  # the run said how it ended itself
            f.attrs["status"] = f"failed: {message}"
    except OSError:
        return  # the file went away or is unreadable: nothing to mark
    print(f"mpibelief: error: {message}; {path} records it", file=sys.stderr, flush=True)


def main() -> None:
    path, pids = sys.argv[1], {int(k): int(v) for k, v in json.loads(sys.argv[2]).items()}
    watch(path, pids, int(sys.argv[3]) if len(sys.argv) > 3 else 0)


if __name__ == "__main__":
    main()
