"""Convolution and pooling kernels (jitnet.kernels_conv): chunked im2col / col2im against NumPy references for
every chunk size, stride, padding and dilation; the 2x2 max-pool fast path against the general kernel; the
fused bias gradient."""
from __future__ import annotations

import numpy as np
import pytest

import jitnet as jn
from jitnet import kernels_conv as KC
from jitnet import kernels_cpu as K
from jitnet.nn import functional as F
from jitnet.testing import gradcheck
from test_nn import T64, np_conv2d, np_pool, rng


def np_conv2d_grads(x, w, g, stride, pad, dil):
    """Return (dx, dw) of sum(conv2d(x, w) * g) by the same loops as np_conv2d, run backwards."""
    xp = np.pad(x, ((0, 0), (0, 0), pad[0], pad[1]))
    dxp, dw = np.zeros_like(xp), np.zeros_like(w)
    _, _, kh, kw = w.shape
    for i in range(g.shape[2]):
        for j in range(g.shape[3]):
            for a in range(kh):
                for bb in range(kw):
                    r, c = i * stride[0] + a * dil[0], j * stride[1] + bb * dil[1]
                    dxp[:, :, r, c] += g[:, :, i, j] @ w[:, :, a, bb]
                    dw[:, :, a, bb] += g[:, :, i, j].T @ xp[:, :, r, c]
    h, wd = x.shape[2:]
    return dxp[:, :, pad[0][0]:pad[0][0] + h, pad[1][0]:pad[1][0] + wd], dw


CASES = [  # x shape, w shape, stride, pads ((top, bottom), (left, right)), dilation
    ((3, 2, 7, 6), (4, 2, 3, 2), (1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 3, 9, 8), (2, 3, 5, 5), (1, 1), ((2, 2), (2, 2)), (1, 1)),
    ((2, 2, 9, 7), (3, 2, 3, 3), (2, 2), ((1, 1), (0, 0)), (1, 1)),
    ((2, 2, 10, 9), (3, 2, 3, 2), (2, 3), ((2, 2), (1, 1)), (2, 1)),
    ((1, 3, 8, 8), (2, 3, 2, 3), (1, 2), ((0, 1), (2, 0)), (1, 2)),     # asymmetric padding
    ((2, 1, 5, 5), (2, 1, 5, 5), (1, 1), ((0, 0), (0, 0)), (1, 1)),     # one output position
    # stride 1 with O <= C: the input gradient is a convolution of g with the flipped filters
    ((1, 4, 8, 9), (3, 4, 3, 2), (1, 1), ((0, 2), (1, 0)), (2, 1)),
    ((2, 3, 6, 7), (3, 3, 5, 3), (1, 1), ((2, 2), (1, 1)), (1, 1)),
    ((1, 3, 6, 6), (2, 3, 2, 2), (1, 1), ((2, 2), (0, 0)), (1, 1)),     # pad > k-1: col2im after all
    ((3, 2, 17, 16), (3, 2, 3, 3), (1, 1), ((1, 1), (1, 1)), (1, 1)),   # 272 positions: per-image gradients
]


