"""L-BFGS over vectors the caller never sees: the two-loop recursion and a Wolfe search.

Sandblaster's coordinator runs L-BFGS without holding the parameters: every vector
(parameters, gradient, direction, the history pairs) lives on the parameter shards, and
the coordinator only names them.  So the algorithm here is written against a small
*vector space* protocol, by name (:class:`Space`): the shards implement it with
commands on their slices (:mod:`mpibelief.ps.vectors`), :class:`NumpySpace` implements
it in this process.  Only scalars (dot products) come back.

- :func:`two_loop`: ``d = -H g`` from the history pairs (Nocedal & Wright, Alg. 7.4),
  one dot product round trip per history entry and loop;
- :func:`wolfe_search`: a line search that returns a step satisfying the strong Wolfe
  conditions (Alg. 3.5 with the zoom of Alg. 3.6, cubic interpolation safeguarded by
  bisection); it only sees ``phi(alpha) -> (f, f')`` along the direction, so the same
  search drives the distributed run and the single-process reference the tests use.
  Strong Wolfe guarantees ``s.y > 0`` on the same batch, which keeps ``H`` positive
  definite.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np


class Space(Protocol):
    """Named float32 vectors of one length, somewhere; only scalars come back."""

    def dots(self, pairs: list[tuple[str, str]]) -> list[float]: ...
    def axpy(self, y: str, alpha: float, x: str) -> None: ...  # y += alpha x
    def scale(self, y: str, alpha: float) -> None: ...
    def copy(self, dst: str, src: str) -> None: ...
    def lincomb(self, dst: str, a: str, alpha: float, b: str) -> None: ...  # a + alpha b


class NumpySpace:
    """:class:`Space` over numpy arrays in this process (float32, dots in float64)."""

    def __init__(self, n: int):
        self.n, self.vectors = n, {}

    def get(self, name: str) -> np.ndarray:
        if name not in self.vectors:
            self.vectors[name] = np.zeros(self.n, np.float32)
        return self.vectors[name]

    def dots(self, pairs):
        return [float(np.dot(self.get(a).astype(np.float64), self.get(b))) for a, b in pairs]

    def axpy(self, y, alpha, x):
        self.get(y)[...] += np.float32(alpha) * self.get(x)

    def scale(self, y, alpha):
        self.get(y)[...] *= np.float32(alpha)

    def copy(self, dst, src):
        self.get(dst)[...] = self.get(src)

    def lincomb(self, dst, a, alpha, b):
        np.add(self.get(a), np.float32(alpha) * self.get(b), out=self.get(dst))


@dataclass
class History:
    """The coordinator's half of the L-BFGS memory: slot names and scalars only.

    The pairs themselves are vectors ``s<k>`` and ``y<k>`` in the space, ``k`` a ring
    slot in ``range(m)``; here are the order of the slots and ``rho = 1 / s.y``.
    """

    m: int
    slots: list[int] = field(default_factory=list)  # oldest first
    rho: dict[int, float] = field(default_factory=dict)
    gamma: float = 1.0  # s.y / y.y of the newest pair: the initial Hessian's scale

    def next_slot(self) -> int:
        """The slot the next pair goes into (the oldest one once the ring is full)."""
        if len(self.slots) < self.m:
            return len(self.slots)
        return self.slots[0]

    def add(self, slot: int, sy: float, yy: float) -> bool:
        """Record the pair stored in ``slot``; refused (False) unless ``s.y > 0``."""
        if slot in self.slots:  # its vectors were overwritten either way
            self.slots.remove(slot)
            del self.rho[slot]
        if not (sy > 1e-12 * max(yy, 1e-30) and math.isfinite(sy) and yy > 0):
            return False
        self.slots.append(slot)
        self.rho[slot], self.gamma = 1.0 / sy, sy / yy
        return True

    def clear(self) -> None:
        self.slots.clear()
        self.rho.clear()
        self.gamma = 1.0


def two_loop(space: Space, hist: History, g: str = "g", d: str = "d") -> None:
    """``d = -H g``: the L-BFGS two-loop recursion, with one dot per step."""
    space.copy(d, g)
    alphas = {}
    for k in reversed(hist.slots):
        (sq,) = space.dots([(f"s{k}", d)])
        alphas[k] = hist.rho[k] * sq
        space.axpy(d, -alphas[k], f"y{k}")
    space.scale(d, -hist.gamma)  # the sign flip folded in: from here d holds -r
    for k in hist.slots:
        (yr,) = space.dots([(f"y{k}", d)])  # y.(-r)
        beta = hist.rho[k] * yr
        space.axpy(d, -(alphas[k] + beta), f"s{k}")  # -r - (alpha - beta) s


@dataclass
class SearchResult:
    """What :func:`wolfe_search` found: the step, ``f`` and ``f'`` there, evaluations."""

    alpha: float
    f: float
    df: float
    evals: int
    wolfe: bool  # both strong Wolfe conditions hold at ``alpha``


