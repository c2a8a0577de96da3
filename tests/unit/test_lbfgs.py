"""L-BFGS by name: the two-loop recursion against a dense BFGS matrix, the Wolfe search
on functions with known answers, and the shard's vector commands against numpy."""

from __future__ import annotations

import math

import numpy as np
import pytest

from mpibelief.lbfgs import History, NumpySpace, two_loop, wolfe_search
from mpibelief.optim import Optimizer
from mpibelief.ps.state import GRADIENT, ShardState
from mpibelief.ps.vectors import VectorCommands


def dense_inverse_hessian(pairs, n):
    """The BFGS inverse-Hessian recursion, as a matrix (Nocedal & Wright, eq. 6.17)."""
    s, y = pairs[-1]
    h = (s @ y) / (y @ y) * np.eye(n)
    for s, y in pairs:
        rho = 1.0 / (s @ y)
        v = np.eye(n) - rho * np.outer(y, s)
        h = v.T @ h @ v + rho * np.outer(s, s)
    return h


def test_two_loop_is_the_bfgs_matrix_applied():
    rng = np.random.default_rng(0)
    n, m = 12, 4
    a = rng.standard_normal((n, n))
    hess = a @ a.T + n * np.eye(n)  # y = A s: curvature pairs of a convex quadratic
    space, hist, pairs = NumpySpace(n), History(m), []
    for _ in range(6):  # more pairs than the ring holds: the oldest are overwritten
        s = rng.standard_normal(n)
        y = hess @ s
        slot = hist.next_slot()
        space.get(f"s{slot}")[:], space.get(f"y{slot}")[:] = s, y
        s32, y32 = space.get(f"s{slot}"), space.get(f"y{slot}")
        assert hist.add(slot, *space.dots([(f"s{slot}", f"y{slot}"), (f"y{slot}", f"y{slot}")]))
        pairs = (pairs + [(s32.astype(np.float64), y32.astype(np.float64))])[-m:]
    g = rng.standard_normal(n).astype(np.float32)
    space.get("g")[:] = g
    two_loop(space, hist, "g", "d")
    want = -dense_inverse_hessian(pairs, n) @ g
    np.testing.assert_allclose(space.get("d"), want, rtol=1e-4, atol=1e-5)


def test_history_refuses_a_pair_without_curvature_and_forgets_its_slot():
    hist = History(2)
    assert hist.add(0, 1.0, 2.0) and hist.add(1, 1.0, 2.0)
    assert hist.next_slot() == 0  # ring full: the oldest
    assert not hist.add(0, -1.0, 2.0)  # s.y < 0: slot 0's vectors are gone too
    assert hist.slots == [1] and 0 not in hist.rho


def strong_wolfe(found, f0, df0, c1, c2):
    return found.f <= f0 + c1 * found.alpha * df0 and abs(found.df) <= -c2 * df0


@pytest.mark.parametrize("alpha0", [1e-3, 0.3, 1.0, 50.0])
@pytest.mark.parametrize("c2", [0.1, 0.9])
def test_wolfe_search_meets_both_conditions(alpha0, c2):
    # phi(a) = f(x + a d) for the Rosenbrock function from (-1.2, 1), steepest descent
    x0 = np.array([-1.2, 1.0])

    def f_g(x):
        f = (1 - x[0]) ** 2 + 100 * (x[1] - x[0] ** 2) ** 2
        g = np.array([-2 * (1 - x[0]) - 400 * x[0] * (x[1] - x[0] ** 2),
                      200 * (x[1] - x[0] ** 2)])
        return f, g

    f0, g0 = f_g(x0)
    d = -g0
    calls = []

    def phi(a):
        f, g = f_g(x0 + a * d)
        calls.append(a)
        return f, float(g @ d)

    found = wolfe_search(phi, f0, float(g0 @ d), alpha0, 1e-4, c2, max_evals=30)
    assert found.wolfe and strong_wolfe(found, f0, float(g0 @ d), 1e-4, c2)
    assert found.evals == len(calls) and found.alpha == calls[-1]  # the last point


def test_wolfe_search_on_a_quadratic_takes_the_exact_step_when_offered():
    phi = lambda a: ((a - 2.0) ** 2, 2 * (a - 2.0))  # noqa: E731
    found = wolfe_search(phi, 4.0, -4.0, alpha=2.0, c2=0.1)
    assert found.evals == 1 and found.alpha == 2.0 and found.wolfe


def test_wolfe_search_refuses_an_ascent_direction():
    with pytest.raises(ValueError, match="descent"):
        wolfe_search(lambda a: (0.0, 0.0), 0.0, 1.0)


def test_wolfe_search_out_of_budget_says_so():
    found = wolfe_search(lambda a: (-a, -1.0), 0.0, -1.0, alpha=1.0, max_evals=3)
    assert not found.wolfe and found.alpha == 4.0 and found.evals == 3  # last evaluated


def test_vector_commands_match_numpy():
    rng = np.random.default_rng(1)
    n = 1001
    state = ShardState(n, Optimizer("sgd", 1.0), clients=2)
    ops = VectorCommands(state)
    a, b = (rng.standard_normal(n).astype(np.float32) for _ in range(2))
    state.vector("a")[:], state.vector("b")[:] = a, b
    assert ops.dot("a", "b") == pytest.approx(float(a.astype(np.float64) @ b), rel=1e-12)
    a2, b2 = a + np.float32(0.5) * b, np.float32(-2.0) * b
    assert ops.run([("axpy", "a", 0.5, "b"), ("dot", "a", "a"), ("scale", "b", -2.0),
                    ("lincomb", "c", "a", 3.0, "b"), ("mul", "e", "a", "b"),
                    ("add", "f", "a", "b"), ("copy", "h", "f"), ("dot", "h", "b")]) == [
        pytest.approx(float(((a + 0.5 * b).astype(np.float64) ** 2).sum()), rel=1e-6),
        pytest.approx(float((a2 + b2).astype(np.float64) @ b2), rel=1e-5)]
    np.testing.assert_allclose(state.vector("c"), a2 + 3 * b2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(state.vector("e"), a2 * b2, rtol=1e-6)
    np.testing.assert_allclose(state.vector("h"), a2 + b2, rtol=1e-6)
    assert ops.run([("zero", "a"), ("push_history", 3, "b", "c")]) is None
    assert not state.vector("a").any() and (state.vector("s3") == b2).all()
    assert ops.publish("c") == 1 and (state.current == state.vector("c")).all()
    assert state.vector("params") is state.current  # read through, never a copy


def test_accumulate_mode_sums_pushes_without_new_versions():
    state = ShardState(5, Optimizer("sgd", 1.0), clients=3)
    ops = VectorCommands(state)
    ops.reset_accumulator("grad")
    one = np.ones(5, np.float32)
    assert not state.consume(GRADIENT, one, client=1, samples=7)  # no version published
    assert not state.consume(GRADIENT, 2 * one[:2], lo=3, client=2, samples=5)
    bad = one.copy()
    bad[0] = math.nan
    assert not state.consume(GRADIENT, bad, client=2, samples=99)  # refused whole
    assert state.version == 0 and state.stats.refused == 1 and state.stats.applied == 2
    np.testing.assert_array_equal(state.vector("grad"), [1, 1, 1, 3, 3])
    assert ops.samples() == [0, 7, 5]
    ops.reset_accumulator("grad")
    assert ops.samples() == [0, 0, 0] and not state.vector("grad").any()
