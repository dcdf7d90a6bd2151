"""The network primitives (convolution, pooling, losses, embedding) forward against NumPy references and backward
against central differences, on every device: the same functions run with "cuda" from tests/cuda/test_ops_cuda.py
(see tests/test_ops.py). Shapes are tiny (the CUDA simulator runs every GPU thread as a Python thread)."""
from __future__ import annotations

import numpy as np
import pytest
from helpers import assert_close, gradcheck, to_device

import jitnet as jn
import jitnet.nn.functional as F
from jitnet.nn.embedding_ops import embedding

RNG = np.random.default_rng(1234)


def T(data, device, dtype=None):
    return to_device(data, device, dtype)


def arr(*shape, lo=-2.0, hi=2.0):
    return RNG.uniform(lo, hi, shape)


def _np_conv2d(x, w, b, stride, pads, dilation):
    (sh, sw), (dh, dw) = stride, dilation
    _, _, kh, kw = w.shape
    xp = np.pad(x, ((0, 0), (0, 0), pads[0], pads[1]))
    oh = (xp.shape[2] - dh * (kh - 1) - 1) // sh + 1
    ow = (xp.shape[3] - dw * (kw - 1) - 1) // sw + 1
    out = np.zeros((x.shape[0], w.shape[0], oh, ow))
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, :, i * dh:i * dh + sh * (oh - 1) + 1:sh, j * dw:j * dw + sw * (ow - 1) + 1:sw]
            out += np.einsum("nchw,oc->nohw", patch, w[:, :, i, j])
    return out if b is None else out + b[None, :, None, None]


CONV_CASES = [  # x shape, w shape, bias, kwargs, the reference's (stride, pads, dilation)
    ((2, 2, 5, 4), (3, 2, 3, 2), True, dict(stride=(2, 1), padding=1), ((2, 1), ((1, 1), (1, 1)), (1, 1))),
    ((2, 2, 5, 4), (2, 2, 3, 2), False, dict(padding="same", dilation=(1, 2)), ((1, 1), ((1, 1), (1, 1)), (1, 2))),
    ((1, 3, 4, 4), (2, 3, 1, 1), True, dict(), ((1, 1), ((0, 0), (0, 0)), (1, 1))),
]


@pytest.mark.parametrize("xs,ws,bias,kw,ref", CONV_CASES, ids=["strided-padded-bias", "same-dilated", "1x1"])
def test_conv2d(device, xs, ws, bias, kw, ref):
    x, w = arr(*xs), arr(*ws)
    b = arr(ws[0]) if bias else None
    expect = _np_conv2d(x, w, b, *ref)
    args = [T(x, device, jn.float32), T(w, device, jn.float32)] + ([T(b, device, jn.float32)] if bias else [])
    assert_close(F.conv2d(*args, **kw), expect, rtol=1e-5, atol=1e-5, dtype=jn.float32, device=device)
    assert_close(F.conv2d(*[T(a, device, jn.float64) for a in [x, w] + ([b] if bias else [])], **kw), expect,
                 rtol=1e-12, atol=1e-12, device=device)
    gradcheck(lambda *a: F.conv2d(*a, **kw), x, w, *([b] if bias else []), device=device)


def _np_pool(x, k, s, p, op, count_include_pad=True):
    fill = -np.inf if op == "max" else 0.0
    xp = np.pad(x, ((0, 0), (0, 0), (p, p), (p, p)), constant_values=fill)
    ones = np.pad(np.ones(x.shape[2:]), ((p, p), (p, p)))
    oh, ow = (xp.shape[2] - k) // s + 1, (xp.shape[3] - k) // s + 1
    out = np.zeros(x.shape[:2] + (oh, ow))
    for i in range(oh):
        for j in range(ow):
            win = xp[:, :, i * s:i * s + k, j * s:j * s + k]
            if op == "max":
                out[:, :, i, j] = win.max(axis=(2, 3))
            else:
                n = k * k if count_include_pad else ones[i * s:i * s + k, j * s:j * s + k].sum()
                out[:, :, i, j] = win.sum(axis=(2, 3)) / n
    return out


POOL_CASES = [("max", 2, None, 0, True), ("max", 3, 2, 1, True), ("avg", 3, 2, 1, True), ("avg", 3, 2, 1, False),
              ("avg", 2, None, 0, False)]


@pytest.mark.parametrize("op,k,s,p,cip", POOL_CASES,
                         ids=["max2", "max3-s2-p1", "avg3-s2-p1", "avg3-s2-p1-exclude-pad", "avg2"])
