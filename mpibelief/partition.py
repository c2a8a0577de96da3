"""One model replica cut into partitions, one per rank of the replica's communicator.

Each partition holds only its own parameters (one contiguous range of the flat
vector, :class:`~mpibelief.model.ParamLayout`) and its own activations: for each
layer, the window of the input it reads and the tile of the output it owns
(:mod:`mpibelief.plan` says which).  A mini-batch runs layer by layer:

    forward, layer i, partition p            backward, layer i, partition p
    post Irecv of each box p needs           layer backward on p's window -> dwindow
    post Isend of each box others need       post Isend of dwindow's boxes to owners
    copy own box into the window             post Irecv of the boxes of p's tile
    wait receives; unpack; compute           sum own part + received -> dtile

Fully connected layers overlap: forward, a partition multiplies the input block it
owns while the others' blocks travel, then adds each block's product as it arrives;
backward, it computes the input gradient first, sends it, and computes the weight
gradient while the messages travel.  The output's loss needs only three allreduces of
one value per sample (max, sums, first arg-max), not the logits.

Locally connected layers do not overlap, by measurement: at P = 2 the 330M image
model sends 4 MiB per partition per mini-batch, which MPICH's shared memory moves in
1-4 ms (a 4 MiB Sendrecv between two ranks here), against 170-280 ms of waiting per
mini-batch of about 6 s; the wait is for the slower partition, not for the bytes, and
MPICH moves a large message only inside MPI calls, which a Numba kernel does not make.
Splitting the tile into interior and border calls would cost more copies than it hides.

Waiting never spins: every wait is a test-and-sleep loop (:func:`mpibelief.comm.poll`),
because a spinning rank steals the core its peer computes on.  With ``comm=None`` the
partition computes alone (no exchange: halos keep whatever they hold), which is how
one partition's compute time is measured on one core for the scaling model.
"""

from __future__ import annotations

import copy

import numpy as np
from mpi4py import MPI

from mpibelief import kernels
from mpibelief.comm import poll
from mpibelief.layers import Dense, LocallyConnected
from mpibelief.model import eval_batch
from mpibelief.plan import Plan, relative

_TAG = 1000  # tags on the replica communicator: 1000 + 2 * layer (+1 backward)


def _wait(requests: list, timeout: float = 600.0) -> float:
    """Complete ``requests`` without spinning; returns the seconds waited."""
    if not requests:
        return 0.0
    return poll(lambda: MPI.Request.Testall(requests), timeout=timeout)


