"""One class per RMA window: the raw window, the parameter buffers and the push inboxes.

Every window here is made with ``MPI.Win.Allocate`` (passive-target locks are portable
only on memory the MPI library allocated) and lives inside one ``Lock_all`` epoch from
construction to ``free()``.  That choice is measured, not stylistic: on MPICH's shared
memory path a ``Lock``/``Lock_all`` is granted by the *target*, so it waits until the
target next enters MPI (up to a whole sleep of an idle shard), whereas ``Get``, ``Put``,
the accumulates and ``Flush`` inside an open epoch complete at the origin without the
target.  With one long epoch no data-path call ever waits for a sleeping shard;
``Flush`` marks completion and the atomic accumulates below give the ordering.

Byte displacements throughout (``disp_unit=1``), so one window can hold an int64
header beside float32 data.  Like ``mpi4py.util.sync``, each class owns one window and
takes ``comm=``.
"""

from __future__ import annotations

import time

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_barrier

ALIGN = 64  # cache line: header words and data buffers never share one
WORD = np.dtype(np.int64)
FLOAT = np.dtype(np.float32)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    return MPI.Datatype.fromcode(np.dtype(dtype).char)


class Backoff:
    """Sleeps that grow from ``low`` to ``high`` while a wait goes on, so waiting is cheap.

    A workstation run has more ranks than cores: a waiter that spins steals the core
    of the rank it waits for.  ``reset()`` after progress makes the next wait short.
    """

    def __init__(self, low: float = 50e-6, high: float = 1e-3):
        self.low, self.high = low, high
        self.delay = low

    def reset(self) -> None:
        self.delay = self.low

    def sleep(self) -> float:
        """Sleep once, lengthen the next sleep; returns the seconds slept."""
        start = time.perf_counter()
        time.sleep(self.delay)
        self.delay = min(self.delay * 2, self.high)
        return time.perf_counter() - start


class Window:
    """One RMA window of ``nbytes`` local bytes, opened in a lifelong ``Lock_all`` epoch.

    Collective over ``comm``: every rank constructs it, each with its own ``nbytes``
    (0 where the rank exposes nothing).  The local memory starts zeroed.

    Args:
        nbytes: bytes this rank exposes.
        comm: the intracommunicator the window spans.
    """

    def __init__(self, nbytes: int, comm: MPI.Intracomm, info: MPI.Info = MPI.INFO_NULL):
        self.comm = comm
        self.rank = comm.Get_rank()
        self.win = MPI.Win.Allocate(int(nbytes), 1, info, comm)
        if self.win.Get_attr(MPI.WIN_MODEL) != MPI.WIN_UNIFIED:
            raise RuntimeError("the parameter server needs the MPI unified memory model")
        self.memory = np.frombuffer(self.win.tomemory(), dtype=np.uint8)
        # Every rank asks every target for its lock at once; all are inside MPI, so the
        # grants flow.  After the barrier nobody touches the window unlocked.
        self.win.Lock_all()
        self.memory[:] = 0
        self.win.Sync()
        quiet_barrier(comm)
        self._word = np.zeros(1, WORD)
        self._result = np.zeros(1, WORD)

    def view(self, dtype, offset: int, count: int) -> np.ndarray:
        """This rank's window memory ``[offset, offset + count items)`` as a numpy view."""
        dtype = np.dtype(dtype)
        return self.memory[offset:offset + count * dtype.itemsize].view(dtype)

    # Data movement: contiguous numpy arrays, byte offsets in the target's window.

    def get(self, out: np.ndarray, rank: int, offset: int) -> None:
        """Start reading ``out.size`` items at ``offset`` of ``rank`` (complete: flush)."""
        self.win.Get(out, rank, (offset, out.size, _mpi_type(out.dtype)))

    def put(self, data: np.ndarray, rank: int, offset: int) -> None:
        """Start writing ``data`` at ``offset`` of ``rank`` (complete: flush)."""
        self.win.Put(data, rank, (offset, data.size, _mpi_type(data.dtype)))

    def accumulate(self, data: np.ndarray, rank: int, offset: int, op=MPI.SUM) -> None:
        """Start an element-wise atomic ``op`` of ``data`` into ``rank``'s memory."""
        self.win.Accumulate(data, rank, (offset, data.size, _mpi_type(data.dtype)), op)

    def atomic_read(self, out: np.ndarray, rank: int, offset: int) -> np.ndarray:
        """Read int64 words atomically (``Get_accumulate(NO_OP)``), completed on return.

        A plain ``Get`` racing an accumulate on the same word is a conflict; this is not.
        """
        ignored = np.zeros_like(out)  # NO_OP reads no origin data, but MPI wants a buffer
        self.win.Get_accumulate(ignored, out, rank, (offset, out.size, MPI.INT64_T), MPI.NO_OP)
        self.win.Flush(rank)
        return out

    def fetch_and_op(self, value: int, rank: int, offset: int, op=MPI.SUM) -> int:
        """Atomically apply ``op`` with ``value`` to one int64 word; return the old value.

        Completed (flushed) on return, so later operations are ordered after it.
        """
        self._word[0] = value
        # INT64_T everywhere: accumulate atomicity holds only between identical datatypes.
        self.win.Fetch_and_op([self._word, MPI.INT64_T], [self._result, MPI.INT64_T], rank,
                              offset, op)
        self.win.Flush(rank)
        return int(self._result[0])

    def read_word(self, rank: int, offset: int) -> int:
        """One int64 word, read atomically."""
        return self.fetch_and_op(0, rank, offset, MPI.NO_OP)

    def write_word(self, value: int, rank: int, offset: int) -> None:
        """Overwrite one int64 word atomically (``REPLACE``: it may race other atomics)."""
        self.fetch_and_op(value, rank, offset, MPI.REPLACE)

    def flush(self, rank: int) -> None:
        """Complete every operation this rank started on ``rank``, at both ends."""
        self.win.Flush(rank)

    def flush_all(self) -> None:
        self.win.Flush_all()

    def sync(self) -> None:
        """Memory barrier between this rank's loads/stores and remote accesses.

        The unified model still asks for ``Win_sync`` between seeing a remote flag and
        loading the data it guards (and between local stores and publishing them).
        """
        self.win.Sync()

    def free(self) -> None:
        """Close the epoch and free the window (collective; waits without spinning)."""
        quiet_barrier(self.comm)
        self.win.Unlock_all()
        self.memory = None
        self.win.Free()


