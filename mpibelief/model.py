"""A layer stack over one flat float32 parameter vector.

Every layer's weights are views into ``Model.params`` and its gradients views into
``Model.grads``, so the whole model can be pulled from or pushed to the parameter shards
as one contiguous vector (and sliced over shards) without copying layer by layer.
The math is the Numba kernels of :mod:`mpibelief.kernels`; buffers for activations are
allocated once per batch size and reused.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from mpibelief import kernels
from mpibelief.layout import shard_slices

_ACTIVATIONS = {
    "sigmoid": (kernels.sigmoid_forward, kernels.sigmoid_backward),
    "tanh": (kernels.tanh_forward, kernels.tanh_backward),
    "relu": (kernels.relu_forward, kernels.relu_backward),
}
# Weight scale per activation, times 1/sqrt(fan_in): He for relu, LeCun otherwise.
_GAIN = {"relu": np.sqrt(2.0), "tanh": 1.0, "sigmoid": 1.0}


class Dense:
    """A fully connected layer ``y = x @ w + b``, optionally followed by an activation."""

    def __init__(self, n_in: int, n_out: int, activation: str | None):
        self.n_in, self.n_out, self.activation = n_in, n_out, activation
        self.size = n_in * n_out + n_out

    def partition_sizes(self, partitions: int) -> list[int]:
        """Parameters each partition owns: the layer's output units split as evenly as
        possible (a unit's weights and bias go with the unit)."""
        return [self.n_in * (u.stop - u.start) + (u.stop - u.start)
                for u in shard_slices(self.n_out, partitions)]

    def bind(self, params: np.ndarray, grads: np.ndarray) -> None:
        """Point the layer's weights and gradients at its slice of the flat vectors."""
        n_w = self.n_in * self.n_out
        self.w = params[:n_w].reshape(self.n_in, self.n_out)
        self.b = params[n_w:]
        self.dw = grads[:n_w].reshape(self.n_in, self.n_out)
        self.db = grads[n_w:]

    def init(self, rng: np.random.Generator, scale: float) -> None:
        gain = _GAIN.get(self.activation or "tanh", 1.0)
        std = scale * gain / np.sqrt(self.n_in)
        self.w[...] = rng.standard_normal(self.w.shape, dtype=np.float32) * np.float32(std)
        self.b[...] = 0.0

    def forward(self, x: np.ndarray, out: np.ndarray) -> None:
        kernels.dense_forward(x, self.w, self.b, out)
        if self.activation:
            _ACTIVATIONS[self.activation][0](out, out)

    def backward(self, x, y, dy, dx) -> None:
        """Back-propagate ``dy`` (overwritten with the pre-activation gradient).

        ``dx`` is None for the first layer, whose input gradient nobody needs.
        """
        if self.activation:
            _ACTIVATIONS[self.activation][1](y, dy, dy)
        if dx is None:
            kernels.dense_backward_params(x, dy, self.dw, self.db)
        else:
            kernels.dense_backward(x, self.w, dy, dx, self.dw, self.db)


@dataclass(frozen=True)
class ParamLayout:
    """Where each (layer, partition) lives in the flat parameter vector.

    Partition-major: all of partition 0's parameters (layer by layer), then partition
    1's, and so on, so that a partition's parameters are one contiguous range on the
    shards and its client pulls and pushes one range.  With one partition this is the
    layers in order, the flat vector the model has always used.

    Attributes:
        partitions: the number of partitions ``P``.
        ranges: ``(layer, partition) -> (start, stop)`` in the flat vector.
    """

    partitions: int
    ranges: dict

    @classmethod
    def of(cls, layers, partitions: int) -> ParamLayout:
        sizes = [layer.partition_sizes(partitions) for layer in layers]
        ranges, at = {}, 0
        for p in range(partitions):
            for i, per_partition in enumerate(sizes):
                ranges[(i, p)] = (at, at + per_partition[p])
                at += per_partition[p]
        return cls(partitions, ranges)

    def partition(self, p: int) -> tuple[int, int]:
        """Partition ``p``'s range ``(lo, hi)`` of the flat vector."""
        mine = [r for (_, q), r in self.ranges.items() if q == p]
        return min(lo for lo, _ in mine), max(hi for _, hi in mine)


class Model:
    """A fully connected classifier: hidden layers of one width, softmax output.

    Attributes:
        params: the flat float32 parameter vector every layer views into.
        grads: the flat float32 gradient of the last :meth:`loss_and_grad` call.
    """

    def __init__(self, n_inputs: int, n_classes: int, hidden: int, layers: int,
                 activation: str):
        widths = [n_inputs] + [hidden] * layers + [n_classes]
        self.layers = [
            Dense(a, b, activation if i < layers else None)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))
        ]
        self.n_inputs, self.n_classes = n_inputs, n_classes
        self.n_params = sum(layer.size for layer in self.layers)
        self.params = np.zeros(self.n_params, dtype=np.float32)
        self.grads = np.zeros(self.n_params, dtype=np.float32)
        offset = 0
        for layer in self.layers:
            end = offset + layer.size
            layer.bind(self.params[offset:end], self.grads[offset:end])
            offset = end
        self._buffers: dict[int, tuple] = {}

    def layout(self, partitions: int = 1) -> ParamLayout:
        """The parameter layout for a replica split into ``partitions`` ranks."""
        return ParamLayout.of(self.layers, partitions)

    @staticmethod
    def size_of(cfg, n_inputs: int, n_classes: int) -> int:
        """Parameters the model of ``cfg`` would have, without allocating it."""
        widths = [n_inputs] + [cfg.hidden] * cfg.layers + [n_classes]
        return sum(a * b + b for a, b in zip(widths[:-1], widths[1:], strict=True))

    @classmethod
    def from_config(cls, cfg, n_inputs: int, n_classes: int) -> Model:
        """Build from a :class:`mpibelief.config.ModelConfig`."""
        return cls(n_inputs, n_classes, cfg.hidden, cfg.layers, cfg.activation)

    def init(self, seed: int, scale: float = 1.0) -> None:
        """Random weights, zero biases; the same seed gives the same model on every rank."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.init(rng, scale)

    def _bufs(self, n: int):
        """Per-batch-size activations, their gradients and the softmax buffers."""
        if n not in self._buffers:
            acts = [np.empty((n, layer.n_out), np.float32) for layer in self.layers]
            grads = [np.empty_like(a) for a in acts]
            self._buffers[n] = (acts, grads, np.empty_like(acts[-1]))
        return self._buffers[n]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits for a batch; the returned array is reused by the next call."""
        acts, _, _ = self._bufs(len(x))
        inp = x
        for layer, out in zip(self.layers, acts, strict=True):
            layer.forward(inp, out)
            inp = out
        return inp

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """Mean cross-entropy and number correct on a batch; fills :attr:`grads`."""
        acts, dacts, probs = self._bufs(len(x))
        logits = self.forward(x)
        loss, correct = kernels.softmax_xent(logits, y, probs, dacts[-1])
        for i in range(len(self.layers) - 1, -1, -1):
            inp = x if i == 0 else acts[i - 1]
            dx = None if i == 0 else dacts[i - 1]
            self.layers[i].backward(inp, acts[i], dacts[i], dx)
        return float(loss), int(correct)

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int = 1024) -> tuple[float, float]:
        """Mean loss and accuracy over a whole set, in batches (no gradients)."""
        total_loss, total_correct = 0.0, 0
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            _, dacts, probs = self._bufs(len(xb))
            loss, correct = kernels.softmax_xent(self.forward(xb), yb, probs, dacts[-1])
            total_loss += float(loss) * len(xb)
            total_correct += int(correct)
        n = max(len(x), 1)
        return total_loss / n, total_correct / n
