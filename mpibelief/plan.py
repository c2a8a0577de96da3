"""Where a model's layers are cut into partitions, and what crosses the cuts (no MPI).

The plan of a model for ``P`` partitions says, for every layer ``i`` and partition
``p``, which output box ``p`` computes (``tiles[i][p]``: a tile of output locations
for a spatial layer, a range of units for a fully connected one), which box of the
layer's input it reads (``windows[i][p]``: the tile's receptive fields, the halo
included), and so which boxes travel between partitions (``sources[i][p]``: ``(q,
box)`` for each ``q != p`` whose output tile of layer ``i - 1`` meets ``p``'s window).
A box is the intersection of two boxes, so each unit's state goes to each partition
that needs it exactly once, however many of its edges cross.  Backward, the gradient
of each such box travels the other way.

The plan is pure: :mod:`mpibelief.partition` runs it over MPI, and the scaling model
(``mpibelief.simulate``) reads :func:`boundary_bytes` from it and times one
partition's compute alone (``PartitionedModel(model, None, partitions=P, index=p)``).
"""

from __future__ import annotations

import numpy as np

F32 = 4  # bytes per activation or gradient value


def intersect(a, b):
    """The common box of two boxes ``(y0, y1, x0, x1, c0, c1)``, or None."""
    lo = [max(a[k], b[k]) for k in (0, 2, 4)]
    hi = [min(a[k], b[k]) for k in (1, 3, 5)]
    if any(h <= low for low, h in zip(lo, hi, strict=True)):
        return None
    return (lo[0], hi[0], lo[1], hi[1], lo[2], hi[2])


def size(box) -> int:
    return (box[1] - box[0]) * (box[3] - box[2]) * (box[5] - box[4])


def relative(box, origin):
    """Index of ``box`` inside an array that holds the box ``origin`` (batch axis first)."""
    return (slice(None), slice(box[0] - origin[0], box[1] - origin[0]),
            slice(box[2] - origin[2], box[3] - origin[2]),
            slice(box[4] - origin[4], box[5] - origin[4]))


def _clip(box, shape):
    """``box`` cut to the map ``(H, W, C)`` (LCN windows reach into the zero padding)."""
    h, w, c = shape
    return intersect(box, (0, h, 0, w, 0, c))


class Plan:
    """Tiles, windows and crossings of every layer for ``partitions`` partitions.

    Attributes:
        tiles: ``tiles[i][p]``, the output box of layer ``i`` that partition ``p`` owns.
        windows: ``windows[i][p]``, the input box it reads (None for an empty tile).
        sources: ``sources[i][p]``, ``[(q, box)]`` boxes of layer ``i``'s input that
            ``p`` receives from ``q != p`` (empty for the first layer: every partition
            reads the data itself).
        own: ``own[i][p]``, the part of ``p``'s window that ``p`` itself holds, or None.
    """

    def __init__(self, model, partitions: int):
        self.model, self.partitions = model, partitions
        layers = model.layers
        self.tiles = [layer.tiles(partitions) for layer in layers]
        self.windows = [[layer.window(t) if size(t) else None for t in tiles]
                        for layer, tiles in zip(layers, self.tiles, strict=True)]
        self.sources, self.own = [], []
        for i, layer in enumerate(layers):
            srcs, owns = [], []
            for p in range(partitions):
                win = self.windows[i][p]
                seen = _clip(win, layer.in_shape) if win is not None else None
                if i == 0 or seen is None:
                    srcs.append([])
                    owns.append(seen if i == 0 else None)
                    continue
                meets = [(q, intersect(seen, t)) for q, t in enumerate(self.tiles[i - 1])]
                srcs.append([(q, b) for q, b in meets if b is not None and q != p])
                owns.append(meets[p][1])
            self.sources.append(srcs)
            self.own.append(owns)

    def sends(self, i: int, p: int) -> list:
        """``[(q, box)]``: the boxes of ``p``'s output of layer ``i - 1`` that ``q`` needs."""
        return [(q, box) for q in range(self.partitions)
                for src, box in self.sources[i][q] if src == p]

    def bytes_matrix(self, batch: int) -> np.ndarray:
        """``(layers, P, P)``: bytes layer ``i``'s forward pass moves from ``q`` to ``p``
        (``[i, q, p]``) for a mini-batch of ``batch``; backward moves the transpose."""
        P = self.partitions
        out = np.zeros((len(self.tiles), P, P), np.int64)
        for i, per_p in enumerate(self.sources):
            for p, srcs in enumerate(per_p):
                for q, box in srcs:
                    out[i, q, p] += F32 * batch * size(box)
        return out


def boundary_bytes(model, partitions: int, batch: int) -> np.ndarray:
    """Exact bytes that cross partition boundaries in one forward pass of a mini-batch,
    per layer and (source, destination) pair: ``(layers, P, P)``.  The backward pass
    moves the same boxes of gradients the other way; the loss adds three allreduces of
    ``batch`` values (not counted here)."""
    return Plan(model, partitions).bytes_matrix(batch)
