"""The Sandblaster coordinator's L-BFGS: one batch per step, vectors on the shards.

The coordinator holds scalars only.  Per batch ``k`` (rows from
:func:`~mpibelief.portions.batch_rows`):

1. ``g`` = the gradient at the parameters ``x`` over the batch (one *evaluation*:
   the shards publish ``x``, the replicas sum the batch's portions into ``grad``);
   with a whole-set batch it is the last evaluation's, kept from the step before;
2. ``d = -H g`` by the two-loop recursion (:func:`~mpibelief.lbfgs.two_loop`); a
   direction that does not descend resets the history;
3. a strong-Wolfe line search along ``d`` on the *same* batch: every trial step
   ``a`` is an evaluation at ``t = x + a d``;
4. the accepted step becomes ``x``, and ``(s, y) = (a d, grad(t) - g)`` goes into
   the history; both gradients come from the same batch, so ``s.y > 0`` holds
   (Wolfe), and a pair that breaks it is left out.

A step that does not decrease the loss is not taken: the history is cleared and the
next batch starts from steepest descent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mpibelief.lbfgs import History, two_loop, wolfe_search
from mpibelief.portions import portion_bounds


@dataclass
class BatchRecord:
    """One row of ``/sandblaster``: what one batch (one L-BFGS step) cost and did."""

    iteration: int = -1
    loss_before: float = math.nan
    loss: float = math.nan
    grad_norm: float = math.nan
    step: float = 0.0
    step_norm: float = 0.0
    evals: int = 0
    accepted: bool = False
    portions_issued: int = 0
    backups_issued: int = 0
    backups_wasted: int = 0
    samples_applied: int = 0
    batch: int = 0
    seconds: float = 0.0
    gradient_seconds: float = 0.0
    bytes_in: int = 0
    bytes_out: int = 0
    done_by: list[int] = field(default_factory=list)


class LBFGSDriver:
    """L-BFGS over the shards' vectors, gradients from the replicas.

    Args:
        space: the shards' vectors (:class:`~mpibelief.ps.vectors.ShardSpace`).
        dispatcher: hands portions out (:class:`Dispatcher`).
        samples_of: turns the shards' per-client sample counts into the samples summed
            (a replica's count is the least over its partitions).
        cfg: the ``[sandblaster]`` table; n_train: rows in the training set.
    """

    def __init__(self, space, dispatcher, samples_of, cfg, n_train: int, clock):
        self.space, self.dispatcher, self.samples_of = space, dispatcher, samples_of
        self.cfg, self.clock = cfg, clock
        self.batch = min(cfg.batch or n_train, n_train)
        self.whole = self.batch >= n_train
        self.bounds = portion_bounds(self.batch, cfg.portions)
        self.hist = History(cfg.history)
        self.have_g = False  # "g" holds the gradient at "x" over the current batch
        self.f = math.nan  # the loss at "x" (over the batch "g" belongs to)
        self.record = BatchRecord()

    def state(self) -> dict:
        """The scalars a checkpoint needs (the vectors are the shards' part); exact in
        JSON, which writes every float's shortest round-trip repr."""
        h = self.hist
        return {"slots": list(h.slots), "rho": [[k, h.rho[k]] for k in h.slots],
                "gamma": h.gamma, "have_g": self.have_g, "f": self.f}

    def load_state(self, state: dict) -> None:
        """Continue from :meth:`state` (the shards restored their vectors)."""
        h = self.hist
        h.slots, h.rho = list(state["slots"]), {int(k): float(v) for k, v in state["rho"]}
        h.gamma, self.have_g, self.f = float(state["gamma"]), state["have_g"], state["f"]

    def evaluate(self, number: int, at: str) -> float:
        """Publish vector ``at`` as the parameters; sum the batch's gradient into ``grad``
        (scaled to the mean); returns the mean loss."""
        space, rec = self.space, self.record
        space.reset_accumulator("grad")
        space.publish(at)  # waits: reset and publish are done before any push
        tick = self.clock.now()
        book = self.dispatcher.evaluate(number, self.bounds)
        rec.gradient_seconds += self.clock.now() - tick
        applied = self.samples_of(space.samples())
        if applied != self.batch or book.samples != self.batch:
            raise RuntimeError(f"batch {number}: the shards summed {applied} samples, the"
                               f" coordinator committed {book.samples}, of {self.batch}")
        space.scale("grad", 1.0 / self.batch)
        st = book.stats
        rec.evals += 1
        rec.samples_applied += applied
        rec.portions_issued += st.issued
        rec.backups_issued += st.backups
        rec.backups_wasted += st.wasted
        rec.done_by = [a + b for a, b in zip(rec.done_by, st.done_by, strict=True)]
        return book.loss_sum / self.batch

    def step(self, k: int) -> BatchRecord:
        """One L-BFGS step on batch ``k``; returns its record."""
        space, cfg, hist = self.space, self.cfg, self.hist
        number = 0 if self.whole else k
        self.record = rec = BatchRecord(iteration=k, batch=self.batch,
                                        done_by=[0] * len(self.dispatcher.ranks))
        start, traffic = self.clock.now(), self._traffic()
        if not self.have_g:
            self.f = self.evaluate(number, "x")
            space.copy("g", "grad")
        (gg,) = space.dots([("g", "g")])
        rec.loss_before, rec.grad_norm = self.f, math.sqrt(gg)
        alpha0 = 1.0 if hist.slots else min(1.0, 1.0 / max(rec.grad_norm, 1e-12))
        if hist.slots:
            two_loop(space, hist, "g", "d")
        else:
            space.copy("d", "g")
            space.scale("d", -1.0)
        df0, dd = space.dots([("g", "d"), ("d", "d")])
        if not df0 < 0:  # not a descent direction: forget the curvature, go downhill
            hist.clear()
            space.copy("d", "g")
            space.scale("d", -1.0)
            df0, dd, alpha0 = -gg, gg, min(1.0, 1.0 / max(rec.grad_norm, 1e-12))

        def phi(a: float) -> tuple[float, float]:
            space.lincomb("t", "x", a, "d")
            f = self.evaluate(number, "t")
            (df,) = space.dots([("grad", "d")])
            return f, df

        found = wolfe_search(phi, self.f, df0, alpha0, cfg.c1, cfg.c2, cfg.line_search_evals)
        rec.accepted = math.isfinite(found.f) and found.f < self.f
        if rec.accepted:
            self._accept(found.alpha)
            self.f = found.f
            rec.step, rec.step_norm = found.alpha, found.alpha * math.sqrt(dd)
        else:
            hist.clear()
            space.publish("x")  # the shards still show the last trial: take it back
            self.have_g = False  # and recompute g on the next batch
        rec.loss = self.f
        if not self.whole:
            self.have_g = False
        rec.seconds = self.clock.now() - start
        rec.bytes_in, rec.bytes_out = (a - b for a, b in zip(self._traffic(), traffic,
                                                            strict=True))
        return rec

    def _accept(self, alpha: float) -> None:
        """``x = t``; the pair ``(alpha d, grad - g)`` into the history; ``g = grad``."""
        space, hist = self.space, self.hist
        slot = hist.next_slot()
        space.copy("sn", "d")
        space.scale("sn", alpha)
        space.lincomb("yn", "grad", -1.0, "g")
        space.push_history(slot, "sn", "yn")
        space.copy("x", "t")
        space.copy("g", "grad")
        sy, yy = space.dots([(f"s{slot}", f"y{slot}"), (f"y{slot}", f"y{slot}")])
        hist.add(slot, sy, yy)
        self.have_g = True

    def _traffic(self) -> tuple[int, int]:
        d, s = self.dispatcher, self.space
        return d.bytes_in + s.bytes_in, d.bytes_out + s.bytes_out
