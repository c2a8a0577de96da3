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

Atomics, and what the windows promise MPI about them (the ``info`` they are made with):
every int64 word is touched by one accumulate operation besides ``NO_OP`` reads
(a reader count only by ``SUM``, a version or slot word only by ``REPLACE``), so the
windows declare ``accumulate_ops = same_op_no_op``; and every atomic that a later
operation depends on is flushed before that operation starts, so they need no ordering
between accumulates (``accumulate_ordering = none``).  All accumulates on a word use
``MPI_INT64_T`` at both ends: MPI makes accumulates atomic only between operations whose
datatypes come from the same predefined type.
"""

from __future__ import annotations

import numpy as np
from mpi4py import MPI

from mpibelief.comm import quiet_barrier
from mpibelief.ps.state import EMPTY, GRADIENT, LOAD, PACKET, REFUSED  # noqa: F401 - re-exported

ALIGN = 64  # cache line: header words and data buffers never share one
WORD = np.dtype(np.int64)
FLOAT = np.dtype(np.float32)


def _aligned(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


def _mpi_type(dtype: np.dtype) -> MPI.Datatype:
    return MPI.Datatype.fromcode(np.dtype(dtype).char)


class Window:
    """One RMA window of ``nbytes`` local bytes, opened in a lifelong ``Lock_all`` epoch.

    Collective over ``comm``: every rank constructs it, each with its own ``nbytes``
    (0 where the rank exposes nothing).  The local memory starts zeroed.

    Args:
        nbytes: bytes this rank exposes.
        comm: the intracommunicator the window spans.
    """

    def __init__(self, nbytes: int, comm: MPI.Intracomm, single_words: bool = False):
        self.comm = comm
        self.rank = comm.Get_rank()
        info = MPI.Info.Create()
        info.Set("accumulate_ops", "same_op_no_op")
        info.Set("accumulate_ordering", "none")
        if single_words:
            # Every atomic on the window is one int64 word.  Open MPI's osc/ucx (its
            # one-sided component on UCX clusters) otherwise wraps each Fetch_and_op /
            # Get_accumulate in a lock on the *target*: a compare-and-swap loop on a
            # word of the target's osc state, which UCX emulates with active messages
            # served only when the target calls into MPI.  A shard polling its own
            # window with atomics held its own lock whenever it progressed, so the
            # clients' lock requests always failed: a livelock (the exactly-once test
            # hung 5 runs in 5).  With this key each such call is one UCX atomic, no
            # lock (osc/rdma reads it too); MPICH ignores it.
            info.Set("acc_single_intrinsic", "true")
        self.win = MPI.Win.Allocate(int(nbytes), 1, info, comm)
        info.Free()
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

    def load_words(self, offset: int, count: int) -> np.ndarray:
        """A copy of this rank's own int64 words, by plain loads after ``Win_sync``.

        For polling only: in the unified model a load of a word that others update is
        valid and its value stable once it appears, but not atomic (more than one byte
        changes), so it may show a change from zero but not the exact new value; read
        that with ``read_word``.  Costs no atomic on the own window, and ``Win_sync``
        lets Open MPI's osc/ucx progress (6 vs 12 us per poll on MPICH).
        """
        self.win.Sync()
        return self.view(WORD, offset, count).copy()

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

    Layout on shard rank ``r`` holding ``count`` parameters, for ``clients`` clients::

        word 0                  current version v; buffer v % buffers holds it
        word 1 + b              readers[b]: pulls now reading buffer b
        word 1 + buffers + c    samples[c]: samples in client c's pushes applied so far
        buffers x float32[count]

    A pull pins the current buffer (``readers += 1``, then re-reads the version to be
    sure it pinned the current one), ``Get``s it and unpins.  The shard writes the
    next version into a buffer that is not current and has no readers, then publishes
    it by replacing word 0.  So a remote ``Get`` never meets a local store (the MPI
    conflict rule), a pull never waits for an update, and an update waits at most for
    the pulls already reading the buffer it needs; nobody waits for a lock grant.
    The ``samples`` words let the coordinator count progress per client while the run
    goes (with partitioned replicas, pushes no longer reach every shard).
    """

    CURRENT = 0

    def __init__(self, counts: dict[int, int], buffers: int, clients: int,
                 comm: MPI.Intracomm):
        self.counts, self.buffers, self.clients = counts, buffers, clients
        self.header = _aligned((1 + buffers + clients) * WORD.itemsize)
        self.stride = {r: _aligned(c * FLOAT.itemsize) for r, c in counts.items()}
        mine = comm.Get_rank()
        nbytes = self.header + buffers * self.stride[mine] if mine in counts else 0
        super().__init__(nbytes, comm, single_words=True)

    def readers_offset(self, buffer: int) -> int:
        return (1 + buffer) * WORD.itemsize

    def samples_offset(self, client: int) -> int:
        return (1 + self.buffers + client) * WORD.itemsize

    def buffer_offset(self, rank: int, buffer: int) -> int:
        return self.header + buffer * self.stride[rank]

    def local_buffer(self, buffer: int) -> np.ndarray:
        """This shard's buffer ``buffer`` as float32 (only the shard calls this)."""
        return self.view(FLOAT, self.buffer_offset(self.rank, buffer), self.counts[self.rank])

    def read_samples(self, rank: int) -> np.ndarray:
        """Every client's applied-sample count on shard ``rank``, each read atomically."""
        return np.array([self.read_word(rank, self.samples_offset(c))
                         for c in range(self.clients)], WORD)


