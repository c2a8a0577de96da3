"""A parameter shard's MPI life: the inbox poll loop and the table of commands.

:class:`ShardServer` drives a :class:`~mpibelief.ps.state.ShardState` (the shard's
plain-numpy state) over the server's windows: it polls its inbox window for published
pushes and applies them one-sidedly, and between polls it dispatches two-sided control
messages through a table of commands (``stop`` today; Sandblaster's vector commands
register themselves).  Why this data path (measured on the 2-core workstation, MPICH 5
shared memory; see ``bench/rma.py``): a raw ``Accumulate(SUM)`` of 1 MiB float32 ran at
about half the speed of ``Get`` or ``Put`` (7 vs 14 GB/s), and an accumulating inbox
would still need an atomic take-and-zero by the shard; a ``Put`` into a slot that only
one client writes needs no atomicity on the data at all, so each push is one ``Put``
plus one atomic word, and the shard reads the gradient once, inside its update pass.
And no locks on the data path: a ``Lock`` is granted by the target, which on this MPICH
means when the shard next enters MPI, so every window stays in one ``Lock_all`` epoch.

Exactly once, by construction: a slot's word goes 0 -> published only by its client,
after its ``Put`` is flushed; published -> 0 only by the shard, after the slot is
consumed; each word transition is one atomic operation, and the shard consumes each
client's slots in the order the client fills them (so one client's pushes are applied
in push order, which makes Adagrad deterministic for a single client).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
from mpi4py import MPI

from mpibelief import checkpoint
from mpibelief.clock import WallClock
from mpibelief.comm import Backoff, Tag, poll
from mpibelief.errors import UserError
from mpibelief.ps.state import GRADIENT, LOAD, PACKET, ShardState, ShardStats
from mpibelief.ps.window import InboxWindow, ParamWindow, decode_slot


class ShardServer:
    """The MPI side of one shard: its inbox poll loop and its command table.

    Args:
        params, inbox: the server's windows (this rank holds a slice of each).
        state: the shard's state over ``params``' buffers.
        ctl: the server's private communicator for commands (:attr:`Tag.COMMAND`).
        offsets: for each client, where its data starts in this shard's slice.
    """

    def __init__(self, params: ParamWindow, inbox: InboxWindow, state: ShardState,
                 ctl: MPI.Intracomm, offsets: list[int], clock=None):
        self.params, self.inbox, self.state, self.ctl = params, inbox, state, ctl
        self.offsets, self.clock = offsets, clock or WallClock()
        self.rank = params.rank
        self.expect = [0] * inbox.clients  # next slot of each client, in fill order
        self.first = 0  # client scanned first, rotated for fairness
        self.stopping = False
        self.commands: dict[str, Callable] = {"stop": self._stop,
                                              "checkpoint": self._checkpoint,
                                              "restore": self._restore}

    def register(self, name: str, handler: Callable) -> None:
        """Add a command: ``handler(source, *args)``; a non-None return is the reply."""
        self.commands[name] = handler

    def _stop(self, source: int) -> None:
        self.stopping = True

    def _checkpoint(self, source: int, folder: str, number: int) -> str:
        """Write this shard's part of checkpoint ``number``; reply its checksum or error."""
        arrays, counters = self.state.snapshot()
        try:
            return checkpoint.write_part(Path(folder), number, self.state.stats.shard, arrays,
                                         {"counters": json.dumps(counters)})
        except OSError as exc:
            return f"error: shard {self.state.stats.shard} (rank {self.rank}): {exc}"

    def _restore(self, source: int, folder: str, number: int) -> str:
        """Load this shard's part of checkpoint ``number`` and publish it; reply "ok".

        Only before any replica starts (``--resume``): nobody pulls or pushes meanwhile.
        """
        shard = self.state.stats.shard
        try:
            arrays, attrs = checkpoint.read_part(Path(folder), number, shard)
            self.wait_unread(self.state.version % self.params.buffers)
            self.params.sync()
            self.state.restore(arrays, json.loads(attrs["counters"]))
        except (UserError, ValueError, KeyError) as exc:
            return f"error: shard {shard} (rank {self.rank}): {exc}"
        p = self.params
        p.sync()  # the restored buffer is complete before its version is published
        p.write_word(self.state.version, self.rank, ParamWindow.CURRENT)
        for client, samples in enumerate(self.state.samples):  # the words start at 0
            p.fetch_and_op(int(samples), self.rank, p.samples_offset(client))
        return "ok"

    def serve(self, tick: Callable[[], None] | None = None) -> ShardStats:
        """Apply pushes and run commands until ``stop``; returns the shard's statistics.

        Idle, it sleeps between polls (200 us growing to 1 ms), and every poll enters
        MPI (``Iprobe``), which keeps weak-progress transports moving.  Not shorter:
        with more ranks than cores each wake-up may preempt a replica in the middle of
        its next push (measured: a 1 MiB push fell from about 0.65 to 0.45-0.6 of raw
        ``Get`` speed with 50 us), while a replica's step takes milliseconds anyway.
        After ``stop`` it drains every push already published, so a push that returned
        before ``stop`` was sent is always applied.  ``tick()``, if given, is called once
        per loop (the algorithm's hook, e.g. to pass on a signal).
        """
        stats, clock = self.state.stats, self.clock
        backoff = Backoff(low=200e-6, high=1e-3)
        cpu, wall = clock.cpu(), clock.now()
        while True:
            start = clock.now()
            if tick is not None:
                tick()
            self.dispatch()
            if self.poll():
                stats.busy_seconds += clock.now() - start
                backoff.reset()
                continue
            if self.stopping:
                break
            backoff.sleep()
            stats.idle_seconds += clock.now() - start
        stats.cpu_seconds += clock.cpu() - cpu
        stats.wall_seconds += clock.now() - wall
        self.stopping = False
        return stats

    def dispatch(self) -> None:
        """Run every command waiting (in arrival order); reply where the handler returns."""
        status = MPI.Status()
        while self.ctl.Iprobe(MPI.ANY_SOURCE, Tag.COMMAND, status):
            source = status.Get_source()
            name, *args = self.ctl.recv(source=source, tag=Tag.COMMAND)
            if name not in self.commands:
                raise RuntimeError(f"shard {self.state.stats.shard}: unknown command {name!r}")
            reply = self.commands[name](source, *args)
            if reply is not None:
                self.ctl.send(reply, dest=source, tag=Tag.REPLY)

    def poll(self) -> int:
        """Consume every published slot found in one snapshot of loads; returns how many."""
        words = self.inbox.local_words()
        clients, depth = words.shape
        done, cpu = 0, None
        for i in range(clients):
            c = (self.first + i) % clients
            for _ in range(depth):
                if not words[c, self.expect[c]]:
                    break
                cpu = self.clock.cpu() if cpu is None else cpu
                # A load saw it published; the exact word (kind, version) by one atomic.
                word = self.inbox.read_word(self.rank, self.inbox.word_offset(c, self.expect[c]))
                self.consume(c, self.expect[c], word)
                self.expect[c] = (self.expect[c] + 1) % depth
                done += 1
        if cpu is not None:
            self.state.stats.busy_cpu_seconds += self.clock.cpu() - cpu
        self.first = (self.first + 1) % max(clients, 1)
        return done

    def consume(self, client: int, slot: int, word: int) -> None:
        """Apply (or refuse) one published slot, then hand the slot back to its client."""
        self.inbox.sync()  # the client's Put is visible before we load the slot
        kind, version = decode_slot(word)
        meta = self.inbox.local_meta(client, slot)
        samples = int(meta[InboxWindow.SAMPLES])
        state, p = self.state, self.params
        self.wait_unread((state.version + 1) % p.buffers)
        p.sync()  # order our window loads after the readers' release
        data, lo = self.inbox.local_slot(client, slot), self.offsets[client]
        if kind == PACKET:  # k packed words in the slot, tau's bits in the meta
            words = data[:int(meta[InboxWindow.WORDS])].view(np.uint32)
            tau = np.array([meta[InboxWindow.TAU]], np.uint32).view(np.float32)[0]
            fresh = state.consume_packet(words, tau, lo, data.size, version, client, samples)
        else:
            fresh = state.consume(kind, data, lo, version, client, samples)
        if fresh:
            p.sync()  # the new buffer is complete before anyone can see it published
            p.write_word(state.version, self.rank, ParamWindow.CURRENT)
            if kind in (GRADIENT, PACKET) and samples:
                p.fetch_and_op(samples, self.rank, p.samples_offset(client))
        self.inbox.sync()  # our loads of the slot finish before the client may reuse it
        self.inbox.write_word(0, self.rank, self.inbox.word_offset(client, slot))

    def publish(self, values: np.ndarray) -> int:
        """Make ``values`` (the whole slice) the next version; returns that version.

        The path a ``LOAD`` push takes, for a command that computed the values on the
        shard (Sandblaster's trial parameters): written into the buffer nobody reads,
        then announced with one atomic word, so a pull sees the old or the new version,
        never a mix.
        """
        state, p = self.state, self.params
        self.wait_unread((state.version + 1) % p.buffers)
        p.sync()
        state.consume(LOAD, values)
        p.sync()  # the new buffer is complete before anyone can see it published
        p.write_word(state.version, self.rank, ParamWindow.CURRENT)
        return state.version

    def wait_unread(self, buffer: int) -> None:
        """Wait until no pull is reading ``buffer`` (pulls pinned it while it was current).

        New pins only land on the current buffer, so this wait is bounded by one Get.
        """
        offset = self.params.readers_offset(buffer)

        def unread() -> bool:
            return not self.params.read_word(self.rank, offset)

        self.state.stats.reader_wait_seconds += poll(unread, low=5e-6, high=200e-6)
