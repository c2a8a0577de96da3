"""Update rules (SGD, Adagrad), one each, shared by the single replica and the shards.

Fused Numba loops: one pass over memory per update, no temporaries, which matters on
the shards where the update is the whole of the work.  Adagrad follows the paper:
rate_i = lr / sqrt(sum over past updates of g_i^2).  Every rule reads ``cur`` and
writes ``out``: the shards write into a buffer nobody is reading and publish it
afterwards; the single replica passes the same array twice to update in place.

The non-finite check lives beside the rules, in :meth:`Optimizer.step`: a gradient
holding NaN or inf is refused whole and leaves ``cur`` and the rule's state untouched
(unless ``out is cur``, where an SGD refusal is found in the same pass and ``cur`` is
spoiled: in-place callers treat a refusal as fatal).
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


@numba.njit(cache=True, fastmath={"reassoc"})
def _nan_probe(x):
    # g * 0 is 0 for finite g and NaN for inf/NaN; "reassoc" lets the sum vectorise
    # while NaNs keep their meaning (no "nnan" flag).
    probe = np.float32(0.0)
    for i in range(x.size):
        probe += x[i] * np.float32(0.0)
    return probe


def all_finite(x: np.ndarray) -> bool:
    """True when a float32 array holds no NaN or inf (one vectorised pass, no temporary)."""
    return bool(_nan_probe(x) == 0.0)


# ``g * 0`` is 0 for finite g and NaN otherwise, so SGD checks finiteness in the same
# pass; "reassoc" lets the sum vectorise without assuming there are no NaNs.
@numba.njit(cache=True, fastmath={"reassoc"})
def sgd_step(cur, grad, lr, out):
    """``out = cur - lr * grad``; returns False if ``grad`` held a non-finite value."""
    probe = np.float32(0.0)
    for i in range(cur.size):
        g = grad[i]
        probe += g * np.float32(0.0)
        out[i] = cur[i] - lr * g
    return probe == 0.0


@numba.njit(cache=True)
def adagrad_step(cur, grad, acc, lr, eps, out):
    """``acc += g^2; out = cur - lr * g / sqrt(acc + eps)`` (check finiteness first)."""
    for i in range(cur.size):
        g = grad[i]
        a = acc[i] + g * g
        acc[i] = a
        out[i] = cur[i] - lr * g / np.sqrt(a + eps)


@dataclass(frozen=True)
class Optimizer:
    """An update rule and its constants: ``kind`` is ``sgd`` or ``adagrad``."""

    kind: str
    lr: float
    eps: float = 1e-6

    def __post_init__(self):
        if self.kind not in ("sgd", "adagrad"):
            raise ValueError(f"unknown optimizer {self.kind!r} (sgd or adagrad)")

    @classmethod
    def from_config(cls, train) -> Optimizer:
        return cls(train.optimizer, train.lr, train.adagrad_eps)

    def state(self, n: int) -> np.ndarray | None:
        """The per-parameter state the rule keeps (Adagrad's sums), or None."""
        return np.zeros(n, np.float32) if self.kind == "adagrad" else None

    def step(self, cur: np.ndarray, grad: np.ndarray, state: np.ndarray | None,
             out: np.ndarray) -> bool:
        """``out`` = ``cur`` updated by ``grad``; False (nothing applied) if it is not finite."""
        lr = np.float32(self.lr)
        if self.kind == "sgd":
            return bool(sgd_step(cur, grad, lr, out))
        if not all_finite(grad):  # Adagrad's sums must not see a NaN: check first
            return False
        adagrad_step(cur, grad, state, lr, np.float32(self.eps), out)
        return True

    def apply(self, params: np.ndarray, grad: np.ndarray, state: np.ndarray | None) -> bool:
        """:meth:`step` in place; a False return means ``params`` may be spoiled."""
        return self.step(params, grad, state, params)

    def warm(self) -> None:
        """Compile (or load from numba's cache) the kernels before anything is timed."""
        x = np.zeros(4, np.float32)
        self.step(x, x, self.state(4), x.copy())
        all_finite(x)
