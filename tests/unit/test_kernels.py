"""Every kernel in ``mpibelief.kernels`` against its numpy twin in ``mpibelief.reference``.

One helper, :func:`check_case`, does the work for every kernel: it runs kernel and twin
on the same seeded float32 inputs and compares the output and every gradient with
explicit tolerances, then checks the twin's gradients (in float64) and the kernel's
(float32) against central finite differences of ``sum(output * upstream)``.  A case is
just the few lines that say how to call a layer's forward and backward.
"""

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pytest

from mpibelief import kernels, reference

F32 = np.float32


@dataclass(frozen=True)
class Case:
    """How to call one layer: ``make(rng)`` -> named inputs, forward, backward."""

    name: str
    make: Callable[[np.random.Generator], dict]
    forward: Callable[[object, dict], np.ndarray]
    backward: Callable[[object, dict, np.ndarray, np.ndarray], dict]
    wrt: tuple  # input names whose gradients are checked against finite differences
    upstream: Callable = None  # (rng, shape) -> gradient of the output; default normal


def _normal(rng, *shape, scale=1.0):
    return (rng.standard_normal(shape) * scale).astype(F32)


def _away_from_zero(a, gap=0.05):
    """Keep inputs off a kink (ReLU at 0) so finite differences are meaningful."""
    return np.where(a >= 0, a + gap, a - gap).astype(a.dtype)


def dense_case(n, i, o, params_only=False):
    def make(rng):
        return {"x": _normal(rng, n, i), "w": _normal(rng, i, o, scale=0.3),
                "b": _normal(rng, o)}

    def forward(mod, a):
        out = np.empty((n, o), a["x"].dtype)
        mod.dense_forward(a["x"], a["w"], a["b"], out)
        return out

    def backward(mod, a, out, g):
        dw, db = np.empty_like(a["w"]), np.empty_like(a["b"])
        if params_only:
            mod.dense_backward_params(a["x"], g, dw, db)
            return {"w": dw, "b": db}
        dx = np.empty_like(a["x"])
        mod.dense_backward(a["x"], a["w"], g, dx, dw, db)
        return {"x": dx, "w": dw, "b": db}

    name = f"dense{'_params' if params_only else ''}-{n}x{i}x{o}"
    return Case(name, make, forward, backward, ("w", "b") if params_only else ("x", "w", "b"))


def activation_case(kind, n, k):
    def make(rng):
        return {"z": _away_from_zero(_normal(rng, n, k, scale=2.0))}

    def forward(mod, a):
        out = np.empty_like(a["z"])
        getattr(mod, f"{kind}_forward")(a["z"], out)
        return out

    def backward(mod, a, out, g):
        dz = np.empty_like(g)
        getattr(mod, f"{kind}_backward")(out, g, dz)
        return {"z": dz}

    return Case(f"{kind}-{n}x{k}", make, forward, backward, ("z",))


def softmax_case(n, k, label_dtype):
    def make(rng):
        return {"logits": _normal(rng, n, k, scale=3.0),
                "labels": rng.integers(0, k, n).astype(label_dtype)}

    def run(mod, a):
        probs, dlogits = np.empty_like(a["logits"]), np.empty_like(a["logits"])
        loss, correct = mod.softmax_xent(a["logits"], a["labels"], probs, dlogits)
        assert isinstance(loss, float) and isinstance(correct, int)
        return np.concatenate([[loss, correct], probs.ravel()]), dlogits

    def forward(mod, a):  # [loss, correct, probs...], all compared with the twin
        return run(mod, a)[0]

    def backward(mod, a, out, g):
        return {"logits": run(mod, a)[1] * g[0]}

    def upstream(rng, shape):  # only the loss is differentiated
        g = np.zeros(shape, F32)
        g[0] = rng.uniform(0.5, 2.0)
        return g

    name = f"softmax_xent-{n}x{k}-{np.dtype(label_dtype).name}"
    return Case(name, make, forward, backward, ("logits",), upstream)


def lc_case(n, h, w, c, rf, stride, u):
    oh, ow = kernels.lc_output_shape(h, w, rf, stride)

    def make(rng):
        return {"x": _normal(rng, n, h, w, c), "w": _normal(rng, oh, ow, u, rf * rf * c,
                                                            scale=0.3),
                "b": _normal(rng, oh, ow, u)}

    def forward(mod, a):
        out = np.empty((n, oh, ow, u), a["x"].dtype)
        mod.lc_forward(a["x"], a["w"], a["b"], rf, stride, out)
        return out

    def backward(mod, a, out, g):
        # Poison the outputs: the kernel must overwrite (dx: zero, then accumulate).
        grads = {k: np.full_like(a[k], np.nan) for k in ("x", "w", "b")}
        mod.lc_backward(a["x"], a["w"], g, rf, stride, grads["x"], grads["w"], grads["b"])
        return grads

    name = f"lc-n{n}-{h}x{w}x{c}-rf{rf}-s{stride}-u{u}"
    return Case(name, make, forward, backward, ("x", "w", "b"))


