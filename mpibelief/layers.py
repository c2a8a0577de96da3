"""The layers a model is stacked from, and how each is cut into partitions.

Every activation is an NHWC array ``(n, H, W, C)``; a fully connected layer's output is
``(n, 1, 1, units)``, so one shape vocabulary serves the speech and the image networks.
A layer knows four things beyond its math, which is all model parallelism needs
(:mod:`mpibelief.partition` does the rest):

- ``tiles(P)``: the ``P`` boxes its output is cut into, one per partition.  Spatial
  layers cut the output map into a grid of tiles of output locations (all channels);
  fully connected layers cut their output units.  A box is ``(y0, y1, x0, x1, c0, c1)``.
- ``window(box)``: the box of its *input* that the outputs in ``box`` depend on (the
  receptive fields; for LCN it reaches past the image, where the input is zero).
- ``local(box)``: the same kind of layer, shaped for one tile: it computes exactly the
  outputs in ``box`` from the input ``window(box)``.
- ``piece(views, box)``: the tile's parameters as views of the whole layer's, in the
  local layer's order, so the flat vector can be reordered partition-major.

Parameters: ``size`` floats, ``views(segment)`` shapes a segment of the flat vector into
the layer's arrays (weights, then biases), ``bind`` points the layer at its segments.
"""

from __future__ import annotations

import math

import numpy as np

from mpibelief import kernels
from mpibelief.layout import shard_slices

ACTIVATIONS = {
    "sigmoid": (kernels.sigmoid_forward, kernels.sigmoid_backward),
    "tanh": (kernels.tanh_forward, kernels.tanh_backward),
    "relu": (kernels.relu_forward, kernels.relu_backward),
}
# Weight scale per activation, times 1/sqrt(fan_in): He for relu, LeCun otherwise.
_GAIN = {"relu": np.sqrt(2.0), "tanh": 1.0, "sigmoid": 1.0}


def grid(partitions: int) -> tuple[int, int]:
    """Rows x columns of tiles for ``partitions``: as square as the count allows, more
    rows than columns (2 -> 2x1, 4 -> 2x2, 6 -> 3x2), since a tile's halo is its
    perimeter and square tiles have the least of it."""
    cols = max(d for d in range(1, math.isqrt(partitions) + 1) if partitions % d == 0)
    return partitions // cols, cols


def spatial_tiles(shape, partitions: int) -> list[tuple]:
    """Boxes of a ``grid(partitions)`` of tiles of an ``(H, W, C)`` map (all channels)."""
    rows, cols = grid(partitions)
    h, w, c = shape
    return [(r.start, r.stop, q.start, q.stop, 0, c)
            for r in shard_slices(h, rows) for q in shard_slices(w, cols)]


def box_shape(box) -> tuple[int, int, int]:
    y0, y1, x0, x1, c0, c1 = box
    return y1 - y0, x1 - x0, c1 - c0


class Layer:
    """Defaults for layers without parameters."""

    size = 0
    activation = None

    def partition_sizes(self, partitions: int) -> list[int]:
        return [self.local(box).size for box in self.tiles(partitions)]

    def views(self, segment: np.ndarray) -> tuple:
        return ()

    def piece(self, views: tuple, box) -> list:
        return []

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        pass

    def init(self, rng: np.random.Generator, scale: float) -> None:
        pass

    def _activate(self, out):
        if self.activation:
            ACTIVATIONS[self.activation][0](out, out)

    def _deactivate(self, y, dy):
        if self.activation:
            ACTIVATIONS[self.activation][1](y, dy, dy)


