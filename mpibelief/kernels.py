"""Numba kernels for the layer math: dense, activations, softmax-xent, locally connected.

Every kernel is a ``@numba.njit(cache=True)`` function over float32 C-contiguous arrays
(labels: int32 or int64) that writes into preallocated output arrays and returns nothing,
except :func:`softmax_xent`, which returns ``(mean loss, number correct)``.  Kernels hold
no MPI and no config objects; :mod:`mpibelief.reference` has a numpy twin of each one
with the same name and signature, and ``tests/unit/test_kernels.py`` checks every pair.

GEMM-shaped work goes to the BLAS that scipy ships, through ``np.dot`` or, where a
leading dimension is needed, through ``numba_xxgemm``, the C helper behind numba's own
``np.dot``.  Everything else is explicit loops.  Threads: whatever ``NUMBA_NUM_THREADS``
and ``OPENBLAS_NUM_THREADS`` say at start-up (one per rank here); no ``prange``.

The locally connected (LC) layer is the kernel that needs thought.  Each of the
``OH*OW`` output locations has its own ``(K, U)`` weights, ``K = rf*rf*C``, so the layer
is ``OH*OW`` small GEMMs sharing only the batch axis (paper sizes: 144 GEMMs of
32x300x8).  Two costs dominate a naive version: the im2col of NHWC input (one short run
of ``rf*C`` floats per sample per patch row, per location) and BLAS calls in shapes it
runs slowly (BLAS is fast here when the output's contiguous axis is the batch or ``K``,
slow when it is ``U``).  The kernels therefore work one column of locations at a time,
on a *strip*: the image rows cut to that column's window width ``L = rf*C``, row after
row, ``strip[(y, j)] = x[y, c0 + j]``.  In a strip the patch of every location of the
column is one contiguous run of ``K`` floats, already in ``w``'s ``(dy, dx, c)`` order,
so BLAS reads patches in place:

* forward: the strip is sample-minor, ``(rows*L, n)``, copied from a sample-minor
  transpose of ``x`` in runs of ``L*n`` floats; ``Ot (U, n) = W.T @ patch``.
* backward, ``dw``: a sample-major strip ``(n, rows*L)``; ``dW (K, U) = patch.T @ G`` is
  one strided GEMM written straight into ``dw``.
* backward, ``dx``: ``dpatch.T (K, n) = W @ G.T`` is accumulated by BLAS itself
  (``beta=1``) into a sample-minor strip gradient, which is added to a sample-minor ``dx``
  once per column and transposed to NHWC at the end.
"""

import numba
import numpy as np
from numba import types

# Fast-math without 'nnan'/'ninf': lets LLVM reassociate sums (vectorised reductions)
# but keeps IEEE inf/nan semantics, so a diverging model shows up as inf/nan, not junk.
_FAST = {"nsz", "arcp", "contract", "afn", "reassoc"}
_jit = numba.njit(cache=True, fastmath=_FAST)


# ----------------------------------------------------------------------------- dense


@_jit
def _add_row_vector(out, b):
    n, o = out.shape
    if b.shape[0] != o:
        raise ValueError("dense: bias length must equal the number of outputs")
    for i in range(n):
        row = out[i]
        for j in range(o):
            row[j] += b[j]


@_jit
def _column_sums(a, out):
    n, o = a.shape
    if out.shape[0] != o:
        raise ValueError("dense: db length must equal the number of outputs")
    for j in range(o):
        out[j] = 0.0
    for i in range(n):
        row = a[i]
        for j in range(o):
            out[j] += row[j]


@_jit
def dense_forward(x, w, b, out):
    """Fully connected layer: ``out (n, o) = x (n, i) @ w (i, o) + b (o,)``."""
    np.dot(x, w, out)
    _add_row_vector(out, b)


@_jit
def dense_backward_params(x, dy, dw, db):
    """Parameter gradients only (first layer): ``dw = x.T @ dy``, ``db = dy.sum(0)``."""
    np.dot(x.T, dy, dw)
    _column_sums(dy, db)


@_jit
def dense_backward(x, w, dy, dx, dw, db):
    """All gradients of :func:`dense_forward`; ``dx (n, i) = dy @ w.T`` as well."""
    np.dot(dy, w.T, dx)
    dense_backward_params(x, dy, dw, db)


