"""Losses, regularizers and constraints against NumPy references; gradients by central differences."""
from __future__ import annotations

import numpy as np
import pytest

import jitnet as jn
from jitnet import nn
from jitnet.nn import functional as F
from jitnet.testing import gradcheck


def T64(a):
    return jn.tensor(np.asarray(a, dtype=np.float64), dtype=jn.float64)


def np_lse(x):
    m = x.max(-1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def test_cross_entropy_int_labels():
    r = np.random.default_rng(0)
    x = r.normal(size=(5, 4)) * 3
    y = np.array([0, 3, 1, 1, 2])
    ref = np_lse(x) - x[np.arange(5), y]
    np.testing.assert_allclose(nn.cross_entropy(T64(x), y, reduction="none").numpy(), ref, rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(T64(x), y).item(), ref.mean(), rtol=1e-12)
    np.testing.assert_allclose(nn.cross_entropy(T64(x), y, reduction="sum").item(), ref.sum(), rtol=1e-12)
    assert gradcheck(lambda x: nn.cross_entropy(x, y), T64(x))
    lg = jn.tensor(x.astype(np.float32), requires_grad=True)
    nn.cross_entropy(lg, y, reduction="sum").backward()
    e = np.exp(x - np_lse(x)[:, None])
    e[np.arange(5), y] -= 1
    np.testing.assert_allclose(lg.grad.numpy(), e, rtol=1e-4, atol=1e-6)


def test_cross_entropy_stable_ignore_and_nd():
    x = np.array([[1000.0, 0.0, -1000.0], [0.0, 0.0, 0.0]], np.float32)
    loss = nn.cross_entropy(jn.tensor(x), np.array([2, -1]), reduction="none").numpy()
    np.testing.assert_allclose(loss, [2000.0, 0.0])
    assert nn.cross_entropy(jn.tensor(x), np.array([0, -1])).item() == 0.0
    r = np.random.default_rng(1)
    x3 = r.normal(size=(2, 3, 4))
    y3 = r.integers(0, 4, (2, 3))
    np.testing.assert_allclose(nn.cross_entropy(T64(x3), y3, reduction="none").numpy(),
                               np_lse(x3) - np.take_along_axis(x3, y3[..., None], -1)[..., 0], rtol=1e-12)
    with pytest.raises(IndexError, match="4 classes"):
        nn.cross_entropy(T64(x3), y3 + 4)
    with pytest.raises(ValueError, match=r"\(2, 2\)"):
        nn.cross_entropy(T64(x3), y3[:, :2])


def test_cross_entropy_probability_labels_and_second_order():
    r = np.random.default_rng(2)
    x = r.normal(size=(4, 3))
    p = r.dirichlet(np.ones(3), 4)
    ref = (p * (np_lse(x)[:, None] - x)).sum(-1)
    np.testing.assert_allclose(nn.cross_entropy(T64(x), T64(p), reduction="none").numpy(), ref, rtol=1e-12)
    assert gradcheck(lambda x, p: nn.cross_entropy(x, p), T64(x), T64(p))
    onehot = np.eye(3)[[0, 2, 1, 1]]
    np.testing.assert_allclose(nn.cross_entropy(T64(x), T64(onehot)).item(),
                               nn.cross_entropy(T64(x), np.array([0, 2, 1, 1])).item(), rtol=1e-12)
    y = np.array([0, 2, 1, 1])

    def g(x):
        return jn.grad(lambda x: nn.cross_entropy(x, y))(x) ** 2
    assert gradcheck(g, T64(x), atol=1e-4)
    s = nn.cross_entropy(T64(x), y, label_smoothing=0.1).item()
    q = np.eye(3)[y] * 0.9 + 0.1 / 3
    np.testing.assert_allclose(s, (q * (np_lse(x)[:, None] - x)).sum(-1).mean(), rtol=1e-12)


def test_bce_mse_l2_huber():
    r = np.random.default_rng(3)
    x, z = r.normal(size=(4, 3)) * 4, r.uniform(size=(4, 3))
    ref = np.maximum(x, 0) - x * z + np.log1p(np.exp(-np.abs(x)))
    np.testing.assert_allclose(nn.binary_cross_entropy_with_logits(T64(x), T64(z)).item(), ref.mean(),
                               rtol=1e-12)
    assert gradcheck(lambda x, z: nn.binary_cross_entropy_with_logits(x, z), T64(x), T64(z))
    pw = 2.0
    refw = (1 - z) * x + (1 + (pw - 1) * z) * np.log1p(np.exp(-x))
    np.testing.assert_allclose(nn.binary_cross_entropy_with_logits(T64(x), T64(z), "none", pos_weight=pw).numpy(),
                               refw, rtol=1e-10)
    a, b = r.normal(size=(4, 3)), r.normal(size=(4, 3))
    np.testing.assert_allclose(nn.mse_loss(T64(a), T64(b)).item(), ((a - b) ** 2).mean(), rtol=1e-12)
    np.testing.assert_allclose(nn.l2_loss(T64(a)).item(), (a ** 2).sum(1).mean(), rtol=1e-12)
    np.testing.assert_allclose(nn.l2_loss(T64(a), "sum").item(), (a ** 2).sum(), rtol=1e-12)
    assert nn.l2_loss(T64(a), "none").shape == (4,)
    d = a - b
    hub = np.where(np.abs(d) <= 0.5, 0.5 * d ** 2, 0.5 * (np.abs(d) - 0.25))
    np.testing.assert_allclose(nn.huber_loss(T64(a), T64(b), delta=0.5).item(), hub.mean(), rtol=1e-12)
    for f in (nn.mse_loss, lambda a, b: nn.huber_loss(a, b, 0.5)):
        assert gradcheck(f, T64(a), T64(b))
    assert gradcheck(nn.l2_loss, T64(a))
    with pytest.raises(ValueError, match="reduction"):
        nn.mse_loss(T64(a), T64(b), reduction="avg")
    with pytest.raises(ValueError, match="mse_loss"):
        nn.mse_loss(T64(a), T64(b[:, :2]))


def test_regularizers_and_max_norm():
    w = np.array([[1.0, -2.0], [3.0, 0.5]])
    assert nn.l1_regularizer(0.1)(T64(w)).item() == pytest.approx(0.65)
    assert nn.l2_regularizer(0.1)(T64(w)).item() == pytest.approx(0.1 * (w ** 2).sum() / 2)
    c = nn.max_norm(T64(w), 2.0, axis=0).numpy()
    norms = np.sqrt((w ** 2).sum(0))
    np.testing.assert_allclose(c, w * np.minimum(norms, 2) / (norms + 1e-7), rtol=1e-6)
    p = jn.Parameter(w)
    p.assign(nn.max_norm(p, 1.0, axis=1))
    assert np.sqrt((p.numpy() ** 2).sum(1)).max() <= 1.0 + 1e-6


def test_log_uniform_sampler():
    jn.random.seed(0)
    s, te, se = F.log_uniform_candidate_sampler(np.array([[0], [5]]), 1, 20, True, 1000)
    assert s.shape == (20,) and len(set(s.numpy().tolist())) == 20
    assert (s.numpy() >= 0).all() and (s.numpy() < 1000).all()
    assert te.shape == (2, 1) and se.shape == (20,)
    assert (se.numpy() > 0).all() and (se.numpy() <= 1).all() and te.numpy()[0, 0] > te.numpy()[1, 0]
    jn.random.seed(1)
    big, _, _ = F.log_uniform_candidate_sampler(np.zeros((1, 1), np.int64), 1, 5000, False, 100)
    counts = np.bincount(big.numpy(), minlength=100) / 5000
    p = (np.log(np.arange(100) + 2) - np.log(np.arange(100) + 1)) / np.log(101)
    assert np.abs(counts - p).max() < 0.03


def test_nce_loss_reference_and_training():
    r = np.random.default_rng(4)
    V, D, B = 50, 4, 6
    W, b = r.normal(size=(V, D)) * 0.1, np.zeros(V)
    x, y = r.normal(size=(B, D)), r.integers(0, V, (B, 1))
    sampled = np.array([1, 7, 9])
    te, se = np.full((B, 1), 0.2), np.array([0.3, 0.1, 0.05])
    loss = nn.nce_loss(T64(W), T64(b), y, T64(x), 3, V, sampled_values=(sampled, te, se))
    tl = (x * W[y[:, 0]]).sum(1, keepdims=True) + b[y] - np.log(te)
    sl = x @ W[sampled].T + b[sampled] - np.log(se)
    sp = lambda v: np.maximum(v, 0) + np.log1p(np.exp(-np.abs(v)))  # noqa: E731
    ref = sp(-tl).sum(1) + sp(sl).sum(1)
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-10)
    assert gradcheck(lambda W, x: nn.nce_loss(W, T64(b), y, x, 3, V, sampled_values=(sampled, te, se)),
                     T64(W), T64(x))
    # accidental hits are removed (their sampled logit contributes nothing)
    y2 = np.array([[7]] * B)
    l2 = nn.nce_loss(T64(W), T64(b), y2, T64(x), 3, V, sampled_values=(sampled, te, se),
                     remove_accidental_hits=True).numpy()
    tl2 = (x * W[7]).sum(1, keepdims=True) - np.log(te)
    ref2 = sp(-tl2).sum(1) + sp(sl[:, [0, 2]]).sum(1)
    np.testing.assert_allclose(l2, ref2, rtol=1e-10)
    # a few SGD steps on a toy problem drive the loss down
    jn.random.seed(0)
    Wt = jn.Parameter(r.normal(size=(V, D)) * 0.1)
    bt = jn.Parameter(np.zeros(V))
    emb = jn.Parameter(r.normal(size=(V, D)) * 0.1)
    ids = np.arange(12) % V
    tgt = ((ids * 7 + 3) % V).reshape(-1, 1)
    losses = []
    for _ in range(60):
        loss = nn.nce_loss(Wt, bt, tgt, jn.take(emb, ids, axis=0), 8, V).mean()
        losses.append(loss.item())
        for p in (Wt, bt, emb):
            p.grad = None
        loss.backward()
        for p in (Wt, bt, emb):
            g = p.grad.to_dense() if hasattr(p.grad, "to_dense") else p.grad
            p.assign(p - g * 0.5)
    assert np.isfinite(losses).all() and loss.shape == ()
    assert np.mean(losses[-10:]) < 0.6 * np.mean(losses[:5])


