"""The parameter-server client: pull, push and load over one-sided windows only.

What replicas (and the coordinator) use to talk to the shards.  A client covers one
contiguous range ``[lo, hi)`` of the flat parameter vector (the whole vector for a
replica of one partition; its partition's range for a model-parallel one) and talks
only to the shards whose slices meet that range.  No two-sided message is ever sent from
here: a pull ``Get``s each shard's published parameter buffer, a push ``Put``s each
gradient slice into this client's own inbox slot on its shard and then publishes it
with one atomic word.  The protocols are drawn on
:class:`~mpibelief.ps.window.ParamWindow` and :class:`~mpibelief.ps.window.InboxWindow`.

A push with any non-finite value is refused as a whole.  Every shard checks the slice
it receives (for SGD inside the update pass, so for free) and refuses it entirely.  With
several shards that alone could apply the finite slices of a push whose NaN sits in
another one, so then the client checks the full gradient first (one extra pass over
it, measured by ``bench/rma.py`` as ``push_checked``) and, on failure, publishes a
"refused" word without data on every shard: every shard counts it, none applies it.
With one shard the shard's check is the same check, and the client skips its own.
"""

from __future__ import annotations

import numpy as np

from mpibelief.clock import WallClock
from mpibelief.comm import poll
from mpibelief.errors import UserError
from mpibelief.layout import Part
from mpibelief.optim import all_finite
from mpibelief.ps.state import GRADIENT, LOAD, REFUSED, ClientStats
from mpibelief.ps.window import InboxWindow, ParamWindow, encode_slot