CASES = [
    dense_case(1, 3, 2), dense_case(5, 7, 3), dense_case(16, 33, 17),
    dense_case(5, 7, 3, params_only=True),
    *[activation_case(kind, n, k) for kind in ("sigmoid", "tanh", "relu")
      for n, k in ((1, 1), (5, 7), (13, 64))],
    softmax_case(1, 3, np.int64), softmax_case(5, 7, np.int32), softmax_case(33, 10, np.int64),
    lc_case(1, 4, 4, 1, 2, 1, 1),      # smallest: 3x3 locations, stride 1
    lc_case(3, 7, 6, 2, 3, 2, 3),      # odd sizes, stride 2, channels 2
    lc_case(9, 9, 11, 3, 4, 3, 5),     # n > 8 (transpose tail); last rows/columns unused
    lc_case(2, 5, 5, 2, 5, 2, 2),      # window = image: one location
    lc_case(2, 9, 9, 1, 2, 3, 2),      # stride > rf: gaps between windows
]


def maxpool_case(n, h, w, c, k):
    def make(rng):
        return {"x": _normal(rng, n, h, w, c)}

    def forward(mod, a):
        out = np.empty((n, h // k, w // k, c), a["x"].dtype)
        mod.maxpool_forward(a["x"], k, out)
        return out

    def backward(mod, a, out, g):
        dx = np.full_like(a["x"], np.nan)  # poisoned: every element must be written
        mod.maxpool_backward(a["x"], out, g, k, dx)
        return {"x": dx}

    return Case(f"maxpool-n{n}-{h}x{w}x{c}-k{k}", make, forward, backward, ("x",))


def lcn_case(n, h, w, c, m, eps=1.0):
    def make(rng):
        return {"xp": _normal(rng, n, h + m - 1, w + m - 1, c, scale=2.0) + F32(0.5)}

    def forward(mod, a):
        out = np.empty((n, h, w, c), a["xp"].dtype)
        mod.lcn_forward(a["xp"], m, eps, out)
        return out

    def backward(mod, a, out, g):
        dxp = np.full_like(a["xp"], np.nan)
        mod.lcn_backward(a["xp"], m, eps, g, dxp)
        return {"xp": dxp}

    return Case(f"lcn-n{n}-{h}x{w}x{c}-m{m}", make, forward, backward, ("xp",))


def logistic_case(n, k, offset):
    def make(rng):
        return {"logits": _normal(rng, n, k, scale=3.0),
                "labels": rng.integers(0, k + 2 * offset, n).astype(np.int64)}

    def run(mod, a):
        probs, dlogits = np.empty_like(a["logits"]), np.empty_like(a["logits"])
        loss = mod.logistic_xent(a["logits"], a["labels"], offset, probs, dlogits)
        assert isinstance(loss, float)
        return np.concatenate([[loss], probs.ravel()]), dlogits

    def backward(mod, a, out, g):
        return {"logits": run(mod, a)[1] * g[0]}

    def upstream(rng, shape):
        g = np.zeros(shape, F32)
        g[0] = rng.uniform(0.5, 2.0)
        return g

    return Case(f"logistic_xent-{n}x{k}-off{offset}", make, lambda mod, a: run(mod, a)[0],
                backward, ("logits",), upstream)


CASES += [
    maxpool_case(1, 2, 2, 1, 2), maxpool_case(3, 7, 5, 2, 2),  # odd: last row/col dropped
    maxpool_case(2, 9, 9, 3, 3), maxpool_case(2, 4, 6, 1, 1),
    lcn_case(1, 1, 1, 1, 1), lcn_case(2, 5, 4, 3, 3), lcn_case(3, 6, 7, 2, 5),
    lcn_case(2, 3, 3, 1, 5),  # window wider than the image: padding dominates
    logistic_case(1, 3, 0), logistic_case(7, 5, 0), logistic_case(6, 4, 3),  # labels off
]


def _fd_grad(case, a64, g64, name, idx, eps=1e-6):
    """Central difference of ``sum(forward(a) * g)`` w.r.t. ``a[name][idx]`` (float64)."""
    def loss(delta):
        b = dict(a64)
        b[name] = a64[name].copy()
        b[name][idx] += delta
        return float(np.sum(case.forward(reference, b) * g64))

    return (loss(eps) - loss(-eps)) / (2 * eps)


def check_case(case, seed=0, n_fd=6):
    """Kernel vs twin on output and gradients, then gradients vs finite differences."""
    rng = np.random.default_rng(seed)
    a = case.make(rng)
    out_k = case.forward(kernels, a)
    out_r = case.forward(reference, a)
    scale = max(1.0, float(np.max(np.abs(out_r))))
    np.testing.assert_allclose(out_k, out_r, rtol=1e-4, atol=2e-5 * scale, err_msg="output")

    g = case.upstream(rng, out_r.shape) if case.upstream else _normal(rng, *out_r.shape)
    grads_k = case.backward(kernels, a, out_k, g)
    grads_r = case.backward(reference, a, out_r, g)
    assert grads_k.keys() == grads_r.keys()
    for name in grads_k:
        ref = grads_r[name]
        scale = max(1.0, float(np.max(np.abs(ref))))
        np.testing.assert_allclose(grads_k[name], ref, rtol=1e-4, atol=2e-5 * scale,
                                   err_msg=f"d{name}")

    a64 = {k: v.astype(np.float64) if v.dtype == F32 else v for k, v in a.items()}
    g64 = g.astype(np.float64)
    grads64 = case.backward(reference, a64, case.forward(reference, a64), g64)
    for name in case.wrt:
        flat = [np.unravel_index(int(f), a[name].shape)
                for f in rng.choice(a[name].size, min(n_fd, a[name].size), replace=False)]
        fd = np.array([_fd_grad(case, a64, g64, name, idx) for idx in flat])
        exact = np.array([grads64[name][idx] for idx in flat])
        single = np.array([grads_k[name][idx] for idx in flat])
        np.testing.assert_allclose(exact, fd, rtol=1e-5, atol=1e-7, err_msg=f"fd d{name}")
        scale = max(1.0, float(np.max(np.abs(fd))))
        np.testing.assert_allclose(single, fd, rtol=1e-3, atol=1e-4 * scale,
                                   err_msg=f"fd d{name} (kernel)")


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_kernel_matches_reference_and_finite_differences(case):
    check_case(case)


@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "relu"])
def test_activations_in_place(kind):
    z = _away_from_zero(_normal(np.random.default_rng(1), 6, 5))
    fwd, bwd = getattr(kernels, f"{kind}_forward"), getattr(kernels, f"{kind}_backward")
    y = np.empty_like(z)
    fwd(z, y)
    inplace = z.copy()
    fwd(inplace, inplace)
    np.testing.assert_array_equal(inplace, y)
    g = np.ones_like(z)
    dz = np.empty_like(z)
    bwd(y, g, dz)
    bwd(y, g, g)
    np.testing.assert_array_equal(g, dz)


