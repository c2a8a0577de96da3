"""The parameter-server client: pull, push and set_params over one-sided windows only.

What replicas (and the coordinator) use to talk to the shards of
:mod:`mpibelief.server`.  No two-sided message is ever sent from here: a pull ``Get``s
each shard's published parameter buffer, a push ``Put``s each gradient slice into this
client's own inbox slot on its shard and then publishes it with one atomic word.  The
protocols are described on :class:`~mpibelief.window.ParamWindow` and
:class:`~mpibelief.window.InboxWindow`.

A push with any non-finite value is refused as a whole.  Every shard checks the slice
it receives (for SGD inside the update pass, so for free) and refuses it entirely.  With
several shards that alone could apply the finite slices of a push whose NaN sits in
another one, so then the client checks the full gradient first (one extra pass over
it, measured by ``bench/rma.py`` as ``push_checked``) and, on failure, publishes a
"refused" word without data on every shard: every shard counts it, none applies it.
With one shard the shard's check is the same check, and the client skips its own.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numba
import numpy as np

from mpibelief.window import GRADIENT, REFUSED, Backoff, InboxWindow, ParamWindow, encode_slot


@numba.njit(cache=True, fastmath={"reassoc"})
def _nan_probe(x):
    # g * 0 is 0 for finite g and NaN for inf/NaN; "reassoc" lets the sum vectorise
    # while NaNs keep their meaning (no "nnan" flag).
    probe = np.float32(0.0)
    for i in range(x.size):
        probe += x[i] * np.float32(0.0)
    return probe


def all_finite(x: np.ndarray) -> bool:
    """True when a float32 array holds no NaN or inf (one vectorised pass, no temporary)."""
    return bool(_nan_probe(x) == 0.0)


@dataclass
class ClientStats:
    """Traffic and time of one client.

    Attributes:
        push_seconds: wall time inside ``push``, including any wait for a free slot.
        wait_seconds: waiting for the shards: for a free inbox slot (inside ``push``)
            and in ``wait_applied``; time the client could not hide behind its work.
    """

    pulls: int = 0
    pushes: int = 0
    refused: int = 0
    bytes_pulled: int = 0
    bytes_pushed: int = 0
    pull_seconds: float = 0.0
    push_seconds: float = 0.0
    wait_seconds: float = 0.0


class ParameterClient:
    """One rank's access to the shards; made by ``ParameterServer.client()``.

    Args:
        params, inbox: the server's windows.
        shard_ranks: the shard ranks, in slice order.
        slices: each shard's slice of the flat vector.
        index: this rank's client index (its inbox slots), or None: pull only.

    Attributes:
        check_finite: check the whole gradient before a push (default: with > 1 shard).
    """

    def __init__(self, params: ParamWindow, inbox: InboxWindow, shard_ranks: list[int],
                 slices: list[slice], index: int | None):
        self.params, self.inbox = params, inbox
        self.shards = list(zip(shard_ranks, slices, strict=True))
        self.n_params = slices[-1].stop
        self.index = index
        self.next_slot = [0] * len(shard_ranks)
        self.stats = ClientStats()
        self.check_finite = len(self.shards) > 1
        # Slot words being published, alive until flushed; slots known to be free.
        self._words = np.zeros((len(self.shards), 1), np.int64)
        self._old = np.zeros((len(self.shards), 1), np.int64)
        self._known_free = [[False] * inbox.depth for _ in self.shards]

    def pull(self, out: np.ndarray) -> np.ndarray:
        """Fill ``out`` (float32, ``n_params``) with every shard's current parameters.

        Each shard's slice is one consistent version (never a mix of two updates).

        Returns:
            the version read from each shard (int64, one per shard), for ``push``.
        """
        self._check(out, "out")
        start = time.perf_counter()
        versions = np.empty(len(self.shards), np.int64)
        pinned = []
        for s, (rank, part) in enumerate(self.shards):
            versions[s], buffer = self._pin(rank)
            pinned.append(buffer)
            self.params.get(out[part], rank, self.params.buffer_offset(rank, buffer))
        self.params.flush_all()  # every Get complete: the buffers may be unpinned
        for (rank, _), buffer in zip(self.shards, pinned, strict=True):
            self.params.fetch_and_op(-1, rank, self.params.readers_offset(buffer))
        self.stats.pulls += 1
        self.stats.bytes_pulled += out.nbytes
        self.stats.pull_seconds += time.perf_counter() - start
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

    def push(self, grad: np.ndarray, versions=None) -> None:
        """Send the gradient of the FULL flat vector, split over the shards.

        Returns once every slice is in its shard's window memory (flushed) and
        published; the shards apply it asynchronously (``wait_applied`` waits).

        Args:
            grad: float32, ``n_params`` long; not modified, reusable on return.
            versions: what ``pull`` returned for the parameters ``grad`` was computed
                from, or None when staleness should not be recorded.
        """
        if self.index is None:
            raise RuntimeError("this rank has no inbox slots: it is not in client_ranks")
        self._check(grad, "grad")
        start = time.perf_counter()
        finite = all_finite(grad) if self.check_finite else True
        slots = [self._free_slot(s, rank) for s, (rank, _) in enumerate(self.shards)]
        if finite:
            for (rank, part), slot in zip(self.shards, slots, strict=True):
                offset = self.inbox.slot_offset(rank, self.index, slot)
                self.inbox.put(grad[part], rank, offset)
            self.inbox.flush_all()  # the data is in the shards' memory before it is announced
        kind = GRADIENT if finite else REFUSED
        for s, ((rank, _), slot) in enumerate(zip(self.shards, slots, strict=True)):
            version = -1 if versions is None else int(versions[s])
            self._words[s] = encode_slot(kind, version)
            self.inbox.publish(self._words[s], self._old[s], rank, self.index, slot)
            self._known_free[s][slot] = False
            self.next_slot[s] = (slot + 1) % self.inbox.depth
        self.inbox.flush_all()
        self.stats.pushes += 1
        self.stats.refused += int(not finite)
        self.stats.bytes_pushed += grad.nbytes if finite else 0
        self.stats.push_seconds += time.perf_counter() - start

    def _free_slot(self, s: int, rank: int) -> int:
        """This client's next slot on shard ``s``, once the shard has handed it back."""
        slot = self.next_slot[s]
        if not self._known_free[s][slot]:
            offset = self.inbox.word_offset(self.index, slot)
            if self.inbox.read_word(rank, offset):
                self._wait_words(rank, [offset])
        return slot

    def wait_applied(self) -> None:
        """Wait until the shards have consumed every push of this client."""
        if self.index is None:
            return
        depth = self.inbox.depth
        for s, (rank, _) in enumerate(self.shards):
            offsets = [self.inbox.word_offset(self.index, k) for k in range(depth)]
            self._wait_words(rank, offsets)
            self._known_free[s] = [True] * depth  # only this client refills them

    def _wait_words(self, rank: int, offsets: list[int]) -> None:
        """Sleep-poll until every word at ``offsets`` on ``rank`` reads 0."""
        start = time.perf_counter()
        backoff = Backoff(low=10e-6, high=1e-3)
        while any(self.inbox.read_word(rank, off) for off in offsets):
            backoff.sleep()
        self.stats.wait_seconds += time.perf_counter() - start

    def set_params(self, flat: np.ndarray) -> None:
        """Overwrite every shard's current parameters with ``flat`` (init, warmstart).

        The caller guarantees a quiet moment: no push being applied and no pull in
        flight (e.g. one rank calls it, then everyone meets at a barrier).  The shards
        may be inside ``serve()`` or not; the version is not changed.
        """
        self._check(flat, "flat")
        p = self.params
        for rank, part in self.shards:
            buffer = p.read_word(rank, ParamWindow.CURRENT) % p.buffers
            p.put(flat[part], rank, p.buffer_offset(rank, buffer))
        p.flush_all()

    def _check(self, array: np.ndarray, name: str) -> None:
        if array.dtype != np.float32 or array.shape != (self.n_params,):
            raise ValueError(f"{name} must be float32 of shape ({self.n_params},), "
                             f"got {array.dtype} {array.shape}")
        if not array.flags.c_contiguous:
            raise ValueError(f"{name} must be contiguous")

