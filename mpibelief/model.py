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
from mpibelief.layers import LCN, Dense, LocallyConnected, MaxPool

__all__ = ["LOSSES", "Dense", "Model", "ParamLayout", "image_stack", "mlp_stack"]

# Output kinds: softmax over the classes, or the paper's one-vs-all logistic units.
LOSSES = ("softmax", "logistic")


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


def mlp_stack(n_inputs: int, n_classes: int, hidden: int, layers: int,
              activation: str) -> list:
    """Fully connected: ``layers`` hidden layers of ``hidden`` units, linear outputs."""
    widths = [n_inputs] + [hidden] * layers + [n_classes]
    return [Dense(a, b, activation if i < layers else None)
            for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True))]


def image_stack(input_shape, n_classes: int, units, rf: int = 10, strides=(1, 1, 1),
                pools=(1, 3, 2), lcn: int = 5, activation: str = "relu") -> list:
    """The paper's image network: per stage a locally connected layer (``rf x rf``
    fields, ``units`` per location), max pooling and local contrast normalisation
    (``lcn`` window; 0 for none), then linear outputs over the classes."""
    stack, shape = [], tuple(input_shape)
    units = [units] * len(strides) if isinstance(units, int) else list(units)
    for u, stride, pool in zip(units, strides, pools, strict=True):
        stack.append(LocallyConnected(shape, rf, stride, u, activation))
        shape = stack[-1].out_shape
        if pool > 1:
            stack.append(MaxPool(shape, pool))
            shape = stack[-1].out_shape
        if lcn:
            stack.append(LCN(shape, lcn))
    n_in = int(np.prod(shape))
    stack.append(Dense(n_in, n_classes, None, in_shape=shape))
    return stack