def test_pooling(device, op, k, s, p, cip):
    x = arr(1, 2, 5, 5)
    if op == "max":
        f = lambda a: F.max_pool2d(a, k, stride=s, padding=p)          # noqa: E731
    else:
        f = lambda a: F.avg_pool2d(a, k, stride=s, padding=p, count_include_pad=cip)      # noqa: E731
    expect = _np_pool(x, k, s or k, p, op, cip)
    assert_close(f(T(x, device, jn.float32)), expect, rtol=1e-5, atol=1e-6, dtype=jn.float32, device=device)
    gradcheck(f, x, device=device)


def _np_log_softmax(a):
    m = a.max(-1, keepdims=True)
    return a - m - np.log(np.exp(a - m).sum(-1, keepdims=True))


@pytest.mark.parametrize("classes", [4, 20], ids=["short-rows", "block-rows"])
def test_cross_entropy_int_labels(device, classes):
    x = arr(5, classes, lo=-3, hi=3)
    y = np.array([0, classes - 1, 2, 1, 3])
    ls = _np_log_softmax(x)
    nll = -ls[np.arange(5), y]
    assert_close(F.cross_entropy(T(x, device, jn.float32), T(y, device)), nll.mean(), rtol=1e-5, device=device)
    assert_close(F.cross_entropy(T(x, device), T(y, device), reduction="none"), nll, rtol=1e-5, device=device)
    y2 = y.copy()
    y2[2] = -1                                           # ignored: loss 0, left out of the mean
    keep = y2 >= 0
    assert_close(F.cross_entropy(T(x, device), T(y2, device)), nll[keep].mean(), rtol=1e-5, device=device)
    eps = 0.1
    smooth = -((1 - eps) * ls[np.arange(5), y] + eps / classes * ls.sum(-1))
    assert_close(F.cross_entropy(T(x, device), T(y, device), label_smoothing=eps), smooth.mean(), rtol=1e-5,
                 device=device)
    gradcheck(lambda a: F.cross_entropy(a, T(y2, device)), x, device=device)
    gradcheck(lambda a: F.cross_entropy(a, T(y, device), label_smoothing=eps), x, device=device)
    # the reduced rows (cross_entropy_int_reduced): the sum, every label ignored, and the gradient of the sum
    assert_close(F.cross_entropy(T(x, device), T(y2, device), reduction="sum"), nll[keep].sum(), rtol=1e-5,
                 device=device)
    assert_close(F.cross_entropy(T(x, device), T(np.full(5, -1), device)), np.float64(0.0), device=device)
    gradcheck(lambda a: F.cross_entropy(a, T(y2, device), reduction="sum"), x, device=device)


def test_cross_entropy_probabilities_bce_mse(device):
    x = arr(4, 3)
    p = RNG.dirichlet(np.ones(3), 4)
    z = (p > 0.3).astype(np.float64)
    assert_close(F.cross_entropy(T(x, device), T(p, device, jn.float32)), -(p * _np_log_softmax(x)).sum(-1).mean(),
                 rtol=1e-5, device=device)
    bce = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    assert_close(F.binary_cross_entropy_with_logits(T(x, device), T(z, device, jn.float32)), bce.mean(), rtol=1e-5,
                 device=device)
    assert_close(F.mse_loss(T(x, device), T(p, device, jn.float32)), ((x - p) ** 2).mean(), rtol=1e-5,
                 device=device)
    gradcheck(lambda a, q: F.cross_entropy(a, q), x, p, device=device)
    gradcheck(lambda a: F.binary_cross_entropy_with_logits(a, T(z, device, jn.float64)), x, device=device)
    gradcheck(F.mse_loss, x, p, device=device)


def test_cross_entropy_label_out_of_range_is_reported(device):
    x = jn.ones((2, 3)).to(device)
    with pytest.raises(IndexError, match="cross_entropy: label 3 is out of bounds"):
        F.cross_entropy(x, T([0, 3], device)).item()     # (on a GPU, at the next synchronization)


def test_embedding_forward_and_gradient_with_duplicates(device):
    table = arr(4, 3)
    ids = np.array([[1, 1], [0, 3]])
    out = embedding(T(table, device, jn.float32), T(ids, device))
    assert_close(out, table[ids], rtol=1e-6, dtype=jn.float32, device=device)
    w = jn.tensor(table).to(device).requires_grad_()
    g = np.arange(12.0).reshape(2, 2, 3) + 1
    (embedding(w, T(ids, device)) * T(g, device, jn.float32)).sum().backward()
    expect = np.zeros_like(table)
    np.add.at(expect, ids, g)                             # duplicates accumulate
    np.testing.assert_allclose(np.asarray(w.grad.numpy()), expect, rtol=1e-6)
    gradcheck(lambda t: embedding(t, T(ids, device)) * T(g, device, jn.float64), table, device=device)
