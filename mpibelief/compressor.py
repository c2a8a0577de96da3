"""A replica's compressor as the config asks for it, with the log of what it sent.

:mod:`mpibelief.compression` is the codec (residual, threshold, packet words); this
module binds it to a run: the tau policy from the ``[compression]`` table, the epoch the
warm-up schedule sees, and one row per compressed step for the result file's
``/compression`` group (its columns: :data:`mpibelief.results.COMPRESSION`).  Sync SGD
and Downpour's replicas both use it, so both record the same figures the same way.

The log is plain numpy, grown by doubling: a rank that is not the writer keeps its rows
and sends them to the coordinating rank in its closing report (one pickled message at
the end, nothing on the training path).
"""

from __future__ import annotations

import numpy as np

from mpibelief.compression import AdaptiveTau, FixedTau, FractionSchedule, ThresholdCompressor
from mpibelief.results import COMPRESSION


def policy(comp) -> FixedTau | AdaptiveTau:
    """The tau policy of a ``[compression]`` table (a ``CompressionConfig``)."""
    if comp.tau > 0:
        return FixedTau(comp.tau)
    if comp.warmup_stages:
        return AdaptiveTau(FractionSchedule.geometric(
            comp.fraction, comp.warmup_start, comp.warmup_stages, comp.warmup_epochs))
    return AdaptiveTau(FractionSchedule(comp.fraction))


def label(comp) -> str:
    """Short name for plots: ``strom(tau=0.001)`` or ``strom(1%)`` (``+warmup``)."""
    if comp.tau > 0:
        return f"strom(tau={comp.tau:g})"
    warm = "+warmup" if comp.warmup_stages else ""
    return f"strom({100 * comp.fraction:g}%{warm})"


class StepLog:
    """One row of :data:`~mpibelief.results.COMPRESSION` per compressed step of one rank."""

    def __init__(self, rank: int, capacity: int = 1024):
        self.rank = rank
        self.rows = np.zeros((capacity, len(COMPRESSION)))
        self.count = 0

    def add(self, step: int, epoch: float, stats) -> dict:
        """Record one step's :class:`~mpibelief.compression.StepStats`; returns the row."""
        row = {"rank": self.rank, "step": step, "epoch": epoch, "tau": stats.tau,
               "fraction": stats.fraction, "bytes_dense": stats.bytes_dense,
               "bytes_compressed": stats.bytes_compressed, "ratio": stats.ratio,
               "residual_norm": stats.residual_norm}
        if self.count == len(self.rows):
            self.rows = np.concatenate([self.rows, np.zeros_like(self.rows)])
        self.rows[self.count] = [row[name] for name in COMPRESSION]
        self.count += 1
        return row

    def columns(self) -> dict[str, np.ndarray]:
        """The rows so far, by column name (for ``Series.extend``)."""
        return {name: self.rows[:self.count, i].copy() for i, name in enumerate(COMPRESSION)}

    def totals(self) -> tuple[int, int]:
        """(dense bytes, compressed bytes) over every step logged."""
        cols = self.columns()
        return int(cols["bytes_dense"].sum()), int(cols["bytes_compressed"].sum())


class Compressor:
    """A :class:`ThresholdCompressor` over ``n`` entries that logs every step.

    Args:
        n: length of the gradient it compresses.
        comp: the ``[compression]`` config table.
        rank: the rank it runs on (the log's ``rank`` column).
    """

    def __init__(self, n: int, comp, rank: int):
        self.codec = ThresholdCompressor(n, policy(comp))
        self.log = StepLog(rank)
        self.steps = 0

    def compress(self, grad: np.ndarray, epoch: float) -> tuple[np.ndarray, dict]:
        """Add ``grad`` to the residual; returns the packet (a view) and the logged row."""
        packet, stats = self.codec.compress(grad, epoch)
        self.steps += 1
        return packet, self.log.add(self.steps, epoch, stats)

    @staticmethod
    def warm() -> None:
        """Compile (or load from numba's cache) the codec's kernels before timing."""
        from mpibelief.compression import decode_packets

        codec = ThresholdCompressor(64, AdaptiveTau(FractionSchedule(0.1)))
        packet, _ = codec.compress(np.ones(64, np.float32))
        ThresholdCompressor(64, FixedTau(0.5)).compress(np.ones(64, np.float32))
        counts = np.array([packet.size], np.int32)
        decode_packets(packet, counts, np.zeros(1, np.int32), np.zeros(64, np.float32))
