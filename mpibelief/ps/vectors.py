"""Vector commands on the shards: what lets a coordinator run L-BFGS without the vectors.

Sandblaster keeps every vector of L-BFGS on the parameter shards, each shard holding
its slice of each, as named float32 arrays beside its :class:`~mpibelief.ps.state.ShardState`
(``state.vectors``): the accepted parameters ``x``, the gradient at them ``g``, the
direction ``d``, the gradient accumulator ``grad`` that replicas' pushes are summed
into, the trial point ``t`` and the history pairs ``s<k>``/``y<k>``.  The coordinator
names them in small commands; each shard runs them on its slice, and only scalars come
back, summed over the shards by the coordinator.  So the coordinator's traffic per
command is a few dozen bytes whatever the model's size.

Two halves:

- :class:`VectorCommands`, on a shard: ``dot``, ``axpy``, ``scale``, ``copy``,
  ``lincomb``, ``add``, ``mul`` (coefficient-wise), ``zero``, ``push_history``,
  ``reset_accumulator``, ``samples``, ``exclude`` (refuse a client's pushes from now
  on, answering what it had summed) and ``publish`` (the named vector becomes the
  next parameter version through the shard's versioned buffers, so replicas' one-sided
  pulls see the old or the new parameters, never a mix), and ``run``, a list of them
  in one message; :func:`install` registers them on a
  :class:`~mpibelief.ps.shard.ShardServer`.
- :class:`ShardSpace`, on the coordinator: the :class:`~mpibelief.lbfgs.Space` protocol
  over those commands.  Commands that return nothing are queued and travel with the
  next one that returns something (one message per shard: messages from one sender
  arrive in order, so a queued ``axpy`` runs before the ``dot`` that follows it), so
  a step of the two-loop recursion is one round trip.  It counts the bytes it sends
  and receives (pickled size, as mpi4py sends them).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable

import numba
import numpy as np

from mpibelief.ps.state import LOAD, ShardState


@numba.njit(cache=True)
def dot64(a, b):
    """``a . b`` for float32 vectors, summed in float64 (a 1M-term float32 sum drifts)."""
    total = 0.0
    for i in range(a.size):
        total += np.float64(a[i]) * np.float64(b[i])
    return total


@numba.njit(cache=True)
def axpy32(y, alpha, x):
    for i in range(y.size):
        y[i] += alpha * x[i]


class VectorCommands:
    """The vector commands over one shard's state (plain numpy; MPI-free).

    Args:
        state: the shard's state; vectors are ``state.vector(name)``.
        publish: makes an array the next parameter version and returns the version
            (:meth:`ShardServer.publish`); default: the state's own ``LOAD`` path.
    """

    RETURNING = ("dot", "publish", "samples", "exclude")

    def __init__(self, state: ShardState, publish: Callable | None = None):
        self.state = state
        self._publish = publish or self._load

    def _load(self, values: np.ndarray) -> int:
        self.state.consume(LOAD, values)
        return self.state.version

    def v(self, name: str) -> np.ndarray:
        return self.state.vector(name)

    def dot(self, a: str, b: str) -> float:
        return float(dot64(self.v(a), self.v(b)))

    def axpy(self, y: str, alpha: float, x: str) -> None:
        axpy32(self.v(y), np.float32(alpha), self.v(x))

    def scale(self, y: str, alpha: float) -> None:
        self.v(y)[...] *= np.float32(alpha)

    def copy(self, dst: str, src: str) -> None:
        self.v(dst)[...] = self.v(src)

    def lincomb(self, dst: str, a: str, alpha: float, b: str) -> None:
        """``dst = a + alpha b``, ``dst`` may be ``a`` (not ``b``)."""
        out = self.v(dst)
        if dst != a:
            out[...] = self.v(a)
        axpy32(out, np.float32(alpha), self.v(b))

    def add(self, dst: str, a: str, b: str) -> None:
        np.add(self.v(a), self.v(b), out=self.v(dst))

    def mul(self, dst: str, a: str, b: str) -> None:
        np.multiply(self.v(a), self.v(b), out=self.v(dst))

    def zero(self, name: str) -> None:
        self.v(name)[...] = 0.0

    def push_history(self, slot: int, s: str, y: str) -> None:
        """Store the pair ``(s, y)`` as history slot ``slot`` (``s<slot>``, ``y<slot>``)."""
        self.copy(f"s{slot}", s)
        self.copy(f"y{slot}", y)

    def reset_accumulator(self, name: str) -> None:
        """Sum gradient pushes into ``name`` from now on, starting from zero."""
        self.state.accumulate = name
        self.zero(name)
        self.state.accum_samples[...] = 0

    def samples(self) -> list[int]:
        """Samples each client's accumulated pushes cover since the last reset."""
        return self.state.accum_samples.tolist()

    def exclude(self, client: int) -> int:
        """Refuse ``client``'s pushes from now on; returns the samples its pushes summed
        since the last reset (final: no push of it is summed after this)."""
        self.state.excluded.add(client)
        return int(self.state.accum_samples[client])

    def publish(self, name: str) -> int:
        return int(self._publish(self.v(name)))

    def run(self, ops: list[tuple]) -> list | None:
        """Run ``ops`` (``(name, *args)``) in order; the returning ones' answers, or None."""
        returned = []
        for name, *args in ops:
            if name not in COMMANDS or name == "run":
                raise RuntimeError(f"shard {self.state.stats.shard}: unknown vector op {name!r}")
            answer = getattr(self, name)(*args)
            if name in self.RETURNING:
                returned.append(answer)
        return returned or None