class PartitionedModel:
    """Partition ``index`` of ``model`` (which need not hold parameters) over ``comm``.

    Same interface as :class:`~mpibelief.model.Model` for what a replica uses:
    ``params``, ``grads`` (this partition's range only), ``n_params``,
    :meth:`loss_and_grad`, :meth:`evaluate` (collective: every partition calls it with
    the same batch).  ``lo, hi`` is the range in the partition-major flat vector.

    Attributes:
        wait_seconds: time spent waiting for other partitions (exchanges, allreduces).
        bytes_sent: bytes this partition sent to other partitions.
    """

    def __init__(self, model, comm, partitions: int | None = None, index: int | None = None):
        self.comm = comm
        self.P = comm.size if comm is not None else partitions
        self.p = comm.rank if comm is not None else index
        self.model, self.plan = model, Plan(model, self.P)
        self.layers = [layer.local(tiles[self.p])
                       for layer, tiles in zip(model.layers, self.plan.tiles, strict=True)]
        self.lo, self.hi = model.layout(self.P).partition(self.p)
        self.n_params = sum(layer.size for layer in self.layers)
        assert self.n_params == self.hi - self.lo
        self.params = np.zeros(self.n_params, np.float32)
        self.grads = np.zeros(self.n_params, np.float32)
        at = 0
        for layer in self.layers:
            layer.bind(self.params[at:at + layer.size], self.grads[at:at + layer.size])
            at += layer.size
        out_tile = self.plan.tiles[-1][self.p]
        self.classes = (out_tile[4], out_tile[5])
        self._bufs: dict[int, tuple] = {}
        self.wait_seconds, self.bytes_sent = 0.0, 0

    def init(self, seed: int, scale: float = 1.0) -> None:
        """The weights the whole model's ``init(seed, scale)`` gives this partition:
        each layer is drawn whole (one at a time) and this partition's piece kept."""
        rng = np.random.default_rng(seed)
        for i, (whole, mine) in enumerate(zip(self.model.layers, self.layers, strict=True)):
            tile = self.plan.tiles[i][self.p]
            if isinstance(whole, LocallyConnected):  # row by row: 1.7B would not fit twice
                for oy, row in enumerate(whole.init_rows(rng, scale)):
                    if tile[0] <= oy < tile[1]:
                        mine.w[oy - tile[0]] = row[tile[2]:tile[3]]
                if mine.size:
                    mine.b[...] = 0.0
            elif whole.size:
                layer, values = copy.copy(whole), np.zeros(whole.size, np.float32)
                layer.bind(values, values)
                layer.init(rng, scale)
                at = self._offset(i)
                for part, local in zip(whole.piece(whole.views(values), tile),
                                       mine.views(self.params[at:at + mine.size]), strict=True):
                    local[...] = part

    def _offset(self, i: int) -> int:
        """Where local layer ``i`` starts in :attr:`params`."""
        return sum(layer.size for layer in self.layers[:i])

    # ------------------------------------------------------------------ buffers

    def _buffers(self, n: int):
        """Per batch size: windows (zero where they reach past the map), outputs,
        their gradients."""
        if n not in self._bufs:
            wins, outs = [], []
            for i, layer in enumerate(self.layers):
                win = self.plan.windows[i][self.p]
                shape = (0, 0, 0) if win is None else (win[1] - win[0], win[3] - win[2],
                                                         win[5] - win[4])
                wins.append(np.zeros((n, *shape), np.float32))
                outs.append(np.zeros((n, *layer.out_shape), np.float32))
            self._bufs[n] = (wins, outs, [np.zeros_like(w) for w in wins],
                             [np.zeros_like(o) for o in outs])
        return self._bufs[n]

    # ------------------------------------------------------------------ forward

    def forward(self, x: np.ndarray) -> np.ndarray:
        """This partition's logits ``(n, classes it owns)``."""
        n = len(x)
        wins, outs, _, _ = self._buffers(n)
        data = x.reshape(n, *self.model.input_shape)
        for i, layer in enumerate(self.layers):
            win = self.plan.windows[i][self.p]
            if i == 0 and win is not None:
                own = self.plan.own[0][self.p]
                wins[0][relative(own, win)] = data[relative(own, (0, 0, 0, 0, 0, 0))]
            elif i and self._overlaps(i):
                self._dense_forward(i, layer, outs[i - 1], wins[i], outs[i])
                continue
            elif i:
                self._gather(i, outs[i - 1], wins[i])  # sends even when the tile is empty
            if win is not None:
                layer.forward(wins[i], outs[i])
        return outs[-1].reshape(n, -1)

    def _overlaps(self, i: int) -> bool:
        """Whether layer ``i`` multiplies input blocks as they arrive (a fully connected
        layer over a vector of units, whose blocks are runs of weight rows)."""
        return (self.comm is not None and isinstance(self.layers[i], Dense)
                and self.plan.windows[i][self.p] is not None
                and self.model.layers[i].in_shape[:2] == (1, 1))

    def _post_sends(self, i: int, tile_out: np.ndarray, backward: bool = False) -> list:
        """Isend each box of this partition's output of layer ``i - 1`` to whoever
        reads it (forward), or each box of the window's gradient to its owner."""
        if self.comm is None:
            return []
        reqs, tag = [], _TAG + 2 * i + backward
        if backward:
            win = self.plan.windows[i][self.p]
            pairs = [(q, np.ascontiguousarray(tile_out[relative(box, win)]))
                     for q, box in self.plan.sources[i][self.p]]
        else:
            tile = self.plan.tiles[i - 1][self.p]
            pairs = [(q, np.ascontiguousarray(tile_out[relative(box, tile)]))
                     for q, box in self.plan.sends(i, self.p)]
        for q, packed in pairs:
            reqs.append(self.comm.Isend(packed, dest=q, tag=tag))
            self.bytes_sent += packed.nbytes
        self._keep = pairs  # the send buffers must live until the sends complete
        return reqs

    def _post_recvs(self, i: int, n: int, backward: bool = False) -> list:
        """``[(q, box, buffer, request)]`` for each box this partition receives."""
        if self.comm is None:
            return []
        boxes = self.plan.sends(i, self.p) if backward else self.plan.sources[i][self.p]
        posted = []
        for q, box in boxes:
            buf = np.empty((n, box[1] - box[0], box[3] - box[2], box[5] - box[4]), np.float32)
            posted.append((q, box, buf, self.comm.Irecv(buf, source=q,
                                                         tag=_TAG + 2 * i + backward)))
        return posted

    def _gather(self, i: int, prev_out: np.ndarray, win_buf: np.ndarray) -> None:
        """Fill layer ``i``'s window: own box copied, the others' boxes received."""
        win, own = self.plan.windows[i][self.p], self.plan.own[i][self.p]
        recvs = self._post_recvs(i, len(win_buf))
        sends = self._post_sends(i, prev_out)
        if own is not None:
            win_buf[relative(own, win)] = prev_out[relative(own, self.plan.tiles[i - 1][self.p])]
        self.wait_seconds += _wait([r for *_, r in recvs])
        for _, box, buf, _ in recvs:
            win_buf[relative(box, win)] = buf
        self.wait_seconds += _wait(sends)

    def _dense_forward(self, i, layer, prev_out, win_buf, out) -> None:
        """Fully connected, multiplying each input block as it arrives (own first)."""
        n = len(out)
        recvs = self._post_recvs(i, n)
        sends = self._post_sends(i, prev_out)
        out2 = out.reshape(n, -1)
        own = self.plan.own[i][self.p]
        if own is not None:
            c0, c1 = own[4], own[5]
            np.dot(prev_out.reshape(n, -1), layer.w[c0:c1], out=out2)
        else:
            out2[...] = 0.0
        pending = list(recvs)

        def progress() -> bool:
            for item in [r for r in pending if r[3].Test()]:
                _, box, buf, _ = item
                out2[...] += buf.reshape(n, -1) @ layer.w[box[4]:box[5]]
                win_buf[relative(box, self.plan.windows[i][self.p])] = buf
                pending.remove(item)
            return not pending

        self.wait_seconds += poll(progress, timeout=600.0)
        if own is not None:
            win_buf[relative(own, self.plan.windows[i][self.p])] = prev_out
        out2 += layer.b
        layer._activate(out2)
        self.wait_seconds += _wait(sends)

    # ------------------------------------------------------------------ loss

    def _allreduce(self, values: np.ndarray, op) -> np.ndarray:
        if self.comm is None:
            return values
        out = np.empty_like(values)
        tick = MPI.Wtime()
        _wait([self.comm.Iallreduce(values, out, op=op)])
        self.wait_seconds += MPI.Wtime() - tick
        return out

    def _loss(self, logits: np.ndarray, y: np.ndarray, dlogits: np.ndarray):
        """Mean loss and number correct over all partitions' classes; fills this
        partition's ``dlogits``."""
        n, k = logits.shape
        c0 = self.classes[0]
        mine = (y >= c0) & (y < c0 + k)
        rows, cols = np.nonzero(mine)[0], y[mine] - c0
        lmax = logits.max(axis=1).astype(np.float64) if k else np.full(n, -np.inf)
        gmax = self._allreduce(lmax, MPI.MAX)
        first = np.where(lmax == gmax, c0 + (logits.argmax(axis=1) if k else 0), 2**62)
        best = self._allreduce(first.astype(np.int64), MPI.MIN)
        correct = int(np.sum(best == y))
        if self.model.loss == "logistic":
            probs = np.empty_like(logits)
            share = kernels.logistic_xent(logits, y, c0, probs, dlogits) if k else 0.0
            return float(self._allreduce(np.array([share]), MPI.SUM)[0]), correct
        e = np.exp(logits - gmax[:, None].astype(np.float32))
        picked = np.zeros(n)
        picked[rows] = logits[rows, cols]
        sums = self._allreduce(np.stack([e.sum(axis=1, dtype=np.float64), picked]), MPI.SUM)
        # The sum is >= 1 (the maximum's own term) except for a partition computing
        # alone (comm None) that owns no class: keep its meaningless loss finite.
        loss = float(np.mean(np.log(np.maximum(sums[0], 1e-300)) + gmax - sums[1]))
        np.divide(e, (sums[0] * n)[:, None].astype(np.float32), out=dlogits)
        dlogits[rows, cols] -= np.float32(1.0 / n)
        return loss, correct

    # ------------------------------------------------------------------ backward

    def loss_and_grad(self, x: np.ndarray, y: np.ndarray) -> tuple[float, int]:
        """Mean loss and number correct (all partitions'); fills this partition's
        :attr:`grads`.  Collective over the replica communicator."""
        n = len(x)
        wins, outs, dwins, douts = self._buffers(n)
        loss, correct = self._loss(self.forward(x), y, douts[-1].reshape(n, -1))
        for i in range(len(self.layers) - 1, -1, -1):
            layer, win = self.layers[i], self.plan.windows[i][self.p]
            if i and self._overlaps(i):
                self._dense_backward(i, layer, wins[i], outs[i], douts[i], dwins[i],
                                     douts[i - 1])
                continue
            if win is not None:
                layer.backward(wins[i], outs[i], douts[i], dwins[i] if i else None)
            if i:
                self._scatter_finish(i, *self._scatter_start(i, dwins[i], douts[i - 1]))
        return loss, correct

    def _scatter_start(self, i: int, dwin: np.ndarray, dprev: np.ndarray):
        """Send the window's gradient boxes to their owners; start the own part."""
        recvs = self._post_recvs(i, len(dwin), backward=True)
        sends = self._post_sends(i, dwin, backward=True)
        dprev[...] = 0.0
        own = self.plan.own[i][self.p]
        if own is not None:
            tile = self.plan.tiles[i - 1][self.p]
            dprev[relative(own, tile)] = dwin[relative(own, self.plan.windows[i][self.p])]
        return dprev, recvs, sends

    def _scatter_finish(self, i: int, dprev, recvs, sends) -> None:
        """Add the gradient boxes others computed for this partition's tile."""
        self.wait_seconds += _wait([r for *_, r in recvs])
        tile = self.plan.tiles[i - 1][self.p]
        for _, box, buf, _ in recvs:
            dprev[relative(box, tile)] += buf
        self.wait_seconds += _wait(sends)

    def _dense_backward(self, i, layer, win, out, dout, dwin, dprev) -> None:
        """Input gradient first, sent while the weight gradient is computed."""
        n = len(win)
        dy2 = dout.reshape(n, -1)
        layer._deactivate(out.reshape(n, -1), dy2)
        np.dot(dy2, layer.w.T, out=dwin.reshape(n, -1))
        pending = self._scatter_start(i, dwin, dprev)
        kernels.dense_backward_params(win.reshape(n, -1), dy2, layer.dw, layer.db)
        self._scatter_finish(i, *pending)

    # ------------------------------------------------------------------ whole sets

    def evaluate(self, x: np.ndarray, y: np.ndarray, batch: int | None = None):
        """Mean loss and accuracy over a set, in batches (collective; no gradients)."""
        batch = batch or eval_batch(self.model)
        total_loss, total_correct = 0.0, 0
        for start in range(0, len(x), batch):
            xb, yb = x[start:start + batch], y[start:start + batch]
            logits = self.forward(xb)
            scratch = self._buffers(len(xb))[3][-1].reshape(len(xb), -1)
            loss, correct = self._loss(logits, yb, scratch)
            total_loss += loss * len(xb)
            total_correct += correct
        n = max(len(x), 1)
        return total_loss / n, total_correct / n

    def agree(self, *values: float) -> tuple:
        """Partition 0's ``values`` on every partition (for decisions all must share,
        such as when to evaluate or stop), in one broadcast."""
        if self.comm is None:
            return values
        buf = np.array(values, np.float64)
        _wait([self.comm.Ibcast(buf, root=0)])
        return tuple(float(v) for v in buf)
