"""Update rules shared by the single-replica trainer and the parameter shards.

Fused Numba loops: one pass over memory per update, no temporaries, which matters on
the shards where the update is the whole of the work.  Adagrad follows the paper:
rate_i = lr / sqrt(sum over past updates of g_i^2).  Each kernel reads ``cur`` and
writes ``out``: the shards write into a buffer nobody is reading and publish it
afterwards, the single-replica trainer passes the same array twice to update in place.
"""

from __future__ import annotations

from dataclasses import dataclass

import numba
import numpy as np


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

    def apply(self, params: np.ndarray, grad: np.ndarray, state: np.ndarray | None) -> None:
        """Apply one update in place (the caller has checked ``grad`` is finite)."""
        if self.kind == "adagrad":
            adagrad_step(params, grad, state, np.float32(self.lr), np.float32(self.eps),
                         params)
        else:
            sgd_step(params, grad, np.float32(self.lr), params)