def test_softmax_xent_is_stable_for_huge_logits():
    logits = np.array([[1e4, 0.0, -1e4], [0.0, 1e4, 1e4]], F32)
    labels = np.array([0, 2])
    probs, dlogits = np.empty_like(logits), np.empty_like(logits)
    loss, correct = kernels.softmax_xent(logits, labels, probs, dlogits)
    assert np.isfinite(loss) and np.all(np.isfinite(probs))
    assert correct == 1  # row 1 ties: the first maximum (index 1) counts, as np.argmax


def test_lc_rejects_mismatched_shapes():
    x, w, b = np.zeros((2, 6, 6, 1), F32), np.zeros((2, 2, 3, 9), F32), np.zeros((2, 2, 3), F32)
    out = np.zeros((2, 2, 2, 3), F32)
    kernels.lc_forward(x, w, b, 3, 2, out)  # rf=3, stride=2: (2, 2, U, 9) is right ...
    with pytest.raises(ValueError):  # ... but not for stride 1
        kernels.lc_forward(x, w, b, 3, 1, out)
    with pytest.raises(ValueError):
        kernels.lc_forward(x, w, b, 3, 2, np.zeros((2, 2, 2, 4), F32))
    with pytest.raises(ValueError):
        kernels.lc_backward(x, w, out, 3, 2, np.zeros((2, 6, 6, 2), F32), np.zeros_like(w), b)