# Inbox slot words: 0 = EMPTY; otherwise ``(version + 1) << KIND_BITS | kind`` (kinds:
# ps.state), one atomic int64, so a push's kind and the version it came from are
# published together.
KIND_BITS = 3


def encode_slot(kind: int, version: int) -> int:
    """The word a client publishes; ``version`` -1 means "not tracked"."""
    return (version + 1) << KIND_BITS | kind


def decode_slot(word: int) -> tuple[int, int]:
    """``(kind, version)`` of a published slot word."""
    return word & ((1 << KIND_BITS) - 1), (word >> KIND_BITS) - 1


class InboxWindow(Window):
    """Per-client push slots on every shard: each client writes only its own slots.

    A client sends each shard only the part of its range that the shard holds:
    ``counts[r][c]`` floats from client ``c`` to shard ``r`` (0: no slots there).
    Layout on shard rank ``r``, ``depth`` slots per client::

        word[c * depth + k]          state of client c's slot k: EMPTY, or published
        per (c, k), in order:        client c's slot k, ``stride(r, c)`` bytes:
            int64[META]                  meta: [0] samples the push sums; for PACKET
                                         [1] packed words k, [2] tau's float32 bits
            float32[counts[r][c]]        the gradient (or, for LOAD, the parameters;
                                         for PACKET, k uint32 words: k <= counts)

    A client ``Put``s meta and data into a slot whose word it has seen at 0, flushes,
    then publishes the word atomically; the shard reads the words atomically, ``sync``s,
    consumes the slot and resets the word.  Data and word are never written concurrently
    by two parties, so there is no conflict, and a slot is consumed exactly once.
    """

    META = ALIGN // WORD.itemsize  # one cache line of int64 words before the data
    SAMPLES, WORDS, TAU = 0, 1, 2  # meta words

    def __init__(self, counts: dict[int, list[int]], depth: int, comm: MPI.Intracomm):
        self.counts, self.depth = counts, depth
        self.clients = len(next(iter(counts.values())))
        self.header = _aligned(self.clients * depth * WORD.itemsize)
        self.offsets = {r: self._slot_offsets(c) for r, c in counts.items()}
        mine = comm.Get_rank()
        nbytes = self.offsets[mine][-1] if mine in counts else 0
        super().__init__(nbytes, comm, single_words=True)

    def _slot_offsets(self, counts: list[int]) -> list[int]:
        """Byte offset of every slot, client-major, and the window size last."""
        offsets, at = [], self.header
        for count in counts:
            stride = ALIGN + _aligned(count * FLOAT.itemsize) if count else 0
            for _ in range(self.depth):
                offsets.append(at)
                at += stride
        return [*offsets, at]

    def word_offset(self, client: int, slot: int) -> int:
        return (client * self.depth + slot) * WORD.itemsize

    def slot_offset(self, rank: int, client: int, slot: int) -> int:
        """Where client's slot starts on shard ``rank``: its meta words."""
        return self.offsets[rank][client * self.depth + slot]

    def data_offset(self, rank: int, client: int, slot: int) -> int:
        return self.slot_offset(rank, client, slot) + ALIGN

    def local_meta(self, client: int, slot: int) -> np.ndarray:
        return self.view(WORD, self.slot_offset(self.rank, client, slot), self.META)

    def local_slot(self, client: int, slot: int) -> np.ndarray:
        """This shard's copy of a client's slot data as float32 (only the shard calls this)."""
        offset = self.data_offset(self.rank, client, slot)
        return self.view(FLOAT, offset, self.counts[self.rank][client])

    def publish(self, word: np.ndarray, old: np.ndarray, rank: int, client: int,
                slot: int) -> None:
        """Start the atomic write of a slot word (``Fetch_and_op(REPLACE)``; then flush).

        Not flushed here, so a client publishing on several shards waits for one flush.
        ``word`` and ``old`` are 1-element int64 arrays the caller keeps alive and
        unchanged until that flush (MPI may use them any time before it); ``old`` then
        holds the word replaced, which must be EMPTY (the client checks: a free
        exactly-once assertion).  Measured faster than a one-element
        ``Accumulate(REPLACE)`` (about 10 vs 18 us).
        """
        self.win.Fetch_and_op([word, MPI.INT64_T], [old, MPI.INT64_T], rank,
                              self.word_offset(client, slot), MPI.REPLACE)

    def local_words(self) -> np.ndarray:
        """Every slot word of this shard by plain loads, shape ``(clients, depth)``.

        Non-zero means published (``load_words``); the shard then reads the exact word
        with one atomic.  Loads, not one ``Get_accumulate`` of all words: a multi-word
        accumulate still takes Open MPI's target lock and is not atomic against the
        clients' lock-free single-word swaps; and loads cost half.
        """
        return self.load_words(0, self.clients * self.depth).reshape(self.clients, self.depth)
