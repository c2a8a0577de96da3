"""Plain numpy twins of :mod:`mpibelief.kernels`: same names, same signatures.

They define what each kernel must compute; ``tests/unit/test_kernels.py`` compares every
kernel with its twin and checks the twins' gradients against finite differences, and
``bench/kernels.py`` reports the kernels' speed-up over them.  They are written the way a
numpy user would write them (vectorised, BLAS through ``@`` / ``np.matmul``), not tuned
and not handicapped.  Unlike the kernels they accept any float dtype, so the tests can
run them in float64.
"""

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


def dense_forward(x, w, b, out):
    """``out = x @ w + b``."""
    np.matmul(x, w, out=out)
    out += b


def dense_backward_params(x, dy, dw, db):
    """``dw = x.T @ dy``, ``db = dy.sum(0)``."""
    np.matmul(x.T, dy, out=dw)
    dy.sum(axis=0, out=db)


def dense_backward(x, w, dy, dx, dw, db):
    """``dx = dy @ w.T`` plus the parameter gradients."""
    np.matmul(dy, w.T, out=dx)
    dense_backward_params(x, dy, dw, db)


def sigmoid_forward(z, out):
    """``out = 1 / (1 + exp(-z))``."""
    np.divide(1.0, 1.0 + np.exp(-z), out=out)


def sigmoid_backward(y, dy, dz):
    """``dz = dy * y * (1 - y)``."""
    np.multiply(dy, y * (1.0 - y), out=dz)


def tanh_forward(z, out):
    """``out = tanh(z)``."""
    np.tanh(z, out=out)


def tanh_backward(y, dy, dz):
    """``dz = dy * (1 - y**2)``."""
    np.multiply(dy, 1.0 - y * y, out=dz)


def relu_forward(z, out):
    """``out = 0 where z <= 0 else z``: NaN stays NaN (``z > 0`` would zero it)."""
    out[...] = np.where(z <= 0, 0, z)


def relu_backward(y, dy, dz):
    """``dz = 0 where y <= 0 else dy`` (a NaN ``y`` passes ``dy``, as PyTorch)."""
    dz[...] = np.where(y <= 0, 0, dy)


def softmax_xent(logits, labels, probs, dlogits):
    """Softmax + cross-entropy; returns ``(mean loss, number correct)``."""
    n = logits.shape[0]
    if np.any((labels < 0) | (labels >= logits.shape[1])):
        raise ValueError("softmax_xent: label out of range")
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_z = np.log(np.exp(shifted).sum(axis=1))
    rows = np.arange(n)
    probs[...] = np.exp(shifted - log_z[:, None])
    dlogits[...] = probs / n
    dlogits[rows, labels] -= 1.0 / n
    loss = float(np.mean(log_z - shifted[rows, labels]))
    correct = int(np.sum(np.argmax(logits, axis=1) == labels))
    return loss, correct


def lc_output_shape(h, w, rf, stride):
    """Output grid ``(oh, ow)`` of a valid ``rf x rf`` window at ``stride``."""
    return (h - rf) // stride + 1, (w - rf) // stride + 1


def _patches(x, rf, stride):
    """``(OH, OW, n, rf*rf*C)`` copy of every patch, flattened in ``(dy, dx, c)`` order."""
    n, _, _, c = x.shape
    win = sliding_window_view(x, (rf, rf), axis=(1, 2))[:, ::stride, ::stride]
    oh, ow = win.shape[1:3]  # win: (n, OH, OW, C, rf, rf)
    return win.transpose(1, 2, 0, 4, 5, 3).reshape(oh, ow, n, rf * rf * c)


def lc_forward(x, w, b, rf, stride, out):
    """Locally connected layer: one matmul per output location (batched by np.matmul)."""
    y = np.matmul(_patches(x, rf, stride), w.transpose(0, 1, 3, 2))  # (OH, OW, n, U)
    out[...] = y.transpose(2, 0, 1, 3) + b