def test_parameters_as_views_of_one_flat_vector():
    """Layers see their weights as views at arbitrary offsets of one flat vector."""
    rng = np.random.default_rng(2)
    x, g = _normal(rng, 3, 7, 6, 2), _normal(rng, 3, 3, 2, 4)
    flat = np.zeros(1 + 3 * 2 * 18 * 4 + 3 * 2 * 4, F32)
    w = flat[1:1 + 432].reshape(3, 2, 4, 18)  # 4-byte but not 8-byte aligned
    b = flat[433:].reshape(3, 2, 4)
    w[...], b[...] = _normal(rng, *w.shape), _normal(rng, *b.shape)
    out_k, out_r = np.empty_like(g), np.empty_like(g)
    kernels.lc_forward(x, w, b, 3, 2, out_k)
    reference.lc_forward(x, w, b, 3, 2, out_r)
    np.testing.assert_allclose(out_k, out_r, rtol=1e-4, atol=1e-4)
    grads = np.zeros_like(flat)
    dw, db = grads[1:1 + 432].reshape(w.shape), grads[433:].reshape(b.shape)
    dx = np.empty_like(x)
    kernels.lc_backward(x, w, g, 3, 2, dx, dw, db)
    ref = [np.empty_like(a) for a in (x, w, b)]
    reference.lc_backward(x, w, g, 3, 2, *ref)
    for mine, theirs in zip((dx, dw, db), ref, strict=True):
        np.testing.assert_allclose(mine, theirs, rtol=1e-4, atol=1e-4)
    assert grads[0] == 0.0  # nothing written outside the views


@pytest.mark.parametrize("mod", [kernels, reference], ids=["kernel", "numpy"])
def test_activations_keep_nan_and_inf_like_pytorch(mod):
    """Values from torch.relu/sigmoid/tanh and threshold_backward: NaN must stay NaN."""
    z = np.array([[np.nan, np.inf, -np.inf, 2.0, -2.0, 0.0]], F32)
    s2, t2 = 1 / (1 + np.exp(-2.0)), np.tanh(2.0)
    want = {"relu": [np.nan, np.inf, 0, 2, 0, 0],
            "sigmoid": [np.nan, 1, 0, s2, 1 - s2, 0.5],
            "tanh": [np.nan, 1, -1, t2, -t2, 0]}
    for kind, expected in want.items():
        y = np.empty_like(z)
        getattr(mod, f"{kind}_forward")(z, y)
        np.testing.assert_allclose(y[0], expected, rtol=1e-6, err_msg=kind)
    y, dz = np.empty_like(z), np.empty_like(z)
    mod.relu_forward(z, y)
    mod.relu_backward(y, np.ones_like(z), dz)
    np.testing.assert_array_equal(dz[0], [1, 1, 0, 1, 0, 0])


@pytest.mark.parametrize("mod", [kernels, reference], ids=["kernel", "numpy"])
@pytest.mark.parametrize("kind", ["sigmoid", "tanh", "relu"])
def test_one_nan_weight_makes_loss_and_gradients_nonfinite(mod, kind):
    """Divergence must show: a finite loss from a NaN weight hides it from every check."""
    rng = np.random.default_rng(3)
    x, labels = _normal(rng, 4, 5), np.array([0, 1, 2, 0])
    w1, b1 = _normal(rng, 5, 6), _normal(rng, 6)
    w2, b2 = _normal(rng, 6, 3), _normal(rng, 3)
    w1[2, 4] = np.nan
    z, h, logits = np.empty((4, 6), F32), np.empty((4, 6), F32), np.empty((4, 3), F32)
    mod.dense_forward(x, w1, b1, z)
    getattr(mod, f"{kind}_forward")(z, h)
    mod.dense_forward(h, w2, b2, logits)
    probs, dlogits = np.empty_like(logits), np.empty_like(logits)
    loss, _ = mod.softmax_xent(logits, labels, probs, dlogits)
    assert np.isnan(loss)
    dh, dw2, db2 = np.empty_like(h), np.empty_like(w2), np.empty_like(b2)
    mod.dense_backward(h, w2, dlogits, dh, dw2, db2)
    dz, dw1, db1 = np.empty_like(z), np.empty_like(w1), np.empty_like(b1)
    getattr(mod, f"{kind}_backward")(h, dh, dz)
    mod.dense_backward_params(x, dz, dw1, db1)
    assert not np.all(np.isfinite(dw1)) and not np.all(np.isfinite(dw2))


def test_softmax_xent_counts_a_nan_row_like_argmax():
    logits = np.array([[0.0, np.nan, 5.0], [1.0, 0.0, 0.0]], F32)
    for labels in (np.array([1, 0]), np.array([2, 0])):
        results = []
        for mod in (kernels, reference):
            probs, dlogits = np.empty_like(logits), np.empty_like(logits)
            loss, correct = mod.softmax_xent(logits, labels, probs, dlogits)
            assert np.isnan(loss) and np.all(np.isnan(probs[0])) and np.isfinite(probs[1]).all()
            results.append(correct)
        assert results[0] == results[1]
