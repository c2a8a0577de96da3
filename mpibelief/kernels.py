"""Numba kernels for the layer math: dense, activations, softmax-xent, locally connected.

Every kernel is a ``@numba.njit(cache=True)`` function over float32 C-contiguous arrays
(labels: int32 or int64) that writes into preallocated output arrays and returns nothing,
except :func:`softmax_xent`, which returns ``(mean loss, number correct)``.  Kernels hold
no MPI and no config objects; :mod:`mpibelief.reference` has a numpy twin of each one
with the same name and signature, and ``tests/unit/test_kernels.py`` checks every pair.

GEMM-shaped dense work goes to the BLAS that scipy ships, through numba's ``np.dot``.
Everything else is explicit loops.  Threads: whatever ``NUMBA_NUM_THREADS`` and
``OPENBLAS_NUM_THREADS`` say at start-up (one per rank here); no ``prange``.

The locally connected (LC) layer is the kernel that needs thought.  Each of the
``OH*OW`` output locations has its own ``(U, K)`` weights, ``K = rf*rf*C``, so the layer
is ``OH*OW`` small GEMMs sharing only the batch axis (``n x K x U``: 32 x 300 x 8 to
32 x 3600 x 36 for the paper's image models).  BLAS is a poor fit: on exactly these
products, operands laid out in advance, scipy's OpenBLAS (its AVX2 "Haswell" kernels on
this AVX-512 machine) ran at 0.25-0.6 x its square-matrix rate.  So the LC kernels are
loops, shaped for LLVM's vectoriser:

* every inner loop runs over the long contiguous axis ``K`` with a 4 x 4 tile of
  scalars hoisted out of it: 16 accumulators (forward, reductions over ``K``) or 16
  coefficients (both gradients, ``d[r] += c @ src`` row updates).  LLVM keeps them in
  vector registers at full width (zmm here); alone, on cached data, the tiles peaked
  at 0.9-1.7 x the square sgemm's peak (lowest for the gradient tiles at K = 300, whose
  K % 16 tail runs scalar).  Batch and units are zero-padded to multiples of 4.
* the weights are stored ``(OH, OW, U, K)``, unit-major, so every tile reads a
  location's weights (and writes its weight gradient) in place.  With ``(K, U)`` the
  per-location transposes took 28-57% of the forward time (measured), since a
  transpose costs about what 2n flops per weight do.
* patches come from a *strip*: one column of windows, the image rows cut to the
  column's width ``L = rf*C``, sample-major, ``strip[i, y*L + j] = x[i, y, c0 + j]``.
  In it the patch of every location of the column is one contiguous run of ``K``
  floats per sample, already in the weights' ``(dy, dx, c)`` order; its gradient is
  accumulated in a strip of the same shape and added back once per column.

``bench/kernels.py`` times all of this against sgemm through the same BLAS.
"""

import numba
import numpy as np

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
    """``out = max(z, 0)``, NaN kept as NaN (as PyTorch): a diverged model must show."""
    zf = z.reshape(-1)
    of = out.reshape(-1)
    for k in range(zf.size):
        v = zf[k]
        of[k] = 0.0 if v <= 0.0 else v  # not 'v > 0': that is false for NaN


@_jit
def relu_backward(y, dy, dz):
    """``dz = 0 where y <= 0 else dy`` (``y`` the forward output; a NaN ``y`` passes ``dy``,
    as PyTorch's ``threshold_backward``)."""
    yf = y.reshape(-1)
    gf = dy.reshape(-1)
    df = dz.reshape(-1)
    for k in range(yf.size):
        df[k] = 0.0 if yf[k] <= 0.0 else gf[k]


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
            # A NaN counts as the maximum, as in np.argmax; the loss is NaN either way.
            if row[j] > m or (row[j] != row[j] and m == m):
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
# Register tiles: every inner loop below is over the long contiguous axis K, with 4 x 4
# scalars hoisted out of it, so LLVM's loop vectoriser keeps 16 accumulators (or 16
# coefficients) in vector registers at the machine's full width.


def lc_output_shape(h, w, rf, stride):
    """Output grid ``(oh, ow)`` of a valid (unpadded) ``rf x rf`` window at ``stride``."""
    return (h - rf) // stride + 1, (w - rf) // stride + 1