class ParamWindow(Window):
    """Every shard's slice of the parameters, in ``buffers`` versions (read-copy-update).

    Layout on shard rank ``r`` holding ``count`` parameters::

        word 0            current version v; buffer v % buffers holds it
        word 1 + b        readers[b]: pulls now reading buffer b
        buffers x float32[count]

    A pull pins the current buffer (``readers += 1``, then re-reads the version to be
    sure it pinned the current one), ``Get``s it and unpins.  The shard writes the
    next version into a buffer that is not current and has no readers, then publishes
    it by replacing word 0.  So a remote ``Get`` never meets a local store (the MPI
    conflict rule), a pull never waits for an update, and an update waits at most for
    the pulls already reading the buffer it needs; nobody waits for a lock grant.
    """

    CURRENT = 0

    def __init__(self, counts: dict[int, int], buffers: int, comm: MPI.Intracomm):
        self.counts, self.buffers = counts, buffers
        self.header = _aligned((1 + buffers) * WORD.itemsize)
        self.stride = {r: _aligned(c * FLOAT.itemsize) for r, c in counts.items()}
        mine = comm.Get_rank()
        nbytes = self.header + buffers * self.stride[mine] if mine in counts else 0
        super().__init__(nbytes, comm)

    def readers_offset(self, buffer: int) -> int:
        return (1 + buffer) * WORD.itemsize

    def buffer_offset(self, rank: int, buffer: int) -> int:
        return self.header + buffer * self.stride[rank]

    def local_buffer(self, buffer: int) -> np.ndarray:
        """This shard's buffer ``buffer`` as float32 (only the shard calls this)."""
        return self.view(FLOAT, self.buffer_offset(self.rank, buffer), self.counts[self.rank])


# Inbox slot words: 0 = empty; otherwise ``(version + 1) << 2 | kind``, one atomic int64,
# so the push's kind and the version it was computed from are published together.
EMPTY, GRADIENT, REFUSED = 0, 1, 2


def encode_slot(kind: int, version: int) -> int:
    """The word a client publishes; ``version`` -1 means "not tracked"."""
    return (version + 1) << 2 | kind


def decode_slot(word: int) -> tuple[int, int]:
    """``(kind, version)`` of a published slot word."""
    return word & 3, (word >> 2) - 1


class InboxWindow(Window):
    """Per-client push slots on every shard: each client writes only its own slots.

    Layout on shard rank ``r`` holding ``count`` parameters, for ``clients`` clients
    with ``depth`` slots each::

        word[c * depth + k]                    state of client c's slot k
        float32[count] per (c, k), in order    the gradient slices

    A client ``Put``s into a slot whose word it has seen at 0, flushes, then publishes
    the word atomically; the shard reads the words atomically, ``sync``s, consumes the
    slot and resets the word.  Data and word are never written concurrently by two
    parties, so there is no conflict, and a slot is consumed exactly once.
    """

    def __init__(self, counts: dict[int, int], clients: int, depth: int,
                 comm: MPI.Intracomm):
        self.counts, self.clients, self.depth = counts, clients, depth
        self.header = _aligned(clients * depth * WORD.itemsize)
        self.stride = {r: _aligned(c * FLOAT.itemsize) for r, c in counts.items()}
        mine = comm.Get_rank()
        slots = clients * depth
        nbytes = self.header + slots * self.stride[mine] if mine in counts else 0
        super().__init__(nbytes, comm)
        self._words = np.zeros(slots, WORD)

    def word_offset(self, client: int, slot: int) -> int:
        return (client * self.depth + slot) * WORD.itemsize

    def slot_offset(self, rank: int, client: int, slot: int) -> int:
        return self.header + (client * self.depth + slot) * self.stride[rank]

    def local_slot(self, client: int, slot: int) -> np.ndarray:
        """This shard's copy of a client's slot as float32 (only the shard calls this)."""
        offset = self.slot_offset(self.rank, client, slot)
        return self.view(FLOAT, offset, self.counts[self.rank])

    def publish(self, word: np.ndarray, old: np.ndarray, rank: int, client: int,
                slot: int) -> None:
        """Start the atomic write of a slot word (``Fetch_and_op(REPLACE)``; then flush).

        Not flushed here, so a client publishing on several shards waits for one flush.
        ``word`` and ``old`` are 1-element int64 arrays the caller keeps alive and
        unchanged until that flush (MPI may use them any time before it).  Measured
        faster than a one-element ``Accumulate(REPLACE)`` (about 10 vs 18 us).
        """
        self.win.Fetch_and_op([word, MPI.INT64_T], [old, MPI.INT64_T], rank,
                              self.word_offset(client, slot), MPI.REPLACE)

    def local_words(self) -> np.ndarray:
        """Every slot word of this shard, read atomically, shape ``(clients, depth)``."""
        self.atomic_read(self._words, self.rank, 0)
        return self._words.reshape(self.clients, self.depth)