class Model:
    """A layer stack over one flat parameter vector, with a softmax or logistic output.

    ``Model(n_inputs, n_classes, hidden, layers, activation)`` is the fully connected
    classifier; :meth:`of` takes any stack (see :func:`image_stack`).  With
    ``allocate=False`` nothing is allocated: the model is a description (sizes,
    layout) for ``mpibelief info`` and for ranks that hold only a partition.

    Attributes:
        params: the flat float32 parameter vector every layer views into.
        grads: the flat float32 gradient of the last :meth:`loss_and_grad` call.
    """

    def __init__(self, n_inputs: int, n_classes: int, hidden: int, layers: int,
                 activation: str, allocate: bool = True):
        self._setup(mlp_stack(n_inputs, n_classes, hidden, layers, activation),
                    (1, 1, n_inputs), "softmax", allocate)

    @classmethod
    def of(cls, stack: list, input_shape, loss: str = "softmax",
           allocate: bool = True) -> Model:
        model = cls.__new__(cls)
        model._setup(stack, tuple(input_shape), loss, allocate)
        return model

    def _setup(self, stack, input_shape, loss, allocate) -> None:
        if loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
        self.layers, self.input_shape, self.loss = stack, input_shape, loss
        self.n_inputs = int(np.prod(input_shape))
        self.n_classes = stack[-1].out_shape[-1]
        self.n_params = sum(layer.size for layer in self.layers)
        self.offsets = np.cumsum([0] + [layer.size for layer in self.layers]).tolist()
        self._buffers: dict[int, tuple] = {}
        self.params = self.grads = None
        if allocate:
            self.params = np.zeros(self.n_params, dtype=np.float32)
            self.grads = np.zeros(self.n_params, dtype=np.float32)
            for i, layer in enumerate(self.layers):
                lo, hi = self.offsets[i], self.offsets[i + 1]
                layer.bind(self.params[lo:hi], self.grads[lo:hi])

    def layout(self, partitions: int = 1) -> ParamLayout:
        """The parameter layout for a replica split into ``partitions`` ranks."""
        return ParamLayout.of(self.layers, partitions)

    @staticmethod
    def size_of(cfg, n_inputs: int, n_classes: int) -> int:
        """Parameters the model of ``cfg`` would have, without allocating it."""
        return Model.from_config(cfg, n_inputs, n_classes, allocate=False).n_params

    @classmethod
    def from_config(cls, cfg, n_inputs: int, n_classes: int, allocate: bool = True) -> Model:
        """Build from a :class:`mpibelief.config.ModelConfig` (``kind`` mlp or image)."""
        if cfg.kind == "mlp":
            return cls(n_inputs, n_classes, cfg.hidden, cfg.layers, cfg.activation, allocate)
        shape = tuple(cfg.input_shape)
        if int(np.prod(shape)) != n_inputs:
            from mpibelief.errors import ConfigError

            raise ConfigError(f"model.input_shape = {list(shape)} holds {int(np.prod(shape))}"
                              f" values but the data has {n_inputs} inputs")
        stack = image_stack(shape, n_classes, cfg.units, cfg.rf, cfg.strides, cfg.pools,
                            cfg.lcn, cfg.activation)
        return cls.of(stack, shape, cfg.output, allocate)

    def init(self, seed: int, scale: float = 1.0) -> None:
        """Random weights, zero biases; the same seed gives the same model on every rank."""
        rng = np.random.default_rng(seed)
        for layer in self.layers:
            layer.init(rng, scale)

    def to_layout(self, whole: np.ndarray, partitions: int,
                  out: np.ndarray | None = None) -> np.ndarray:
        """A flat vector in this model's order (one partition) rearranged into the
        partition-major order of ``layout(partitions)``, as the shards hold it."""
        out = np.empty_like(whole) if out is None else out
        for at, part in self._pieces(whole, partitions):
            out[at:at + part.size] = part.ravel()
        return out

    def from_layout(self, ordered: np.ndarray, partitions: int,
                    out: np.ndarray | None = None) -> np.ndarray:
        """The inverse of :meth:`to_layout`."""
        out = np.empty_like(ordered) if out is None else out
        for at, part in self._pieces(out, partitions):
            part[...] = ordered[at:at + part.size].reshape(part.shape)
        return out

    def _pieces(self, whole: np.ndarray, partitions: int):
        """``(offset in the partition-major vector, view of whole)`` for every piece."""
        for (i, p), (lo, hi) in self.layout(partitions).ranges.items():
            layer = self.layers[i]
            views = layer.views(whole[self.offsets[i]:self.offsets[i + 1]])
            at = lo
            for part in layer.piece(views, layer.tiles(partitions)[p]):
                yield at, part
                at += part.size
            assert at == hi, (i, p, at, hi)

    def _bufs(self, n: int):
        """Per-batch-size activations, their gradients and the output's buffers."""
        if n not in self._buffers:
            acts = [np.empty((n, *layer.out_shape), np.float32) for layer in self.layers]
            grads = [np.empty_like(a) for a in acts]
            self._buffers[n] = (acts, grads, np.empty((n, self.n_classes), np.float32))
        return self._buffers[n]

    def forward(self, x: np.ndarray) -> np.ndarray:
        """Logits ``(n, n_classes)`` for a batch; reused by the next call."""
        acts, _, _ = self._bufs(len(x))
        inp = x.reshape(len(x), *self.input_shape)
        for layer, out in zip(self.layers, acts, strict=True):
            layer.forward(inp, out)
            inp = out
        return inp.reshape(len(x), self.n_classes)

    def _loss(self, logits, y, probs, dlogits) -> tuple[float, int]:
        if self.loss == "softmax":
            return kernels.softmax_xent(logits, y, probs, dlogits)
        loss = kernels.logistic_xent(logits, y, 0, probs, dlogits)
        return loss, int(np.sum(np.argmax(logits, axis=1) == y))

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """Mean loss and number correct on a batch; fills :attr:`grads`."""
        acts, dacts, probs = self._bufs(len(x))
        logits = self.forward(x)
        loss, correct = self._loss(logits, y, probs, dacts[-1].reshape(logits.shape))
        x4 = x.reshape(len(x), *self.input_shape)
        for i in range(len(self.layers) - 1, -1, -1):
            inp = x4 if i == 0 else acts[i - 1]
            dx = None if i == 0 else dacts[i - 1]
            self.layers[i].backward(inp, acts[i], dacts[i], dx)
        return float(loss), int(correct)

    def range_losses(self, x: np.ndarray, y: np.ndarray,
                     bounds: list[tuple[int, int]]) -> list[float]:
        """The mean loss of each row range ``(lo, hi)`` of a batch, from one forward pass:
        what ``loss_and_grad`` on those rows alone returns, without the gradients (the
        simulated Sandblaster's portions, :mod:`mpibelief.simulate.sandblaster_cluster`).
        """
        _, dacts, probs = self._bufs(len(x))
        logits = self.forward(x)
        dlogits = dacts[-1].reshape(logits.shape)
        return [self._loss(logits[lo:hi], y[lo:hi], probs[lo:hi], dlogits[lo:hi])[0]
                for lo, hi in bounds]

    def evaluate(self, x: np.ndarray, y: np.ndarray,
                 batch: int | None = None) -> tuple[float, float]:
        """Mean loss and accuracy over a whole set, in batches (no gradients)."""
        batch = batch or eval_batch(self)
        total_loss, total_correct = 0.0, 0
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            _, dacts, probs = self._bufs(len(xb))
            logits = self.forward(xb)
            loss, correct = self._loss(logits, yb, probs, dacts[-1].reshape(logits.shape))
            total_loss += float(loss) * len(xb)
            total_correct += int(correct)
        n = max(len(x), 1)
        return total_loss / n, total_correct / n


def eval_batch(model, budget: int = 2**25) -> int:
    """Evaluation batch: up to 1024 samples, fewer when activations are large (at most
    ``budget`` floats of layer outputs for the whole stack: 128 MiB)."""
    per_sample = sum(int(np.prod(layer.out_shape)) for layer in model.layers)
    return int(max(1, min(1024, budget // max(per_sample, 1))))
