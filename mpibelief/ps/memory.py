"""The parameter server without MPI: shard states in this process, one client interface.

:class:`MemoryServer` holds one :class:`~mpibelief.ps.state.ShardState` per shard and
hands out :class:`MemoryClient` objects with the same methods as the MPI
:class:`~mpibelief.ps.client.ParameterClient` (``pull``, ``push``, ``load``,
``wait_applied``, ``stats``).  A push is applied when it is made, in the order pushes
are made, so whoever calls the clients (a test, the virtual-time simulator) decides the
interleaving of replicas, and with it the staleness, exactly.

:meth:`MemoryServer.command` runs Sandblaster's vector commands
(:class:`~mpibelief.ps.vectors.VectorCommands`) on the states as
:meth:`ParameterServer.command <mpibelief.ps.server.ParameterServer.command>` has the
MPI shards run them, so a :class:`~mpibelief.ps.vectors.ShardSpace` over a
:class:`MemoryServer` drives L-BFGS on in-memory shards with the same code.
"""

from __future__ import annotations

import numpy as np

from mpibelief.compression import HEADER_BYTES, split_words
from mpibelief.layout import Part, parts_of, shard_slices
from mpibelief.optim import Optimizer, all_finite
from mpibelief.ps.state import GRADIENT, LOAD, REFUSED, ClientStats, ShardState
from mpibelief.ps.vectors import VectorCommands


class MemoryServer:
    """``shards`` shard states over an ``n_params`` vector; clients by index.

    Args:
        ranges: each client's ``(lo, hi)`` range of the flat vector; default one client
            over all of it.
    """

    def __init__(self, n_params: int, shards: int, optimizer: Optimizer,
                 ranges: list[tuple[int, int]] | None = None):
        self.n_params = n_params
        self.ranges = ranges or [(0, n_params)]
        self.slices = shard_slices(n_params, shards)
        self.states = [ShardState(s.stop - s.start, optimizer, len(self.ranges), shard=i,
                                  rank=i) for i, s in enumerate(self.slices)]
        self.parts = [parts_of(lo, hi, list(range(shards)), self.slices)
                      for lo, hi in self.ranges]
        self.shard_ranks = list(range(shards))  # a state's rank is its index
        self.commands = [VectorCommands(state) for state in self.states]

    def client(self, index: int) -> MemoryClient:
        return MemoryClient(self, index)

    def command(self, name: str, *args, shards: list[int] | None = None,
                reply: bool = False) -> list | None:
        """Run a vector command on the shards (all by default), in shard order; with
        ``reply``, their answers (as the MPI server's ``command``)."""
        ranks = self.shard_ranks if shards is None else shards
        answers = [getattr(self.commands[s], name)(*args) for s in ranks]
        return answers if reply else None

    def samples_applied(self) -> np.ndarray:
        """Samples applied per client (the least over the shards its range meets)."""
        return np.array([min(self.states[p.rank].samples[c] for p in parts)
                         for c, parts in enumerate(self.parts)], np.int64)

    def params(self) -> np.ndarray:
        """The whole current parameter vector (a copy)."""
        return np.concatenate([s.current for s in self.states])


class MemoryClient:
    """A client of a :class:`MemoryServer`; the methods of the MPI client, no waiting."""

    def __init__(self, server: MemoryServer, index: int):
        self.server, self.index = server, index
        lo, hi = server.ranges[index]
        self.n_params = hi - lo
        self.parts: list[Part] = server.parts[index]
        self.stats = ClientStats()
        self.check_finite = len(self.parts) > 1

    def pull(self, out: np.ndarray) -> np.ndarray:
        versions = np.empty(len(self.parts), np.int64)
        for s, part in enumerate(self.parts):
            state = self.server.states[part.rank]
            size = part.local.stop - part.local.start
            out[part.local] = state.current[part.offset:part.offset + size]
            versions[s] = state.version
        self.stats.pulls += 1
        self.stats.bytes_pulled += out.nbytes
        return versions

    def push(self, grad: np.ndarray, versions=None, samples: int = 0) -> None:
        finite = all_finite(grad) if self.check_finite else True
        self._send(grad, GRADIENT if finite else REFUSED, versions, samples)
        self.stats.pushes += 1
        self.stats.refused += int(not finite)
        self.stats.bytes_pushed += grad.nbytes if finite else 0

    def push_packet(self, packet: np.ndarray | None, versions=None, samples: int = 0) -> None:
        """A compressed push: each shard decodes its part's words (as the MPI client)."""
        if packet is None:
            self._send(None, REFUSED, versions, samples)
        else:
            bounds = [(p.local.start, p.local.stop) for p in self.parts]
            tau = packet[:1].view(np.float32)[0]
            for s, (part, words) in enumerate(zip(self.parts, split_words(packet[1:], bounds),
                                                  strict=True)):
                version = -1 if versions is None else int(versions[s])
                size = part.local.stop - part.local.start
                self.server.states[part.rank].consume_packet(
                    words, tau, part.offset, size, version, self.index, samples)
                self.stats.bytes_pushed += 4 * words.size + HEADER_BYTES
        self.stats.pushes += 1
        self.stats.refused += int(packet is None)

    def load(self, values: np.ndarray) -> None:
        self._send(values, LOAD, None, 0)

    set_params = load

    def _send(self, data, kind: int, versions, samples: int) -> None:
        for s, part in enumerate(self.parts):
            version = -1 if versions is None else int(versions[s])
            piece = None if data is None else data[part.local]
            self.server.states[part.rank].consume(kind, piece, part.offset,
                                                   version, self.index, samples)

    def wait_applied(self) -> None:
        """Nothing to wait for: every push was applied when it was made."""
