"""A shard's state and a client's counters: plain numpy, no MPI.

:class:`ShardState` is everything a shard *is*: its slice of the parameters in
``buffers`` versions, the update rule and its state (Adagrad's sums), the version
(parameter versions published so far) and the counters (applied, refused, staleness,
samples per client).  The MPI shard (:mod:`mpibelief.ps.shard`) and the in-memory store
(:mod:`mpibelief.ps.memory`) drive the same state, so what is tested without MPI is
what runs with it.

Versions: a pull returns the version it read; the push carries it back; the shard
records ``version_now - version_then - 1`` (updates applied in between: staleness).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mpibelief.compression import HEADER_BYTES, decode_add
from mpibelief.optim import Optimizer, all_finite

# What a push is (the inbox slot's kind): a gradient to apply, a gradient the client
# found non-finite (no data: refused), values to load as the next version, or a
# threshold-compressed gradient (packed words; the shard decodes and applies it).
EMPTY, GRADIENT, REFUSED, LOAD, PACKET = 0, 1, 2, 3, 4


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


@dataclass
class ShardStats:
    """What one shard did; plain data, so it pickles for the coordinator.

    Attributes:
        staleness: histogram, ``staleness[k]`` = pushes applied ``k`` updates after
            the pull they were computed from (pushes without versions not counted).
        bytes_in: gradient bytes received (client-refused pushes carry none).
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

    @property
    def busy_fraction(self) -> float:
        """Share of the serving time spent applying: near 1, the shard is the bottleneck."""
        return self.busy_seconds / self.wall_seconds if self.wall_seconds else 0.0