def lc_backward(x, w, dy, rf, stride, dx, dw, db):
    """Gradients of :func:`lc_forward`; patch gradients are added back per location."""
    g = dy.transpose(1, 2, 0, 3)  # (OH, OW, n, U)
    np.matmul(g.transpose(0, 1, 3, 2), _patches(x, rf, stride), out=dw)  # (OH, OW, U, K)
    dy.sum(axis=0, out=db)
    oh, ow = w.shape[:2]
    dpatch = np.matmul(g, w)  # (OH, OW, n, K)
    dpatch = dpatch.reshape(oh, ow, x.shape[0], rf, rf, x.shape[3])
    dx[...] = 0
    for oy in range(oh):
        for ox in range(ow):
            dx[:, oy * stride:oy * stride + rf, ox * stride:ox * stride + rf] += dpatch[oy, ox]


def maxpool_forward(x, k, out):
    """Max over non-overlapping ``k x k`` blocks (trailing partial blocks dropped)."""
    n, h, w, c = x.shape
    oh, ow = h // k, w // k
    out[...] = x[:, :oh * k, :ow * k].reshape(n, oh, k, ow, k, c).max(axis=(2, 4))


def maxpool_backward(x, y, dy, k, dx):
    """``dy`` to the first maximum of each block (row-major), zero elsewhere."""
    n, oh, ow, c = y.shape
    blocks = x[:, :oh * k, :ow * k].reshape(n, oh, k, ow, k, c).transpose(0, 1, 3, 5, 2, 4)
    first = blocks.reshape(n, oh, ow, c, k * k).argmax(axis=-1)
    onehot = np.arange(k * k) == first[..., None]  # (n, oh, ow, c, k*k)
    spread = (onehot * dy[..., None]).reshape(n, oh, ow, c, k, k).transpose(0, 1, 4, 2, 5, 3)
    dx[...] = 0
    dx[:, :oh * k, :ow * k] = spread.reshape(n, oh * k, ow * k, c)


def _window_stats(xp, m):
    """Mean and variance over every ``m x m`` window of all channels, float64."""
    win = sliding_window_view(xp.astype(np.float64), (m, m), axis=(1, 2))
    count = m * m * xp.shape[3]
    mu = win.sum(axis=(3, 4, 5)) / count  # (n, h, w)
    var = (win * win).sum(axis=(3, 4, 5)) / count - mu * mu
    return mu, var, count


def lcn_forward(xp, m, eps, out):
    """``(x_centre - mean) / sqrt(eps + var)`` over each ``m x m`` window of all channels."""
    r = m // 2
    mu, var, _ = _window_stats(xp, m)
    h, w = mu.shape[1:]
    centre = xp[:, r:r + h, r:r + w]
    out[...] = (centre - mu[..., None]) / np.sqrt(eps + var[..., None])


def lcn_backward(xp, m, eps, dy, dxp):
    """Gradient of :func:`lcn_forward` w.r.t. the padded input, by the chain rule."""
    r = m // 2
    mu, var, count = _window_stats(xp, m)
    h, w = mu.shape[1:]
    s = 1.0 / np.sqrt(eps + var)
    centre = xp[:, r:r + h, r:r + w]
    dvar = -0.5 * s**3 * (dy * (centre - mu[..., None])).sum(axis=3)
    a = (-s * dy.sum(axis=3) - 2.0 * mu * dvar) / count
    b = 2.0 * dvar / count
    dxp[...] = 0
    for oy in range(m):
        for ox in range(m):
            region = (slice(None), slice(oy, oy + h), slice(ox, ox + w))
            dxp[region] += a[..., None] + b[..., None] * xp[region]
    dxp[:, r:r + h, r:r + w] += dy * s[..., None]


def logistic_xent(logits, labels, offset, probs, dlogits):
    """One-vs-all binary cross-entropy, summed over classes, mean over rows."""
    n, k = logits.shape
    target = (labels[:, None] - offset) == np.arange(k)
    probs[...] = 1.0 / (1.0 + np.exp(-logits))
    dlogits[...] = (probs - target) / n
    z = logits.astype(np.float64)
    loss = np.maximum(z, 0) + np.log1p(np.exp(-np.abs(z))) - target * z
    return float(loss.sum() / n)