# ------------------------------------------------------------------------ activations
# Elementwise over any 2-D C-contiguous array; ``out is z`` / ``dz is dy`` is allowed
# because each element is read before it is written.


@_jit
def sigmoid_forward(z, out):
    """Logistic function ``out = 1 / (1 + exp(-z))``."""
    zf = z.reshape(-1)
    of = out.reshape(-1)
    for k in range(zf.size):
        of[k] = 1.0 / (1.0 + np.exp(-zf[k]))


@_jit
def sigmoid_backward(y, dy, dz):
    """``dz = dy * y * (1 - y)`` where ``y`` is the forward output."""
    yf = y.reshape(-1)
    gf = dy.reshape(-1)
    df = dz.reshape(-1)
    for k in range(yf.size):
        df[k] = gf[k] * yf[k] * (1.0 - yf[k])


@_jit
def tanh_forward(z, out):
    """``out = tanh(z)``."""
    zf = z.reshape(-1)
    of = out.reshape(-1)
    for k in range(zf.size):
        of[k] = np.tanh(zf[k])


@_jit
def tanh_backward(y, dy, dz):
    """``dz = dy * (1 - y**2)`` where ``y`` is the forward output."""
    yf = y.reshape(-1)
    gf = dy.reshape(-1)
    df = dz.reshape(-1)
    for k in range(yf.size):
        df[k] = gf[k] * (1.0 - yf[k] * yf[k])


@_jit
def relu_forward(z, out):
    """``out = max(z, 0)``."""
    zf = z.reshape(-1)
    of = out.reshape(-1)
    for k in range(zf.size):
        v = zf[k]
        of[k] = v if v > 0.0 else 0.0


@_jit
def relu_backward(y, dy, dz):
    """``dz = dy where y > 0 else 0`` where ``y`` is the forward output."""
    yf = y.reshape(-1)
    gf = dy.reshape(-1)
    df = dz.reshape(-1)
    for k in range(yf.size):
        df[k] = gf[k] if yf[k] > 0.0 else 0.0


# --------------------------------------------------------------------- softmax-xent


@_jit
def softmax_xent(logits, labels, probs, dlogits):
    """Row-wise softmax with cross-entropy against integer labels.

    Writes ``probs = softmax(logits)`` (max-shifted, so large logits do not overflow)
    and ``dlogits = (probs - onehot(labels)) / n``, the gradient of the mean loss.

    Returns:
        ``(loss, correct)``: the mean cross-entropy as a float and the number of rows
        whose first arg-max equals the label, as an int.
    """
    n, k = logits.shape
    total = 0.0
    correct = 0
    for i in range(n):
        label = labels[i]
        if label < 0 or label >= k:
            raise ValueError("softmax_xent: label out of range")
        row = logits[i]
        best = 0
        m = row[0]
        for j in range(1, k):
            if row[j] > m:
                m = row[j]
                best = j
        p = probs[i]
        s = 0.0
        for j in range(k):
            e = np.exp(row[j] - m)
            p[j] = e
            s += e
        total += np.log(s) - (row[label] - m)
        if best == label:
            correct += 1
        inv = 1.0 / s
        g = dlogits[i]
        for j in range(k):
            p[j] *= inv
            g[j] = p[j] / n
        g[label] -= 1.0 / n
    return total / n, correct


# ---------------------------------------------------------------- locally connected

# numba's own np.dot reaches BLAS through the C helper ``numba_xxgemm`` (scipy's sgemm).
# Calling it directly gives what np.dot hides: leading dimensions (a GEMM on a window of
# a bigger array, no copy), transposed operands and accumulation (beta=1).  The symbol is
# resolved by name, so kernels that use it still cache.
_f32p = types.CPointer(types.float32)
_xxgemm = types.ExternalFunction("numba_xxgemm", types.intc(
    types.char, types.char, types.char, types.intp, types.intp, types.intp,
    _f32p, _f32p, types.intp, _f32p, types.intp, _f32p, _f32p, types.intp))
_KIND, _N, _T = ord("s"), ord("n"), ord("t")


