"""The arithmetic a sync exchange costs each replica, beside the bytes it moves.

:mod:`.collectives` charges the network; this charges the CPU, per entry or per word,
each cost timed on the code that does it:

- reduce: the allreduce's additions.  MPICH sums with a C loop over the received half
  (:mod:`.collectives`: ``((p'-1)/p' + [R > p']) * n`` entries a rank); timed as
  ``np.add(a, b, out=a)`` over ``n`` float32, the same one-pass loop.
- encode: :meth:`mpibelief.compressor.Compressor.compress` (add to the residual, choose
  tau, pack), seconds per gradient entry, with the config's ``[compression]`` policy.
- decode: :func:`mpibelief.compression.decode_packets` into the dense update: zeroing
  ``n`` entries plus one add per packet word, fitted to a decode of one packet and of
  16 (two points, least squares is no better).

Measured here (n = 514098, the FSDD model, 1% kept; medians of 9): at load ~4,
reduce 0.12-0.17 ns, encode 3.0 ns per entry (1.5 ms a step, as much as a 15-sample
gradient), decode 0.06 ns per entry plus 1.2 ns per word; at load 6-7 encode took
5.9-7.4 ns per entry.  Without these a compressed step would look free of the codec's
five passes over the vector, and Strom's method would be flattered exactly where it is
cheapest (small models, fast networks).

The costs are written into the calibration file (``work_*`` root attributes) by
``mpibelief simulate --calibrate``; a file made before they existed is completed by
timing them when the simulation starts, and the run's attributes say which.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace
from functools import partial
from pathlib import Path

import h5py
import numpy as np

from mpibelief.simulate.collectives import pof2

PREFIX = "work_"


@dataclass(frozen=True)
class LocalWork:
    """Seconds of exchange arithmetic: per float32 entry, or per packet word."""

    reduce_per_entry: float = 0.0
    encode_per_entry: float = 0.0
    decode_per_entry: float = 0.0
    decode_per_word: float = 0.0

    def reduce(self, n: int, ranks: int) -> float:
        """A rank's additions in MPICH's Rabenseifner allreduce of ``n`` entries."""
        if ranks <= 1:
            return 0.0
        p = pof2(ranks)
        return ((p - 1) / p + (ranks > p)) * n * self.reduce_per_entry

    def encode(self, n: int) -> float:
        return n * self.encode_per_entry

    def decode(self, n: int, words: int) -> float:
        return n * self.decode_per_entry + words * self.decode_per_word

    def scaled(self, factor: float) -> LocalWork:
        return LocalWork(*(v * factor for v in asdict(self).values()))

    def attrs(self) -> dict[str, float]:
        """The costs as calibration-file attributes (``work_*``)."""
        return {PREFIX + k: v for k, v in asdict(self).items()}


def _median(fn, repeats: int) -> float:
    fn()  # warm-up (the kernels compile or load on their first call)
    took = []
    for _ in range(repeats):
        tick = time.perf_counter()
        fn()
        took.append(time.perf_counter() - tick)
    return float(np.median(took))


def measure(n: int, comp, repeats: int = 9, seed: int = 0) -> LocalWork:
    """Time the three on this machine for a vector of ``n`` entries (medians)."""
    from mpibelief.compression import decode_packets
    from mpibelief.compressor import Compressor

    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    reduce = _median(lambda: np.add(a, b, out=a), repeats) / n
    Compressor.warm()
    codec = Compressor(n, replace(comp, enabled=True), 0)
    grad = b * np.float32(1e-3)
    encode = _median(lambda: codec.compress(grad, 0.0), repeats) / n
    packet = codec.compress(grad, 0.0)[0].copy()
    out = np.empty(n, np.float32)
    seconds, words = [], []
    for copies in (1, 16):
        buffer = np.tile(packet, copies)
        counts = np.full(copies, packet.size, np.int32)
        displs = np.arange(copies, dtype=np.int32) * packet.size
        seconds.append(_median(partial(decode_packets, buffer, counts, displs, out), repeats))
        words.append(buffer.size)
    per_word = max((seconds[1] - seconds[0]) / (words[1] - words[0]), 0.0)
    per_entry = max(seconds[0] - per_word * words[0], 0.0) / n
    return LocalWork(reduce, encode, per_entry, per_word)


def read(calibration: Path) -> LocalWork | None:
    """The costs a calibration file holds, or None if it was made without them."""
    with h5py.File(calibration, "r") as f:
        names = [PREFIX + k for k in asdict(LocalWork())]
        if not all(name in f.attrs for name in names):
            return None
        return LocalWork(*(float(f.attrs[name]) for name in names))


def for_run(calibration: Path, n: int, comp) -> tuple[LocalWork, str]:
    """``(costs, where they came from)``: the calibration file's, else timed now."""
    found = read(calibration)
    if found is not None:
        return found, str(calibration)
    return measure(n, comp), "timed when the simulation started"