class ParameterClient:
    """One rank's access to the shards; made by ``ParameterServer.client()``.

    Args:
        params, inbox: the server's windows.
        parts: the shards this client's range meets (:func:`parts_of`).
        index: this rank's client index (its inbox slots), or None: pull only.
        size: the length of the client's range.
        stall_seconds: a wait for a shard longer than this raises a one-line error
            naming the shard (None: wait for ever).

    Attributes:
        check_finite: check the whole gradient before a push (default: with > 1 shard).
    """

    def __init__(self, params: ParamWindow, inbox: InboxWindow, parts: list[Part],
                 index: int | None, size: int, clock=None, stall_seconds: float | None = None):
        self.params, self.inbox, self.parts = params, inbox, parts
        self.stall_seconds = stall_seconds
        self.index, self.n_params = index, size
        self.clock = clock or WallClock()
        self.next_slot = [0] * len(parts)
        self.stats = ClientStats()
        self.check_finite = len(parts) > 1
        # Slot words and meta being published, alive until flushed; slots known free.
        self._words = np.zeros((len(parts), 1), np.int64)
        self._old = np.zeros((len(parts), 1), np.int64)
        self._meta = np.zeros(InboxWindow.META, np.int64)
        self._known_free = [[False] * inbox.depth for _ in parts]

    def pull(self, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (float32, the range's length) with the shards' current parameters.

        Each shard's part is one consistent version (never a mix of two updates).

        Returns:
            the version read from each shard met (int64, in slice order), for ``push``.
        """
        self._check(out, "out")
        start = self.clock.now()
        p = self.params
        versions = np.empty(len(self.parts), np.int64)
        pinned = []
        for s, part in enumerate(self.parts):
            versions[s], buffer = self._pin(part.rank)
            pinned.append(buffer)
            at = p.buffer_offset(part.rank, buffer) + 4 * part.offset
            p.get(out[part.local], part.rank, at)
        p.flush_all()  # every Get complete: the buffers may be unpinned
        for part, buffer in zip(self.parts, pinned, strict=True):
            p.fetch_and_op(-1, part.rank, p.readers_offset(buffer))
        self.stats.pulls += 1
        self.stats.bytes_pulled += out.nbytes
        self.stats.pull_seconds += self.clock.now() - start
        return versions

    def _pin(self, rank: int) -> tuple[int, int]:
        """Pin the current buffer of shard ``rank``; returns ``(version, buffer)``.

        The re-read proves the pin landed while the buffer was still current; the
        shard checks pins only after publishing a newer one, so it cannot miss ours.
        """
        p = self.params
        while True:
            version = p.read_word(rank, ParamWindow.CURRENT)
            buffer = version % p.buffers
            p.fetch_and_op(1, rank, p.readers_offset(buffer))
            if p.read_word(rank, ParamWindow.CURRENT) == version:
                return version, buffer
            p.fetch_and_op(-1, rank, p.readers_offset(buffer))

    def push(self, grad: np.ndarray, versions=None, samples: int = 0) -> None:
        """Send the gradient of this client's range, split over the shards it meets.

        Returns once every part is in its shard's window memory (flushed) and
        published; the shards apply it asynchronously (``wait_applied`` waits).

        Args:
            grad: float32, the range's length; not modified, reusable on return.
            versions: what ``pull`` returned for the parameters ``grad`` was computed
                from, or None when staleness should not be recorded.
            samples: how many training samples ``grad`` sums (counted by the shards).
        """
        self._check(grad, "grad")
        start = self.clock.now()
        finite = all_finite(grad) if self.check_finite else True
        self._send(grad, GRADIENT if finite else REFUSED, versions, samples)
        self.stats.pushes += 1
        self.stats.refused += int(not finite)
        self.stats.bytes_pushed += grad.nbytes if finite else 0
        self.stats.push_seconds += self.clock.now() - start

    def load(self, values: np.ndarray) -> None:
        """Make ``values`` the shards' parameters on this range, as a new version.

        Travels like a push (so it is ordered with this client's pushes and never
        races an update) and returns once every shard has published it.
        """
        self._check(values, "values")
        self._send(values, LOAD, None, 0)
        self.wait_applied()

    set_params = load

    def _send(self, data: np.ndarray, kind: int, versions, samples: int) -> None:
        if self.index is None:
            raise RuntimeError("this rank has no inbox slots: it is not a client")
        inbox = self.inbox
        slots = [self._free_slot(s, part.rank) for s, part in enumerate(self.parts)]
        self._meta[0] = samples
        if kind != REFUSED:
            for part, slot in zip(self.parts, slots, strict=True):
                inbox.put(self._meta, part.rank, inbox.slot_offset(part.rank, self.index, slot))
                inbox.put(data[part.local], part.rank,
                          inbox.data_offset(part.rank, self.index, slot))
            inbox.flush_all()  # the data is in the shards' memory before it is announced
        for s, (part, slot) in enumerate(zip(self.parts, slots, strict=True)):
            version = -1 if versions is None else int(versions[s])
            self._words[s] = encode_slot(kind, version)
            inbox.publish(self._words[s], self._old[s], part.rank, self.index, slot)
            self._known_free[s][slot] = False
            self.next_slot[s] = (slot + 1) % inbox.depth
        inbox.flush_all()
        if self._old.any():  # free: the words replaced must all have been EMPTY
            raise RuntimeError(f"client {self.index}: published over a full slot "
                               f"(words {self._old.ravel().tolist()}): exactly-once broken")

    def _free_slot(self, s: int, rank: int) -> int:
        """This client's next slot on shard ``s``, once the shard has handed it back."""
        slot = self.next_slot[s]
        if not self._known_free[s][slot]:
            self._wait_words(rank, [self.inbox.word_offset(self.index, slot)])
        return slot

    def wait_applied(self) -> None:
        """Wait until the shards have consumed every push of this client."""
        if self.index is None:
            return
        depth = self.inbox.depth
        for s, part in enumerate(self.parts):
            self._wait_words(part.rank, [self.inbox.word_offset(self.index, k)
                                         for k in range(depth)])
            self._known_free[s] = [True] * depth  # only this client refills them

    def _wait_words(self, rank: int, offsets: list[int]) -> None:
        """Sleep-poll until every word at ``offsets`` on ``rank`` reads 0."""
        def empty() -> bool:
            return not any(self.inbox.read_word(rank, off) for off in offsets)

        try:
            self.stats.wait_seconds += poll(empty, low=10e-6, high=1e-3,
                                            timeout=self.stall_seconds)
        except TimeoutError:
            raise UserError(f"shard rank {rank} has not taken a push for"
                            f" {self.stall_seconds:g} s (stalled or stopped?)") from None

    def _check(self, array: np.ndarray, name: str) -> None:
        if array.dtype != np.float32 or array.shape != (self.n_params,):
            raise ValueError(f"{name} must be float32 of shape ({self.n_params},), "
                             f"got {array.dtype} {array.shape}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
