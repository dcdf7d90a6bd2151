"""Winograd convolutions (jitnet.winograd): the transforms' defining identity, forward and filter gradient
against NumPy loops in float64 and float32, every padding, partial tiles and lane blocks, the routing from
nn.functional, and gradcheck through F.conv2d."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

import jitnet as jn
from jitnet import winograd as W
from jitnet.nn import functional as F
from jitnet.testing import gradcheck
from test_conv_kernels import np_conv2d_grads
from test_nn import np_conv2d, rng


@pytest.mark.parametrize("m,r", [(2, 3), (4, 3), (2, 5), (4, 5), (3, 5)])
def test_matrices_compute_correlation_exactly(m, r):
    AT, G, BT = W.matrices(m, r)
    a = m + r - 1
    for trial in range(3):
        d = [Fraction(int(v)) for v in rng(trial).integers(-9, 9, size=a)]
        g = [Fraction(int(v)) for v in rng(trial + 10).integers(-9, 9, size=r)]
        gg = [sum(G[j][k] * g[k] for k in range(r)) for j in range(a)]
        dd = [sum(BT[j][l] * d[l] for l in range(a)) for j in range(a)]
        y = [sum(AT[i][j] * gg[j] * dd[j] for j in range(a)) for i in range(m)]
        assert y == [sum(d[i + k] * g[k] for k in range(r)) for i in range(m)]


_SLOW = pytest.mark.slow     # each tile size compiles its own transform kernels (~30 s): 3x3 runs with the slow tests
CASES = [  # x shape, w shape, pads ((top, bottom), (left, right))
    ((2, 8, 12, 12), (8, 8, 5, 5), ((2, 2), (2, 2))),          # "same", whole tiles
    pytest.param((3, 9, 7, 10), (10, 9, 3, 3), ((1, 1), (1, 1)), marks=_SLOW),   # partial tiles, lanes % 16 != 0
    ((2, 8, 9, 11), (8, 8, 5, 5), ((0, 0), (0, 0))),           # "valid"
    ((1, 8, 9, 11), (12, 8, 5, 5), ((1, 3), (2, 0))),          # asymmetric padding
    ((2, 70, 6, 5), (72, 70, 5, 5), ((2, 2), (2, 2))),         # more than one lane block (LB = 64)
    pytest.param((2, 70, 6, 5), (72, 70, 3, 3), ((1, 1), (1, 1)), marks=_SLOW),
]


@pytest.mark.parametrize("xs,ws,pads", CASES)
def test_forward_and_filter_gradient_match_numpy(xs, ws, pads):
    r = rng(3)
    x, w, b = r.normal(size=xs), r.normal(size=ws), r.normal(size=ws[0])
    y = W.conv2d(x, w, b, pads)
    ref = np_conv2d(x, w, b, (1, 1), pads, (1, 1))
    np.testing.assert_allclose(y, ref, rtol=1e-10, atol=1e-10)
    g = r.normal(size=y.shape)
    _, dw_ref = np_conv2d_grads(x, w, g, (1, 1), pads, (1, 1))
    np.testing.assert_allclose(W.conv2d_grad_weight(x, g, ws, pads), dw_ref, rtol=1e-10, atol=1e-10)


@pytest.mark.slow               # each (tile, dtype) compiles its own transform kernels, ~30-60 s
@pytest.mark.parametrize("xs,ws,pads", [CASES[0], CASES[2]])
def test_float32_forward_and_filter_gradient_within_rounding(xs, ws, pads):
    r = rng(3)
    x, w, b = r.normal(size=xs), r.normal(size=ws), r.normal(size=ws[0])
    ref = np_conv2d(x, w, b, (1, 1), pads, (1, 1))
    g = r.normal(size=ref.shape)
    _, dw_ref = np_conv2d_grads(x, w, g, (1, 1), pads, (1, 1))
    # float32: within a few units of float32 rounding of the output's scale
    y32 = W.conv2d(x.astype(np.float32), w.astype(np.float32), b.astype(np.float32), pads)
    assert y32.dtype == np.float32
    assert np.abs(y32 - ref).max() <= 2e-5 * np.abs(ref).max()
    dw32 = W.conv2d_grad_weight(x.astype(np.float32), g.astype(np.float32), ws, pads)
    assert np.abs(dw32 - dw_ref).max() <= 2e-5 * np.abs(dw_ref).max()


def test_functional_routes_eligible_convs_and_gradients_check(monkeypatch):
    r = rng(5)
    x = jn.tensor(r.normal(size=(2, 8, 6, 7)), requires_grad=True)
    w = jn.tensor(r.normal(size=(9, 8, 5, 5)) * 0.3, requires_grad=True)   # 5x5: the tile the other tests compile
    b = jn.tensor(r.normal(size=9), requires_grad=True)
    monkeypatch.setattr(W, "MIN_CHANNELS", {3: 8, 5: 8})      # small shapes keep the gradcheck quick
    calls = []
    orig = W.conv2d

    def spy(*a):
        calls.append(1)
        return orig(*a)
    monkeypatch.setattr(W, "conv2d", spy)
    y = F.conv2d(x, w, b, padding="same")
    np.testing.assert_allclose(y.numpy(), np_conv2d(x.numpy(), w.numpy(), b.numpy(), (1, 1), ((2, 2), (2, 2)),
                                                    (1, 1)), rtol=1e-10, atol=1e-10)
    assert calls, "an eligible stride-1 5x5 conv did not run in Winograd tiles"
    gradcheck(lambda x, w, b: (F.conv2d(x, w, b, padding="same") ** 2).sum(), x, w, b)
    gradcheck(lambda x, w: (F.conv2d(x, w, padding="valid") ** 2).sum(), x, w)


def test_ineligible_convs_stay_on_im2col():
    assert not W.supported((2, 32, 9, 9), (32, 32, 3, 3), (2, 2), (1, 1), np.float32)   # stride
    assert not W.supported((2, 32, 9, 9), (32, 32, 3, 3), (1, 1), (2, 2), np.float32)   # dilation
    assert not W.supported((2, 8, 9, 9), (16, 8, 5, 5), (1, 1), (1, 1), np.float32)     # few input channels
    assert not W.supported((2, 64, 9, 9), (16, 64, 3, 3), (1, 1), (1, 1), np.float32)   # few output channels
    assert W.supported((2, 16, 9, 9), (16, 16, 5, 5), (1, 1), (1, 1), np.float32)
    assert not W.supported((2, 32, 9, 9), (32, 32, 3, 5), (1, 1), (1, 1), np.float32)   # not square
    assert not W.supported((2, 32, 9, 9), (32, 32, 7, 7), (1, 1), (1, 1), np.float32)   # no tile for 7x7


def test_other_threads_use_im2col():
    import threading
    seen = []
    t = threading.Thread(target=lambda: seen.append(W.supported((2, 16, 9, 9), (16, 16, 5, 5), (1, 1), (1, 1),
                                                                np.float32)))
    t.start()
    t.join()
    assert seen == [False]
    x = jn.tensor(rng(1).normal(size=(2, 16, 6, 6)))
    w = jn.tensor(rng(2).normal(size=(16, 16, 5, 5)))
    out = []
    t = threading.Thread(target=lambda: out.append(F.conv2d(x, w, padding="same").numpy()))
    t.start()
    t.join()
    np.testing.assert_allclose(out[0], F.conv2d(x, w, padding="same").numpy(), rtol=1e-10, atol=1e-10)


def test_batch_chunks_give_the_same_result(monkeypatch):
    r = rng(4)
    x, w, b = r.normal(size=(5, 16, 7, 6)), r.normal(size=(16, 16, 5, 5)), r.normal(size=16)
    pads = ((2, 2), (2, 2))
    y1 = W.conv2d(x, w, b, pads)
    g = r.normal(size=y1.shape)
    dw1 = W.conv2d_grad_weight(x, g, w.shape, pads)
    monkeypatch.setattr(W, "CHUNK_BYTES", 1)             # one image per chunk
    assert len(W._batch_chunks(5, 2, 2, 8, (16, 16), 8)) == 5
    np.testing.assert_allclose(W.conv2d(x, w, b, pads), y1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(W.conv2d_grad_weight(x, g, w.shape, pads), dw1, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(y1, np_conv2d(x, w, b, (1, 1), pads, (1, 1)), rtol=1e-10, atol=1e-10)
