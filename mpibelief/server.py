"""Role: a parameter shard of Downpour SGD, serving pulls and applying pushes one-sidedly.

Each shard owns a contiguous slice of the flat float32 parameter vector in RMA window
memory (:mod:`mpibelief.window`) and applies every pushed gradient as it arrives, with
plain SGD (``p -= lr * g``) or Adagrad (``acc += g * g; p -= lr * g / sqrt(acc + eps)``,
``acc`` per parameter, kept on the shard).  Replicas never message a shard: pulls are
``Get``s of a published parameter buffer, pushes are ``Put``s into the client's own
inbox slot plus one atomic word (see :class:`~mpibelief.window.InboxWindow`).  The only
two-sided message is the coordinator's stop.

Why this data path (measured on the 2-core workstation, MPICH 5 shared memory; see
``bench/rma.py``): a raw ``Accumulate(SUM)`` of 1 MiB float32 ran at about half the
speed of ``Get`` or ``Put`` (7 vs 14 GB/s), and an accumulating inbox would still need
an atomic take-and-zero by the shard; a ``Put`` into a slot that only one client
writes needs no atomicity on the data at all, so each push is one ``Put`` plus one
atomic word, and the shard reads the gradient once, inside its update pass.  And no
locks on the data path: a ``Lock`` is granted by the target, which on this MPICH means
when the shard next enters MPI (a pull waited 3 s on a target that slept 3 s), so
every window stays in one ``Lock_all`` epoch and pulls read versioned buffers instead.

Exactly once, by construction: a slot's word goes 0 -> published only by its client,
after its ``Put`` is flushed; published -> 0 only by the shard, after the slot is
consumed; each word transition is one atomic operation, and the shard consumes each
client's slots in the order the client fills them (so one client's pushes are applied
in push order, which makes Adagrad deterministic for a single client).

Versions: the shard's version counts the updates it applied.  A pull returns the
version it read; the push carries it back; the shard records ``version_now -
version_then`` (the updates applied in between: staleness) in a histogram.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
from mpi4py import MPI

from mpibelief.client import ParameterClient, all_finite
from mpibelief.comm import quiet_wait
from mpibelief.layout import shard_slices
from mpibelief.optim import Optimizer, adagrad_step, sgd_step
from mpibelief.window import GRADIENT, Backoff, InboxWindow, ParamWindow, decode_slot

STOP_TAG = 23  # on the server's private duplicate of comm, so it meets no user message


@dataclass
class ShardStats:
    """What one shard did; plain data, so it pickles for ``comm.gather``.

    Attributes:
        staleness: histogram, ``staleness[k]`` = pushes applied ``k`` updates after
            the pull they were computed from (pushes without versions not counted).
        bytes_in: gradient bytes received in the inbox (client-refused pushes carry none).
        busy_seconds: loop time spent consuming pushes; idle_seconds: the rest of it.
        reader_wait_seconds: part of busy, waiting for pulls to leave a buffer.
        cpu_seconds: process CPU time inside ``serve`` (idle must stay far below wall).
    """

    shard: int
    rank: int
    n_params: int
    applied: int = 0
    refused: int = 0
    version: int = 0
    staleness: np.ndarray = field(default_factory=lambda: np.zeros(1, np.int64))
    bytes_in: int = 0
    busy_seconds: float = 0.0
    idle_seconds: float = 0.0
    reader_wait_seconds: float = 0.0
    cpu_seconds: float = 0.0
    wall_seconds: float = 0.0

    def record_staleness(self, stale: int) -> None:
        if stale >= self.staleness.size:
            grown = np.zeros(max(stale + 1, 2 * self.staleness.size), np.int64)
            grown[:self.staleness.size] = self.staleness
            self.staleness = grown
        self.staleness[stale] += 1


# The update kernels (mpibelief.optim) write the new version into a buffer nobody
# reads, so SGD checks finiteness in the same pass and simply does not publish on failure.
class _Shard:
    """One shard's state and update logic (the part of ``serve`` that is not looping)."""

    def __init__(self, params: ParamWindow, inbox: InboxWindow, opt: Optimizer,
                 stats: ShardStats):
        self.params, self.inbox, self.opt, self.stats = params, inbox, opt, stats
        self.rank = params.rank
        self.lr, self.eps = np.float32(opt.lr), np.float32(opt.eps)
        self.acc = np.zeros(stats.n_params, np.float32) if opt.kind == "adagrad" else None
        self.expect = [0] * inbox.clients  # next slot of each client, in fill order
        self.first = 0  # client scanned first, rotated for fairness
        self.readers = Backoff(low=5e-6, high=200e-6)

    def poll(self) -> int:
        """Consume every published slot found in one atomic snapshot; returns how many."""
        words = self.inbox.local_words()
        clients, depth = words.shape
        done = 0
        for i in range(clients):
            c = (self.first + i) % clients
            for _ in range(depth):
                word = int(words[c, self.expect[c]])
                if not word:
                    break
                self.consume(c, self.expect[c], word)
                self.expect[c] = (self.expect[c] + 1) % depth
                done += 1
        self.first = (self.first + 1) % max(clients, 1)
        return done

    def consume(self, client: int, slot: int, word: int) -> None:
        """Apply (or refuse) one published slot, then hand the slot back to its client."""
        self.inbox.sync()  # the client's Put is visible before we load the slot
        kind, version = decode_slot(word)
        grad = self.inbox.local_slot(client, slot)
        stats = self.stats
        stats.bytes_in += grad.nbytes if kind == GRADIENT else 0
        if kind == GRADIENT and self.apply(grad):
            stats.applied += 1
            if version >= 0:  # a version from the future is a caller's mix-up: count it 0
                stats.record_staleness(max(self.stats.version - 1 - version, 0))
        else:
            stats.refused += 1
        self.inbox.sync()  # our loads of the slot finish before the client may reuse it
        self.inbox.write_word(0, self.rank, self.inbox.word_offset(client, slot))

    def apply(self, grad: np.ndarray) -> bool:
        """Write ``current - update`` into a free buffer and publish it; False if refused."""
        p, buffers = self.params, self.params.buffers
        version = self.stats.version
        target = (version + 1) % buffers
        self.wait_unread(target)
        p.sync()  # see a set_params Put into the current buffer
        cur, out = p.local_buffer(version % buffers), p.local_buffer(target)
        if self.acc is None:
            if not sgd_step(cur, grad, self.lr, out):
                return False
        else:
            if not all_finite(grad):
                return False
            adagrad_step(cur, grad, self.acc, self.lr, self.eps, out)
        p.sync()  # the new buffer is complete before anyone can see it published
        self.stats.version = version + 1
        p.write_word(version + 1, self.rank, ParamWindow.CURRENT)
        return True

    def wait_unread(self, buffer: int) -> None:
        """Wait until no pull is reading ``buffer`` (pulls pinned it while it was current).

        New pins only land on the current buffer, so this wait is bounded by one Get.
        """
        offset = self.params.readers_offset(buffer)
        if not self.params.read_word(self.rank, offset):
            return
        start = time.perf_counter()
        self.readers.reset()
        while self.params.read_word(self.rank, offset):
            self.readers.sleep()
        self.stats.reader_wait_seconds += time.perf_counter() - start