class Dense(Layer):
    """A fully connected layer ``y = x @ w + b`` over the flattened input, optionally
    followed by an activation; partitioned by output units (a unit's weights and bias
    go with the unit)."""

    def __init__(self, n_in: int, n_out: int, activation: str | None, in_shape=None):
        self.n_in, self.n_out, self.activation = n_in, n_out, activation
        self.in_shape = tuple(in_shape) if in_shape is not None else (1, 1, n_in)
        self.out_shape = (1, 1, n_out)
        self.size = n_in * n_out + n_out

    def tiles(self, partitions):
        return [(0, 1, 0, 1, u.start, u.stop) for u in shard_slices(self.n_out, partitions)]

    def window(self, box):
        h, w, c = self.in_shape
        return (0, h, 0, w, 0, c)

    def local(self, box):
        return Dense(self.n_in, box[5] - box[4], self.activation, self.in_shape)

    def views(self, segment):
        n_w = self.n_in * self.n_out
        return segment[:n_w].reshape(self.n_in, self.n_out), segment[n_w:]

    def piece(self, views, box):
        w, b = views
        return [w[:, box[4]:box[5]], b[box[4]:box[5]]]

    def bind(self, params, grads):
        self.w, self.b = self.views(params)
        self.dw, self.db = self.views(grads)

    def init(self, rng, scale):
        std = scale * _GAIN.get(self.activation or "tanh", 1.0) / np.sqrt(self.n_in)
        self.w[...] = rng.standard_normal(self.w.shape, dtype=np.float32) * np.float32(std)
        self.b[...] = 0.0

    def forward(self, x, out):
        out2 = out.reshape(len(out), self.n_out)
        kernels.dense_forward(x.reshape(len(x), self.n_in), self.w, self.b, out2)
        self._activate(out2)

    def backward(self, x, y, dy, dx) -> None:
        """Back-propagate ``dy`` (overwritten with the pre-activation gradient); ``dx``
        is None for the first layer, whose input gradient nobody needs."""
        n = len(x)
        dy2 = dy.reshape(n, self.n_out)
        self._deactivate(y.reshape(n, self.n_out), dy2)
        x2 = x.reshape(n, self.n_in)
        if dx is None:
            kernels.dense_backward_params(x2, dy2, self.dw, self.db)
        else:
            kernels.dense_backward(x2, self.w, dy2, dx.reshape(n, self.n_in), self.dw, self.db)


class LocallyConnected(Layer):
    """Locally connected: every output location has its own ``rf x rf x C -> units``
    weights (no sharing), then an activation.  Partitioned by tiles of locations."""

    def __init__(self, in_shape, rf: int, stride: int, units: int, activation: str | None):
        self.in_shape, self.rf, self.stride, self.units = tuple(in_shape), rf, stride, units
        self.activation = activation
        h, w, c = self.in_shape
        if rf > min(h, w):
            raise ValueError(f"a {rf}x{rf} field does not fit a {h}x{w} input")
        oh, ow = kernels.lc_output_shape(h, w, rf, stride)
        self.k = rf * rf * c
        self.out_shape = (oh, ow, units)
        self.size = oh * ow * (self.k * units + units)

    def tiles(self, partitions):
        return spatial_tiles(self.out_shape, partitions)

    def window(self, box):
        y0, y1, x0, x1 = box[:4]
        s, rf = self.stride, self.rf
        if y1 <= y0 or x1 <= x0:
            return (0, 0, 0, 0, 0, self.in_shape[2])
        return (y0 * s, (y1 - 1) * s + rf, x0 * s, (x1 - 1) * s + rf, 0, self.in_shape[2])

    def local(self, box):
        y0, y1, x0, x1 = box[:4]
        if y1 <= y0 or x1 <= x0:
            return Empty(box_shape(box))
        return LocallyConnected(box_shape(self.window(box)), self.rf, self.stride,
                                self.units, self.activation)

    def views(self, segment):
        oh, ow, u = self.out_shape
        n_w = oh * ow * self.k * u
        # (OH, OW, U, K): the kernels' layout, each location's weights one row per unit
        return segment[:n_w].reshape(oh, ow, u, self.k), segment[n_w:].reshape(oh, ow, u)

    def piece(self, views, box):
        w, b = views
        y0, y1, x0, x1 = box[:4]
        return [w[y0:y1, x0:x1], b[y0:y1, x0:x1]]

    def bind(self, params, grads):
        self.w, self.b = self.views(params)
        self.dw, self.db = self.views(grads)

    def init(self, rng, scale):
        for row, values in zip(self.w, self.init_rows(rng, scale), strict=True):
            row[...] = values
        self.b[...] = 0.0

    def init_rows(self, rng, scale):
        """The initial weights one row of locations at a time, so that a partition can
        keep its tile's part of each row without ever holding the whole layer."""
        std = np.float32(scale * _GAIN.get(self.activation or "tanh", 1.0) / np.sqrt(self.k))
        for _ in range(self.out_shape[0]):
            yield rng.standard_normal((self.out_shape[1], self.units, self.k),
                                      dtype=np.float32) * std

    def forward(self, x, out):
        kernels.lc_forward(x, self.w, self.b, self.rf, self.stride, out)
        self._activate(out.reshape(len(out), -1))

    def backward(self, x, y, dy, dx):
        n = len(x)
        self._deactivate(y.reshape(n, -1), dy.reshape(n, -1))
        scratch = dx if dx is not None else np.empty_like(x)
        kernels.lc_backward(x, self.w, dy, self.rf, self.stride, scratch, self.dw, self.db)