@_jit
def _lc_check(x, w, b, y, rf, stride):
    """Shapes must agree: the unchecked indexing below would write out of bounds."""
    n, H, W, C = x.shape
    OH, OW, U, _ = w.shape
    if rf < 1 or stride < 1 or rf > H or rf > W:
        raise ValueError("lc: need 1 <= rf <= min(H, W) and stride >= 1")
    if (w.shape[0], w.shape[1], w.shape[3]) != ((H - rf) // stride + 1,
                                                 (W - rf) // stride + 1, rf * rf * C):
        raise ValueError("lc: w must be (*lc_output_shape(H, W, rf, stride), U, rf*rf*C)")
    if b.shape != (OH, OW, U) or y.shape != (n, OH, OW, U):
        raise ValueError("lc: b/db must be (OH, OW, U) and out/dy (n, OH, OW, U)")


@_jit
def _up4(k):
    return (k + 3) // 4 * 4


@_jit
def _strip_rows(x3, c0, L, Hu, strip, add_back):
    """``strip[i, y*L + j] = x3[i, y, c0 + j]`` for ``i < n``, or the reverse, added.

    The strip is one column of windows, sample-major: in it the patch of every location
    of the column is one contiguous run of ``K = rf*L`` floats per sample, already in
    ``w``'s ``(dy, dx, c)`` order.  Rows ``n..`` of the strip (padding) are not touched.
    """
    n, H, WC = x3.shape
    xf = x3.reshape(-1)
    sf = strip.reshape(-1)
    width = strip.shape[1]
    for i in range(n):
        for y in range(Hu):
            s = np.uint64((i * H + y) * WC + c0)  # unsigned: no negative-index wrapping
            d = np.uint64(i * width + y * L)
            if add_back:
                for j in range(np.uint64(L)):
                    xf[s + j] += sf[d + j]
            else:
                for j in range(np.uint64(L)):
                    sf[d + j] = xf[s + j]


@_jit
def _dot_tile(p, off, K, wt, i, u, y):
    """``y[i:i+4, u:u+4] = p[i:i+4, off:off+K] @ wt[u:u+4, :K].T``: 16 dot products.

    ``p`` is a strip (patches), ``wt`` a location's ``(U, K)`` weights.
    """
    p0, p1, p2, p3 = p[i, off:off + K], p[i + 1, off:off + K], p[i + 2, off:off + K], \
        p[i + 3, off:off + K]
    w0, w1, w2, w3 = wt[u], wt[u + 1], wt[u + 2], wt[u + 3]
    z = np.float32(0.0)
    a00 = a01 = a02 = a03 = a10 = a11 = a12 = a13 = z
    a20 = a21 = a22 = a23 = a30 = a31 = a32 = a33 = z
    for k in range(K):
        x0, x1, x2, x3 = p0[k], p1[k], p2[k], p3[k]
        v0, v1, v2, v3 = w0[k], w1[k], w2[k], w3[k]
        a00 += x0 * v0; a01 += x0 * v1; a02 += x0 * v2; a03 += x0 * v3  # noqa: E702
        a10 += x1 * v0; a11 += x1 * v1; a12 += x1 * v2; a13 += x1 * v3  # noqa: E702
        a20 += x2 * v0; a21 += x2 * v1; a22 += x2 * v2; a23 += x2 * v3  # noqa: E702
        a30 += x3 * v0; a31 += x3 * v1; a32 += x3 * v2; a33 += x3 * v3  # noqa: E702
    y[i, u], y[i, u + 1], y[i, u + 2], y[i, u + 3] = a00, a01, a02, a03
    y[i + 1, u], y[i + 1, u + 1], y[i + 1, u + 2], y[i + 1, u + 3] = a10, a11, a12, a13
    y[i + 2, u], y[i + 2, u + 1], y[i + 2, u + 2], y[i + 2, u + 3] = a20, a21, a22, a23
    y[i + 3, u], y[i + 3, u + 1], y[i + 3, u + 2], y[i + 3, u + 3] = a30, a31, a32, a33


@_jit
def _axpy_tile(d, doff, r, src, soff, K, c):
    """``d[r+j, doff:+K] += sum_m c[j, m] * src[m, soff:+K]`` for ``j, m < 4``.

    One tile serves both gradients: ``dW += G.T @ patches`` and ``dpatches += G @ W``
    (``W``, ``dW`` a location's ``(U, K)`` weights and gradient, ``G`` its ``(n, U)``).
    """
    d0, d1, d2, d3 = d[r, doff:doff + K], d[r + 1, doff:doff + K], d[r + 2, doff:doff + K], \
        d[r + 3, doff:doff + K]
    s0, s1, s2, s3 = src[0, soff:soff + K], src[1, soff:soff + K], src[2, soff:soff + K], \
        src[3, soff:soff + K]
    c00, c01, c02, c03 = c[0, 0], c[0, 1], c[0, 2], c[0, 3]
    c10, c11, c12, c13 = c[1, 0], c[1, 1], c[1, 2], c[1, 3]
    c20, c21, c22, c23 = c[2, 0], c[2, 1], c[2, 2], c[2, 3]
    c30, c31, c32, c33 = c[3, 0], c[3, 1], c[3, 2], c[3, 3]
    for k in range(K):
        x0, x1, x2, x3 = s0[k], s1[k], s2[k], s3[k]
        d0[k] += c00 * x0 + c01 * x1 + c02 * x2 + c03 * x3
        d1[k] += c10 * x0 + c11 * x1 + c12 * x2 + c13 * x3
        d2[k] += c20 * x0 + c21 * x1 + c22 * x2 + c23 * x3
        d3[k] += c30 * x0 + c31 * x1 + c32 * x2 + c33 * x3


@_jit
def _weights_at(w, oy, ox, pad):
    """Location ``(oy, ox)``'s ``(U, K)`` weights: a view, or, if ``U % 4``, a zero-padded copy."""
    U = w.shape[2]
    if U % 4 == 0:
        return w[oy, ox]
    pad[:U] = w[oy, ox]
    return pad


@_jit
def lc_forward(x, w, b, rf, stride, out):
    """Locally connected layer (no weight sharing), NHWC.

    ``out[i, oy, ox, u] = b[oy, ox, u] + sum_k patch(i, oy, ox)[k] * w[oy, ox, u, k]``
    where the patch of location ``(oy, ox)`` is ``x[i, oy*stride:+rf, ox*stride:+rf, :]``
    flattened in ``(dy, dx, c)`` order.  Shapes: ``x (n, H, W, C)``,
    ``w (OH, OW, U, rf*rf*C)``, ``b (OH, OW, U)``, ``out (n, OH, OW, U)``.
    """
    n, H, W, C = x.shape
    OH, OW, U, K = w.shape
    _lc_check(x, w, b, out, rf, stride)
    L, Hu = rf * C, (OH - 1) * stride + rf  # Hu: image rows in use
    n4, U4 = _up4(n), _up4(U)  # zero padding: whole 4 x 4 tiles, no tail code
    strip = np.zeros((n4, Hu * L), np.float32)
    pad = np.zeros((U4, K), np.float32)
    y = np.empty((n4, U4), np.float32)
    x3 = x.reshape(n, H, W * C)
    for ox in range(OW):
        _strip_rows(x3, ox * stride * C, L, Hu, strip, False)
        for oy in range(OH):
            wl = _weights_at(w, oy, ox, pad)
            for i in range(0, n4, 4):
                for u in range(0, U4, 4):
                    _dot_tile(strip, oy * stride * L, K, wl, i, u, y)
            bl = b[oy, ox]
            for i in range(n):
                o = out[i, oy, ox]
                for u in range(U):
                    o[u] = y[i, u] + bl[u]


@_jit
def _lc_grads_at(strip, dstrip, off, K, wl, g, gt, dwl):
    """One location's ``dW (U4, K)`` and its patch gradients, added into ``dstrip``."""
    n4, U4 = g.shape
    dwl[:] = 0.0
    for i in range(0, n4, 4):
        for u in range(0, U4, 4):
            _axpy_tile(dwl, 0, u, strip[i:i + 4], off, K, gt[u:u + 4, i:i + 4])
            _axpy_tile(dstrip, off, i, wl[u:u + 4], 0, K, g[i:i + 4, u:u + 4])


@_jit
def lc_backward(x, w, dy, rf, stride, dx, dw, db):
    """Gradients of :func:`lc_forward` given ``dy (n, OH, OW, U)``.

    Writes ``dx (n, H, W, C)`` (overlapping patches accumulate; zeroed here first),
    ``dw`` and ``db`` (same shapes as ``w`` and ``b``).
    """
    n, H, W, C = x.shape
    OH, OW, U, K = w.shape
    _lc_check(x, w, db, dy, rf, stride)
    if dx.shape != x.shape or dw.shape != w.shape:
        raise ValueError("lc_backward: dx and dw must have the shapes of x and w")
    L, Hu = rf * C, (OH - 1) * stride + rf
    n4, U4 = _up4(n), _up4(U)
    strip = np.zeros((n4, Hu * L), np.float32)
    dstrip = np.empty((n4, Hu * L), np.float32)
    pad, dpad = np.zeros((U4, K), np.float32), np.empty((U4, K), np.float32)
    g, gt = np.zeros((n4, U4), np.float32), np.zeros((U4, n4), np.float32)
    x3, dx3 = x.reshape(n, H, W * C), dx.reshape(n, H, W * C)
    dx[:] = 0.0
    for ox in range(OW):
        c0 = ox * stride * C
        _strip_rows(x3, c0, L, Hu, strip, False)
        dstrip[:] = 0.0
        for oy in range(OH):
            dbl = db[oy, ox]
            dbl[:] = 0.0
            for i in range(n):
                gi = dy[i, oy, ox]
                for u in range(U):
                    g[i, u] = gt[u, i] = gi[u]
                    dbl[u] += gi[u]
            wl = _weights_at(w, oy, ox, pad)
            dwl = dw[oy, ox] if U % 4 == 0 else dpad
            _lc_grads_at(strip, dstrip, oy * stride * L, K, wl, g, gt, dwl)
            if U % 4:
                dw[oy, ox] = dpad[:U]
        _strip_rows(dx3, c0, L, Hu, dstrip, True)


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