def test_sampled_softmax_loss():
    r = np.random.default_rng(5)
    V, D, B = 30, 3, 4
    W, b, x = r.normal(size=(V, D)), r.normal(size=V), r.normal(size=(B, D))
    y = np.array([[2], [5], [9], [1]])
    sampled = np.array([3, 4, 5])
    te, se = np.full((B, 1), 0.1), np.array([0.2, 0.2, 0.3])
    loss = nn.sampled_softmax_loss(T64(W), T64(b), y, T64(x), 3, V, sampled_values=(sampled, te, se))
    tl = (x * W[y[:, 0]]).sum(1, keepdims=True) + b[y] - np.log(te)
    sl = x @ W[sampled].T + b[sampled] - np.log(se)
    logits = np.concatenate([tl, sl], 1)
    logits[1, 3] = -np.inf                          # label 5 was sampled for row 1: removed
    ref = np_lse(logits) - logits[:, 0]
    np.testing.assert_allclose(loss.numpy(), ref, rtol=1e-10)
    jn.random.seed(3)
    l2 = nn.sampled_softmax_loss(T64(W), T64(b), y, T64(x), 5, V)
    assert l2.shape == (B,) and np.isfinite(l2.numpy()).all()


def test_cross_entropy_mean_ignores_negative_labels_under_jit_as_eagerly():
    rng = np.random.default_rng(0)
    x = jn.tensor(rng.standard_normal((6, 4)), dtype=jn.float64, requires_grad=True)
    y = jn.tensor(np.array([1, -1, 3, 0, -1, 2]), dtype=jn.int64)

    def f(x, y):
        return F.cross_entropy(x, y)

    eager = f(x, y).item()
    valid = np.array([0, 2, 3, 5])
    logits = x.numpy()[valid]
    ref = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(4), y.numpy()[valid]])
    assert abs(eager - ref) < 1e-12
    jf = jn.jit(f)
    for _ in range(3):                                  # trace, plan, native driver
        assert abs(jf(x, y).item() - eager) < 1e-12
    ge = jn.grad(f)(x, y).numpy()
    gj = jn.jit(jn.grad(f))
    for _ in range(3):
        np.testing.assert_allclose(gj(x, y).numpy(), ge, atol=1e-12)
    assert (ge[[1, 4]] == 0).all()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_cross_entropy_mean_and_sum_are_one_fused_row_with_exact_gradients(reduction):
    """The mean (sum) over non-ignored integer labels is one row (XENT_INT_REDUCED) forward and one backward:
    gradients and second order by central differences with ignored labels and non-contiguous logits; every
    label ignored gives 0, a mean over no rows NaN; the traced step holds no count, scale or reduce node."""
    rng = np.random.default_rng(4)
    xf = rng.normal(size=(4, 7)) * 2
    x = T64(xf)[:, ::2]                                  # non-contiguous (4, 4) logits
    y = np.array([3, -1, 0, 2])
    rows = (np_lse(xf[:, ::2]) - xf[:, ::2][np.arange(4), np.maximum(y, 0)])[y >= 0]
    ref = rows.mean() if reduction == "mean" else rows.sum()
    np.testing.assert_allclose(nn.cross_entropy(x, y, reduction=reduction).item(), ref, rtol=1e-12)
    assert gradcheck(lambda x: nn.cross_entropy(x, y, reduction=reduction), x)
    assert gradcheck(lambda x: jn.grad(lambda x: nn.cross_entropy(x, y, reduction=reduction) * 3.0)(x) ** 2, x,
                     atol=1e-4)
    assert gradcheck(lambda x, s: jn.sum(jn.apply(F.XENT_INT_REDUCED_GRAD, x, jn.tensor(y), s,
                                                  mean=reduction == "mean") ** 2), x, T64(np.array(1.5)), atol=1e-4)
    assert nn.cross_entropy(x, np.full(4, -1), reduction=reduction).item() == 0.0
    empty = nn.cross_entropy(T64(np.zeros((0, 3))), np.zeros(0, np.int64), reduction=reduction).item()
    assert np.isnan(empty) if reduction == "mean" else empty == 0.0
    jf = jn.jit(lambda x: nn.cross_entropy(x, y, reduction=reduction))
    for _ in range(3):                                  # trace, plan, native driver
        np.testing.assert_allclose(jf(x).item(), ref, rtol=1e-12)
    (comp,) = jf._cache.values()
    assert any("cross_entropy_int_reduced" in n for n in comp.plan.step_names) or any(
        "nn_xent_int_reduced" in s for s in comp.plan.sources), comp.plan.step_names
    assert not any(n.startswith("reduce") for n in comp.plan.step_names), comp.plan.step_names