class MaxPool(Layer):
    """Max over non-overlapping ``k x k`` blocks; partitioned by tiles of its output."""

    def __init__(self, in_shape, k: int):
        self.in_shape, self.k = tuple(in_shape), k
        h, w, c = self.in_shape
        self.out_shape = (h // k, w // k, c)

    def tiles(self, partitions):
        return spatial_tiles(self.out_shape, partitions)

    def window(self, box):
        y0, y1, x0, x1, c0, c1 = box
        k = self.k
        return (y0 * k, y1 * k, x0 * k, x1 * k, c0, c1)

    def local(self, box):
        return MaxPool(box_shape(self.window(box)), self.k)

    def forward(self, x, out):
        kernels.maxpool_forward(x, self.k, out)

    def backward(self, x, y, dy, dx):
        if dx is not None:
            kernels.maxpool_backward(x, y, dy, self.k, dx)


class LCN(Layer):
    """Local contrast normalisation over ``m x m`` windows (zero padding: same size).

    The whole-model layer pads its input itself; a tile's local layer (``padded``)
    is given its window, halo and zero padding included, by the partition.
    """

    def __init__(self, in_shape, m: int, eps: float = 1.0, padded: bool = False):
        self.in_shape, self.m, self.eps, self.padded = tuple(in_shape), m, eps, padded
        h, w, c = self.in_shape
        r = 2 * (m // 2) if padded else 0
        self.out_shape = (h - r, w - r, c)
        self._pads: dict[int, tuple] = {}

    def tiles(self, partitions):
        return spatial_tiles(self.out_shape, partitions)

    def window(self, box):
        y0, y1, x0, x1, c0, c1 = box
        r = self.m // 2
        return (y0 - r, y1 + r, x0 - r, x1 + r, c0, c1)

    def local(self, box):
        return LCN(box_shape(self.window(box)), self.m, self.eps, padded=True)

    def _pad(self, n: int):
        if n not in self._pads:
            r, (h, w, c) = self.m // 2, self.in_shape
            self._pads[n] = (np.zeros((n, h + 2 * r, w + 2 * r, c), np.float32),
                             np.empty((n, h + 2 * r, w + 2 * r, c), np.float32))
        return self._pads[n]

    def forward(self, x, out):
        if self.padded:
            kernels.lcn_forward(x, self.m, self.eps, out)
            return
        r, (h, w, _) = self.m // 2, self.in_shape
        xp, _ = self._pad(len(x))
        xp[:, r:r + h, r:r + w] = x
        kernels.lcn_forward(xp, self.m, self.eps, out)

    def backward(self, x, y, dy, dx):
        if dx is None:
            return
        if self.padded:
            kernels.lcn_backward(x, self.m, self.eps, dy, dx)
            return
        r, (h, w, _) = self.m // 2, self.in_shape
        xp, dxp = self._pad(len(x))
        xp[:, r:r + h, r:r + w] = x  # the cached copy may be another batch's
        kernels.lcn_backward(xp, self.m, self.eps, dy, dxp)
        dx[...] = dxp[:, r:r + h, r:r + w]


class Empty(Layer):
    """A partition's share of a layer when the layer has fewer tiles' worth of
    locations than partitions: no outputs, no parameters, no work."""

    def __init__(self, out_shape):
        self.in_shape = self.out_shape = tuple(out_shape)

    def forward(self, x, out):
        pass

    def backward(self, x, y, dy, dx):
        if dx is not None:
            dx[...] = 0.0