class ShardState:
    """One shard's slice, update rule, version and counters; plain numpy, no MPI.

    Args:
        n: parameters in this shard's slice.
        optimizer: the update rule applied to every gradient.
        clients: how many clients may push (their applied samples are counted).
        buffers: the arrays holding successive versions (the MPI shard passes its window
            memory); default two fresh ones.  Version ``v`` lives in ``buffers[v % B]``.
    """

    def __init__(self, n: int, optimizer: Optimizer, clients: int = 1,
                 buffers: list[np.ndarray] | None = None, shard: int = 0, rank: int = 0):
        self.buffers = buffers if buffers is not None else [np.zeros(n, np.float32)
                                                            for _ in range(2)]
        self.optimizer, self.opt_state = optimizer, optimizer.state(n)
        self.stats = ShardStats(shard=shard, rank=rank, n_params=n)
        self.samples = np.zeros(clients, np.int64)
        self.scratch: np.ndarray | None = None  # decoded packets, allocated on first use
        # Named vectors beside the parameters (Sandblaster's gradient sum, direction,
        # history; see mpibelief.ps.vectors).  With ``accumulate`` set to a name,
        # gradient pushes are summed into that vector instead of applied: no new
        # version, and ``accum_samples`` counts what each client's pushes cover.
        self.vectors: dict[str, np.ndarray] = {}
        self.accumulate: str | None = None
        self.accum_samples = np.zeros(clients, np.int64)
        # Clients whose gradient pushes are refused from now on: Sandblaster's failed
        # replicas, so a sum one of them pushes after being given up on never counts.
        self.excluded: set[int] = set()

    def vector(self, name: str) -> np.ndarray:
        """The named vector (zeros when new); ``params`` is the current version, read only."""
        if name == "params":
            return self.current
        if name not in self.vectors:
            self.vectors[name] = np.zeros(self.current.size, np.float32)
        return self.vectors[name]

    @property
    def version(self) -> int:
        return self.stats.version

    @property
    def current(self) -> np.ndarray:
        return self.buffers[self.version % len(self.buffers)]

    @property
    def target(self) -> np.ndarray:
        """The buffer the next version is written into."""
        return self.buffers[(self.version + 1) % len(self.buffers)]

    def consume(self, kind: int, data: np.ndarray, lo: int = 0, version: int = -1,
                client: int = 0, samples: int = 0) -> bool:
        """Take one push: a gradient (``GRADIENT``), new values (``LOAD``) or a refusal.

        ``data`` covers ``[lo, lo + data.size)`` of the slice.  Returns True when a new
        version was written into :attr:`target` (the caller publishes it).
        """
        stats = self.stats
        if kind == LOAD:
            self._write(data, lo, None)
            return True
        if kind != GRADIENT:
            stats.refused += 1
            return False
        return self._apply(data, lo, version, client, samples, data.nbytes)

    def consume_packet(self, words: np.ndarray, tau: float, lo: int, size: int,
                       version: int = -1, client: int = 0, samples: int = 0) -> bool:
        """Take a compressed push (``PACKET``): decode it over ``[lo, lo + size)``, apply.

        ``words`` are packed entries indexed from ``lo`` (:func:`~mpibelief.compression.
        split_words`); each adds ``+-tau``.  Decoding into a zeroed dense vector and then
        running the usual rule keeps one update path for every kind of push.  Returns
        True when a new version was written (as :meth:`consume`).
        """
        if self.scratch is None:
            self.scratch = np.zeros(self.current.size, np.float32)
        dense = self.scratch[:size]
        dense[:] = 0.0
        decode_add(words, np.float32(tau), dense)
        return self._apply(dense, lo, version, client, samples, words.nbytes + HEADER_BYTES)

    def _apply(self, grad: np.ndarray, lo: int, version: int, client: int, samples: int,
               nbytes: int) -> bool:
        stats = self.stats
        stats.bytes_in += nbytes
        if self.accumulate is not None:
            return self._accumulate(grad, lo, client, samples)
        if not self._write(grad, lo, self.optimizer):
            stats.refused += 1
            return False
        stats.applied += 1
        self.samples[client] += samples
        if version >= 0:  # a version from the future is a caller's mix-up: count it 0
            stats.record_staleness(max(stats.version - 1 - version, 0))
        return True

    def snapshot(self) -> tuple[dict, dict]:
        """The arrays and counters a checkpoint needs (copies: the shard goes on).

        The named vectors go too (``vec_<name>``: Sandblaster's L-BFGS history and
        gradient live only here), so a checkpoint taken between batches is the whole
        of the shard's part of the run.
        """
        arrays = {"params": self.current.copy()}
        if self.opt_state is not None:
            arrays["opt_state"] = self.opt_state.copy()
        arrays.update({f"vec_{name}": v.copy() for name, v in self.vectors.items()})
        st = self.stats
        counters = {"version": st.version, "applied": st.applied, "refused": st.refused,
                    "bytes_in": st.bytes_in, "samples": self.samples.tolist(),
                    "staleness": st.staleness.tolist()}
        return arrays, counters

    def restore(self, arrays: dict, counters: dict) -> None:
        """Become the state a :meth:`snapshot` recorded; the caller publishes the version."""
        if arrays["params"].shape != self.current.shape:
            raise ValueError(f"checkpoint slice of {arrays['params'].size} parameters for a"
                             f" shard of {self.current.size}")
        st = self.stats
        st.version = int(counters["version"])
        self.current[:] = arrays["params"]
        if self.opt_state is not None:
            self.opt_state[:] = arrays["opt_state"]
        st.applied, st.refused = int(counters["applied"]), int(counters["refused"])
        st.bytes_in = int(counters["bytes_in"])
        st.staleness = np.array(counters["staleness"], np.int64)
        self.samples[:] = counters["samples"]
        self.vectors = {name[4:]: np.array(v, np.float32) for name, v in arrays.items()
                        if name.startswith("vec_")}

    def _accumulate(self, data: np.ndarray, lo: int, client: int, samples: int) -> bool:
        """Sum a gradient push into the accumulator (refused whole if not finite, or
        from an excluded client)."""
        if client in self.excluded or not all_finite(data):
            self.stats.refused += 1
            return False
        self.vector(self.accumulate)[lo:lo + data.size] += data
        self.count_summed(client, samples)
        return False  # nothing to publish: the parameters did not change

    def count_summed(self, client: int, samples: int) -> None:
        """Count a push summed into the accumulator: applied, and the samples it covers
        (the virtual-time simulator counts each push here when it arrives and adds the
        data of an evaluation's pushes at once, see
        :mod:`mpibelief.simulate.sandblaster_cluster`)."""
        self.stats.applied += 1
        self.samples[client] += samples
        self.accum_samples[client] += samples

    def _write(self, data: np.ndarray, lo: int, rule: Optimizer | None) -> bool:
        """Write the next version: ``data`` applied (or copied) on its range, the rest kept."""
        cur, out = self.current, self.target
        hi = lo + data.size
        if rule is None:
            out[lo:hi] = data
        else:
            state = None if self.opt_state is None else self.opt_state[lo:hi]
            if not rule.step(cur[lo:hi], data, state, out[lo:hi]):
                return False
        if lo > 0 or hi < cur.size:  # a ranged push: the rest of the slice carries over
            out[:lo], out[hi:] = cur[:lo], cur[hi:]
        self.stats.version += 1
        return True