@pytest.mark.parametrize("per_image", [True, False])
@pytest.mark.parametrize("chunk", [1, 600, 1 << 20])
@pytest.mark.parametrize("xs,ws,stride,pads,dil", CASES)
def test_conv_impls_match_numpy(monkeypatch, per_image, chunk, xs, ws, stride, pads, dil):
    monkeypatch.setattr(F, "CHUNK_BYTES", chunk)          # 1: one image per chunk; 600: a few; 1 MiB: all
    monkeypatch.setattr(F, "CHUNK_BYTES_THREADED", chunk)
    monkeypatch.setattr(F, "_per_image_gemms", lambda: per_image)     # False: the several-threads layout
    r = rng(7)
    x, w, b = r.normal(size=xs), r.normal(size=ws), r.normal(size=ws[0])
    p = dict(stride=stride, pads=pads, dilation=dil)
    y = F._conv2d_impl(x, w, b, **p)
    np.testing.assert_allclose(y, np_conv2d(x, w, b, stride, pads, dil), rtol=1e-10, atol=1e-10)
    g = r.normal(size=y.shape)
    dx_ref, dw_ref = np_conv2d_grads(x, w, g, stride, pads, dil)
    np.testing.assert_allclose(F._conv2d_grad_input_impl(g, w, x_shape=x.shape, **p), dx_ref, rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(F._conv2d_grad_weight_impl(x, g, w_shape=w.shape, **p), dw_ref, rtol=1e-10,
                               atol=1e-10)
    np.testing.assert_allclose(F._conv2d_bias_grad_impl(g), g.sum(axis=(0, 2, 3)), rtol=1e-10, atol=1e-10)


def test_conv_float32_noncontiguous_and_public_grads():
    r = rng(8)
    x = r.normal(size=(3, 4, 9, 10)).astype(np.float32).transpose(0, 1, 3, 2)   # (3, 4, 10, 9), not contiguous
    w = r.normal(size=(5, 4, 3, 3)).astype(np.float32)[:, :, ::-1]               # negative strides
    y = F.conv2d(jn.tensor(x), jn.tensor(w), padding=1, stride=(1, 2))
    np.testing.assert_allclose(y.numpy(), np_conv2d(x, w, None, (1, 2), ((1, 1), (1, 1))), rtol=1e-4,
                               atol=1e-4)
    g = r.normal(size=y.shape).astype(np.float32)
    dx_ref, dw_ref = np_conv2d_grads(x.astype(np.float64), w.astype(np.float64), g, (1, 2), ((1, 1), (1, 1)),
                                     (1, 1))
    dx = F.conv2d_grad_input(jn.tensor(g), jn.tensor(w), x.shape, stride=(1, 2), padding=1)
    dw = F.conv2d_grad_weight(jn.tensor(x), jn.tensor(g), w.shape, stride=(1, 2), padding=1)
    np.testing.assert_allclose(dx.numpy(), dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dw.numpy(), dw_ref, rtol=1e-4, atol=1e-3)


def test_conv_bias_gradient_and_its_derivative():
    r = rng(9)
    x, w, b = r.normal(size=(2, 2, 5, 4)), r.normal(size=(3, 2, 3, 3)), r.normal(size=3)
    assert gradcheck(lambda x, w, b: F.conv2d(x, w, b, padding=1), T64(x), T64(w), T64(b))

    def gb(x, w, b):      # d/db of sum(conv^2) = conv2d_bias_grad(2 * conv): differentiate it again
        b = b.detach().requires_grad_(True)
        return jn.gradients(jn.sum(F.conv2d(x, w, b, padding=1) ** 2), [b], create_graph=True)[0]
    assert gradcheck(gb, T64(x), T64(w), T64(b), argnums=(0, 1), atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# 2x2 / stride 2 max pooling fast path
# ---------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(2, 3, 6, 8), (1, 2, 7, 5), (2, 1, 1, 3)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_max_pool2x2_fast_path_matches_general_kernel(shape, dtype):
    r = rng(10)
    x = r.integers(-3, 4, size=shape).astype(dtype)          # many ties inside windows
    x.flat[::7] = -np.inf
    x.flat[5] = np.nan
    oh, ow = shape[2] // 2, shape[3] // 2
    fast, slow = np.empty(shape[:2] + (oh, ow), dtype), np.empty(shape[:2] + (oh, ow), dtype)
    if oh and ow:
        KC.max_pool2x2(x, fast)
        K.nn_max_pool2d(x, slow, 2, 2, 2, 2, 0, 0)
        np.testing.assert_array_equal(fast, slow)            # NaN wins its window in both
    g = r.normal(size=fast.shape).astype(dtype)
    dfast, dslow = np.full(shape, 7, dtype), np.full(shape, 7, dtype)
    if g.size:
        KC.max_pool2x2_grad(x, g, dfast)
        K.nn_max_pool2d_grad(x, g, dslow, 2, 2, 2, 2, 0, 0)
        np.testing.assert_array_equal(dfast, dslow)          # first maximum wins ties; odd edges get 0


def test_max_pool2x2_public_path_and_gradient():
    r = rng(11)
    x = r.permutation(2 * 3 * 7 * 6).reshape(2, 3, 7, 6) * 0.1 + r.uniform(0, 0.01, (2, 3, 7, 6))
    np.testing.assert_allclose(F.max_pool2d(T64(x), 2).numpy(), np_pool(x, (2, 2), (2, 2), (0, 0), "max"))
    xt = x.transpose(0, 1, 3, 2)                             # non-contiguous input
    np.testing.assert_allclose(F.max_pool2d(T64(xt), 2).numpy(), np_pool(xt, (2, 2), (2, 2), (0, 0), "max"))
    assert gradcheck(lambda x: F.max_pool2d(x, 2), T64(x))
    assert gradcheck(lambda x: F.max_pool2d(x, (2, 2), (2, 2), 0), T64(xt))


def test_jitted_conv_pool_step_matches_eager():
    r = rng(12)
    x = jn.tensor(r.normal(size=(4, 3, 12, 12)).astype(np.float32))
    w = jn.tensor(r.normal(size=(6, 3, 5, 5)).astype(np.float32) * 0.1, requires_grad=True)
    b = jn.tensor(r.normal(size=6).astype(np.float32), requires_grad=True)

    def step(x):
        w.grad = b.grad = None
        loss = jn.sum(F.max_pool2d(F.relu(F.conv2d(x, w, b, padding="same")), 2) ** 2)
        loss.backward()
        return loss, w.grad, b.grad
    eager = [t.numpy() for t in step(x)]
    js = jn.jit(step)
    for _ in range(2):
        for e, j in zip(eager, js(x)):
            np.testing.assert_allclose(j.numpy(), e, rtol=1e-4, atol=1e-4)


def test_parallel_twins_match_serial():
    """Small tests run the serial twins (kernels_cpu.Adaptive); the prange twins must agree with them."""
    r = rng(13)
    x = r.normal(size=(3, 5, 9, 8))
    for args in [(3, 3, 1, 1, 1, 1, 1, 1, 9, 8), (3, 2, 2, 1, 1, 0, 1, 2, 4, 7)]:
        kh, kw, oh, ow = args[0], args[1], args[8], args[9]
        c1, c2 = np.empty((5 * kh * kw, 3 * oh * ow)), np.empty((5 * kh * kw, 3 * oh * ow))
        KC.im2col_chunk.serial(x, c1, *args)
        KC.im2col_chunk.parallel(x, c2, *args)
        np.testing.assert_array_equal(c1, c2)
        d1, d2 = np.empty_like(x), np.empty_like(x)
        KC.col2im_chunk.serial(c1, d1, *args)
        KC.col2im_chunk.parallel(c1, d2, *args)
        np.testing.assert_array_equal(d1, d2)
    y1, y2 = np.empty((4, 5, 3 * 2)), np.empty((4, 5, 3 * 2))
    z = r.normal(size=(5, 4 * 6))
    KC.onp_to_nop_bias.serial(z, np.arange(5.0), y1, True)
    KC.onp_to_nop_bias.parallel(z, np.arange(5.0), y2, True)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_array_equal(y1[1, 2], z[2, 6:12] + 2)
    z1, z2 = np.empty_like(z), np.empty_like(z)
    KC.nop_to_onp.serial(y1, z1)
    KC.nop_to_onp.parallel(y1, z2)
    np.testing.assert_array_equal(z1, z2)
    s1, s2 = np.empty(5), np.empty(5)
    KC.channel_sum.serial(y1, s1)
    KC.channel_sum.parallel(y1, s2)
    np.testing.assert_allclose(s1, s2, rtol=1e-12)
    xp = r.normal(size=(3, 4, 8, 7))
    p1, p2 = np.empty((3, 4, 4, 3)), np.empty((3, 4, 4, 3))
    KC.max_pool2x2.serial(xp, p1)
    KC.max_pool2x2.parallel(xp, p2)
    np.testing.assert_array_equal(p1, p2)
    g = r.normal(size=p1.shape)
    g1, g2 = np.empty_like(xp), np.empty_like(xp)
    KC.max_pool2x2_grad.serial(xp, g, g1)
    KC.max_pool2x2_grad.parallel(xp, g, g2)
    np.testing.assert_array_equal(g1, g2)
