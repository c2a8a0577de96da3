"""Setting up the sharded parameter server: windows, shard servers, clients, stop.

The server is a set of ranks: *shards*, each holding a contiguous slice of the flat
float32 parameter vector (:func:`mpibelief.layout.shard_slices`), and *clients*, each
covering a contiguous range of it (a whole replica, or one partition of one).  This
module builds the two RMA windows over them and hands each rank its part: the
:class:`~mpibelief.ps.shard.ShardServer` on shard ranks, a
:class:`~mpibelief.ps.client.ParameterClient` elsewhere.  The protocols live in
:mod:`mpibelief.ps.window`, the shard's state and loop in :mod:`mpibelief.ps.shard`.
"""

from __future__ import annotations

import numpy as np

from mpibelief.comm import Tag, poll, quiet_send
from mpibelief.errors import UserError
from mpibelief.layout import parts_of, shard_slices
from mpibelief.optim import Optimizer, all_finite
from mpibelief.ps.client import ParameterClient
from mpibelief.ps.shard import ShardServer
from mpibelief.ps.state import ShardState, ShardStats
from mpibelief.ps.window import InboxWindow, ParamWindow


class ParameterServer:
    """The sharded parameter server, built collectively by every rank of ``comm``.

    Constructed by every rank of ``comm`` (coordinator, shards, workers), because it
    creates the RMA windows; ``free()`` is collective too.

    Args:
        comm: every rank that serves, pulls, pushes or stops.
        n_params: length of the flat float32 parameter vector.
        shard_ranks: ranks of ``comm`` holding the slices (``shard_slices`` order).
        client_ranks: ranks that may push (each gets ``depth`` slots on the shards
            its range meets).  Any non-shard rank may ``pull`` the whole vector.
        optimizer: the update rule the shards apply.
        ranges: each client's ``(lo, hi)`` range of the flat vector; default: all of it.
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
        clock: what the shard loop and the clients time themselves with.
        stall_seconds: how long a client waits for a shard before it gives up with an
            error naming the shard (None: for ever).
    """

    def __init__(self, comm, n_params: int, shard_ranks: list[int], client_ranks: list[int],
                 optimizer: Optimizer, *, ranges: list[tuple[int, int]] | None = None,
                 buffers: int = 2, depth: int = 1, clock=None,
                 stall_seconds: float | None = None):
        ranges = ranges or [(0, n_params)] * len(client_ranks)
        _check_ranks(comm, n_params, shard_ranks, client_ranks, ranges, buffers, depth)
        self.comm, self.n_params, self.optimizer = comm, n_params, optimizer
        self.shard_ranks, self.client_ranks = list(shard_ranks), list(client_ranks)
        self.ranges, self.clock, self.stall_seconds = list(ranges), clock, stall_seconds
        self.slices = shard_slices(n_params, len(shard_ranks))
        self.client_parts = [parts_of(lo, hi, self.shard_ranks, self.slices)
                             for lo, hi in ranges]
        counts = {r: s.stop - s.start for r, s in zip(shard_ranks, self.slices, strict=True)}
        inbox_counts = {r: [0] * len(client_ranks) for r in shard_ranks}
        for c, parts in enumerate(self.client_parts):
            for part in parts:
                inbox_counts[part.rank][c] = part.local.stop - part.local.start
        self.ctl = comm.Dup()
        self.params = ParamWindow(counts, buffers, len(client_ranks), comm)
        self.inbox = InboxWindow(inbox_counts, depth, comm)
        self.shard: ShardServer | None = None
        self._clients: dict = {}
        rank = comm.Get_rank()
        if rank in shard_ranks:
            self.shard = self._make_shard(rank, counts[rank])
        elif rank in client_ranks:
            all_finite(np.zeros(4, np.float32))  # JIT now, not inside the first push

    def _make_shard(self, rank: int, count: int) -> ShardServer:
        index = self.shard_ranks.index(rank)
        buffers = [self.params.local_buffer(b) for b in range(self.params.buffers)]
        state = ShardState(count, self.optimizer, len(self.client_ranks), buffers,
                           shard=index, rank=rank)
        offsets = [next((p.offset for p in parts if p.rank == rank), 0)
                   for parts in self.client_parts]
        self.optimizer.warm()  # compile before the first timed push
        return ShardServer(self.params, self.inbox, state, self.ctl, offsets, self.clock)

    def serve(self, tick=None) -> ShardStats:
        """Apply pushes and run commands until ``stop()``; on shard ranks only."""
        if self.shard is None:
            raise RuntimeError(f"rank {self.comm.Get_rank()} is not a shard")
        return self.shard.serve(tick)

    def command(self, name: str, *args, shards: list[int] | None = None,
                reply: bool = False) -> list | None:
        """Send a command to the shards (all by default); with ``reply``, their answers.

        The answers come in shard order.  Waiting sleeps instead of spinning, and gives
        up after ``stall_seconds`` (a stalled shard must not hang its caller).

        Raises:
            UserError: a shard did not answer within ``stall_seconds``.
        """
        ranks = self.shard_ranks if shards is None else shards
        quiet_send(self.ctl, (name, *args), ranks, Tag.COMMAND)
        if not reply:
            return None
        requests = [self.ctl.irecv(source=r, tag=Tag.REPLY) for r in ranks]
        answers = [None] * len(ranks)

        def arrived() -> bool:
            for i, request in enumerate(requests):
                if request is not None:
                    done, answers[i] = request.test()
                    requests[i] = None if done else request
            return all(r is None for r in requests)

        try:
            poll(arrived, timeout=self.stall_seconds)
        except TimeoutError:
            late = [r for r, q in zip(ranks, requests, strict=True) if q is not None]
            raise UserError(f"shard rank(s) {late} did not answer {name!r} within"
                            f" {self.stall_seconds:g} s (stalled or stopped?)") from None
        return answers

    def stop(self) -> None:
        """Tell every shard to return from ``serve()``; call once all pushes returned."""
        self.command("stop")

    def client(self, pull_only: bool = False) -> ParameterClient:
        """This rank's client: over its range if it is a client rank, else pull-only."""
        rank = self.comm.Get_rank()
        if rank in self.shard_ranks:
            raise RuntimeError(f"rank {rank} is a shard, not a client")
        if rank not in self._clients:
            if rank in self.client_ranks and not pull_only:
                index = self.client_ranks.index(rank)
                lo, hi = self.ranges[index]
                parts = self.client_parts[index]
            else:
                index, (lo, hi) = None, (0, self.n_params)
                parts = parts_of(0, self.n_params, self.shard_ranks, self.slices)
            self._clients[rank] = ParameterClient(self.params, self.inbox, parts, index,
                                                  hi - lo, self.clock, self.stall_seconds)
        return self._clients[rank]

    def versions(self) -> np.ndarray:
        """Every shard's current version, read atomically (any non-shard rank)."""
        return np.array([self.params.read_word(r, ParamWindow.CURRENT)
                         for r in self.shard_ranks], np.int64)

    def samples_applied(self) -> np.ndarray:
        """Samples applied per client, read live from the shards (any non-shard rank).

        A client's count is the least over the shards its range meets: a push counts
        once every shard it reached has applied it.
        """
        per_shard = {r: self.params.read_samples(r) for r in self.shard_ranks}
        return np.array([min((per_shard[p.rank][c] for p in parts), default=0)
                         for c, parts in enumerate(self.client_parts)], np.int64)

    def free(self) -> None:
        """Free the windows (collective over ``comm``; waits without spinning)."""
        self.inbox.free()
        self.params.free()
        self.ctl.Free()


def _check_ranks(comm, n_params, shard_ranks, client_ranks, ranges, buffers, depth) -> None:
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
    if len(ranges) != len(client_ranks):
        raise ValueError(f"{len(ranges)} ranges for {len(client_ranks)} clients")
    if any(not 0 <= lo < hi <= n_params for lo, hi in ranges):
        raise ValueError(f"a client range is empty or outside [0, {n_params})")
    if buffers < 2 or depth < 1:
        raise ValueError("need buffers >= 2 and depth >= 1")
