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
``mpibelief simulate --calibrate`` (wall time on this machine, as the rest of that
file).  A dedicated-core calibration (:mod:`.corecosts`, the Figure 4/5 campaigns')
carries the codec's three (``codec_*`` root attributes) in CPU seconds of one core
instead: timed with ``time.thread_time``, so the machine's other jobs do not stretch
them as they stretched the wall clock (the campaigns' first Strom rows, timed at the
start of each run on this shared machine, got 2.9-59 ns per entry for the encode).
Whatever a file lacks is timed (wall time) when the simulation starts, and the run's
``work_source`` says which came from where.
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
CODEC_PREFIX = "codec_"  # a dedicated-core calibration's codec costs (CPU seconds)
CODEC = ("encode_per_entry", "decode_per_entry", "decode_per_word")
TIMED_NOW = "timed when the simulation started"


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


def _times(fn, repeats: int, clock=time.perf_counter) -> np.ndarray:
    """``repeats`` timings of ``fn`` on ``clock``, after one untimed call (the kernels
    compile or load on their first call)."""
    fn()
    took = []
    for _ in range(repeats):
        tick = clock()
        fn()
        took.append(clock() - tick)
    return np.array(took)


def _median(fn, repeats: int, clock=time.perf_counter) -> float:
    return float(np.median(_times(fn, repeats, clock)))


def measure_codec(n: int, comp, repeats: int = 9, seed: int = 0,
                  clock=time.perf_counter) -> tuple[dict[str, float], dict]:
    """Strom's codec on a vector of ``n`` entries, timed on ``clock`` (medians):
    ``({encode_per_entry, decode_per_entry, decode_per_word}, raw timings)``."""
    from mpibelief.compression import decode_packets
    from mpibelief.compressor import Compressor

    rng = np.random.default_rng(seed)
    Compressor.warm()
    codec = Compressor(n, replace(comp, enabled=True), 0)
    grad = rng.standard_normal(n).astype(np.float32) * np.float32(1e-3)
    encodes = _times(lambda: codec.compress(grad, 0.0), repeats, clock)
    packet = codec.compress(grad, 0.0)[0].copy()
    out = np.empty(n, np.float32)
    raw, seconds, words = {"encode_seconds": encodes}, [], []
    for copies in (1, 16):
        buffer = np.tile(packet, copies)
        counts = np.full(copies, packet.size, np.int32)
        displs = np.arange(copies, dtype=np.int32) * packet.size
        took = _times(partial(decode_packets, buffer, counts, displs, out), repeats, clock)
        raw[f"decode_{copies}_packets_seconds"] = took
        seconds.append(float(np.median(took)))
        words.append(buffer.size)
    per_word = max((seconds[1] - seconds[0]) / (words[1] - words[0]), 0.0)
    per_entry = max(seconds[0] - per_word * words[0], 0.0) / n
    raw["packet_words"] = packet.size
    return dict(zip(CODEC, (float(np.median(encodes)) / n, per_entry, per_word),
                    strict=True)), raw


def measure(n: int, comp, repeats: int = 9, seed: int = 0) -> LocalWork:
    """Time the three on this machine for a vector of ``n`` entries (wall medians)."""
    rng = np.random.default_rng(seed)
    a = rng.standard_normal(n).astype(np.float32)
    b = rng.standard_normal(n).astype(np.float32)
    reduce = _median(lambda: np.add(a, b, out=a), repeats) / n
    codec, _ = measure_codec(n, comp, repeats, seed + 1)
    return LocalWork(reduce, **codec)


def read(calibration: Path) -> LocalWork | None:
    """The costs a calibration file holds, or None if it was made without them."""
    with h5py.File(calibration, "r") as f:
        names = [PREFIX + k for k in asdict(LocalWork())]
        if not all(name in f.attrs for name in names):
            return None
        return LocalWork(*(float(f.attrs[name]) for name in names))


def read_codec(calibration: Path) -> dict[str, float] | None:
    """A dedicated-core calibration's codec costs (``codec_*``), or None."""
    with h5py.File(calibration, "r") as f:
        names = [CODEC_PREFIX + k for k in CODEC]
        if not all(name in f.attrs for name in names):
            return None
        return {k: float(f.attrs[CODEC_PREFIX + k]) for k in CODEC}


def codec_attrs(codec: dict[str, float]) -> dict[str, float]:
    return {CODEC_PREFIX + k: float(codec[k]) for k in CODEC}


def for_run(calibration: Path, n: int, comp) -> tuple[LocalWork, str]:
    """``(costs, where they came from)``: the calibration file's ``work_*``; else its
    ``codec_*`` with the reduce timed now; else all timed now (wall time)."""
    found = read(calibration)
    if found is not None:
        return found, str(calibration)
    codec = read_codec(calibration)
    if codec is None:
        return measure(n, comp), TIMED_NOW
    with h5py.File(calibration, "r") as f:
        clock = str(f.attrs.get(CODEC_PREFIX + "clock", "?"))
    timed = measure(n, comp)
    return (LocalWork(timed.reduce_per_entry, **codec),
            f"codec (encode, decode): {calibration}, {clock}; reduce: {TIMED_NOW}")