@_jit
def _gemm(ta, tb, m, n, k, a, lda, b, ldb, accumulate, c, ldc):
    """Row-major ``C[:m, :n] (+)= op(A) @ op(B)`` on flat views with leading dimensions.

    ``ta``/``tb`` are ``_N`` or ``_T``; ``op(A)`` is ``m x k``, ``op(B)`` is ``k x n``.
    """
    scal = np.array([1.0, 1.0 if accumulate else 0.0], np.float32)
    # BLAS is column-major: row-major C = op(A) op(B) is column-major C.T = op(B).T op(A).T.
    _xxgemm(_KIND, tb, ta, n, m, k, scal[0:].ctypes, b.ctypes, ldb, a.ctypes, lda,
            scal[1:].ctypes, c.ctypes, ldc)


def lc_output_shape(h, w, rf, stride):
    """Output grid ``(oh, ow)`` of a valid (unpadded) ``rf x rf`` window at ``stride``."""
    return (h - rf) // stride + 1, (w - rf) // stride + 1


@_jit
def _lc_check(x, w, b, y, rf, stride):
    """Shapes must agree: BLAS and unchecked indexing would write out of bounds."""
    n, H, W, C = x.shape
    OH, OW, _, U = w.shape
    if rf < 1 or stride < 1 or rf > H or rf > W:
        raise ValueError("lc: need 1 <= rf <= min(H, W) and stride >= 1")
    if w.shape[:3] != ((H - rf) // stride + 1, (W - rf) // stride + 1, rf * rf * C):
        raise ValueError("lc: w must be (*lc_output_shape(H, W, rf, stride), rf*rf*C, U)")
    if b.shape != (OH, OW, U) or y.shape != (n, OH, OW, U):
        raise ValueError("lc: b/db must be (OH, OW, U) and out/dy (n, OH, OW, U)")


@_jit
def _transpose(a, at, to_at):
    """``at[m, i] = a[i, m]`` (to_at) or the reverse, for ``a (n, M)``, ``at (M, n)``.

    Eight rows of ``a`` at a time, so that every 32-byte run of ``at`` is written (or
    read) once while the eight source rows stream through the cache.
    """
    n, M = a.shape
    atf = at.reshape(-1)
    i0 = 0
    while i0 + 8 <= n:
        r0, r1, r2, r3 = a[i0], a[i0 + 1], a[i0 + 2], a[i0 + 3]
        r4, r5, r6, r7 = a[i0 + 4], a[i0 + 5], a[i0 + 6], a[i0 + 7]
        for m in range(M):
            o = m * n + i0
            if to_at:
                atf[o], atf[o + 1], atf[o + 2], atf[o + 3] = r0[m], r1[m], r2[m], r3[m]
                atf[o + 4], atf[o + 5], atf[o + 6], atf[o + 7] = r4[m], r5[m], r6[m], r7[m]
            else:
                r0[m], r1[m], r2[m], r3[m] = atf[o], atf[o + 1], atf[o + 2], atf[o + 3]
                r4[m], r5[m], r6[m], r7[m] = atf[o + 4], atf[o + 5], atf[o + 6], atf[o + 7]
        i0 += 8
    for i in range(i0, n):
        row = a[i]
        for m in range(M):
            if to_at:
                atf[m * n + i] = row[m]
            else:
                row[m] = atf[m * n + i]


@_jit
def _copy(src, dst):
    for k in range(src.size):
        dst[k] = src[k]


@_jit
def _add(src, dst):
    for k in range(src.size):
        dst[k] += src[k]


@_jit
def lc_forward(x, w, b, rf, stride, out):
    """Locally connected layer (no weight sharing), NHWC.

    ``out[i, oy, ox, u] = b[oy, ox, u] + sum_k patch(i, oy, ox)[k] * w[oy, ox, k, u]``
    where the patch of location ``(oy, ox)`` is ``x[i, oy*stride:+rf, ox*stride:+rf, :]``
    flattened in ``(dy, dx, c)`` order.  Shapes: ``x (n, H, W, C)``,
    ``w (OH, OW, rf*rf*C, U)``, ``b (OH, OW, U)``, ``out (n, OH, OW, U)``.
    """
    n, H, W, C = x.shape
    OH, OW, K, U = w.shape
    _lc_check(x, w, b, out, rf, stride)
    L, WC, Hu = rf * C, W * C, (OH - 1) * stride + rf  # Hu: image rows in use
    xt = np.empty((H * WC, n), np.float32)  # x, sample-minor
    _transpose(x.reshape(n, H * WC), xt, True)
    xtf = xt.reshape(-1)
    strip = np.empty((Hu * L, n), np.float32)  # one column of windows, sample-minor
    sf = strip.reshape(-1)
    Ot = np.empty((U, n), np.float32)
    for ox in range(OW):
        c0 = ox * stride * C
        for y in range(Hu):
            _copy(xtf[(y * WC + c0) * n:(y * WC + c0 + L) * n], sf[y * L * n:(y + 1) * L * n])
        for oy in range(OH):
            y0 = oy * stride
            np.dot(w[oy, ox].T, strip[y0 * L:y0 * L + K], Ot)
            bl = b[oy, ox]
            for i in range(n):
                o = out[i, oy, ox]
                for u in range(U):
                    o[u] = Ot[u, i] + bl[u]


@_jit
def _fill_strip(x3, c0, L, Hu, strip):
    """``strip[i, y*L + j] = x3[i, y, c0 + j]``: one column of windows, sample-major."""
    n, H, WC = x3.shape
    xf = x3.reshape(-1)
    sf = strip.reshape(-1)
    for i in range(n):
        for y in range(Hu):
            s = np.uint64((i * H + y) * WC + c0)  # unsigned: no negative-index wrapping
            d = np.uint64((i * Hu + y) * L)
            for j in range(np.uint64(L)):
                sf[d + j] = xf[s + j]


@_jit
def lc_backward(x, w, dy, rf, stride, dx, dw, db):
    """Gradients of :func:`lc_forward` given ``dy (n, OH, OW, U)``.

    Writes ``dx (n, H, W, C)`` (overlapping patches accumulate; zeroed here first),
    ``dw`` and ``db`` (same shapes as ``w`` and ``b``).
    """
    n, H, W, C = x.shape
    OH, OW, K, U = w.shape
    _lc_check(x, w, db, dy, rf, stride)
    if dx.shape != x.shape or dw.shape != w.shape:
        raise ValueError("lc_backward: dx and dw must have the shapes of x and w")
    L, WC, Hu = rf * C, W * C, (OH - 1) * stride + rf
    x3 = x.reshape(n, H, WC)
    strip = np.empty((n, Hu * L), np.float32)  # one column of windows, sample-major
    sf = strip.reshape(-1)
    dstrip = np.empty((Hu * L, n), np.float32)  # its gradient, sample-minor
    dsf = dstrip.reshape(-1)
    dxt = np.zeros((H * WC, n), np.float32)  # dx, sample-minor
    dxtf = dxt.reshape(-1)
    G = np.empty((n, U), np.float32)
    Gt = np.empty((U, n), np.float32)
    for ox in range(OW):
        c0 = ox * stride * C
        _fill_strip(x3, c0, L, Hu, strip)
        dstrip[:] = 0.0
        for oy in range(OH):
            y0 = oy * stride
            dbl = db[oy, ox]
            dbl[:] = 0.0
            for i in range(n):
                g = dy[i, oy, ox]
                for u in range(U):
                    G[i, u] = g[u]
                    Gt[u, i] = g[u]
                    dbl[u] += g[u]
            # dw (K, U) = patch.T @ G, straight into dw in w's (dy, dx, c) row order.
            _gemm(_T, _N, K, U, n, sf[y0 * L:], Hu * L, G.reshape(-1), U, False,
                  dw[oy, ox].reshape(-1), U)
            # dpatch.T (K, n) = w @ G.T, accumulated into the strip gradient.
            _gemm(_N, _N, K, n, U, w[oy, ox].reshape(-1), U, Gt.reshape(-1), n, True,
                  dsf[y0 * L * n:], n)
        for y in range(Hu):
            _add(dsf[y * L * n:(y + 1) * L * n], dxtf[(y * WC + c0) * n:(y * WC + c0 + L) * n])
    _transpose(dx.reshape(n, H * WC), dxt, False)


# ------------------------------------------------- pooling, normalisation, logistic
# The image networks' other layers (after Le et al. 2012, the paper's image models):
# max pooling over non-overlapping k x k blocks, local contrast normalisation over an
# m x m window of every channel, and one-vs-all logistic outputs.  All NHWC.


@_jit
def maxpool_forward(x, k, out):
    """``out[i, oy, ox, c] = max(x[i, oy*k:+k, ox*k:+k, c])``; trailing rows/cols that
    do not fill a block are dropped.  ``out (n, H // k, W // k, C)``."""
    n, H, W, C = x.shape
    OH, OW = H // k, W // k
    if k < 1 or out.shape != (n, OH, OW, C):
        raise ValueError("maxpool: out must be (n, H // k, W // k, C), k >= 1")
    for i in range(n):
        for oy in range(OH):
            for ox in range(OW):
                o = out[i, oy, ox]
                o[:] = x[i, oy * k, ox * k]
                for dy in range(k):
                    for dx in range(k):
                        v = x[i, oy * k + dy, ox * k + dx]
                        for c in range(C):
                            if v[c] > o[c]:
                                o[c] = v[c]


@_jit
def maxpool_backward(x, y, dy, k, dx):
    """Gradient of :func:`maxpool_forward`: each block's ``dy`` goes to the first
    position (row-major within the block) that holds the maximum; ``dx`` is zeroed."""
    n, OH, OW, C = y.shape
    if dx.shape != x.shape or dy.shape != y.shape or x.shape[1] // k != OH:
        raise ValueError("maxpool_backward: dx like x, dy like y")
    dx[...] = 0.0
    for i in range(n):
        for oy in range(OH):
            for ox in range(OW):
                for c in range(C):
                    target = y[i, oy, ox, c]
                    done = False
                    for ddy in range(k):
                        for ddx in range(k):
                            if not done and x[i, oy * k + ddy, ox * k + ddx, c] == target:
                                dx[i, oy * k + ddy, ox * k + ddx, c] = dy[i, oy, ox, c]
                                done = True


@_jit
def _lcn_stats(xp, m, i, S1, S2):
    """Box sums over ``m x m`` windows and every channel of sample ``i``: ``S1`` of
    values, ``S2`` of squares, both ``(h, w)`` float64 (float32 sums cancel badly)."""
    _, Hp, Wp, C = xp.shape
    h, w = Hp - m + 1, Wp - m + 1
    col1 = np.zeros((Hp, w))
    col2 = np.zeros((Hp, w))
    for y in range(Hp):
        p1 = np.zeros(Wp)
        p2 = np.zeros(Wp)
        for x in range(Wp):
            v = xp[i, y, x]
            for c in range(C):
                p1[x] += v[c]
                p2[x] += v[c] * v[c]
        for x in range(w):
            a, b = 0.0, 0.0
            for d in range(m):
                a += p1[x + d]
                b += p2[x + d]
            col1[y, x], col2[y, x] = a, b
    for y in range(h):
        for x in range(w):
            a, b = 0.0, 0.0
            for d in range(m):
                a += col1[y + d, x]
                b += col2[y + d, x]
            S1[y, x], S2[y, x] = a, b


@_jit
def lcn_forward(xp, m, eps, out):
    """Local contrast normalisation over ``m x m`` windows of all channels, NHWC.

    ``xp (n, h+m-1, w+m-1, C)`` is the input zero-padded by ``m // 2`` on every side
    (the caller pads, so a partition can pass its window with its neighbours' halo);
    ``out (n, h, w, C)``.  With ``N = m*m*C``, ``mu`` and ``var`` the window's mean and
    variance, ``out = (x_centre - mu) / sqrt(eps + var)``: subtractive and divisive
    normalisation in one window (Jarrett et al. 2009 with a box window; ``eps`` is the
    floor their ``max(c, sigma)`` provides).
    """
    n, Hp, Wp, C = xp.shape
    r = m // 2
    h, w = Hp - 2 * r, Wp - 2 * r
    if m < 1 or m % 2 == 0 or out.shape != (n, h, w, C):
        raise ValueError("lcn: m odd and out (n, H - m + 1, W - m + 1, C)")
    N = m * m * C
    S1 = np.empty((h, w))
    S2 = np.empty((h, w))
    for i in range(n):
        _lcn_stats(xp, m, i, S1, S2)
        for y in range(h):
            for x in range(w):
                mu = S1[y, x] / N
                s = 1.0 / np.sqrt(eps + S2[y, x] / N - mu * mu)
                v = xp[i, y + r, x + r]
                o = out[i, y, x]
                for c in range(C):
                    o[c] = (v[c] - mu) * s


@_jit
def lcn_backward(xp, m, eps, dy, dxp):
    """Gradient of :func:`lcn_forward` with respect to the padded input ``xp``.

    Per window: ``dmu = -s*sum(dy) - 2*mu*dvar`` and ``dvar = -s**3/2 * sum(dy*(x-mu))``
    spread over the window as ``dmu/N + 2*dvar/N * x``, plus ``dy*s`` at the centre.
    ``dxp`` (shape of ``xp``) is overwritten; its padding receives gradient too (the
    caller drops or forwards it).
    """
    n, Hp, Wp, C = xp.shape
    r = m // 2
    h, w = Hp - 2 * r, Wp - 2 * r
    if dy.shape != (n, h, w, C) or dxp.shape != xp.shape:
        raise ValueError("lcn_backward: dy like out, dxp like xp")
    N = m * m * C
    S1 = np.empty((h, w))
    S2 = np.empty((h, w))
    A = np.empty((h, w))
    B = np.empty((h, w))
    for i in range(n):
        _lcn_stats(xp, m, i, S1, S2)
        for y in range(h):
            for x in range(w):
                mu = S1[y, x] / N
                s = 1.0 / np.sqrt(eps + S2[y, x] / N - mu * mu)
                v, g = xp[i, y + r, x + r], dy[i, y, x]
                g1, g2 = 0.0, 0.0
                for c in range(C):
                    g1 += g[c]
                    g2 += g[c] * (v[c] - mu)
                dvar = -0.5 * s * s * s * g2
                A[y, x] = (-s * g1 - 2.0 * mu * dvar) / N
                B[y, x] = 2.0 * dvar / N
        _lcn_spread(xp, m, i, A, B, dxp)
        for y in range(h):
            for x in range(w):
                mu = S1[y, x] / N
                s = 1.0 / np.sqrt(eps + S2[y, x] / N - mu * mu)
                g, d = dy[i, y, x], dxp[i, y + r, x + r]
                for c in range(C):
                    d[c] += g[c] * s


@_jit
def _lcn_spread(xp, m, i, A, B, dxp):
    """``dxp[i, p, c] = sum over windows containing p of (A + B * xp[i, p, c])``."""
    _, Hp, Wp, C = xp.shape
    h, w = A.shape
    for y in range(Hp):
        for x in range(Wp):
            a, b = 0.0, 0.0
            for oy in range(max(0, y - m + 1), min(h, y + 1)):
                for ox in range(max(0, x - m + 1), min(w, x + 1)):
                    a += A[oy, ox]
                    b += B[oy, ox]
            v, d = xp[i, y, x], dxp[i, y, x]
            for c in range(C):
                d[c] = a + b * v[c]


@_jit
def logistic_xent(logits, labels, offset, probs, dlogits):
    """One-vs-all logistic outputs: column ``j`` is class ``offset + j``.

    ``probs = sigmoid(logits)``; the loss is the mean over rows of the summed binary
    cross-entropies (target 1 for the row's label, 0 elsewhere); ``dlogits`` its
    gradient, ``(probs - target) / n``.  ``offset`` lets a partition that holds
    classes ``offset..offset+k-1`` compute its share of the loss (shares add up).

    Returns:
        the loss share as a float.
    """
    n, k = logits.shape
    total = 0.0
    for i in range(n):
        t = labels[i] - offset
        for j in range(k):
            z = logits[i, j]
            p = 1.0 / (1.0 + np.exp(-z))
            probs[i, j] = p
            total += max(z, 0.0) + np.log1p(np.exp(-abs(z))) - (z if j == t else 0.0)
            dlogits[i, j] = (p - (1.0 if j == t else 0.0)) / n
    return total / n