COMMANDS = ("dot", "axpy", "scale", "copy", "lincomb", "add", "mul", "zero",
            "push_history", "reset_accumulator", "samples", "exclude", "publish", "run")


def install(shard) -> VectorCommands:
    """Register every vector command on a :class:`~mpibelief.ps.shard.ShardServer`."""
    ops = VectorCommands(shard.state, shard.publish)
    for name in COMMANDS:
        method = getattr(ops, name)
        shard.register(name, lambda source, *args, _m=method: _m(*args))
    dot64(np.zeros(2, np.float32), np.zeros(2, np.float32))  # compile before timing
    axpy32(np.zeros(2, np.float32), np.float32(0), np.zeros(2, np.float32))
    return ops


class ShardSpace:
    """The :class:`~mpibelief.lbfgs.Space` of the shards, seen from the coordinator.

    Args:
        ps: the :class:`~mpibelief.ps.server.ParameterServer` (its ``command``).

    Attributes:
        bytes_out, bytes_in: what the commands cost the coordinator, all shards.
        round_trips: commands it waited for.
    """

    def __init__(self, ps):
        self.ps = ps
        self.queue: list[tuple] = []
        self.bytes_out = self.bytes_in = self.round_trips = 0

    def _op(self, *op) -> None:
        self.queue.append(tuple(float(a) if isinstance(a, np.floating) else a for a in op))

    def _send(self, reply: bool) -> list | None:
        ops, self.queue = self.queue, []
        if not ops:
            return None
        self.bytes_out += len(pickle.dumps(("run", ops), -1)) * len(self.ps.shard_ranks)
        answers = self.ps.command("run", ops, reply=reply)
        if reply:
            self.round_trips += 1
            self.bytes_in += sum(len(pickle.dumps(a, -1)) for a in answers)
        return answers

    def flush(self) -> None:
        """Send the queued commands that return nothing (they run in order anyway)."""
        self._send(False)

    def dots(self, pairs: list[tuple[str, str]]) -> list[float]:
        for a, b in pairs:
            self._op("dot", a, b)
        answers = self._send(True)
        return [float(sum(col)) for col in zip(*answers, strict=True)]

    def axpy(self, y: str, alpha: float, x: str) -> None:
        self._op("axpy", y, alpha, x)

    def scale(self, y: str, alpha: float) -> None:
        self._op("scale", y, alpha)

    def copy(self, dst: str, src: str) -> None:
        self._op("copy", dst, src)

    def lincomb(self, dst: str, a: str, alpha: float, b: str) -> None:
        self._op("lincomb", dst, a, alpha, b)

    def push_history(self, slot: int, s: str, y: str) -> None:
        self._op("push_history", slot, s, y)

    def reset_accumulator(self, name: str = "grad") -> None:
        self._op("reset_accumulator", name)

    def publish(self, name: str) -> list[int]:
        """Make vector ``name`` the parameters (a new version on every shard); waits."""
        self._op("publish", name)
        return [a[-1] for a in self._send(True)]

    def exclude(self, clients: list[int]) -> list[list[int]]:
        """Have every shard refuse the pushes of ``clients`` (a replica's partitions),
        in one round trip; per shard, what each of them had summed there."""
        for client in clients:
            self._op("exclude", client)
        return [[int(x) for x in a[-len(clients):]] for a in self._send(True)]

    def samples(self) -> np.ndarray:
        """Per shard, per client: samples the accumulated pushes cover (shards x clients)."""
        self._op("samples")
        return np.array([a[-1] for a in self._send(True)], np.int64)
