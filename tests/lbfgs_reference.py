"""A single-process L-BFGS, written independently of the shards, for the tests to match.

Plain numpy over the whole parameter vector: its own two-loop recursion (float32
vectors, float64 dot products, as the shards keep them), the same strong-Wolfe search
(:func:`mpibelief.lbfgs.wolfe_search`) and the same rules as the Sandblaster driver
(first step ``min(1, 1/|g|)``, later steps 1; a pair without curvature is left out; a
step that does not decrease the loss is not taken and clears the history), on the
whole training set as the batch.
"""

from __future__ import annotations

import math

import numpy as np

from mpibelief.lbfgs import wolfe_search


def dot(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a.astype(np.float64), b.astype(np.float64)))


def direction(g: np.ndarray, pairs: list) -> np.ndarray:
    """``-H g`` for the pairs ``(s, y, rho)``, oldest first (Nocedal & Wright Alg. 7.4)."""
    q, alphas = g.copy(), []
    for s, y, rho in reversed(pairs):
        a = rho * dot(s, q)
        alphas.append(a)
        q -= np.float32(a) * y
    s, y, _ = pairs[-1]
    r = np.float32(dot(s, y) / dot(y, y)) * q
    for (s, y, rho), a in zip(pairs, reversed(alphas), strict=True):
        r += np.float32(a - rho * dot(y, r)) * s
    return -r


def minimize(model, x, y, iterations: int, m: int, c1: float = 1e-4, c2: float = 0.9,
             max_evals: int = 10) -> list[float]:
    """Run L-BFGS from ``model.params`` on ``(x, y)``; the loss after each iteration."""
    w = model.params.copy()

    def f_g(at: np.ndarray) -> tuple[float, np.ndarray]:
        model.params[...] = at
        loss, _ = model.loss_and_grad(x, y)
        return float(loss), model.grads.copy()

    f, g = f_g(w)
    pairs, losses = [], []
    for _ in range(iterations):
        gnorm = math.sqrt(dot(g, g))
        d, alpha0 = (direction(g, pairs), 1.0) if pairs else (-g, min(1.0, 1 / gnorm))
        if not dot(g, d) < 0:
            pairs, d, alpha0 = [], -g, min(1.0, 1 / gnorm)
        last = {}

        def phi(a: float, w=w, d=d, last=last) -> tuple[float, float]:
            last["t"] = w + np.float32(a) * d
            last["f"], last["g"] = f_g(last["t"])
            return last["f"], dot(last["g"], d)

        found = wolfe_search(phi, f, dot(g, d), alpha0, c1, c2, max_evals)
        if math.isfinite(found.f) and found.f < f:
            s, yv = np.float32(found.alpha) * d, last["g"] - g
            sy, yy = dot(s, yv), dot(yv, yv)
            if len(pairs) == m:
                pairs.pop(0)
            if sy > 1e-12 * max(yy, 1e-30) and yy > 0:
                pairs.append((s, yv, 1 / sy))
            w, f, g = last["t"], found.f, last["g"]
        else:
            pairs = []
        losses.append(f)
    return losses