def _cubic_min(a, fa, da, b, fb, db) -> float:
    """Minimiser of the cubic through two points with slopes; bisection if it fails."""
    d1 = da + db - 3 * (fa - fb) / (a - b)
    disc = d1 * d1 - da * db
    lo, hi = min(a, b), max(a, b)
    if disc >= 0:
        d2 = math.copysign(math.sqrt(disc), b - a)
        x = b - (b - a) * (db + d2 - d1) / (db - da + 2 * d2)
        width = hi - lo
        if math.isfinite(x) and lo + 0.1 * width <= x <= hi - 0.1 * width:
            return x
    return (a + b) / 2


def wolfe_search(phi: Callable[[float], tuple[float, float]], f0: float, df0: float,
                 alpha: float = 1.0, c1: float = 1e-4, c2: float = 0.9,
                 max_evals: int = 10, alpha_max: float = 1e10) -> SearchResult:
    """A step along a descent direction that meets the strong Wolfe conditions.

    ``f(a) <= f0 + c1 a f0'`` (enough decrease) and ``|f'(a)| <= c2 |f0'|`` (enough
    curvature).  Returns the last point evaluated, so the caller's gradient
    accumulator always belongs to the returned step; when ``max_evals`` run out
    first, ``wolfe`` is False and the caller decides (take it if it decreased).

    Args:
        phi: evaluates ``f`` and ``f'`` at a step (one gradient over the batch).
        f0, df0: ``f`` and ``f'`` at 0; ``df0`` must be negative.
    """
    if not df0 < 0:
        raise ValueError(f"not a descent direction: f'(0) = {df0}")
    prev_a, prev_f, prev_df = 0.0, f0, df0
    evals = 0
    while evals < max_evals:
        f, df = phi(alpha)
        evals += 1
        if not math.isfinite(f) or f > f0 + c1 * alpha * df0 or (evals > 1 and f >= prev_f):
            return _zoom(phi, f0, df0, prev_a, prev_f, prev_df, alpha, f, df, c1, c2,
                         max_evals - evals, evals)
        if abs(df) <= -c2 * df0:
            return SearchResult(alpha, f, df, evals, True)
        if df >= 0:
            return _zoom(phi, f0, df0, alpha, f, df, prev_a, prev_f, prev_df, c1, c2,
                         max_evals - evals, evals)
        prev_a, prev_f, prev_df = alpha, f, df
        alpha = min(2 * alpha, alpha_max)
    return SearchResult(prev_a, prev_f, prev_df, evals, False)  # the last one evaluated


def _zoom(phi, f0, df0, lo, f_lo, df_lo, hi, f_hi, df_hi, c1, c2, budget, evals):
    """Alg. 3.6: shrink ``[lo, hi]`` (``lo`` the best step so far) to a Wolfe point."""
    last = None
    for _ in range(budget):
        if math.isfinite(f_hi) and math.isfinite(df_hi):
            a = _cubic_min(lo, f_lo, df_lo, hi, f_hi, df_hi)
        else:
            a = (lo + hi) / 2
        f, df = phi(a)
        evals += 1
        last = (a, f, df)
        if not math.isfinite(f) or f > f0 + c1 * a * df0 or f >= f_lo:
            hi, f_hi, df_hi = a, f, df
            continue
        if abs(df) <= -c2 * df0:
            return SearchResult(a, f, df, evals, True)
        if df * (hi - lo) >= 0:
            hi, f_hi, df_hi = lo, f_lo, df_lo
        lo, f_lo, df_lo = a, f, df
    if last is None:
        return SearchResult(lo, f_lo, df_lo, evals, False)
    return SearchResult(*last, evals, False)