class ParameterServer:
    """The sharded parameter server: windows, the shard loop, and clients.

    Constructed collectively by every rank of ``comm`` (coordinator, shards, workers),
    because it creates the RMA windows; ``free()`` is collective too.

    Args:
        comm: every rank that serves, pulls, pushes or stops.
        n_params: length of the flat float32 parameter vector.
        shard_ranks: ranks of ``comm`` holding the slices (``shard_slices`` order).
        client_ranks: ranks that may ``push`` (each gets ``depth`` slots per shard).
            Any non-shard rank may ``pull`` and ``set_params``.
        optimizer: the update rule the shards apply.
        buffers: parameter versions kept per shard (>= 2).  With 2 an update may wait
            for a pull still reading the older version (one ``Get`` at most, counted in
            ``reader_wait_seconds``); more buffers wait less but enlarge the shard's
            memory footprint, which measured slower at 4 MiB (caches).
        depth: inbox slots per client per shard.  With 1 a client pushing again
            before the shard consumed its last push waits for it; with 2 it can push
            while the shard applies.  1 is the default because a replica computes for
            far longer than a shard applies, and because the ``Put`` into a slot the
            client itself wrote last is faster (its lines are still in the client's
            cache: 1 MiB push 108 vs 125 us measured); ``bench/rma.py --depth 2``
            shows the back-to-back stream that a deeper inbox overlaps.
    """

    def __init__(self, comm, n_params: int, shard_ranks: list[int], client_ranks: list[int],
                 optimizer: Optimizer, *, buffers: int = 2, depth: int = 1):
        _check_ranks(comm, n_params, shard_ranks, client_ranks, buffers, depth)
        self.comm, self.n_params, self.optimizer = comm, n_params, optimizer
        self.shard_ranks, self.client_ranks = list(shard_ranks), list(client_ranks)
        self.slices = shard_slices(n_params, len(shard_ranks))
        counts = {r: s.stop - s.start for r, s in zip(shard_ranks, self.slices, strict=True)}
        self.ctl = comm.Dup()
        self.params = ParamWindow(counts, buffers, comm)
        self.inbox = InboxWindow(counts, len(client_ranks), depth, comm)
        self._shard = None
        self._client = None
        rank = comm.Get_rank()
        if rank in shard_ranks:
            index = shard_ranks.index(rank)
            stats = ShardStats(shard=index, rank=rank, n_params=counts[rank])
            self._shard = _Shard(self.params, self.inbox, optimizer, stats)
            _warm_kernels()
        elif rank in client_ranks:
            all_finite(np.zeros(4, np.float32))  # JIT now, not inside the first push

    def serve(self) -> ShardStats:
        """Apply pushes as they arrive until ``stop()``; on shard ranks only.

        Idle, it sleeps between polls (200 us growing to 1 ms), and every poll enters
        MPI (``Iprobe``), which keeps weak-progress transports moving.  Not shorter:
        with more ranks than cores each wake-up may preempt a replica in the middle of
        its next push (measured: a 1 MiB push fell from about 0.65 to 0.45-0.6 of raw
        ``Get`` speed with 50 us), while a replica's step takes milliseconds anyway.  After the stop
        message it drains every push already published, so a push that returned
        before ``stop()`` was called is always applied.
        """
        if self._shard is None:
            raise RuntimeError(f"rank {self.comm.Get_rank()} is not a shard")
        shard, stats = self._shard, self._shard.stats
        backoff = Backoff(low=200e-6, high=1e-3)
        cpu, wall = time.process_time(), time.perf_counter()
        stopping = False
        while True:
            tick = time.perf_counter()
            if not stopping and self.ctl.Iprobe(MPI.ANY_SOURCE, STOP_TAG):
                self.ctl.recv(source=MPI.ANY_SOURCE, tag=STOP_TAG)
                stopping = True
            if shard.poll():
                stats.busy_seconds += time.perf_counter() - tick
                backoff.reset()
                continue
            if stopping:
                break
            backoff.sleep()
            stats.idle_seconds += time.perf_counter() - tick
        stats.cpu_seconds += time.process_time() - cpu
        stats.wall_seconds += time.perf_counter() - wall
        return stats

    def stop(self) -> None:
        """Tell every shard to return from ``serve()``; call once all pushes returned."""
        requests = [self.ctl.isend(None, dest=r, tag=STOP_TAG) for r in self.shard_ranks]
        for request in requests:
            quiet_wait(request)

    def client(self) -> ParameterClient:
        """This rank's client (pull and set_params anywhere; push on client ranks)."""
        rank = self.comm.Get_rank()
        if rank in self.shard_ranks:
            raise RuntimeError(f"rank {rank} is a shard, not a client")
        if self._client is None:
            index = self.client_ranks.index(rank) if rank in self.client_ranks else None
            self._client = ParameterClient(self.params, self.inbox, self.shard_ranks,
                                           self.slices, index)
        return self._client

    def free(self) -> None:
        """Free the windows (collective over ``comm``; waits without spinning)."""
        self.inbox.free()
        self.params.free()
        self.ctl.Free()


def _check_ranks(comm, n_params, shard_ranks, client_ranks, buffers, depth) -> None:
    size = comm.Get_size()
    if not shard_ranks:
        raise ValueError("need at least one shard rank")
    if n_params < len(shard_ranks):
        raise ValueError(f"{n_params} parameters cannot fill {len(shard_ranks)} shards")
    if set(shard_ranks) & set(client_ranks):
        raise ValueError("a rank cannot be both shard and client")
    if len(set(shard_ranks)) != len(shard_ranks) or len(set(client_ranks)) != len(client_ranks):
        raise ValueError("duplicate rank in shard_ranks or client_ranks")
    if any(not 0 <= r < size for r in [*shard_ranks, *client_ranks]):
        raise ValueError(f"shard/client rank outside a communicator of {size}")
    if buffers < 2 or depth < 1:
        raise ValueError("need buffers >= 2 and depth >= 1")


def _warm_kernels() -> None:
    """Compile (or load from numba's cache) the kernels before the first timed push."""
    x = np.zeros(4, np.float32)
    sgd_step(x, x, np.float32(1), x.copy())
    adagrad_step(x, x, x.copy(), np.float32(1), np.float32(1), x.copy())
    all_finite(x)
