"""One partition's compute, per layer, timed alone on one core.

The scaling model needs, for every ``P`` and partition ``p``, the seconds each layer's
forward and backward take on ``p``'s tile.  Tiles repeat: a grid of tiles of a map
cut by :func:`mpibelief.layout.shard_slices` has at most two row heights and two
column widths, and output units are cut into at most two widths, so a layer has at
most four distinct local shapes for any ``P``, and shapes recur across ``P``.  Each
distinct ``(layer, input window, output tile)`` is timed once (the cache is shared
over every ``P`` asked for), which keeps 144 partitions of the 1.7B model affordable:
the cost is about ``sum over P of (distinct shapes) x (whole step) / P``.

A local layer is timed on its own: its own parameter arrays (filled with a small
constant: the kernels' work does not depend on the values, and a constant is cheaper
than drawing 1.4 billion normals), a random input window and output gradient, one
warm-up call on one sample (Numba's JIT), then the median of ``repeats`` calls, or a
single call when one already takes longer than ``slow`` seconds.  This is the same
code the partition runs (:meth:`PartitionedModel.forward` calls ``layer.forward`` on
the window), without the copies that assemble windows, which are small beside it.

The clock is the thread's CPU time, not the wall's: this machine is shared, and at
load 5-15 on 2 cores the wall time of one call swung 2-6x with other jobs (80M, one
step: 0.27 s alone, 1.8 s in a busy minute), while its CPU time held.  A tile's CPU
time is its compute on a core of its own, which is what a machine per partition gives.
"""

from __future__ import annotations

import time

import numpy as np

from mpibelief.layers import box_shape
from mpibelief.plan import Plan

__all__ = ["LayerTimer"]


class LayerTimer:
    """Times local layers of ``model`` at mini-batch ``batch``, caching by shape.

    Attributes:
        timed: how many distinct local layers were timed; seconds: time spent timing.
    """

    def __init__(self, model, batch: int, repeats: int = 3, slow: float = 2.0):
        self.model, self.batch, self.repeats, self.slow = model, batch, repeats, slow
        self.cache: dict[tuple, tuple[float, float]] = {}
        self.timed, self.seconds = 0, 0.0

    def times(self, partitions: int) -> tuple[np.ndarray, np.ndarray]:
        """``(forward, backward)``: ``(layers, P)`` seconds for each layer's tile."""
        plan = Plan(self.model, partitions)
        L = len(self.model.layers)
        fwd, bwd = np.zeros((L, partitions)), np.zeros((L, partitions))
        for i, layer in enumerate(self.model.layers):
            for p, tile in enumerate(plan.tiles[i]):
                win = plan.windows[i][p]
                if win is None:
                    continue  # an empty tile: no work
                key = (i, box_shape(win), box_shape(tile))
                if key not in self.cache:
                    tick = time.perf_counter()
                    self.cache[key] = self._time(layer.local(tile), box_shape(win), i == 0)
                    self.seconds += time.perf_counter() - tick
                    self.timed += 1
                fwd[i, p], bwd[i, p] = self.cache[key]
        return fwd, bwd

    def _time(self, local, win_shape, first: bool) -> tuple[float, float]:
        params = np.full(local.size, 0.01, np.float32)
        grads = np.zeros(local.size, np.float32)
        local.bind(params, grads)
        rng = np.random.default_rng(0)

        def arrays(n):
            x = rng.standard_normal((n, *win_shape), dtype=np.float32)
            out = np.zeros((n, *local.out_shape), np.float32)
            dy = rng.standard_normal(out.shape, dtype=np.float32)
            return x, out, dy, None if first else np.zeros_like(x)

        self._once(local, *arrays(1))  # compile for these types (Numba's cache)
        x, out, dy, dx = arrays(self.batch)
        runs = []
        for _ in range(self.repeats):
            runs.append(self._once(local, x, out, dy, dx))
            if sum(runs[-1]) > self.slow:
                break
        return tuple(float(v) for v in np.median(np.array(runs), axis=0))

    @staticmethod
    def _once(local, x, out, dy, dx) -> tuple[float, float]:
        dy = dy.copy()  # backward overwrites it; copied outside the clock
        tick = time.thread_time()
        local.forward(x, out)
        mid = time.thread_time()
        local.backward(x, out, dy, dx)
        return mid - tick, time.thread_time() - mid
